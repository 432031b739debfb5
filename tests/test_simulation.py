"""The promise itself, simulated: who is called, when, exactly once, as the family last said.

Each seed drives the real job through a day and a half against the real MariaDB and the
in-tests Cloud Tasks server on a virtual clock that the job reads too. The server runs
each task when the clock reaches its time (at once when created already due) and refuses
a name for an hour after its task ran or was deleted. Most runs are `main.main` in this
process; runs that are SIGKILLed are real processes.

Between runs families change their settings: a new time (also back to an earlier one, and
back to before the call that already ran today), a pause, other weekdays, a typo in the
text `call_time`, a deletion and a new sign-up. Runs are missed, late (up to 14 minutes),
doubled (two executions at once), meet an outage of creates, gets, deletes or lists
part-way (then Cloud Run's retry), are killed with SIGKILL part-way (then the retry), or
lose their database connections, and with them their run lock, while one of their
creates or deletes is slow: another execution runs meanwhile, and the slow request lands
after it. Part-way through, the service changes its shard count (one shared queue, then
a queue per shard), with an execution of the old count overlapping the new one.

Afterwards every execution is checked against the history of the users table, with an
oracle written here rather than the job's planner:

- no call executes twice, and no row is called twice on one local date once a complete
  run came after the first call may have run, while the second was still ahead;
- every execution carries the user's phone number and was wanted by some run;
- no call is lost that the table wanted throughout, from a complete run (exit 0) that
  covered it until its time, unless the row was already called that local date;
- no stale call executes after a complete run covering it stopped wanting it (unless it
  was due within the job's 60 s firing margin then, or a later run wanted it again).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import functools
import os
import random
import signal
import threading
import time
import zoneinfo
from typing import Any

import pytest

from tests.conftest import (
    Database,
    JobResult,
    VirtualClock,
    create_database,
    drop_database,
    finish_job,
    job_env,
    kill_connections,
    run_main,
    start_job,
)
from tests.fake_cloud_tasks import Execution, FakeCloudTasks

JST = zoneinfo.ZoneInfo("Asia/Tokyo")
UTC = dt.UTC
START = dt.datetime(2026, 11, 30, 0, 0, tzinfo=JST)  # a Monday
HOURS = 36
USERS = 80
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
# Text the family might type into a VARCHAR call_time by mistake.
TYPOS = ("9時", "", "25:00", "9:3", "noon", "10:61")


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the users table says about one user at some moment."""

    active: bool
    days: frozenset[int]
    at: dt.time
    typo: str | None = None  # the text in call_time instead of `at`: the row is invalid

    def wants(self, instant: dt.datetime) -> bool:
        local = instant.astimezone(JST)
        return (
            self.active
            and self.typo is None
            and local.weekday() in self.days
            and local.time() == self.at
        )

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
    """One job run (one shard): when it ran (virtual), what it saw, how it ended."""

    at: dt.datetime
    snapshot: dict[int, Setting | None]
    kind: str
    count: int = 1
    index: int = 0
    quick: bool = False  # a quick run (--changes)
    code: int = 0
    seconds: float = 0.0  # real time a process took: how far its own clock moved
    start: dt.datetime | None = None  # its window, from its summary
    end: dt.datetime | None = None

    def window(self) -> tuple[dt.datetime, dt.datetime]:
        if self.start is None or self.end is None:
            return self.at - GRACE, self.at + LOOKAHEAD
        return self.start, self.end

    def covers(self, user_id: int, instant: dt.datetime) -> bool:
        start, end = self.window()
        return user_id % self.count == self.index and start <= instant < end

    def wants(self, user_id: int, instant: dt.datetime) -> bool:
        setting = self.snapshot.get(user_id)
        return setting is not None and self.covers(user_id, instant) and setting.wants(instant)

    def keeps(self, user_id: int) -> bool:
        """The row was invalid (a typo): the run keeps whatever the user has queued."""
        setting = self.snapshot.get(user_id)
        return setting is not None and setting.typo is not None

    def ended(self, result: JobResult) -> None:
        self.code = result.code
        if result.code in (0, 1) and result.stdout.strip():
            summary = result.summary
            self.start = dt.datetime.fromisoformat(summary["window_start"])
            self.end = dt.datetime.fromisoformat(summary["window_end"])


