"""A Cloud Tasks gRPC server for tests and the benchmark.

It speaks `google.cloud.tasks.v2.CloudTasks` with the official message types
(grpc generic handlers), so the job talks to it through the real client. It keeps the
semantics the job relies on and that gcloud-tasks-emulator lacks:

- task names are unique; a name stays refused (ALREADY_EXISTS) for `tombstone_seconds`
  after its task ran or was deleted, as Cloud Tasks does for about an hour;
- GetTask, DeleteTask and ListTasks with pagination;
- request validation: parent, task id characters and length, schedule_time limit.

With `dispatch=True` it also runs tasks, against its clock (real or virtual): a task
executes once the clock reaches its schedule_time, or at once when created already
due. Each execution is recorded and leaves the name refused for an hour.

Fault knobs (all off by default) let tests drive the job's error handling: fail the
first N creates, fail a random fraction, store-then-time-out, permanent errors for
chosen users, an outage of chosen methods after N more successful calls, a missing
queue, and added latency per RPC. `before_rpc` runs before an RPC takes effect (a test
can hold it there: a slow request that lands late); `on_rpc` runs after an RPC took
effect and before its answer is sent (a test can kill the job there). `hidden` names
tasks that ListTasks leaves out, as a listing does when tasks run between its pages.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, NamedTuple

import grpc
from google.cloud import tasks_v2
from google.protobuf import empty_pb2

SERVICE = "google.cloud.tasks.v2.CloudTasks"
TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,500}")
THIRTY_DAYS = 30 * 86_400


class Execution(NamedTuple):
    """One dispatch of a task to its URL: task id, JSON body, and the clock time."""

    task_id: str
    body: dict[str, Any]
    at: float


class Rpc(NamedTuple):
    """One recorded call: method, task name (or parent) and the gRPC code returned."""

    method: str
    name: str
    code: str


@dataclasses.dataclass
class Faults:
    """Knobs for injected failures; each is off by default."""

    fail_first: int = 0  # the first N CreateTask calls fail with `fail_code`
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    fail_fraction: float = 0.0  # this share of CreateTask calls fail with `fail_code`
    timeout_after_store: int = 0  # the first N creates store the task, then DEADLINE_EXCEEDED
    permanent: dict[int, grpc.StatusCode] = dataclasses.field(default_factory=dict)  # user_id
    latency: float = 0.0  # seconds added to every RPC
    missing_queue: bool = False  # every call answers NOT_FOUND for the queue
    list_error: grpc.StatusCode | None = None  # ListTasks fails with this code
    # An outage: after `outage_after` more successful calls of these methods, every
    # call of them answers UNAVAILABLE until the set is emptied.
    outage_methods: frozenset[str] = frozenset()
    outage_after: int = 0
    # Per method: seconds added to each call, and a code every call answers.
    method_latency: dict[str, float] = dataclasses.field(default_factory=dict)
    method_errors: dict[str, grpc.StatusCode] = dataclasses.field(default_factory=dict)


class FakeCloudTasks:
    """In-memory Cloud Tasks for one or more queues; start() serves it on 127.0.0.1."""

    def __init__(
        self,
        *,
        tombstone_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
        dispatch: bool = False,
    ) -> None:
        self.tasks: dict[str, tasks_v2.Task] = {}
        self.tombstones: dict[str, float] = {}  # name -> time it is refused until
        self.rpcs: list[Rpc] = []
        self.stored: list[str] = []  # every name a create stored, in order
        self.faults = Faults()
        self.executions: list[Execution] = []
        self.dispatch = dispatch
        self.before_rpc: Callable[[str, Any], None] | None = None
        self.on_rpc: Callable[[str], None] | None = None
        self.hidden: set[str] = set()  # task names ListTasks leaves out
        self.tombstone_seconds = tombstone_seconds
        self._clock = clock
        self._random = random.Random(seed)
        self._creates = 0
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------

    def start(self, max_workers: int = 64) -> FakeCloudTasks:
        handlers = {
            "CreateTask": (self._create, tasks_v2.CreateTaskRequest, tasks_v2.Task),
            "GetTask": (self._get, tasks_v2.GetTaskRequest, tasks_v2.Task),
            "DeleteTask": (self._delete, tasks_v2.DeleteTaskRequest, None),
            "ListTasks": (self._list, tasks_v2.ListTasksRequest, tasks_v2.ListTasksResponse),
        }
        rpc_handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(name, fn),
                request_deserializer=request.deserialize,
                response_serializer=(
                    response.serialize if response else empty_pb2.Empty.SerializeToString
                ),
            )
            for name, (fn, request, response) in handlers.items()
        }
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, rpc_handlers),)
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- what tests look at -------------------------------------------------

    def task_ids(self) -> list[str]:
        with self._lock:
            return sorted(name.rsplit("/", 1)[1] for name in self.tasks)

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(t.http_request.body) for t in self.tasks.values()]

    def created_names(self) -> list[str]:
        """Names of every task a create stored, in order (a name twice = a double call)."""
        with self._lock:
            return list(self.stored)

    def run_due(self, now: float | None = None) -> list[str]:
        """Dispatch (remove, record and tombstone) every task due at `now`, in time order."""
        now = self._clock() if now is None else now
        with self._lock:
            due = sorted(
                (t.schedule_time.timestamp(), n)
                for n, t in self.tasks.items()
                if t.schedule_time.timestamp() <= now
            )
            for when, name in due:
                # On its own clock a task runs at its time. Tests that pass a `now` of
                # their own (no dispatch) keep the name refused for an hour of real time.
                self._execute(name, when if self.dispatch else self._clock())
        return [name for _, name in due]

    def _execute(self, name: str, at: float) -> None:
        """Run one task at clock time `at` (the lock is held)."""
        task = self.tasks.pop(name)
        body = json.loads(task.http_request.body or b"{}")
        self.executions.append(Execution(name.rsplit("/", 1)[1], body, at))
        self.tombstones[name] = at + self.tombstone_seconds

    def add_task(self, name: str, schedule_time: float) -> None:
        """Put a task on the queue directly, as another producer would."""
        task = tasks_v2.Task(name=name)
        task.schedule_time = _timestamp(schedule_time)
        with self._lock:
            self.tasks[name] = task

    # -- RPCs ---------------------------------------------------------------

    def _wrap(self, method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            if delay := self.faults.latency + self.faults.method_latency.get(method, 0.0):
                time.sleep(delay)
            if self.before_rpc is not None:
                self.before_rpc(method, request)
            if self.dispatch:
                self.run_due()
            name = getattr(request, "name", "") or getattr(request, "parent", "")
            if method == "CreateTask":
                name = request.task.name
            try:
                self._outage(method)
                result = fn(request, context)
            except _Abort as abort:
                with self._lock:
                    self.rpcs.append(Rpc(method, name, abort.code.name))
                context.abort(abort.code, abort.message)
            with self._lock:
                self.rpcs.append(Rpc(method, name, "OK"))
            if self.on_rpc is not None:
                self.on_rpc(method)
            return result

        return handler

    def _outage(self, method: str) -> None:
        faults = self.faults
        if method in faults.method_errors:
            raise _Abort(faults.method_errors[method], f"injected {method} failure")
        with self._lock:
            if method not in faults.outage_methods:
                return
            if faults.outage_after > 0:
                faults.outage_after -= 1
                return
        raise _Abort(grpc.StatusCode.UNAVAILABLE, "injected outage")

    def _check_queue(self, queue: str) -> None:
        if self.faults.missing_queue:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Queue does not exist: {queue}")
        if not re.fullmatch(r"projects/[^/]+/locations/[^/]+/queues/[^/]+", queue):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad queue name {queue!r}")

    def _create(self, request: tasks_v2.CreateTaskRequest, _ctx: Any) -> tasks_v2.Task:
        self._check_queue(request.parent)
        task = request.task
        if not task.name.startswith(request.parent + "/tasks/"):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "task name outside parent")
        if not TASK_ID.fullmatch(task.name.rsplit("/", 1)[1]):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "bad task id")
        if task.schedule_time.timestamp() > self._clock() + THIRTY_DAYS:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "schedule_time beyond 30 days")
        faults = self.faults
        with self._lock:
            self._creates += 1
            count = self._creates
            fail = count <= faults.fail_first or (
                faults.fail_fraction and self._random.random() < faults.fail_fraction
            )
        if fail:
            raise _Abort(faults.fail_code, "injected failure")
        user_id = json.loads(task.http_request.body or b"{}").get("user_id")
        if user_id in faults.permanent:
            raise _Abort(faults.permanent[user_id], f"injected permanent failure for {user_id}")
        now = self._clock()
        with self._lock:
            if task.name in self.tasks or self.tombstones.get(task.name, 0) > now:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"task exists: {task.name}")
            stored = tasks_v2.Task(task)
            stored.create_time = _timestamp(now)
            self.tasks[task.name] = stored
            self.stored.append(task.name)
            if self.dispatch and task.schedule_time.timestamp() <= now:
                self._execute(task.name, now)  # due already: it runs at once
            timeout = faults.timeout_after_store > 0
            if timeout:
                faults.timeout_after_store -= 1
        if timeout:
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "injected timeout after store")
        return stored

    def _get(self, request: tasks_v2.GetTaskRequest, _ctx: Any) -> tasks_v2.Task:
        self._check_queue(request.name.rsplit("/tasks/", 1)[0])
        with self._lock:
            task = self.tasks.get(request.name)
        if task is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"no task {request.name}")
        return task

    def _delete(self, request: tasks_v2.DeleteTaskRequest, _ctx: Any) -> empty_pb2.Empty:
        self._check_queue(request.name.rsplit("/tasks/", 1)[0])
        with self._lock:
            if self.tasks.pop(request.name, None) is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"no task {request.name}")
            self.tombstones[request.name] = self._clock() + self.tombstone_seconds
        return empty_pb2.Empty()

    def _list(self, request: tasks_v2.ListTasksRequest, _ctx: Any) -> tasks_v2.ListTasksResponse:
        self._check_queue(request.parent)
        if self.faults.list_error is not None:
            raise _Abort(self.faults.list_error, "injected ListTasks failure")
        size = min(request.page_size or 1000, 1000)
        start = int(request.page_token or 0)
        with self._lock:
            names = sorted(
                n
                for n in self.tasks
                if n.startswith(request.parent + "/tasks/") and n not in self.hidden
            )
            page = [tasks_v2.Task(self.tasks[n]) for n in names[start : start + size]]
        if request.response_view != tasks_v2.Task.View.FULL:
            for task in page:
                task.http_request.body = b""
        token = str(start + size) if start + size < len(names) else ""
        return tasks_v2.ListTasksResponse(tasks=page, next_page_token=token)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _timestamp(seconds: float) -> Any:
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
