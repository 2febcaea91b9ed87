"""The user guides (FINETUNE_GUIDE.md and its Chinese version) cannot drift from the code.

Every command in their code blocks parses (and, where it does not read a file, validates) with the real
parsers; both guides hold the same commands, document every flag with the default the code has, describe
the presets as the code defines them, link each other and keep the place of the measured table. Fast: no
training, nothing is loaded but the parsers.
"""

import functools
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

import finetune_gpu
import test_model
from fashion_ft.config import PRESETS
from fashion_ft.errors import UsageError

GUIDE_EN = REPO / "FINETUNE_GUIDE.md"
GUIDE_ZH = REPO / "FINETUNE_GUIDE.zh-CN.md"
GUIDES = {"en": GUIDE_EN, "zh": GUIDE_ZH}
MARKER = "<!-- results-table -->"
RESULTS_TABLE_HEADER = "| plan | test acc |"  # the header bench/results.py writes
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
DECIMAL_PERCENT = re.compile(r"\d+\.\d+%")


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
    """(which script, its arguments) for the command lines the guides must keep working, else None
    (arguments None: a torchrun line that runs no finetune_gpu.py)."""
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):  # FASHION_MNIST_DIR=... python test_model.py
        tokens = tokens[1:]
    if len(tokens) >= 2 and tokens[0] in ("python", "python3") and tokens[1] in ("finetune_gpu.py", "test_model.py"):
        return tokens[1], tokens[2:]
    if tokens and tokens[0] == "torchrun":
        scripts = [i for i, t in enumerate(tokens) if t.endswith("finetune_gpu.py")]
        return "torchrun", tokens[scripts[0] + 1:] if scripts else None
    if tokens[:2] == ["bash", "QUICKSTART.sh"]:
        return "QUICKSTART.sh", tokens[2:]
    return None


def guide_commands(text: str) -> list[tuple[str, str, tuple | None]]:
    """(command as written without comments, script, arguments) for every command line of a guide."""
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


def section(text: str, title: str, level: int) -> str:
    """The text under the heading `title` (exact) of `level`, up to the next heading of that level or above."""
    lines = text.splitlines()
    marks = headings(text)
    for i, (lvl, name, start) in enumerate(marks):
        if lvl == level and name == title:
            end = next((n for lv, _, n in marks[i + 1:] if lv <= level), len(lines))
            return "\n".join(lines[start + 1:end])
    raise AssertionError(f"no heading {'#' * level} {title}")


def subsection_by_group(text: str, group_title: str) -> str:
    """The '#### <group title>' part (a translation may follow after ' — ') of a script's flag reference."""
    marks = headings(text)
    lines = text.splitlines()
    for i, (lvl, name, start) in enumerate(marks):
        if lvl == 4 and name.split(" — ")[0] == group_title:
            end = next((n for lv, _, n in marks[i + 1:] if lv <= 4), len(lines))
            return "\n".join(lines[start + 1:end])
    raise AssertionError(f"no heading '#### {group_title}' for the --help group of that name")


def mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.lstrip().startswith("|")]


# ---------------------------------------------------------------- the parsers

FINETUNE_PARSER = finetune_gpu.get_args_parser()
TEST_MODEL_PARSER = test_model.get_args_parser()
SCRIPT_PARSERS = {"finetune_gpu.py": FINETUNE_PARSER, "test_model.py": TEST_MODEL_PARSER}


def documented_actions(parser):
    return [a for a in parser._actions if a.option_strings and "-h" not in a.option_strings]


def option_strings(parser) -> list[str]:
    return [opt for action in documented_actions(parser) for opt in action.option_strings]


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


def parse_finetune(argv: list[str]) -> None:
    """Flags parse and validate; with --resume (build_config would read the file) they only parse."""
    try:
        if any(a == "--resume" or a.startswith("--resume=") for a in argv):
            FINETUNE_PARSER.parse_args(argv)
        else:
            finetune_gpu.build_config(argv)
    except SystemExit as exc:  # argparse: an unknown flag or a bad type/choice
        raise AssertionError(f"finetune_gpu.py rejects {argv} (exit {exc.code})") from None
    except UsageError as exc:  # validate(): a value out of range or flags that do not go together
        raise AssertionError(f"finetune_gpu.py rejects {argv}: {exc}") from None


TEXTS = {name: read(path) for name, path in GUIDES.items()}
COMMANDS = {name: guide_commands(text) for name, text in TEXTS.items()}
ALL_COMMANDS = sorted({c for cmds in COMMANDS.values() for c in cmds})


# ---------------------------------------------------------------- the tests

def test_both_guides_exist_and_hold_commands():
    for name, path in GUIDES.items():
        assert path.is_file(), f"{path.name} is missing"
        kinds = {kind for _, kind, _ in COMMANDS[name]}
        assert kinds == {"finetune_gpu.py", "test_model.py", "torchrun", "QUICKSTART.sh"}, (path.name, kinds)
        assert len(COMMANDS[name]) >= 20, f"{path.name}: only {len(COMMANDS[name])} commands found"


def test_both_guides_hold_the_same_commands():
    en = [c for c, _, _ in COMMANDS["en"]]
    zh = [c for c, _, _ in COMMANDS["zh"]]
    assert set(en) - set(zh) == set(), "commands only in FINETUNE_GUIDE.md"
    assert set(zh) - set(en) == set(), "commands only in FINETUNE_GUIDE.zh-CN.md"
    assert en == zh, "the commands appear in a different order or number"


