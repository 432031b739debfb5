"""The quick start: `make demo` in a clean copy, and the database fallback it relies on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

import demo
from tests import localdb
from tests.conftest import DB_SETTINGS, ROOT, create_database, drop_database


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


@pytest.fixture
def demo_db() -> Iterator[str]:
    """A database name of the demo's own for one run (never another run's, not even a
    concurrent one's); dropped afterwards from the server the demo finds by itself."""
    name = f"anpi_demo_test_{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        if localdb.answers("127.0.0.1", 3306):  # else the demo's private server is gone
            with pymysql.connect(host="127.0.0.1", port=3306, user="root", ssl_disabled=True) as conn, conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def make_demo(copy: Path, *flags: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")} | settings
    return subprocess.run(
        ["make", "--no-print-directory", "demo", f"DEMO_FLAGS={' '.join(flags)}"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def report(out: str) -> dict[int, str]:
    """The report's status of each user: user id -> what the demo says about them."""
    lines = out.split("=== report ===\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {int(m[1]): m[2] for m in (re.match(r"  user (\d+) +\S+ +\S+  (.*)", ln) for ln in lines) if m}


def assert_reasons_of_the_users_not_due(status: dict[int, str]) -> None:
    """Each reason comes from the job's plan, logs and the rows, never a guess."""
    assert sorted(status) == list(range(1, 11))
    assert status[7] == "invalid: call_weekdays '月x': unknown word 'x'"
    assert status[8] == "inactive: not called"
    assert status[9].startswith("later: its time is outside this run's window")
    assert re.fullmatch(r"paused: \S+\.\.\S+ covers \d{4}-\d\d-\d\d", status[10])
    for user in (1, 2, 3, 5):  # by today's weekday
        assert re.search(r"^called|^due |is not one of its days$", status[user]), status[user]


def test_make_demo_delivers_every_due_call(clean_copy: Path, demo_db: str) -> None:
    result = make_demo(clean_copy, DB_NAME=demo_db)
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
    # Every call at its second: within a second of its time, never early.
    lateness = [float(s) for s in re.findall(r"📞 call for user .*, ([+-][0-9.]+) s late", out)]
    assert len(lateness) == int(total) and all(-0.2 < late < 1.0 for late in lateness), lateness
    status = report(out)
    assert_reasons_of_the_users_not_due(status)
    called = {int(u) for u in re.findall(r"📞 call for user (\d+)", out)}
    assert {u for u, s in status.items() if s.startswith("called")} == called >= {4, 6}


def test_make_demo_fails_clearly_when_the_webhook_is_down(clean_copy: Path, demo_db: str) -> None:
    result = make_demo(clean_copy, "--no-webhook", DB_NAME=demo_db)
    assert result.returncode != 0
    assert "did not arrive at the webhook" in result.stdout
    assert "(it is down: --no-webhook)" in result.stdout
    # "not delivered" only for the calls that were due; the others say why not.
    status = report(result.stdout)
    assert_reasons_of_the_users_not_due(status)
    down = {u for u, s in status.items() if s.endswith("not delivered: the webhook is down (--no-webhook)")}
    assert down >= {4, 6} and "delivered      0 of " + str(len(down)) in result.stdout
    assert all("not delivered" not in s for u, s in status.items() if u not in down)


def test_make_demo_never_touches_a_database_it_did_not_create(clean_copy: Path) -> None:
    """DB_NAME naming a database that holds a table: the demo refuses it, exit 1, and
    the database and its table are as they were."""
    theirs = create_database("CREATE TABLE precious (id INT PRIMARY KEY, note VARCHAR(40));")
    try:
        theirs.execute("INSERT INTO precious VALUES (1, 'keep me')")
        result = make_demo(
            clean_copy,
            DB_HOST=DB_SETTINGS["host"],
            DB_PORT=str(DB_SETTINGS["port"]),
            DB_USER=DB_SETTINGS["user"],
            DB_PASSWORD=DB_SETTINGS["password"],
            DB_NAME=theirs.name,
        )
        assert result.returncode != 0 and "demo] Error 1" in result.stderr  # demo.py exited 1
        assert f"demo: database {theirs.name} exists and the demo did not create it" in result.stdout
        assert "Traceback" not in result.stdout + result.stderr
        with theirs.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT id, note FROM precious")
            assert cur.fetchall() == ((1, "keep me"),)
            cur.execute("SHOW TABLES")
            assert cur.fetchall() == (("precious",),)
    finally:
        drop_database(theirs)


def test_the_demo_re_creates_its_own_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """A database the demo made (it carries the mark) is dropped and made afresh by the
    next run: nothing of the earlier run's rows is left."""
    name = f"anpi_demo_test_{uuid.uuid4().hex[:8]}"
    for key, value in (("DB_HOST", DB_SETTINGS["host"]), ("DB_PORT", str(DB_SETTINGS["port"])),
                       ("DB_USER", DB_SETTINGS["user"]), ("DB_PASSWORD", DB_SETTINGS["password"]),
                       ("DB_NAME", name)):  # fmt: skip
        monkeypatch.setenv(key, value)
    try:
        settings = demo.database([])
        demo.load(settings, [{"id": 1, "phone_number": "+819011110001", "call_weekdays": "daily",
                              "call_time": "09:00:00"}])  # fmt: skip
        again = demo.database([])
        with demo.connect(again) as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM users")
            assert cur.fetchone() == (0,)
            cur.execute(f"SELECT COUNT(*) FROM {demo.MARKER_TABLE}")
            assert cur.fetchone() == (1,)
    finally:
        with pymysql.connect(**DB_SETTINGS) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


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
