"""The guides (FINETUNE_GUIDE.md, its Chinese version) and README.md cannot drift from the code: their command
lines parse with the scripts' own parsers (and validate where no file is read), both guides hold the same command
lines and structure, the presets table and the resume lists are Config's, and every accuracy figure is measured."""

import contextlib
import functools
import io
import itertools
import re
import shlex
import subprocess

import pytest
from conftest import REPO

import finetune_gpu
import test_model
from fashion_ft.config import PRESETS, RESUME_RULES, flag_of
from fashion_ft.errors import UsageError, UserError

GUIDES = {"en": REPO / "FINETUNE_GUIDE.md", "zh": REPO / "FINETUNE_GUIDE.zh-CN.md"}
README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
DECIMAL_PERCENT = re.compile(r"(?<!>= )(?<![\d.])\d+\.\d+%")  # ">= 94.0%" is a target, not a result
SCRIPTS = ("finetune_gpu.py", "test_model.py")
PARSERS = {"finetune_gpu.py": finetune_gpu.get_args_parser(), "test_model.py": test_model.get_args_parser()}
for _parser in PARSERS.values():  # a flag the guides abbreviate breaks when a new flag makes it ambiguous
    _parser.allow_abbrev = False


def markdown_lines(text: str) -> tuple[list[str], list[str]]:
    """(the lines outside fenced code blocks, those inside them with backslash-continued lines joined)."""
    prose, code, inside, pending = [], [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            inside, pending = not inside, ""
        elif not inside:
            prose.append(raw)
        elif (line := pending + raw.strip()).endswith("\\"):
            pending = line[:-1].rstrip() + " "
        else:
            pending = ""
            code.append(line[2:] if line.startswith("$ ") else line)
    return prose, code


def guide_commands(text: str) -> list[tuple[str, str, tuple | None]]:
    """(command as written without comments, script, its arguments) for every command line that must keep
    working (arguments None: a torchrun line that runs no finetune_gpu.py)."""
    found = []
    for line in markdown_lines(text)[1]:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:  # unbalanced quotes: a broken command line
            assert line.split()[:1] not in (["python"], ["python3"], ["torchrun"], ["bash"]), f"{line!r}: {exc}"
            continue
        tokens = list(itertools.dropwhile(ENV_ASSIGNMENT.match, tokens))  # FASHION_MNIST_DIR=... python ...
        if tokens[:1] in (["python"], ["python3"]) and tokens[1:2] and tokens[1] in SCRIPTS:
            found.append((" ".join(tokens), tokens[1], tuple(tokens[2:])))
        elif tokens[:1] == ["torchrun"]:
            script = [i for i, t in enumerate(tokens) if t.endswith("finetune_gpu.py")]
            found.append((" ".join(tokens), "torchrun", tuple(tokens[script[0] + 1:]) if script else None))
        elif tokens[:2] == ["bash", "QUICKSTART.sh"]:
            found.append((" ".join(tokens), "QUICKSTART.sh", tuple(tokens[2:])))
    return found


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.lstrip().startswith("|")]


