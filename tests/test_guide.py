"""The user guides (FINETUNE_GUIDE.md and its Chinese version) cannot drift from the code.

Every `python finetune_gpu.py ...` / `python test_model.py ...` command line in their code blocks, and in
README.md, parses with the scripts' own parsers (`get_args_parser()`), so no guide can show a flag that does
not exist; where no file has to be read, the values are validated too. Both guides hold the same command lines
and the same structure, the presets table and the results table match the code and the measurement, and
every accuracy figure comes from a measurement. The flags themselves are documented by `--help`. Fast: no
training, nothing is loaded but the parsers.
"""

import contextlib
import functools
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

import finetune_gpu
import test_model
from fashion_ft.config import PRESETS, RESUME_RULES, flag_of
from fashion_ft.errors import UsageError, UserError

GUIDE_EN = REPO / "FINETUNE_GUIDE.md"
GUIDE_ZH = REPO / "FINETUNE_GUIDE.zh-CN.md"
GUIDES = {"en": GUIDE_EN, "zh": GUIDE_ZH}
README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
DECIMAL_PERCENT = re.compile(r"(?<!>= )(?<![\d.])\d+\.\d+%")  # ">= 94.0%" is a target, not a result
SCRIPTS = ("finetune_gpu.py", "test_model.py")


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


# ---------------------------------------------------------------- reading the guides