class Simulation:
    def __init__(self, seed: int, db: Database) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.db = db
        self.clock = VirtualClock(START)
        self.server = FakeCloudTasks(clock=self.clock.seconds, dispatch=True).start()
        self.current: dict[int, Setting | None] = {}
        self.history: dict[int, list[tuple[dt.datetime, Setting | None]]] = {}
        self.runs: list[Run] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.count = 1  # the shard count of the service now
        self.per_shard_queues = False
        # The hour the shard count changes, and to what; an execution of the old count
        # overlaps the first one of the new.
        first = self.rng.choice([2, 3])
        self.reshard_hours = {
            self.rng.randint(6, 14): first,
            self.rng.randint(20, 28): self.rng.choice([c for c in (1, 2, 3) if c != first]),
        }
        # Hours with an event each seed must have: the hourly run, and the hour's last
        # quick run, SIGKILLed part-way (real processes cost a second or two each, so
        # random ones are rare); the hourly run losing its connections while a create or
        # a delete is held (twice each). Never a reshard's hour.
        free = [h for h in range(2, HOURS) if h not in self.reshard_hours]
        self.kill_hour, self.quick_kill_hour, *cuts = self.rng.sample(free, 6)
        self.cut_hours = dict(zip(cuts, ["CreateTask", "DeleteTask"] * 2, strict=True))
        # Hours just before which a family moves back a call that ran within the hour.
        self.back_hours = set(self.rng.sample(range(3, HOURS), 4))

    @property
    def now(self) -> dt.datetime:
        return self.clock.now

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
                    setting.at.isoformat() if setting.typo is None else setting.typo,
                    int(setting.active),
                ),
            )
        self.current[user_id] = setting
        self.history.setdefault(user_id, []).append((self.now, setting))

    def change_someone(self) -> None:
        rng = self.rng
        if rng.random() < 0.15 and self.move_back_today():
            return
        user_id = rng.randint(1, USERS)
        old = self.current[user_id]
        new: Setting | None
        if old is None:
            new, kind = self.random_setting(), "re-added"
        elif old.typo is not None:
            new, kind = dataclasses.replace(old, typo=None), "typo fixed"
        else:
            kind = rng.choice(["time", "time", "time back", "pause", "weekdays", "delete", "typo"])
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
            elif kind == "typo":
                new = dataclasses.replace(old, typo=rng.choice(TYPOS))
            else:
                new = None
        self.write(user_id, new)
        self.counts[f"change: {kind}"] += 1

    def move_back_today(self, within: dt.timedelta = dt.timedelta(minutes=20)) -> bool:
        """A user whose call ran lately (`within`) is moved to a few minutes before now:
        today, still inside the next run's grace. False when nobody was called lately."""
        recent = [
            e for e in self.server.executions
            if self.now - within <= _executed_at(e) <= self.now
        ]  # fmt: skip
        if not recent:
            return False
        user_id = self.rng.choice(recent).body["user_id"]
        setting = self.current.get(user_id)
        at = (self.now - dt.timedelta(minutes=self.rng.randint(1, 10))).astimezone(JST)
        if (
            setting is None
            or setting.typo is not None
            or at.date() != self.now.astimezone(JST).date()
        ):
            return False
        self.write(
            user_id, dataclasses.replace(setting, at=at.time().replace(second=0, microsecond=0))
        )
        self.counts["change: back today, after the call ran"] += 1
        return True

    def advance(self, to: dt.datetime) -> None:
        """Move the virtual clock forward, running every task that falls due."""
        assert to >= self.now
        self.clock.now = to
        self.server.run_due()

    # -- the job --------------------------------------------------------------

    def env(self, count: int, index: int, per_shard: bool | None = None) -> dict[str, str]:
        per_shard = self.per_shard_queues if per_shard is None else per_shard
        return job_env(
            self.db,
            self.server,
            ENQUEUE_DEADLINE_SECONDS="1",  # an outage fails the run instead of waiting
            ENQUEUE_MAX_PER_SECOND="0",
            LOG_LEVEL="WARNING",
            CLOUD_RUN_TASK_COUNT=str(count),
            CLOUD_RUN_TASK_INDEX=str(index),
            QUEUE_PER_SHARD="1" if per_shard else "0",
        )

    def shard_run(
        self,
        kind: str,
        index: int,
        count: int | None = None,
        per_shard: bool | None = None,
        quick: bool = False,
    ) -> Run:
        """One shard's run, in this process; returns when it ended."""
        count = count or self.count
        run = Run(self.now, dict(self.current), kind, count, index, quick)
        self.runs.append(run)
        args = ["--changes"] if quick else []
        self.ended(run, run_main(args, self.env(count, index, per_shard), self.clock))
        # The shared clock moves while it runs (another shard's retry waits meanwhile):
        # its own clock moved as far, and the checks measure its margin from there.
        run.seconds = max(run.seconds, (self.now - run.at).total_seconds())
        return run

    def ended(self, run: Run, result: JobResult) -> None:
        run.ended(result)
        self.counts[f"exit {run.code}"] += 1
        if run.code not in (0, 1, -signal.SIGKILL):
            pytest.fail(f"seed {self.seed}: run at {run.at} exited {run.code}:\n{result.stderr}")

    def execution(
        self,
        kind: str,
        count: int | None = None,
        per_shard: bool | None = None,
        quick: bool = False,
    ) -> list[Run]:
        """One Cloud Run execution: a run per shard, at once. Failed shards of an hourly
        execution are retried; a quick run's retry is the next quick run."""
        count = count or self.count
        runs: list[Run] = []
        threads = [
            threading.Thread(
                target=lambda i=i: runs.append(self.shard_run(kind, i, count, per_shard, quick))
            )
            for i in range(count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for run in list(runs):
            if run.code != 0 and not quick:
                self.retry(run.index, count, per_shard)
        return runs

    def retry(self, index: int, count: int, per_shard: bool | None = None) -> None:
        """Cloud Run retries a failed task: the same shard, a little later."""
        self.advance(self.now + dt.timedelta(seconds=self.rng.randint(10, 90)))
        self.shard_run("retry", index, count, per_shard)

    def together(self, *executions: tuple[str, dict[str, Any]]) -> None:
        """Executions that overlap: each in its own thread."""
        threads = [
            threading.Thread(target=self.execution, args=(kind,), kwargs=kwargs)
            for kind, kwargs in executions
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)

    def hourly(self, slot: dt.datetime, hour: int) -> None:
        """One hour's trigger, with whatever goes wrong this hour."""
        rng = self.rng
        old_count, old_per_shard = self.count, self.per_shard_queues
        if hour in self.reshard_hours:
            self.count = self.reshard_hours[hour]
            self.per_shard_queues = True
            self.counts[f"reshard {old_count}->{self.count}"] += 1
        roll = rng.random()
        if (
            roll < 0.08
            and old_count == self.count
            and hour not in (self.kill_hour, *self.cut_hours)
        ):
            self.counts["missed"] += 1
            return
        late = dt.timedelta(minutes=rng.uniform(1, 14)) if roll < 0.33 else dt.timedelta()
        self.advance(slot + dt.timedelta(seconds=rng.randint(0, 20)) + late)
        if late:
            self.counts["late"] += 1
        if hour == self.kill_hour:
            self.kill()
        elif old_count != self.count:
            # An execution of the old count is still running when the new one starts.
            self.together(
                ("old count", {"count": old_count, "per_shard": old_per_shard}),
                ("new count", {}),
            )
        elif hour in self.cut_hours:
            self.cut(self.cut_hours[hour])
        elif roll >= 0.90:  # two executions at once (Cloud Scheduler is at-least-once)
            self.together(("doubled", {}), ("doubled", {}))
            self.counts["doubled"] += 1
        elif roll >= 0.82:  # a quick run starts while the hourly one runs
            self.together(("beside a quick run", {}), ("quick beside the hourly", {"quick": True}))
            self.counts["hourly and quick at once"] += 1
        elif roll >= 0.74:
            self.outage()
        elif roll >= 0.725:
            self.kill()
        else:
            self.execution("normal")

    def outage(self, quick: bool = False) -> None:
        methods = frozenset(self.rng.sample(METHODS, self.rng.randint(1, 3)))
        self.server.faults.outage_methods = methods
        self.server.faults.outage_after = self.rng.randint(0, 3)
        kind = ("quick " if quick else "") + "outage: " + ",".join(sorted(methods))
        try:
            runs = [self.shard_run(kind, i, quick=quick) for i in range(self.count)]
        finally:
            self.server.faults.outage_methods = frozenset()
        self.counts["quick outage" if quick else "outage"] += 1
        for run in runs:
            if run.code != 0 and not quick:
                self.retry(run.index, self.count)

    def kill(self, quick: bool = False) -> None:
        """SIGKILL one shard's process right after its k-th RPC took effect (its answer
        unsent), or part-way through its database work when k is 0; then the retry (an
        hourly run's: Cloud Run retries it; a quick run's is the next quick run)."""
        k = self.rng.randint(0, 5)
        index = self.rng.randrange(self.count)
        began = time.monotonic()
        kind = f"{'quick ' if quick else ''}killed after {k} RPCs"
        run = Run(self.now, dict(self.current), kind, self.count, index, quick)
        self.runs.append(run)
        args = ["--now", self.now.isoformat(), *(["--changes"] if quick else [])]
        proc = start_job(args, self.env(self.count, index))
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
            result = finish_job(proc)
        finally:
            self.server.on_rpc = None
        run.seconds = time.monotonic() - began
        self.ended(run, result)
        self.counts["quick killed" if quick else "killed"] += 1
        if run.code != 0 and not quick:
            self.retry(index, self.count)
        for other in range(self.count):
            if other != index:
                self.shard_run("beside a killed one", other, quick=quick)

    def quick(self, kill: bool = False) -> None:
        """The every-minute trigger of the quick run (its minutes here are random)."""
        roll = self.rng.random()
        if kill or roll < 0.005:
            self.kill(quick=True)
        elif roll < 0.10:
            self.outage(quick=True)
        else:
            self.execution("quick", quick=True)

    def cut(self, method: str) -> None:
        """A shard's run holds its first `method` (CreateTask or DeleteTask) before it
        takes effect; meanwhile families change settings (one may undo the change that
        made the run delete), the run's database connections drop (its run lock with
        them) and another execution runs; then the held request lands. Cloud Run then
        retries the run."""
        user_id, before = self.prepare_cut(method)
        index = user_id % self.count
        reached, release = threading.Event(), threading.Event()
        held: list[bool] = []

        def hook(name: str, _request: object) -> None:
            if name == method and not held:
                held.append(True)
                reached.set()
                release.wait(30)

        self.server.before_rpc = hook
        runs: list[Run] = []
        first = threading.Thread(
            target=lambda: runs.append(self.shard_run(f"cut during {method}", index))
        )
        first.start()
        while not reached.is_set() and first.is_alive():
            reached.wait(0.01)
        try:
            if reached.is_set():
                if self.rng.random() < 0.5:
                    self.write(user_id, before)  # the family undoes its change
                for _ in range(self.rng.randint(0, 2)):
                    self.change_someone()
                kill_connections(self.db)
                self.advance(self.now + dt.timedelta(seconds=self.rng.randint(5, 60)))
                self.execution("while another's request is held")
                self.counts[f"cut during {method}"] += 1
        finally:
            release.set()
            first.join(120)
            self.server.before_rpc = None
        if runs and runs[0].code != 0:
            self.retry(index, self.count)

    def prepare_cut(self, method: str) -> tuple[int, Setting | None]:
        """A change that makes the next run create (a call 20-100 minutes ahead) or delete
        (a queued call moved; one is queued first if none is): the user and their
        setting before it."""
        if method == "DeleteTask" and not self.queued_ahead():
            user_id = self.rng.randint(1, USERS)
            self.write(user_id, Setting(True, frozenset(range(7)), self.minutes_ahead(30, 40)))
            self.execution("before a cut")
        ahead = self.queued_ahead() if method == "DeleteTask" else []
        user_id = self.rng.choice(ahead) if ahead else self.rng.randint(1, USERS)
        before = self.current.get(user_id)
        new_time = self.minutes_ahead(20, 100)
        while before is not None and before.at == new_time:
            new_time = self.minutes_ahead(20, 100)
        self.write(user_id, Setting(True, frozenset(range(7)), new_time))
        return user_id, before

    def queued_ahead(self) -> list[int]:
        """Users with a task queued more than 5 minutes ahead."""
        found = set()
        for name, task in list(self.server.tasks.items()):
            instant = dt.datetime.fromtimestamp(task.schedule_time.timestamp(), UTC)
            user_id = int(name.rsplit("-anpi-", 1)[1].split("-")[0])
            if instant > self.now + dt.timedelta(minutes=5) and self.current.get(user_id):
                found.add(user_id)
        return sorted(found)

    def minutes_ahead(self, low: int, high: int) -> dt.time:
        at = (self.now + dt.timedelta(minutes=self.rng.randint(low, high))).astimezone(JST)
        return at.time().replace(second=0, microsecond=0)

    def change_near_a_call(self) -> None:
        """A change to a call due within 45 minutes: moved, paused, removed, or a new
        person signing up for a call that soon."""
        rng = self.rng
        soon = [
            (user_id, instant)
            for user_id, setting in self.current.items()
            if setting is not None
            for instant in setting.calls_in(self.now, self.now + dt.timedelta(minutes=45))
        ]
        if not soon or rng.random() < 0.2:
            user_id = max(self.current) + 1
            self.write(user_id, Setting(True, frozenset(range(7)), self.minutes_ahead(3, 45)))
            self.counts["change near a call: new person"] += 1
            return
        user_id, _ = rng.choice(sorted(soon))
        old = self.current[user_id]
        assert old is not None
        kind = rng.choice(["earlier", "later", "pause", "delete", "weekdays"])
        new: Setting | None
        if kind in ("earlier", "later"):
            low, high = (3, 20) if kind == "earlier" else (30, 90)
            new = dataclasses.replace(old, at=self.minutes_ahead(low, high))
        elif kind == "pause":
            new = dataclasses.replace(old, active=False)
        elif kind == "weekdays":
            today = self.now.astimezone(JST).weekday()
            new = dataclasses.replace(
                old, days=(old.days - {today}) or frozenset({(today + 1) % 7})
            )
        else:
            new = None
        self.write(user_id, new)
        self.counts[f"change near a call: {kind}"] += 1

    def simulate(self) -> None:
        self.db.execute("ALTER TABLE users MODIFY call_time VARCHAR(16) NULL")
        for user_id in range(1, USERS + 1):
            self.write(user_id, self.random_setting())
        for hour in range(HOURS):
            slot = START + dt.timedelta(hours=hour)
            if hour in self.back_hours and slot - dt.timedelta(minutes=1) > self.now:
                self.advance(slot - dt.timedelta(minutes=1))
                self.move_back_today(within=dt.timedelta(hours=1))
            self.hourly(slot, hour)
            # The rest of the hour: families change settings, some close to a call, and
            # quick runs follow at random minutes.
            rng = self.rng
            events = (
                [(rng.uniform(1, 59), self.change_someone) for _ in range(rng.randint(0, 6))]
                + [(rng.uniform(1, 59), self.change_near_a_call) for _ in range(rng.randint(0, 3))]
                + [(rng.uniform(1, 59), self.quick) for _ in range(rng.randint(2, 4))]
            )
            if hour == self.quick_kill_hour:
                events.append((59.5, functools.partial(self.quick, kill=True)))
            for minute, event in sorted(events, key=lambda e: e[0]):
                at = slot + dt.timedelta(minutes=minute)
                if at > self.now:
                    self.advance(at)
                    event()
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
        per_date: dict[tuple[int, dt.date], list[dt.datetime]] = collections.defaultdict(list)
        for user_id, instant in executions:
            per_date[(user_id, instant.astimezone(JST).date())].append(instant)
        for (user_id, day), instants in sorted(per_date.items()):
            first, *later = sorted(instants)
            for second in later:
                # A complete run after the first call may have run, with the second still
                # ahead of it, had to keep the second from being made.
                chance = [
                    run
                    for run in self.runs
                    if run.code == 0
                    and run.covers(user_id, second)
                    and first <= run.at + FIRING_MARGIN
                    and second > run.at + FIRING_MARGIN + dt.timedelta(seconds=run.seconds + 1)
                ]
                if chance:
                    found.append(
                        f"user {user_id} called at {first.isoformat()} and again at"
                        f" {second.isoformat()} on {day}, though the run at"
                        f" {chance[0].at.isoformat()} ({chance[0].kind}) exited 0 between them"
                    )

        for (user_id, instant), runs in sorted(executions.items()):
            call = f"user {user_id} at {instant.isoformat()}"
            if len(runs) > 1:
                found.append(f"{call} executed {len(runs)} times: {[r.task_id for r in runs]}")
            if not any(r.wants(user_id, instant) for r in self.runs):
                found.append(f"{call} executed but no run ever wanted it")
            executed_at = _executed_at(runs[0])
            for run in self.runs:
                if not (run.code == 0 and run.at < executed_at and run.covers(user_id, instant)):
                    continue
                horizon = run.at + FIRING_MARGIN + dt.timedelta(seconds=run.seconds + 1)
                if run.wants(user_id, instant) or run.keeps(user_id) or instant <= horizon:
                    continue
                wanted_again = any(
                    run.at < later.at <= executed_at and later.wants(user_id, instant)
                    for later in self.runs
                )
                if not wanted_again:
                    found.append(
                        f"{call} executed at {executed_at.isoformat()} although the run at"
                        f" {run.at.isoformat()} ({run.kind}, shard {run.index}/{run.count})"
                        " exited 0 without wanting it"
                    )

        expected: set[tuple[int, dt.datetime]] = set()
        for run in self.runs:
            if run.code != 0:
                continue
            for user_id, setting in run.snapshot.items():
                if setting is None or user_id % run.count != run.index:
                    continue
                for instant in setting.calls_in(*run.window()):
                    if self.wanted_throughout(user_id, instant, run.at):
                        expected.add((user_id, instant))
        self.counts["calls that had to run"] = len(expected)
        for user_id, instant in sorted(expected - set(executions)):
            if (user_id, instant.astimezone(JST).date()) in per_date:
                continue  # the row was called that day already: at most one call a day
            found.append(
                f"user {user_id} at {instant.isoformat()} lost: wanted throughout after a"
                " run that exited 0"
            )
        return found


def _executed_at(execution: Execution) -> dt.datetime:
    return dt.datetime.fromtimestamp(execution.at, UTC)


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
    assert sim.counts["calls executed"] > 40  # the simulation really exercised the job
    assert sim.counts["exit 1"] + sim.counts[f"exit {-signal.SIGKILL}"] > 0
    assert sim.counts["killed"] and sim.counts["quick killed"]  # SIGKILL, hourly and quick
    # The events that found the holes happen on every seed.
    assert sum(v for k, v in sim.counts.items() if k.startswith("reshard")) == 2
    assert sim.counts["cut during CreateTask"] and sim.counts["cut during DeleteTask"]
    assert sim.counts["change: back today, after the call ran"] and sim.counts["change: typo"]
    assert not problems, f"seed {seed}: " + "\n".join(problems)


def test_the_checks_catch_a_double_and_a_lost_call(db: Database) -> None:
    """The verdict itself can fail: a doubled execution, a second call on one local date
    and a missing one are each named."""
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
        later = {**body, "scheduled_at": (START + dt.timedelta(hours=9, minutes=20)).isoformat()}
        sim.server.executions[1:] = [Execution("b", later, at9 + 1200)]
        assert not any("and again at" in p for p in sim.problems())  # no run between them
        sim.runs.append(Run(START + dt.timedelta(hours=9, minutes=5), {1: setting}, "normal"))
        assert any("and again at" in p for p in sim.problems())
    finally:
        sim.server.stop()


def test_a_typo_keeps_the_call_in_the_verdict(db: Database) -> None:
    """A run that read a typo keeps what the user has queued: its call is not stale."""
    sim = Simulation(1, db)
    try:
        setting = Setting(True, frozenset(range(7)), dt.time(9, 0))
        typo = dataclasses.replace(setting, typo="9時")
        sim.write(1, setting)
        sim.runs += [
            Run(START + dt.timedelta(hours=8), {1: setting}, "normal"),
            Run(START + dt.timedelta(hours=8, minutes=30), {1: typo}, "normal"),
        ]
        body = {
            "user_id": 1,
            "phone_number": phone(1),
            "scheduled_at": (START + dt.timedelta(hours=9)).isoformat(),
        }
        sim.server.executions.append(
            Execution("a", body, (START + dt.timedelta(hours=9)).timestamp())
        )
        assert sim.problems() == []
        sim.runs[1].snapshot = {1: dataclasses.replace(setting, active=False)}
        assert any("without wanting it" in p for p in sim.problems())
    finally:
        sim.server.stop()
