"""The promise itself, simulated: who is called, when, exactly once.

Each seed drives the real job (a subprocess, as Cloud Scheduler would start it) through
a day and a half of hourly runs against the real MariaDB and the in-tests Cloud Tasks
server on a virtual clock. The server runs each task when the clock reaches its time
(at once when created already due) and refuses a name for an hour after its task ran
or was deleted. Between runs, users change their time (also back to an earlier one),
pause and resume, change weekdays, and are deleted and re-added. Runs are missed, late
(up to 14 minutes), doubled (two at once), meet an outage of creates, gets, deletes or
lists part-way (then Cloud Run's retry), or are killed with SIGKILL part-way (then the
retry).

Afterwards every execution is checked against the history of the users table, with an
oracle written here rather than the job's planner:

- no call executes twice;
- no call is lost that the table wanted throughout, from a run that covered it and
  exited 0 until its time;
- no stale call executes after a complete run stopped wanting it (unless it was due
  within the job's 60 s firing margin, or a later run wanted it again);
- every execution carries the user's phone number, and was wanted by some run.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import os
import random
import signal
import subprocess
import time
import zoneinfo
from typing import Any

import pytest

from tests.conftest import Database, create_database, drop_database, job_env, start_job
from tests.fake_cloud_tasks import Execution, FakeCloudTasks

JST = zoneinfo.ZoneInfo("Asia/Tokyo")
UTC = dt.UTC
START = dt.datetime(2026, 11, 30, 0, 0, tzinfo=JST)  # a Monday
HOURS = 36
USERS = 100
GRACE = dt.timedelta(minutes=15)  # the job's defaults
LOOKAHEAD = dt.timedelta(minutes=120)
FIRING_MARGIN = dt.timedelta(seconds=60)
SEEDS = [11, 23, 37, 41, 59]
METHODS = ("CreateTask", "GetTask", "DeleteTask", "ListTasks")
# Call minutes cluster around the hour, where late runs, the grace and the firing
# margin meet.
MINUTES = (0, 0, 1, 2, 5, 10, 14, 15, 16, 20, 30, 45, 59)
DAY_SPELLINGS = {
    frozenset(range(7)): ("daily", "毎日"),
    frozenset(range(5)): ("平日", "mon-fri", "月〜金"),
    frozenset({5, 6}): ("sat,sun", "土日"),
}
KANJI = "月火水木金土日"


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the users table says about one user at some moment."""

    active: bool
    days: frozenset[int]
    at: dt.time

    def wants(self, instant: dt.datetime) -> bool:
        local = instant.astimezone(JST)
        return self.active and local.weekday() in self.days and local.time() == self.at

    def calls_in(self, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
        """Every instant in [start, end) this setting wants (JST has no DST)."""
        day = start.astimezone(JST).date() - dt.timedelta(days=1)
        found = []
        while day <= end.astimezone(JST).date():
            instant = dt.datetime.combine(day, self.at, tzinfo=JST)
            if start <= instant < end and self.wants(instant):
                found.append(instant)
            day += dt.timedelta(days=1)
        return found


@dataclasses.dataclass
class Run:
    """One job process: when it ran (virtual), what it saw, how it ended."""

    at: dt.datetime
    snapshot: dict[int, Setting | None]
    kind: str
    code: int = 0
    seconds: float = 0.0  # real time it took: how far the job's own clock moved

    def window(self) -> tuple[dt.datetime, dt.datetime]:
        return self.at - GRACE, self.at + LOOKAHEAD

    def covers(self, instant: dt.datetime) -> bool:
        start, end = self.window()
        return start <= instant < end

    def wants(self, user_id: int, instant: dt.datetime) -> bool:
        setting = self.snapshot.get(user_id)
        return setting is not None and self.covers(instant) and setting.wants(instant)


class Simulation:
    def __init__(self, seed: int, db: Database) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.db = db
        self.now = START
        self.server = FakeCloudTasks(clock=lambda: self.now.timestamp(), dispatch=True).start()
        self.current: dict[int, Setting | None] = {}
        self.history: dict[int, list[tuple[dt.datetime, Setting | None]]] = {}
        self.runs: list[Run] = []
        self.counts: collections.Counter[str] = collections.Counter()

    # -- the world ----------------------------------------------------------

    def random_setting(self) -> Setting:
        rng = self.rng
        days = rng.choice(
            [frozenset(range(7)), frozenset(range(5)), frozenset({5, 6})]
            + [frozenset(rng.sample(range(7), rng.randint(1, 6))) for _ in range(3)]
        )
        at = dt.time(rng.randrange(24), rng.choice(MINUTES), rng.choice((0, 0, 0, 30)))
        return Setting(True, days, at)

    def spelling(self, days: frozenset[int]) -> str:
        if days in DAY_SPELLINGS:
            return self.rng.choice(DAY_SPELLINGS[days])
        if self.rng.random() < 0.5:
            return "".join(KANJI[d] for d in sorted(days))
        return ",".join(("mon", "tue", "wed", "thu", "fri", "sat", "sun")[d] for d in sorted(days))

    def write(self, user_id: int, setting: Setting | None) -> None:
        """Change the users table and remember when."""
        if setting is None:
            self.db.execute("DELETE FROM users WHERE id = %s", (user_id,))
        else:
            self.db.execute(
                "REPLACE INTO users (id, phone_number, call_weekdays, call_time, is_active)"
                " VALUES (%s, %s, %s, %s, %s)",
                (
                    user_id,
                    phone(user_id),
                    self.spelling(setting.days),
                    setting.at.isoformat(),
                    int(setting.active),
                ),
            )
        self.current[user_id] = setting
        self.history.setdefault(user_id, []).append((self.now, setting))

    def change_someone(self) -> None:
        rng = self.rng
        user_id = rng.randint(1, USERS)
        old = self.current[user_id]
        if old is None:
            new: Setting | None = self.random_setting()
            kind = "re-added"
        else:
            kind = rng.choice(["time", "time back", "pause", "weekdays", "delete"])
            if kind == "time":
                new = dataclasses.replace(old, at=self.random_setting().at)
            elif kind == "time back":
                earlier = [s for _, s in self.history[user_id] if s is not None and s.at != old.at]
                at = earlier[-1].at if earlier else self.random_setting().at
                new = dataclasses.replace(old, at=at)
            elif kind == "pause":
                new = dataclasses.replace(old, active=not old.active)
            elif kind == "weekdays":
                new = dataclasses.replace(old, days=self.random_setting().days)
            else:
                new = None
        self.write(user_id, new)
        self.counts[f"change: {kind}"] += 1

    def advance(self, to: dt.datetime) -> None:
        """Move the virtual clock forward, running every task that falls due."""
        assert to >= self.now
        self.now = to
        self.server.run_due()

    # -- the job --------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return job_env(
            self.db,
            self.server,
            ENQUEUE_DEADLINE_SECONDS="1",  # an outage fails the run instead of waiting
            ENQUEUE_MAX_PER_SECOND="0",
            LOG_LEVEL="WARNING",
        )

    def start(self, kind: str) -> tuple[Run, subprocess.Popen[str]]:
        run = Run(self.now, dict(self.current), kind)
        self.runs.append(run)
        proc = start_job(["--now", self.now.isoformat()], self.env())
        return run, proc

    def finish(self, run: Run, proc: subprocess.Popen[str], began: float) -> None:
        _stdout, stderr = proc.communicate(timeout=120)
        run.code, run.seconds = proc.returncode, time.monotonic() - began
        self.counts[f"exit {run.code}"] += 1
        if run.code not in (0, 1, -signal.SIGKILL):
            pytest.fail(f"seed {self.seed}: run at {run.at} exited {run.code}:\n{stderr}")

    def run_job(self, kind: str) -> Run:
        began = time.monotonic()
        run, proc = self.start(kind)
        self.finish(run, proc, began)
        return run

    def hourly(self, slot: dt.datetime) -> None:
        """One hour's trigger, with whatever goes wrong this hour."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.08:
            self.counts["missed"] += 1
            return
        late = dt.timedelta(minutes=rng.uniform(1, 14)) if roll < 0.33 else dt.timedelta()
        self.advance(slot + dt.timedelta(seconds=rng.randint(0, 20)) + late)
        if late:
            self.counts["late"] += 1
        if roll >= 0.90:  # two executions at once (Cloud Scheduler is at-least-once)
            began = time.monotonic()
            pair = [self.start("doubled"), self.start("doubled")]
            for run, proc in pair:
                self.finish(run, proc, began)
            self.counts["doubled"] += 1
        elif roll >= 0.75:
            self.outage()
        elif roll >= 0.62:
            self.kill()
        else:
            self.run_job("normal")

    def outage(self) -> None:
        methods = frozenset(self.rng.sample(METHODS, self.rng.randint(1, 3)))
        self.server.faults.outage_methods = methods
        self.server.faults.outage_after = self.rng.randint(0, 3)
        self.run_job("outage: " + ",".join(sorted(methods)))
        self.server.faults.outage_methods = frozenset()
        self.counts["outage"] += 1
        self.retry()

    def kill(self) -> None:
        """SIGKILL the job right after its k-th RPC took effect (its answer unsent), or
        part-way through its database work when k is 0."""
        k = self.rng.randint(0, 5)
        began = time.monotonic()
        run, proc = self.start(f"killed after {k} RPCs")
        seen = 0

        def hook(_method: str) -> None:
            nonlocal seen
            seen += 1
            if seen == k:
                os.kill(proc.pid, signal.SIGKILL)

        if k:
            self.server.on_rpc = hook
        else:
            time.sleep(self.rng.uniform(0.3, 0.8))
            proc.kill()
        try:
            self.finish(run, proc, began)
        finally:
            self.server.on_rpc = None
        self.counts["killed"] += 1
        if run.code != 0:
            self.retry()

    def retry(self) -> None:
        """Cloud Run retries a failed task: a new process, a little later."""
        self.advance(self.now + dt.timedelta(seconds=self.rng.randint(10, 90)))
        self.run_job("retry")

    def simulate(self) -> None:
        for user_id in range(1, USERS + 1):
            self.write(user_id, self.random_setting())
        for hour in range(HOURS):
            slot = START + dt.timedelta(hours=hour)
            # Families change settings between the runs.
            for offset in sorted(self.rng.uniform(1, 40) for _ in range(self.rng.randint(0, 9))):
                change_at = slot - dt.timedelta(minutes=offset)
                if change_at > self.now:
                    self.advance(change_at)
                    self.change_someone()
            self.hourly(slot)
        self.advance(self.now + LOOKAHEAD + dt.timedelta(hours=1))

    # -- the verdict ----------------------------------------------------------

    def setting_at(self, user_id: int, at: dt.datetime) -> Setting | None:
        found = None
        for when, setting in self.history[user_id]:
            if when <= at:
                found = setting
        return found

    def wanted_throughout(self, user_id: int, instant: dt.datetime, since: dt.datetime) -> bool:
        """The user's setting wanted `instant` at `since` and at every change until then."""
        first = self.setting_at(user_id, since)
        later = [s for when, s in self.history[user_id] if since < when <= instant]
        return all(s is not None and s.wants(instant) for s in [first, *later])

    def problems(self) -> list[str]:
        executions: dict[tuple[int, dt.datetime], list[Execution]] = collections.defaultdict(list)
        found = []
        for ex in self.server.executions:
            user_id = ex.body.get("user_id")
            if not isinstance(user_id, int) or ex.body.get("phone_number") != phone(user_id):
                found.append(f"task {ex.task_id} ran without the user's phone: {ex.body}")
                continue
            instant = dt.datetime.fromisoformat(ex.body["scheduled_at"])
            executions[(user_id, instant)].append(ex)
        self.counts["calls executed"] = len(executions)

        for (user_id, instant), runs in sorted(executions.items()):
            call = f"user {user_id} at {instant.isoformat()}"
            if len(runs) > 1:
                found.append(f"{call} executed {len(runs)} times: {[r.task_id for r in runs]}")
            if not any(r.wants(user_id, instant) for r in self.runs):
                found.append(f"{call} executed but no run ever wanted it")
            executed_at = dt.datetime.fromtimestamp(runs[0].at, UTC)
            for run in self.runs:
                if not (run.code == 0 and run.at < executed_at and run.covers(instant)):
                    continue
                horizon = run.at + FIRING_MARGIN + dt.timedelta(seconds=run.seconds + 1)
                if run.wants(user_id, instant) or instant <= horizon:
                    continue
                wanted_again = any(
                    run.at < later.at <= executed_at and later.wants(user_id, instant)
                    for later in self.runs
                )
                if not wanted_again:
                    found.append(
                        f"{call} executed at {executed_at.isoformat()} although the run at"
                        f" {run.at.isoformat()} exited 0 without wanting it"
                    )

        expected: set[tuple[int, dt.datetime]] = set()
        for run in self.runs:
            if run.code != 0:
                continue
            for user_id, setting in run.snapshot.items():
                if setting is None:
                    continue
                for instant in setting.calls_in(*run.window()):
                    if self.wanted_throughout(user_id, instant, run.at):
                        expected.add((user_id, instant))
        self.counts["calls that had to run"] = len(expected)
        for user_id, instant in sorted(expected - set(executions)):
            found.append(
                f"user {user_id} at {instant.isoformat()} lost: wanted throughout after a"
                " run that exited 0"
            )
        return found


