"""End to end through gcloud-tasks-emulator: rows in, HTTP POSTs out at the call time."""

from __future__ import annotations

import datetime as dt
import uuid
from zoneinfo import ZoneInfo

from tests.conftest import Database, job_env, run_job
from tests.emulator import Emulator
from tests.webhook import WebhookReceiver

TOKYO = ZoneInfo("Asia/Tokyo")


def test_calls_arrive_at_their_scheduled_second(db: Database) -> None:
    # Calls a few seconds from now, in JST, one in another zone; one row is inactive.
    base = dt.datetime.now(TOKYO).replace(microsecond=0) + dt.timedelta(seconds=6)
    la = ZoneInfo("America/Los_Angeles")
    db.insert(
        [
            {"id": 1, "call_weekdays": "daily", "call_time": base.strftime("%H:%M:%S"),
             "phone_number": "+819011110001"},
            {"id": 2, "call_weekdays": "daily",
             "call_time": (base + dt.timedelta(seconds=2)).strftime("%H:%M:%S"),
             "phone_number": "+819011110002"},
            {"id": 3, "call_weekdays": "daily",
             "call_time": base.astimezone(la).strftime("%H:%M:%S"),
             "timezone": "America/Los_Angeles", "phone_number": "+12135550003"},
            {"id": 4, "call_weekdays": "daily", "call_time": base.strftime("%H:%M:%S"),
             "is_active": 0},
        ]
    )  # fmt: skip
    project, queue = "e2e-project", f"q{uuid.uuid4().hex[:10]}"
    emulator = Emulator(f"projects/{project}/locations/asia-northeast1/queues/{queue}")
    receiver = WebhookReceiver().start()
    try:
        env = job_env(
            db,
            GOOGLE_CLOUD_PROJECT=project,
            CLOUD_TASKS_QUEUE=queue,
            CLOUD_TASKS_EMULATOR_HOST=emulator.address,
            ANPI_CALL_URL=receiver.url,
        )
        result = run_job([], env)
        assert result.code == 0, result.stderr
        assert result.summary["tasks_created"] == 3
        deliveries = receiver.wait_for(3, timeout=30)
        # Nothing more arrives afterwards (the inactive row, or a double call).
        assert len(receiver.wait_for(4, timeout=2)) == 3
    finally:
        receiver.stop()
        emulator.stop()

    by_user = {d.body["user_id"]: d for d in deliveries}
    assert sorted(by_user) == [1, 2, 3]
    expected = {1: base, 2: base + dt.timedelta(seconds=2), 3: base}
    for user_id, delivery in by_user.items():
        scheduled = dt.datetime.fromisoformat(delivery.body["scheduled_at"])
        assert scheduled == expected[user_id]
        assert delivery.headers["Content-Type"] == "application/json"
        lateness = delivery.arrived - scheduled.timestamp()
        assert -0.5 <= lateness < 3.0, (user_id, lateness)
    assert by_user[3].body["scheduled_at"].endswith(("-08:00", "-07:00"))
    assert by_user[1].body["phone_number"] == "+819011110001"
