"""README.md and README.ja.md stay in step: every configuration variable, deploy.sh flag,
summary key and exit code that one names, the other names too; and README.md names every
one the code defines. A failure says what is missing where."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pymysql

import main
from tests.conftest import DB_SETTINGS, OFFLINE_ENV, ROOT

EN = (ROOT / "README.md").read_text()
JA = (ROOT / "README.ja.md").read_text()


def job_variables() -> set[str]:
    """Every variable Config.from_env reads."""
    source = inspect.getsource(main.Config.from_env)
    return set(
        re.findall(r'(?:text|integer)\(\s*"([A-Z][A-Z0-9_]+)"', source)
        + re.findall(r'env\.get\("([A-Z][A-Z0-9_]+)"', source)
        + re.findall(r'"([A-Z][A-Z0-9_]+)" in env', source)
    )


def deploy_settings() -> set[str]:
    text = (ROOT / "deploy.env.example").read_text()
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M))


def deploy_flags() -> set[str]:
    """deploy.sh's flags and day-2 commands (the words of its `case` patterns)."""
    text = (ROOT / "deploy.sh").read_text()
    flags = set(re.findall(r"^\s*(--[a-z][a-z-]*)\)", text, re.M)) | {"--help"}
    [commands] = re.findall(r"^\s*((?:[a-z]+ \| )+[a-z]+)\)$", text, re.M)
    return flags | {f"./deploy.sh {c}" for c in commands.split(" | ")}


def job_flags() -> set[str]:
    return set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', inspect.getsource(main.main)))


def summary_keys() -> set[str]:
    return {f.name for cls in (main.RunSummary, main.CheckSummary) for f in dataclasses.fields(cls)}


def named(text: str, words: set[str]) -> set[str]:
    """The words of `words` that `text` names (as whole words)."""
    return {w for w in words if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)}


def exit_codes(text: str) -> set[str]:
    """Codes in the rows of exit-code tables: `| 0 |` at the start of a row."""
    return set(re.findall(r"^\| ([0-9]) \|", text, re.M))


def test_the_code_s_names_are_all_in_the_english_readme() -> None:
    required = job_variables() | deploy_flags() | job_flags() | summary_keys()
    missing = sorted(required - named(EN, required))
    assert not missing, f"README.md does not name: {missing}"
    assert exit_codes(EN) == {"0", "1", "2"}


def test_both_readmes_name_the_same_settings_flags_keys_and_exit_codes() -> None:
    for what, words in [
        ("configuration variables", job_variables() | deploy_settings()),
        ("deploy.sh flags and job flags", deploy_flags() | job_flags()),
        ("summary keys", summary_keys()),
    ]:
        en, ja = named(EN, words), named(JA, words)
        assert not en - ja, f"README.ja.md lacks {what}: {sorted(en - ja)}"
        assert not ja - en, f"README.md lacks {what}: {sorted(ja - en)}"
    assert exit_codes(JA) == exit_codes(EN), "the exit-code tables differ"


def test_the_readmes_link_to_each_other() -> None:
    assert "README.ja.md" in EN.split("\n## ")[0]
    assert "README.md" in JA.split("\n## ")[0]


def test_the_check_detects_a_missing_name() -> None:
    """The comparison can fail: drop one variable from the Japanese text."""
    words = job_variables()
    assert "SCHEDULED_CALLS_RETENTION_DAYS" in named(JA, words)
    shortened = JA.replace("SCHEDULED_CALLS_RETENTION_DAYS", "")
    assert "SCHEDULED_CALLS_RETENTION_DAYS" not in named(shortened, words)


def local_run_block(text: str) -> str:
    """The shell block under the `local-run` marker: the README's run of your own."""
    match = re.search(r"<!-- local-run[^>]*-->\n```sh\n(.*?)```", text, re.S)
    assert match, "no local-run block"
    return match[1]


def test_both_readmes_give_the_same_local_run() -> None:
    def commands(block: str) -> list[str]:
        return [re.sub(r"\s+#.*", "", line) for line in block.splitlines()]

    assert commands(local_run_block(EN)) == commands(local_run_block(JA))


def test_the_local_run_works_as_written(tmp_path: Path) -> None:
    """A copy of the repository, the block run line by line as a user types it, with
    nothing in the environment but PATH: exit 0, the WARNING line, one plan line."""
    for name in ("main.py", "schema.sql", ".env.example", "Makefile", *REQUIREMENTS):
        shutil.copy2(ROOT / name, tmp_path / name)  # copy2: `make venv` sees .venv current
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    block = local_run_block(EN)
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