def parses(script: str, argv: list[str]) -> None:
    """argv parses with the script's parser (--help exits 0); where building finetune_gpu.py's config reads
    no file (--resume reads last.pt, which only a run makes), the values also pass validation."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            PARSERS[script].parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 0, f"{script} rejects {argv}: {err.getvalue().strip()}"
            return
    if script == "finetune_gpu.py" and not any(a == "--resume" or a.startswith("--resume=") for a in argv):
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
    flags = {t for line in shown.stdout.splitlines()  # after its '--' the flags are finetune_gpu.py's
             for t in line.split("#")[0].split(" -- ")[0].split() if t.startswith("-")}
    return frozenset(flags | {"-h", "--help"}), " -- " in shown.stdout


def check_command(line: str, kind: str, argv: tuple | None) -> None:
    assert argv is not None, f"{line}: torchrun runs finetune_gpu.py only"
    argv = list(argv)
    if kind == "QUICKSTART.sh":
        own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, None)
        listed, passes_on = quickstart_help()
        assert set(own) <= listed, f"{line}: QUICKSTART.sh --help does not list {sorted(set(own) - listed)}"
        if rest is None:
            return
        assert passes_on, f"{line}: QUICKSTART.sh --help does not say that flags after -- are passed on"
        argv = rest
    parses("test_model.py" if kind == "test_model.py" else "finetune_gpu.py", argv)


TEXTS = {lang: path.read_text(encoding="utf-8") for lang, path in GUIDES.items()}
COMMANDS = {lang: guide_commands(text) for lang, text in TEXTS.items()}
EVERY_COMMAND = sorted({command for path in [*GUIDES.values(), README]
                        for command in guide_commands(path.read_text(encoding="utf-8"))})


@pytest.mark.parametrize("kind, argv, refusal", [
    ("finetune_gpu.py", ["--learning-rate", "0.001"], "rejects"), ("finetune_gpu.py", ["--epoch", "1"], "rejects"),
    ("test_model.py", ["--model", "a.pt"], "rejects"),
    ("torchrun", ["--lr", "0"], "--lr"),  # parses, but validation refuses it
    ("QUICKSTART.sh", ["--no-such-flag"], "does not list"),
])
def test_the_command_check_fails_a_bad_command(kind, argv, refusal):
    """The check of every command below would pass anything if it did not fail these."""
    with pytest.raises(AssertionError, match=refusal):
        check_command("", kind, tuple(argv))


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda c: c[0][:90])
def test_every_command_of_the_guides_and_readme_parses(command):
    check_command(*command)


@pytest.mark.parametrize("lang, other", [("en", "FINETUNE_GUIDE.zh-CN.md"), ("zh", "FINETUNE_GUIDE.md")])
def test_each_guide_links_the_other_and_shows_every_kind_of_command_and_help(lang, other):
    assert f"]({other})" in "\n".join(TEXTS[lang].splitlines()[:5]), f"{lang}: no link to {other} at its top"
    assert {kind for _, kind, _ in COMMANDS[lang]} == {*SCRIPTS, "torchrun", "QUICKSTART.sh"}
    assert {f"python {s} --help" for s in SCRIPTS} <= {c for c, _, _ in COMMANDS[lang]}, "the flag reference is --help"


def test_both_guides_hold_the_same_command_lines_and_structure():
    en, zh = ([c for c, _, _ in COMMANDS[lang]] for lang in GUIDES)
    assert en == zh, f"command lines in one guide only: {set(en) ^ set(zh)}, or in another order or number"
    shape = {lang: ([len(m.group(1)) for line in markdown_lines(text)[0] if (m := re.match(r"(#{1,6}) ", line))],
                    text.count("```"), len(table_rows(text))) for lang, text in TEXTS.items()}
    assert shape["en"] == shape["zh"], "heading levels, fenced code blocks or table rows differ"


@pytest.mark.parametrize("lang", GUIDES)
def test_presets_table_matches_the_code(lang):
    rows = {row[0]: row[1] for row in table_rows(TEXTS[lang]) if len(row) > 1}
    for name, values in PRESETS.items():
        flags = " ".join(flag_of(k) if v is True else f"{flag_of(k)} {' '.join(v) if isinstance(v, list) else v}"
                         for k, v in values.items())
        assert f"`{flags}`" in rows.get(f"`{name}`", ""), f"{lang}: preset {name} is `{flags}` in the code"


@pytest.mark.parametrize("path", [*GUIDES.values(), README], ids=lambda p: p.name)
def test_the_results_table_lives_in_one_place(path):
    """bench/results/results.md holds the measured table; the others link to it and copy none of its rows (copies
    drift)."""
    text = path.read_text(encoding="utf-8")
    assert "](bench/results/results.md)" in text, f"{path.name}: no link to bench/results/results.md"
    measured = [r for r in table_rows((RESULTS / "results.md").read_text()) if r[0] not in ("plan", "---")]
    copied = [r for r in table_rows(text) if r in measured]
    assert measured and not copied, f"{path.name}: rows copied from bench/results/results.md: {copied}"


# Everything a figure may be quoted from: the model cards, the results tables, their READMEs and the raw logs
MEASURED = ("results.md", "logs/*.log", "before-warmup/results.md", "before-warmup/logs/*.log",
            "resnet-candidates/README.md", "resnet-candidates/logs/*.log", "own-model/README.md",
            "own-model/logs/*.log", "distill/README.md", "distill/logs/*.log")


@pytest.mark.parametrize("path, also_measured", [(GUIDES["en"], ()), (GUIDES["zh"], ()),
                                                 (RESULTS / "README.md", ("narrow-cnn3/results.md",))],
                         ids=["en", "zh", "the diary of what was tried"])
def test_no_accuracy_figure_is_invented(path, also_measured):
    """Every accuracy figure of the guides and of the diary of what was tried is quoted from a measurement."""
    files = [*REPO.glob("model/*.md"), *(f for pattern in MEASURED + also_measured for f in RESULTS.glob(pattern))]
    source = "\n".join(f.read_text(encoding="utf-8") for f in files)
    figures = set(DECIMAL_PERCENT.findall(path.read_text(encoding="utf-8")))
    unknown = sorted(f for f in figures if f not in source)
    assert figures and not unknown, f"{path.name}: figures measured nowhere: {unknown}"


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