def phone(user_id: int) -> str:
    return f"+81901{user_id:07d}"


@pytest.mark.parametrize("seed", SEEDS)
def test_every_call_exactly_once_through_days_of_faults(seed: int) -> None:
    db = create_database()
    sim = Simulation(seed, db)
    try:
        sim.simulate()
        problems = sim.problems()
    finally:
        sim.server.stop()
        drop_database(db)
    print(f"seed {seed}: " + ", ".join(f"{k}={v}" for k, v in sorted(sim.counts.items())))
    assert sim.counts["calls executed"] > 50  # the simulation really exercised the job
    assert sim.counts["exit 1"] + sim.counts[f"exit {-signal.SIGKILL}"] > 0
    assert not problems, f"seed {seed}: " + "\n".join(problems)


def test_the_checks_catch_a_double_and_a_lost_call(db: Database) -> None:
    """The verdict itself can fail: a doubled execution and a missing one are named."""
    sim = Simulation(1, db)
    try:
        setting = Setting(True, frozenset(range(7)), dt.time(9, 0))
        sim.write(1, setting)
        sim.runs.append(Run(START + dt.timedelta(hours=8), {1: setting}, "normal"))
        at9 = (START + dt.timedelta(hours=9)).timestamp()
        body: dict[str, Any] = {
            "user_id": 1,
            "phone_number": phone(1),
            "scheduled_at": (START + dt.timedelta(hours=9)).isoformat(),
        }
        assert any("lost" in p for p in sim.problems())
        sim.server.executions += [Execution("a", body, at9), Execution("a-r1", body, at9)]
        assert any("executed 2 times" in p for p in sim.problems())
    finally:
        sim.server.stop()
