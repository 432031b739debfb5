"""The quick start: `make demo` in a clean copy, and the database fallback it relies on."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import localdb
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed files only, as a fresh clone has them; the virtualenvs that
    `make test` already built are linked in (their install is what .ci/run proves)."""
    copy = tmp_path_factory.mktemp("clone")
    files = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (ROOT / name).exists():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    for venv in (".venv", ".venv-emulator"):
        (copy / venv).symlink_to(ROOT / venv)
    return copy


def make_demo(copy: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    return subprocess.run(
        ["make", "--no-print-directory", "demo", f"DEMO_FLAGS={' '.join(flags)}"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_make_demo_delivers_every_due_call(clean_copy: Path) -> None:
    result = make_demo(clean_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "demo: OK, every due call arrived once, at its second" in out
    delivered = next(line for line in out.splitlines() if line.startswith("delivered"))
    count, total = delivered.split()[1], delivered.split()[3]
    assert count == total and int(total) >= 3  # daily, 土日/平日 by the day, Los Angeles
    assert "invalid rows   1" in out and "call_weekdays '月x'" in out
    assert "user 8  daily" in out and "inactive: not called" in out
    assert out.count("📞 call for user") == int(total)
    assert "+81901111" not in out  # phone numbers masked


def test_make_demo_fails_clearly_when_the_webhook_is_down(clean_copy: Path) -> None:
    result = make_demo(clean_copy, "--no-webhook")
    assert result.returncode != 0
    assert "did not arrive at the webhook" in result.stdout
    assert "(it is down: --no-webhook)" in result.stdout


def test_private_mariadb_starts_serves_and_leaves_nothing_behind() -> None:
    server = localdb.PrivateMariaDB()
    try:
        assert localdb.answers("127.0.0.1", server.port)
        assert server.dir.exists()
    finally:
        server.stop()
    assert not server.dir.exists()
    assert not localdb.answers("127.0.0.1", server.port)


def test_no_binaries_names_the_apt_get_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localdb, "SEARCH_PATH", "/nonexistent")
    with pytest.raises(localdb.NoDatabase, match="sudo apt-get install -y mariadb-server"):
        localdb.PrivateMariaDB()
