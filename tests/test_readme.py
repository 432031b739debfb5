"""README.md and README.ja.md stay in step: every configuration variable, deploy.sh flag,
summary key and exit code that one names, the other names too; and README.md names every
one the code defines. A failure says what is missing where."""

from __future__ import annotations

import dataclasses
import inspect
import re

import main
from tests.conftest import ROOT

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
    text = (ROOT / "deploy.sh").read_text()
    return set(re.findall(r"^\s*(--[a-z][a-z-]*)\)", text, re.M)) | {"--help"}


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