def test_both_guides_have_the_same_structure():
    en, zh = headings(TEXTS["en"]), headings(TEXTS["zh"])
    assert [lvl for lvl, _, _ in en] == [lvl for lvl, _, _ in zh], "headings differ in number or level"
    blocks = {name: text.count("```") for name, text in TEXTS.items()}
    assert blocks["en"] == blocks["zh"], f"fenced code blocks differ: {blocks}"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c[0][:90])
def test_every_guide_command_parses(command):
    line, kind, argv = command
    assert argv is not None, f"{line}: torchrun runs finetune_gpu.py only"
    argv = list(argv)
    if kind in ("finetune_gpu.py", "torchrun"):
        parse_finetune(argv)
    elif kind == "test_model.py":
        try:
            TEST_MODEL_PARSER.parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"test_model.py rejects {argv} (exit {exc.code})") from None
    else:
        own_flags, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
        listed, passes_on = quickstart_help()
        unknown = set(own_flags) - listed
        assert not unknown, f"{line}: QUICKSTART.sh --help does not list {sorted(unknown)}"
        if "--" in argv:
            assert passes_on, f"{line}: QUICKSTART.sh --help does not say that flags after -- are passed on"
            parse_finetune(rest)


@pytest.mark.parametrize("lang", GUIDES)
def test_every_flag_is_documented(lang):
    text = TEXTS[lang]
    for script, parser in SCRIPT_PARSERS.items():
        missing = [opt for opt in option_strings(parser) if not mentions(text, opt)]
        assert not missing, f"{GUIDES[lang].name} does not mention these {script} flags: {missing}"


@pytest.mark.parametrize("lang", GUIDES)
def test_flag_reference_is_grouped_as_in_help_with_the_code_defaults(lang):
    """Under '### `<script>`' every flag has a table row whose default column shows the parser's default."""
    text = TEXTS[lang]
    for script, parser in SCRIPT_PARSERS.items():
        reference = section(text, f"`{script}`", 3)
        for group in parser._action_groups:
            actions = [a for a in group._group_actions if a in documented_actions(parser)]
            if not actions:
                continue
            part = reference if group.title in ("options", "optional arguments") else subsection_by_group(
                reference, group.title)
            rows = table_rows(part)
            for action in actions:
                row = next((r for r in rows if mentions(r[0], action.option_strings[0])), None)
                assert row is not None, f"{GUIDES[lang].name}: {script} {action.option_strings[0]} has no row " \
                                        f"under its --help group '{group.title}'"
                default = action.default
                if default is None or isinstance(default, bool):
                    continue
                shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
                assert f"`{shown}`" in row[1], (f"{GUIDES[lang].name}: {script} {action.option_strings[0]} "
                                                f"default is {shown!r} in the code, the guide says {row[1]!r}")


@pytest.mark.parametrize("lang", GUIDES)
def test_presets_table_matches_the_code(lang):
    rows = table_rows(TEXTS[lang])
    for name, values in PRESETS.items():
        flags = " ".join(f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}"
                         for k, v in values.items())
        row = next((r for r in rows if r[0] == f"`{name}`"), None)
        assert row is not None, f"{GUIDES[lang].name}: no table row for the preset {name}"
        assert f"`{flags}`" in row[1], f"{GUIDES[lang].name}: preset {name} is `{flags}` in the code, not {row[1]}"


def test_guides_link_each_other():
    assert "](FINETUNE_GUIDE.zh-CN.md)" in "\n".join(TEXTS["en"].splitlines()[:5]), \
        "FINETUNE_GUIDE.md must link the Chinese version at its top"
    assert "](FINETUNE_GUIDE.md)" in "\n".join(TEXTS["zh"].splitlines()[:5]), \
        "FINETUNE_GUIDE.zh-CN.md must link the English version at its top"


def measured_section(text: str) -> str:
    """The level-2 section that holds the results marker or the table that replaced it."""
    lines = text.splitlines()
    marks = [(lvl, n) for lvl, _, n in headings(text)]
    for i, (lvl, start) in enumerate(marks):
        if lvl != 2:
            continue
        end = next((n for lv, n in marks[i + 1:] if lv <= 2), len(lines))
        body = lines[start + 1:end]
        if MARKER in (b.strip() for b in body) or any(b.startswith(RESULTS_TABLE_HEADER) for b in body):
            return "\n".join(body)
    return ""


@pytest.mark.parametrize("lang", GUIDES)
def test_measured_results_have_their_place(lang):
    text = TEXTS[lang]
    assert measured_section(text), f"{GUIDES[lang].name}: neither {MARKER} nor a results table"
    assert "bench/results.py" in measured_section(text) and "bench/results/" in measured_section(text)
    if lang == "en":
        assert measured_section(text) == section(text, "Measured results", 2)


@pytest.mark.parametrize("lang", GUIDES)
def test_no_accuracy_figure_outside_the_measured_table_is_invented(lang):
    """Percentages with decimals outside the measured section must come from the base model's card."""
    text = TEXTS[lang]
    outside = text.replace(measured_section(text), "")
    card = read(REPO / "model" / "README.md")
    unknown = sorted({p for p in DECIMAL_PERCENT.findall(outside) if p not in card})
    assert not unknown, f"{GUIDES[lang].name}: figures not measured anywhere: {unknown}"
