"""The documents stay in step with the code and with each other.

- The English operator documents (README.md, docs/configuration.md, operations.md,
  troubleshooting.md) name every setting, flag, summary key, exit code, day-2 command,
  alert and log line at WARNING or above that the code defines; the settings, summary,
  exit-code, day-2 and alert tables list exactly the code's, with its defaults.
- Each has a Japanese counterpart (README.ja.md, docs/ja/...) that names exactly the same
  ones, and the two link to each other.
- Every relative link of every document resolves, anchors included; no document refers
  to issues; README.md stays short; both READMEs give the same local run, which works as
  written. (The scale-out steps are run against the fake gcloud in test_deploy.py.)

A failure says what is missing where.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pymysql
import pytest

import main
from tests.conftest import DB_SETTINGS, OFFLINE_ENV, ROOT

# Each English operator document and its Japanese counterpart.
PAIRS = {
    "README.md": "README.ja.md",
    "docs/configuration.md": "docs/ja/configuration.md",
    "docs/operations.md": "docs/ja/operations.md",
    "docs/troubleshooting.md": "docs/ja/troubleshooting.md",
}
DOCUMENTS = sorted(
    {"README.md", "README.ja.md", "tests/README.md"}
    | {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")}
)


def read(name: str) -> str:
    return (ROOT / name).read_text()


# -- what the code defines --------------------------------------------------------------


def job_defaults() -> dict[str, str | None]:
    """Every variable Config.from_env reads, with its default as text (None: none)."""
    source = textwrap.dedent(inspect.getsource(main.Config.from_env))
    found: dict[str, str | None] = dict.fromkeys(re.findall(r'"([A-Z][A-Z0-9_]+)" in env', source))
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = node.args[0].value if isinstance(node.args[0], ast.Constant) else None
        func = node.func
        reader = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Z][A-Z0-9_]+", name):
            continue
        if reader in ("text", "integer", "number", "switch", "get"):
            default = node.args[1] if len(node.args) > 1 else None
            value = default.value if isinstance(default, ast.Constant) else None
            found[name] = None if value in (None, "") else str(value)
    return found


def job_variables() -> set[str]:
    return set(job_defaults())


def deploy_defaults() -> dict[str, str | None]:
    """deploy.env.example's settings, with deploy.sh's default where it gives a literal."""
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", read("deploy.env.example"), re.M)
    script = read("deploy.sh")
    found: dict[str, str | None] = {}
    for name in names:
        m = re.search(rf'^\s*{name}="\$\{{{name}:?-([^}}$]*)\}}"$', script, re.M)
        found[name] = m[1] if m and m[1] else None
    return found


def deploy_settings() -> set[str]:
    return set(deploy_defaults())


def deploy_flags() -> set[str]:
    """deploy.sh's flags and day-2 commands (the words of its `case` patterns)."""
    return set(re.findall(r"^\s*(--[a-z][a-z-]*)\)", read("deploy.sh"), re.M)) | {"--help"}


def day_two_commands() -> set[str]:
    [commands] = re.findall(r"^\s*((?:[a-z]+ \| )+[a-z]+)\)$", read("deploy.sh"), re.M)
    return {f"./deploy.sh {c}" for c in commands.split(" | ")}


def job_flags() -> set[str]:
    return set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', inspect.getsource(main.parse_args)))


def summary_keys() -> set[str]:
    return {f.name for cls in (main.RunSummary, main.CheckSummary) for f in dataclasses.fields(cls)}


def alerts() -> set[str]:
    """The alert policies' names, after the job's name."""
    [block] = re.findall(r"local -a names=\((.*?)\)", read("deploy.sh"), re.S)
    return set(re.findall(r'"\$\{JOB_NAME\}: ([^"]+)"', block))


LOG_CALLS = {"warning", "error", "critical", "exception"}
# The errors that end a run; UsageError's are the command line's own (configuration.md).
ERRORS = {
    cls.__name__
    for top in main.JobError.__subclasses__()
    for cls in (top, *top.__subclasses__())
    if cls.__name__ != "UsageError"
}


