"""docs/contract.md keeps up with the code: settings, metrics, commands, options, exit codes.

Names are read from the source files as text (regular expressions, no imports), so the test
keeps working while modules move between common/, ops/ and supervisor/. A failure means a
name was added, renamed or removed in the code without the same change to the contract (or
the other way round): fix docs/contract.md in the same commit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
ENTRY = DOCS / "contract.md"
README = ROOT / "README.md"
SOURCE_DIRS = ("common", "ops", "supervisor")

# A call whose first argument is an upper-case string literal: reader.url("DATABASE_URL", …),
# env.get("X"), os.getenv("X"); and os.environ["X"].
ENV_READ = re.compile(r"""\b\w+\(\s*["']([A-Z][A-Z0-9_]*)["']""")
ENV_INDEX = re.compile(r"""\benviron\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\]""")
# A URL setting, which may also be read from the file its `<name>_FILE` names: reader.url("REDIS_URL", …).
ENV_URL = re.compile(r"""\.url\(\s*["']([A-Z][A-Z0-9_]*)["']""")
METRIC_NAME = re.compile(r"""["'](processor_[a-z0-9_]+)["']""")
METRIC_CALL = re.compile(r"""\b(Counter|Gauge|Histogram|Summary|Info)MetricFamily\(\s*["'](processor_[a-z0-9_]+)["']""")
# A family whose name is a variable, `CounterMetricFamily(name, …)`: its names are the
# literals of the `for` loop that opens last before the call.
METRIC_VARIABLE_CALL = re.compile(r"""\b(Counter|Gauge|Histogram|Summary|Info)MetricFamily\(\s*[a-z_]\w*\s*,""")
LOOP_START = re.compile(r"^[ \t]*for\s", re.M)
SUBCOMMAND = re.compile(r"""\badd_parser\(\s*["']([a-z][a-z0-9-]*)["']""")
OPTION_CALL = re.compile(r"""\badd_argument\(((?:\s*["']-[^"']*["']\s*,)+)""")
OPTION = re.compile(r"""["'](-[^"']+)["']""")
EXIT_CODE = re.compile(r"^\s+([A-Z][A-Z_]*)\s*=\s*(\d+)\b", re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


# --- reading -------------------------------------------------------------------------------


def source_files(predicate: Callable[[Path, str], bool]) -> dict[Path, str]:
    """Python files under SOURCE_DIRS whose path and text satisfy `predicate`."""
    found = {}
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if predicate(path, text):
                found[path] = text
    return found


def contract() -> str:
    """The entry page and every page under docs/ it links to (transitively)."""
    assert ENTRY.exists(), f"{ENTRY.relative_to(ROOT)} is missing"
    seen: dict[Path, str] = {}
    todo = [ENTRY]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen[page] = page.read_text(encoding="utf-8")
        for target in MD_LINK.findall(seen[page]):
            linked = (page.parent / target.split("#")[0]).resolve()
            if linked.suffix == ".md" and linked.is_relative_to(DOCS.resolve()) and linked.exists():
                todo.append(linked)
    return "\n".join(seen.values())


def section(text: str, heading: str) -> str:
    """The text under the first heading that starts with `heading`, up to the next heading of its level or above."""
    match = re.search(rf"^(#+) {re.escape(heading)}.*$", text, re.M)
    assert match, f"docs/contract.md has no section {heading!r}"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def table_rows(text: str) -> list[list[str]]:
    """Cells of every Markdown table row in `text`, header and separator rows included."""
    return [
        [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        for line in text.splitlines()
        if line.lstrip().startswith("|")
    ]


def first_cell_names(text: str) -> dict[str, list[str]]:
    """Backticked name in the first cell of each table row → the row's cells."""
    rows = {}
    for cells in table_rows(text):
        match = re.fullmatch(r"`([^`]+)`", cells[0]) if cells else None
        if match:
            rows[match.group(1)] = cells
    return rows


def whole_word(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


# --- names in the code ---------------------------------------------------------------------


def settings_read() -> set[str]:
    files = source_files(lambda path, text: path.name == "config.py" or "def from_env" in text)
    assert files, f"no config.py (or from_env) under {SOURCE_DIRS}: did the configuration move? update this test"
    names = set()
    for text in files.values():
        names |= set(ENV_READ.findall(text)) | set(ENV_INDEX.findall(text)) | {f"{name}_FILE" for name in ENV_URL.findall(text)}
    assert {"REDIS_URL", "DATABASE_URL", "STREAM_KEY"} <= names, f"the settings were not found in {list(files)}"
    return names


def metrics_defined() -> dict[str, str]:
    """Family name → kind ('counter', 'gauge', 'histogram', or '' when the code does not tell)."""
    files = source_files(lambda _path, text: "MetricFamily" in text)
    assert files, f"no *MetricFamily under {SOURCE_DIRS}: did supervisor/http.py move? update this test"
    kinds: dict[str, str] = {}
    for text in files.values():
        for name in METRIC_NAME.findall(text):
            kinds.setdefault(name, "")
        for kind, name in METRIC_CALL.findall(text):
            kinds[name] = kind.lower()
        for call in METRIC_VARIABLE_CALL.finditer(text):
            loops = [loop.start() for loop in LOOP_START.finditer(text, 0, call.start())]
            if loops:
                for name in METRIC_NAME.findall(text, loops[-1], call.start()):
                    kinds[name] = call.group(1).lower()
    assert "processor_batch_seconds" in kinds, f"the metric names were not found in {list(files)}"
    return kinds


def exposed_name(name: str, kind: str) -> str:
    """The name Prometheus shows: prometheus_client adds `_total` to counters."""
    return name if kind != "counter" or name.endswith("_total") else f"{name}_total"


def cli_sources() -> dict[Path, str]:
    files = source_files(lambda _path, text: "add_parser(" in text)
    assert files, f"no argparse sub-commands under {SOURCE_DIRS}: did the CLI move? update this test"
    return files


def subcommands() -> set[str]:
    names = set()
    for text in cli_sources().values():
        names |= set(SUBCOMMAND.findall(text))
    assert {"run", "migrate"} <= names, "the sub-commands were not found"
    return names


def options() -> set[str]:
    found = set()
    for text in cli_sources().values():
        for strings in OPTION_CALL.findall(text):
            found |= set(OPTION.findall(strings))
    assert "--json" in found, "the command-line options were not found"
    return found


def exit_codes() -> dict[str, int]:
    files = source_files(lambda _path, text: "class ExitCode" in text)
    assert files, f"no `class ExitCode` under {SOURCE_DIRS}: did common/errors.py move? update this test"
    codes = {}
    for text in files.values():
        body = re.search(r"^class ExitCode\b.*?:\n(.*?)(?=^\S)", text + "\nend", re.M | re.S)
        assert body
        codes |= {name: int(value) for name, value in EXIT_CODE.findall(body.group(1))}
    assert codes.get("CONFIG") == 78, "the exit codes were not found"
    return codes


# --- the tests -----------------------------------------------------------------------------


def test_every_setting_is_documented_and_every_documented_setting_is_read() -> None:
    read = settings_read()
    table = first_cell_names(section(contract(), "Configuration"))
    documented = {name for name in table if re.fullmatch(r"[A-Z][A-Z0-9_]*", name)}
    missing = sorted(read - documented)
    assert not missing, f"read by the configuration but not in the table of docs/contract.md, Configuration: {missing}"
    extra = sorted(documented - read)
    assert not extra, f"in the Configuration table of docs/contract.md but not read by the code: {extra}"


def test_every_metric_is_documented_with_its_exposed_name_and_type() -> None:
    defined = metrics_defined()
    table = first_cell_names(section(contract(), "`GET /metrics`"))
    problems = []
    for name, kind in sorted(defined.items()):
        shown = exposed_name(name, kind)
        row = table.get(shown)
        if row is None and not kind:  # kind unknown: either form will do
            row = table.get(f"{name}_total")
        if row is None:
            problems.append(f"{shown} is exported but not in the metrics table")
        elif kind and (len(row) < 2 or row[1] != kind):
            problems.append(f"{shown} is a {kind}, the table says {row[1:2]}")
    known = {exposed_name(n, k) for n, k in defined.items()} | {f"{n}_total" for n, k in defined.items() if not k}
    problems += [f"{name} is in the metrics table but not exported" for name in sorted(set(table) - known)]
    assert not problems, "docs/contract.md, GET /metrics:\n" + "\n".join(problems)


def test_every_subcommand_appears_in_a_processor_command_line() -> None:
    spans = [span for span in CODE_SPAN.findall(contract()) if span.startswith("processor ")]
    missing = sorted(name for name in subcommands() if not any(whole_word(name, span) for span in spans))
    assert not missing, f"sub-commands with no `processor … <name>` in docs/contract.md: {missing}"


def test_every_option_is_documented() -> None:
    text = contract()
    missing = sorted(option for option in options() if not whole_word(option, text))
    assert not missing, f"command-line options not in docs/contract.md: {missing}"


def test_every_exit_code_is_in_the_table() -> None:
    codes = exit_codes()
    rows = table_rows(section(contract(), "Exit codes"))
    documented = {cells[0]: cells[1].strip("`") for cells in rows if len(cells) > 1 and cells[0].isdigit()}
    expected = {str(value): name for name, value in codes.items()}
    assert documented == expected, f"exit codes in docs/contract.md {documented} != common/errors.py {expected}"


def test_contract_says_it_is_the_contract() -> None:
    text = ENTRY.read_text(encoding="utf-8")
    assert "same commit" in text and "Not yet implemented (planned)" in text


@pytest.mark.parametrize("page", [README, ENTRY], ids=lambda p: p.name)
def test_links_stay_inside_the_repository(page: Path) -> None:
    """The README points at docs/contract.md, and no link leaves the repository or points nowhere."""
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in MD_LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT.resolve()) or not path.exists():
            broken.append(target)
    assert not broken, f"{page.name} links outside the repository or to nothing: {broken}"
    if page == README:
        assert "docs/contract.md" in MD_LINK.findall(text) or any(
            t.startswith("docs/contract.md") for t in MD_LINK.findall(text)
        ), "README.md does not link docs/contract.md"