def code_block_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks, backslash-continued lines joined."""
    lines, inside, pending = [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        lines.append(line[2:] if line.startswith("$ ") else line)
    return lines


def command_kind(tokens: list[str]) -> tuple[str, list[str] | None] | None:
    """(which script, its arguments) for the command lines that must keep working, else None
    (arguments None: a torchrun line that runs no finetune_gpu.py)."""
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):  # FASHION_MNIST_DIR=... python test_model.py
        tokens = tokens[1:]
    if len(tokens) >= 2 and tokens[0] in ("python", "python3") and tokens[1] in SCRIPTS:
        return tokens[1], tokens[2:]
    if tokens and tokens[0] == "torchrun":
        scripts = [i for i, t in enumerate(tokens) if t.endswith("finetune_gpu.py")]
        return "torchrun", tokens[scripts[0] + 1:] if scripts else None
    if tokens[:2] == ["bash", "QUICKSTART.sh"]:
        return "QUICKSTART.sh", tokens[2:]
    return None


def guide_commands(text: str) -> list[tuple[str, str, tuple | None]]:
    """(command as written without comments, script, arguments) for every command line of a document."""
    found = []
    for line in code_block_lines(text):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:  # unbalanced quotes: a broken command line
            if line.split()[:1] in (["python"], ["python3"], ["torchrun"], ["bash"]):
                raise AssertionError(f"cannot split {line!r}: {exc}") from None
            continue
        kind = command_kind(tokens)
        if kind is not None:
            script, argv = kind
            found.append((" ".join(tokens), script, None if argv is None else tuple(argv)))
    return found


def headings(text: str) -> list[tuple[int, str, int]]:
    """(level, title, line number) of every Markdown heading outside code blocks."""
    found, inside = [], False
    for number, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside and (m := re.match(r"^(#{1,6}) +(.*?)\s*$", line)):
            found.append((len(m.group(1)), m.group(2), number))
    return found


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.lstrip().startswith("|")]


# ---------------------------------------------------------------- the parsers

FINETUNE_PARSER = finetune_gpu.get_args_parser()
TEST_MODEL_PARSER = test_model.get_args_parser()


def parse_quietly(parser, argv: list[str]) -> None:
    """parse_args, with --help allowed (it exits 0); any other exit is a flag or value the parser rejects.
    Flags must be written in full: argparse would accept an abbreviation that a new flag can make ambiguous."""
    abbreviated = [a for a in argv if a.startswith("--") and a.split("=")[0] not in parser._option_string_actions]
    if abbreviated:
        raise AssertionError(f"{parser.prog} rejects {argv}: no flag named {abbreviated}")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code != 0:
                raise AssertionError(f"{parser.prog} rejects {argv}: {err.getvalue().strip()}") from None


def parse_finetune(argv: list[str]) -> None:
    """The flags parse; where building the config reads no file, the values also pass validation."""
    parse_quietly(FINETUNE_PARSER, argv)
    if {"-h", "--help"} & set(argv) or any(a == "--resume" or a.startswith("--resume=") for a in argv):
        return  # --help exits; --resume reads last.pt, which only a run makes
    try:
        finetune_gpu.build_config(argv)
    except UsageError as exc:  # validate(): a value out of range or flags that do not go together
        raise AssertionError(f"finetune_gpu.py rejects {argv}: {exc}") from None
    except UserError:  # a file the command expects from an earlier run: parsing is what is checked here
        pass


@functools.cache
def quickstart_help() -> tuple[frozenset, bool]:
    """The options QUICKSTART.sh --help lists, and whether it documents passing flags on after '--'."""
    shown = subprocess.run(["bash", str(REPO / "QUICKSTART.sh"), "--help"], capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0, shown.stderr
    flags = {"-h", "--help"}
    for line in shown.stdout.splitlines():
        own = line.split("#")[0].split(" -- ")[0].split()  # after its '--' the flags are finetune_gpu.py's
        flags |= {t for t in own if t.startswith("-")}
    return frozenset(flags), " -- " in shown.stdout


def check_command(command) -> None:
    line, kind, argv = command
    assert argv is not None, f"{line}: torchrun runs finetune_gpu.py only"
    argv = list(argv)
    if kind in ("finetune_gpu.py", "torchrun"):
        parse_finetune(argv)
    elif kind == "test_model.py":
        parse_quietly(TEST_MODEL_PARSER, argv)
    else:
        own_flags, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
        listed, passes_on = quickstart_help()
        unknown = set(own_flags) - listed
        assert not unknown, f"{line}: QUICKSTART.sh --help does not list {sorted(unknown)}"
        if "--" in argv:
            assert passes_on, f"{line}: QUICKSTART.sh --help does not say that flags after -- are passed on"
            parse_finetune(rest)


TEXTS = {name: read(path) for name, path in GUIDES.items()}
COMMANDS = {name: guide_commands(text) for name, text in TEXTS.items()}
GUIDE_COMMANDS = sorted({c for cmds in COMMANDS.values() for c in cmds})
README_COMMANDS = sorted(set(guide_commands(read(README))))


# ---------------------------------------------------------------- the tests

def test_parsers_reject_an_unknown_flag():
    """The command check below would pass anything if parsing did not fail on a flag that does not exist."""
    with pytest.raises(AssertionError, match="rejects"):
        parse_finetune(["--learning-rate", "0.001"])
    with pytest.raises(AssertionError, match="rejects"):
        parse_quietly(TEST_MODEL_PARSER, ["--model", "a.pt"])
    with pytest.raises(AssertionError, match="--lr"):
        parse_finetune(["--lr", "0"])  # parses, but validation refuses it


def test_both_guides_exist_and_hold_commands():
    for name, path in GUIDES.items():
        assert path.is_file(), f"{path.name} is missing"
        kinds = {kind for _, kind, _ in COMMANDS[name]}
        assert kinds == {"finetune_gpu.py", "test_model.py", "torchrun", "QUICKSTART.sh"}, (path.name, kinds)


def test_both_guides_hold_the_same_command_lines():
    en = [c for c, _, _ in COMMANDS["en"]]
    zh = [c for c, _, _ in COMMANDS["zh"]]
    assert set(en) - set(zh) == set(), "command lines only in FINETUNE_GUIDE.md"
    assert set(zh) - set(en) == set(), "command lines only in FINETUNE_GUIDE.zh-CN.md"
    assert en == zh, "the command lines appear in a different order or number"


def test_both_guides_have_the_same_structure():
    en, zh = headings(TEXTS["en"]), headings(TEXTS["zh"])
    assert [lvl for lvl, _, _ in en] == [lvl for lvl, _, _ in zh], "headings differ in number or level"
    blocks = {name: text.count("```") for name, text in TEXTS.items()}
    assert blocks["en"] == blocks["zh"], f"fenced code blocks differ: {blocks}"
    tables = {name: len(table_rows(text)) for name, text in TEXTS.items()}
    assert tables["en"] == tables["zh"], f"table rows differ: {tables}"


@pytest.mark.parametrize("command", GUIDE_COMMANDS, ids=lambda c: c[0][:90])
def test_every_guide_command_parses(command):
    check_command(command)


@pytest.mark.parametrize("command", README_COMMANDS, ids=lambda c: c[0][:90])
def test_every_readme_command_parses(command):
    check_command(command)


@pytest.mark.parametrize("lang", GUIDES)
def test_flags_are_documented_by_help(lang):
    """The guides point to --help for the flag reference instead of copying it."""
    shown = {c for c, _, _ in COMMANDS[lang]}
    for script in SCRIPTS:
        assert f"python {script} --help" in shown, f"{GUIDES[lang].name} does not show `python {script} --help`"


@pytest.mark.parametrize("lang", GUIDES)
def test_presets_table_matches_the_code(lang):
    rows = table_rows(TEXTS[lang])
    for name, values in PRESETS.items():
        flags = " ".join(f"--{k.replace('_', '-')}" if v is True else
                         f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in values.items())
        row = next((r for r in rows if r[0] == f"`{name}`"), None)
        assert row is not None, f"{GUIDES[lang].name}: no table row for the preset {name}"
        assert f"`{flags}`" in row[1], f"{GUIDES[lang].name}: preset {name} is `{flags}` in the code, not {row[1]}"


def test_guides_link_each_other():
    assert "](FINETUNE_GUIDE.zh-CN.md)" in "\n".join(TEXTS["en"].splitlines()[:5]), \
        "FINETUNE_GUIDE.md must link the Chinese version at its top"
    assert "](FINETUNE_GUIDE.md)" in "\n".join(TEXTS["zh"].splitlines()[:5]), \
        "FINETUNE_GUIDE.zh-CN.md must link the English version at its top"


@pytest.mark.parametrize("path", [GUIDE_EN, GUIDE_ZH, README], ids=lambda p: p.name)
def test_the_results_table_lives_in_one_place(path):
    """bench/results/results.md holds the measured table; the guides and the README link to it and copy none
    of its rows (copies drift)."""
    text = read(path)
    assert "](bench/results/results.md)" in text, f"{path.name}: no link to bench/results/results.md"
    measured = [r for r in table_rows(read(RESULTS / "results.md")) if r[0] not in ("plan", "---")]
    assert measured, "bench/results/results.md holds no table"
    copied = [r for r in table_rows(text) if r in measured]
    assert not copied, f"{path.name}: rows copied from bench/results/results.md: {copied}"


def measured_text() -> str:
    """Everything a figure may be quoted from: the model cards, the results table and the raw logs."""
    files = [*sorted((REPO / "model").glob("*.md")), RESULTS / "results.md", *sorted((RESULTS / "logs").glob("*.log")),
             RESULTS / "before-warmup" / "results.md", *sorted((RESULTS / "before-warmup" / "logs").glob("*.log")),
             RESULTS / "resnet-candidates" / "README.md", *sorted((RESULTS / "resnet-candidates" / "logs").glob("*.log")),
             RESULTS / "own-model" / "README.md", *sorted((RESULTS / "own-model" / "logs").glob("*.log")),
             RESULTS / "distill" / "README.md", *sorted((RESULTS / "distill" / "logs").glob("*.log"))]
    return "\n".join(read(f) for f in files)


@pytest.mark.parametrize("lang", GUIDES)
def test_no_accuracy_figure_is_invented(lang):
    """Every accuracy figure is quoted from a measurement."""
    text = TEXTS[lang]
    source = measured_text()
    unknown = sorted({p for p in DECIMAL_PERCENT.findall(text) if p not in source})
    assert not unknown, f"{GUIDES[lang].name}: figures measured nowhere: {unknown}"


def test_the_diary_of_what_was_tried_quotes_measured_figures():
    text = read(RESULTS / "README.md")
    assert "What was tried" in text
    source = measured_text() + read(RESULTS / "narrow-cnn3" / "results.md")
    unknown = sorted({p for p in DECIMAL_PERCENT.findall(text) if p not in source})
    assert not unknown, f"bench/results/README.md: figures measured nowhere: {unknown}"


RESUME_LISTS = {"en": (("Free to change:", "Other changes"), ("Never:", "(start a new round)")),
                "zh": (("可以随意改变：", "其他改动"), ("永远不能改变：", "（请开始新一轮）"))}


@pytest.mark.parametrize("lang", GUIDES)
def test_the_resume_lists_are_the_configs_rules(lang):
    """The guide's flags that may change on --resume, and those that never may, are Config's metadata."""
    text = " ".join(TEXTS[lang].split())

    def flags_between(start: str, end: str) -> set[str]:
        at = text.index(start)
        return set(re.findall(r"`(--[a-z-]+)`", text[at:text.index(end, at)]))

    free, never = (flags_between(*marks) for marks in RESUME_LISTS[lang])
    rule_of = {flag_of(name): rule for name, rule in RESUME_RULES.items()}
    assert free == {f for f, rule in rule_of.items() if rule in ("free", "permission")} - {"--resume"}
    assert never == {f for f, rule in rule_of.items() if rule == "fixed"}