def log_messages() -> set[str]:
    """The fixed text of every log line at WARNING or above and every run-level error
    (what `summary.fail` and the JobError classes carry): its text up to the first
    value filled in, or, where that is too short to find, its longest fixed part."""
    tree = ast.parse(Path(main.__file__).read_text())
    constants = {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    messages: set[str] = set()
    for function in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))]:
        local: dict[str, list[ast.expr]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                local.setdefault(node.targets[0].id, []).append(node.value)
        for node in ast.walk(function):
            if not isinstance(node, ast.Call) or not node.args or not _reports(node.func):
                continue
            for text in _texts(node.args[0], {**{k: [v] for k, v in constants.items()}, **local}):
                parts = [p.strip(" :(,;.") for p in text.split("\0")]
                fixed = parts[0] if len(parts[0]) >= 12 else max(parts, key=len)
                if len(fixed) >= 12:
                    messages.add(fixed)
    return messages


def _reports(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        logged = isinstance(func.value, ast.Name) and func.value.id == "log"
        return (logged and func.attr in LOG_CALLS) or func.attr == "fail"
    return isinstance(func, ast.Name) and func.id in ERRORS


def _texts(node: ast.expr, names: dict[str, list[ast.expr]]) -> list[str]:
    """The text of a message argument, "\\0" where a value is filled in; a name, or an
    f-string starting with one, stands for each text assigned to it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [re.sub(r"%[a-z.0-9]*[sdgfr]", "\0", node.value)]
    if isinstance(node, ast.Name):
        return [t for value in names.get(node.id, []) for t in _texts(value, names)]
    if isinstance(node, ast.JoinedStr):
        values = node.values
        if values and isinstance(values[0], ast.FormattedValue):
            inner = values[0].value
            if isinstance(inner, ast.Name) and inner.id in names:
                return _texts(inner, names)
        text = "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in values)
        return [re.sub(r"%[a-z.0-9]*[sdgf]", "\0", text)]
    return []


# -- what a document names -------------------------------------------------------------


def named(text: str, words: set[str], how: str = "word") -> set[str]:
    """The words of `words` that `text` names: as whole words ("word"; "any case"), as
    code (`word`: "code"), or within code (a log line, quoted in part: "in code")."""
    if how in ("code", "in code"):
        spans = re.findall(r"`([^`\n]+)`", text)
        return {w for w in words if any(w == s or (how == "in code" and w in s) for s in spans)}
    pattern = r"(?<![\w-]){}(?![\w-])" if how == "word" else r"(?i)(?<![\w-]){}(?![\w-])"
    return {w for w in words if re.search(pattern.format(re.escape(w)), text)}


def exit_codes(text: str) -> set[str]:
    """Codes in the rows of exit-code tables: `| 0 |` at the start of a row."""
    return set(re.findall(r"^\| ([0-9]) \|", text, re.M))


def table(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table under the line `heading`, its header left out."""
    section = text.split(f"\n{heading}\n", 1)[1]
    rows = []
    for line in section[section.index("\n|") + 1 :].splitlines():
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return rows[2:]


def code_words(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def headings(text: str) -> list[str]:
    return [m[1] for m in re.finditer(r"^#{1,6} (.*)$", text, re.M)]


# What the code defines, and how a document names it: summary keys such as `error` and
# log lines are ordinary words too, so only their code spans count.
VOCABULARY = {
    "settings": (lambda: job_variables() | deploy_settings(), "word"),
    "flags": (lambda: job_flags() | deploy_flags(), "word"),
    "summary keys": (summary_keys, "code"),
    "day-2 commands": (day_two_commands, "word"),
    "alerts": (alerts, "any case"),
    "log messages": (log_messages, "in code"),
}


# -- the English documents name what the code defines ---------------------------------


def english() -> str:
    return "\n".join(read(name) for name in PAIRS)


@pytest.mark.parametrize("kind", sorted(VOCABULARY))
def test_the_english_operator_documents_name_everything_the_code_defines(kind: str) -> None:
    words, how = VOCABULARY[kind][0](), VOCABULARY[kind][1]
    assert words, f"found no {kind} in the code: the extraction is broken"
    missing = sorted(words - named(english(), words, how))
    assert not missing, f"no English operator document names these {kind}: {missing}"


def test_troubleshooting_has_a_heading_per_alert_and_log_line() -> None:
    text = " ".join(headings(read("docs/troubleshooting.md")))
    for kind in ("alerts", "log messages"):
        words = VOCABULARY[kind][0]()
        missing = sorted(words - named(text, words, "any case"))
        assert not missing, f"docs/troubleshooting.md has no heading for these {kind}: {missing}"


def test_the_tables_list_exactly_what_the_code_defines() -> None:
    configuration, operations = read("docs/configuration.md"), read("docs/operations.md")
    documented = _defaults(table(configuration, "## Settings"), " / ")
    assert documented == job_defaults(), "docs/configuration.md's settings table"
    documented = _defaults(table(operations, "## Settings of deploy.sh"), ", ")
    expected = deploy_defaults()
    assert set(documented) == set(expected), "docs/operations.md's settings table"
    wrong = {k: (v, expected[k]) for k, v in documented.items() if expected[k] not in (None, v)}
    assert not wrong, f"docs/operations.md's defaults differ from deploy.sh's: {wrong}"
    keys = {w for row in table(configuration, "## The summary") for w in code_words(row[0])}
    assert keys == {f.name for f in dataclasses.fields(main.RunSummary)}
    assert exit_codes(configuration) == {"0", "1", "2"}
    commands = {
        " ".join(w.split()[:2]) for r in table(operations, "## Day 2") for w in code_words(r[0])
    }
    assert commands == day_two_commands()
    names = {w.split(": ", 1)[1] for r in table(operations, "## Alerts") for w in code_words(r[0])}
    assert names == alerts()


def _defaults(rows: list[list[str]], separator: str) -> dict[str, str | None]:
    """A settings table as {name: its default, when the cell gives it in backquotes}."""
    found: dict[str, str | None] = {}
    for row in rows:
        names = [w for w in code_words(row[0]) if re.fullmatch(r"[A-Z][A-Z0-9_]+", w)]
        cells = [c.strip() for c in row[1].split(separator)] if len(names) > 1 else [row[1]]
        if len(cells) == 1:
            cells *= len(names)
        assert len(cells) == len(names), f"one default per setting in the row {row}"
        for name, cell in zip(names, cells, strict=True):
            found[name] = code_words(cell)[0] if cell.startswith("`") else None
    return found


# -- English and Japanese name the same -------------------------------------------------


@pytest.mark.parametrize("english_name", sorted(PAIRS))
def test_each_japanese_document_names_what_its_english_one_names(english_name: str) -> None:
    en, ja = read(english_name), read(PAIRS[english_name])
    for kind, (defined, how) in VOCABULARY.items():
        words = defined()
        only_en = sorted(named(en, words, how) - named(ja, words, how))
        only_ja = sorted(named(ja, words, how) - named(en, words, how))
        assert not only_en, f"{PAIRS[english_name]} lacks these {kind}: {only_en}"
        assert not only_ja, f"{english_name} lacks these {kind}: {only_ja}"
    assert exit_codes(ja) == exit_codes(en), "the exit-code tables differ"


@pytest.mark.parametrize("english_name", sorted(PAIRS))
def test_each_pair_links_to_each_other(english_name: str) -> None:
    ja_name = PAIRS[english_name]
    first = {english_name: read(english_name), ja_name: read(ja_name)}
    for name, other in ((english_name, ja_name), (ja_name, english_name)):
        target = os.path.relpath(ROOT / other, (ROOT / name).parent)
        top = first[name].split("\n## ")[0]
        assert f"]({target})" in top, f"{name} does not link to {target} before its first section"


def test_the_check_detects_a_missing_name() -> None:
    """The comparison can fail: drop one variable, one log line, one alert."""
    ja = read("docs/ja/configuration.md")
    assert "SCHEDULED_CALLS_RETENTION_DAYS" in named(ja, job_variables())
    assert "SCHEDULED_CALLS_RETENTION_DAYS" not in named(
        ja.replace("SCHEDULED_CALLS_RETENTION_DAYS", ""), job_variables()
    )
    trouble = read("docs/ja/troubleshooting.md")
    missed = "call missed: no complete run covered it"
    assert missed in named(trouble, log_messages(), "in code")
    cut = trouble.replace(missed, "call missed")
    assert missed not in named(cut, log_messages(), "in code")
    assert "quick runs keep failing" in alerts()


# -- links, issues, length ---------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in headings(re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_link_resolves(name: str) -> None:
    text = read(name)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (ROOT / name).parent / path if path else ROOT / name
        missing = not file.exists()
        if missing or (anchor and file.suffix == ".md" and anchor not in anchors(file.read_text())):
            broken.append(target)
    assert not broken, f"{name} has broken links: {broken}"


@pytest.mark.parametrize("name", DOCUMENTS)
def test_no_document_refers_to_issues(name: str) -> None:
    found = re.findall(r"\b(?:issues?|tickets?|tracker)\b|(?<![\w&])#\d+\b", read(name), re.I)
    assert not found, f"{name} refers to how the project was made: {found}"


def test_the_readme_is_short() -> None:
    assert len(read("README.md").splitlines()) <= 150
    assert len(read("README.ja.md").splitlines()) <= 150


def local_run_block(text: str) -> str:
    """The shell block under the `local-run` marker: the README's run of your own."""
    match = re.search(r"<!-- local-run[^>]*-->\n```sh\n(.*?)```", text, re.S)
    assert match, "no local-run block"
    return match[1]


def test_both_readmes_give_the_same_local_run() -> None:
    def commands(block: str) -> list[str]:
        return [re.sub(r"\s+#.*", "", line) for line in block.splitlines()]

    assert commands(local_run_block(read("README.md"))) == commands(
        local_run_block(read("README.ja.md"))
    )


def test_the_local_run_works_as_written(tmp_path: Path) -> None:
    """A copy of the repository, the block run line by line as a user types it, with
    nothing in the environment but PATH: exit 0, the WARNING line, one plan line."""
    for name in ("main.py", "schema.sql", ".env.example", "Makefile", *REQUIREMENTS):
        shutil.copy2(ROOT / name, tmp_path / name)  # copy2: `make venv` sees .venv current
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    block = local_run_block(read("README.md"))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **OFFLINE_ENV}
    server = (
        DB_SETTINGS["host"],
        DB_SETTINGS["port"],
        DB_SETTINGS["user"],
        DB_SETTINGS["password"],
    )
    if server != ("127.0.0.1", 3306, "root", ""):  # not the README's server: point it there
        block = block.replace("-h 127.0.0.1 -u root", f"-h 127.0.0.1 -P {server[1]} -u root")
        env["DB_PORT"] = str(server[1])
    existed = _has_database("anpi")
    try:
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        if not existed:
            _drop_database("anpi")
    assert result.returncode == 0, result.stdout + result.stderr
    summaries = [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]
    check, today, at_nine = (s for s in summaries if "users_checked" in s or "calls_planned" in s)
    assert check["users_checked"] == 1 and check["rows_invalid"] == 0
    assert today["error"] is None and at_nine["error"] is None
    warnings = [ln for ln in result.stderr.splitlines() if "WARNING" in ln]
    assert len(warnings) == 2 and all("queue not read (GOOGLE_CLOUD_PROJECT" in w for w in warnings)
    plan = [s for s in summaries if "task_id" in s and s["scheduled_at"].startswith("2026-11-30")]
    assert [p["scheduled_at"] for p in plan] == ["2026-11-30T09:30:00+09:00"]


REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")


def _has_database(name: str) -> bool:
    with pymysql.connect(**DB_SETTINGS) as conn, conn.cursor() as cur:
        return bool(cur.execute("SHOW DATABASES LIKE %s", (name,)))


def _drop_database(name: str) -> None:
    with pymysql.connect(**DB_SETTINGS) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
