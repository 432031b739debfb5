"""deploy.sh against a recording fake gcloud that keeps state and refuses any command,
flag or choice the real Google Cloud CLI's tree lacks; the Dockerfile and job.yaml
without Docker."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml
from dotenv import dotenv_values
from dotenv.parser import parse_stream
from hypothesis import given, settings
from hypothesis import strategies as st

import main
from tests.conftest import ROOT, Database, job_env
from tests.fake_gcloud import cli_problem, write_tree

SETTINGS = {
    "GOOGLE_CLOUD_PROJECT": "anpi-prod",
    "CLOUD_SQL_INSTANCE": "anpi-prod:asia-northeast1:anpi-db",
    "DB_USER": "anpi_job",
    "DB_NAME": "anpi",
    "DB_PASSWORD_SECRET": "anpi-db-password",
    "ANPI_CALL_URL": "https://webhook.example.com/call",
    "IAM_WAIT_SECONDS": "0",  # no real IAM to wait for
}
READ_ONLY = {"describe", "list", "versions", "get-default-service-account", "read", "get"}
RUNTIME_SA = "serviceAccount:anpi-call-job@anpi-prod.iam.gserviceaccount.com"
SCHEDULER_SA = "anpi-call-scheduler@anpi-prod.iam.gserviceaccount.com"
BUILD_SA = "serviceAccount:123-compute@developer.gserviceaccount.com"
QUEUE_ROLES = ("roles/cloudtasks.enqueuer", "roles/cloudtasks.viewer", "roles/cloudtasks.taskDeleter")
JOB = "anpi-call-create-task-job"
CHANGES_JOB = "anpi-call-changes-job"


@pytest.fixture(scope="session")
def cli_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gcloud") / "tree.json"
    write_tree(path)
    return path


class Deploy:
    """A copy of deploy.sh and job.yaml with a fake gcloud first on PATH."""

    def __init__(self, tmp: Path, tree: Path) -> None:
        self.dir = tmp / "repo"
        self.dir.mkdir()
        for name in ("deploy.sh", "job.yaml"):
            shutil.copy(ROOT / name, self.dir / name)
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'fake_gcloud.py'} \"$@\"\n")
        gcloud.chmod(0o755)
        # deploy.sh's waits (retries, IAM propagation) pass at once and are recorded.
        self.sleeps = tmp / "sleeps.log"
        sleep = bin_dir / "sleep"
        sleep.write_text(f'#!/bin/sh\necho "$1" >> {self.sleeps}\n')
        sleep.chmod(0o755)
        self.log = tmp / "gcloud.log"
        self.state = tmp / "gcloud.json"
        self.state.write_text(json.dumps({"secrets": ["anpi-db-password"], "resources": {}}))
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp),
            "FAKE_GCLOUD_LOG": str(self.log),
            "FAKE_GCLOUD_STATE": str(self.state),
            "FAKE_GCLOUD_TREE": str(tree),
            "TMPDIR": str(tmp / "tmp"),
        }
        (tmp / "tmp").mkdir()

    def run(self, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        """Run deploy.sh; every gcloud call it made must fit the real CLI's tree."""
        self.log.write_text("")
        env = {**self.env, **SETTINGS, **settings}
        env = {k: v for k, v in env.items() if v is not None and v != "<unset>"}
        result = subprocess.run(
            ["bash", str(self.dir / "deploy.sh"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        invalid = [c for c in self.calls() if "invalid" in c]
        assert not invalid, f"gcloud calls the real CLI would refuse: {invalid}"
        assert not list((self.dir.parent / "tmp").iterdir()), "temporary files left behind"
        return result

    def waits(self) -> list[str]:
        """The seconds deploy.sh slept, in order, over all its runs."""
        return self.sleeps.read_text().split() if self.sleeps.exists() else []

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def mutating(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls() if not READ_ONLY & set(c["argv"])]

    def find(self, *words: str) -> list[list[str]]:
        return [argv for argv in (c["argv"] for c in self.calls()) if all(w in argv for w in words)]

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state.read_text())

    def set_state(self, **values: Any) -> None:
        self.state.write_text(json.dumps({**self.read_state(), **values}))

    def bindings(self) -> set[tuple[str, ...]]:
        return {tuple(b) for b in self.read_state().get("bindings", [])}

    def rendered_job(self, name: str = JOB) -> dict[str, Any]:
        """The job.yaml deploy.sh rendered for job `name` in its last run."""
        replaces = [c for c in self.calls() if c["argv"][:3] == ["run", "jobs", "replace"]]
        jobs = [yaml.safe_load(c["file"]) for c in replaces]
        assert all("__" not in c["file"] for c in replaces)
        [job] = [j for j in jobs if j["metadata"]["name"] == name]
        return dict(job)

    def scheduler(self, name: str) -> list[str]:
        """The one `scheduler jobs create|update http NAME` of the last run."""
        [argv] = [a for a in self.find("scheduler", "jobs", "http") if a[4] == name]
        return argv


def container_env(job: dict[str, Any]) -> dict[str, Any]:
    [container] = job["spec"]["template"]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.fixture
def deploy(tmp_path: Path, cli_tree: Path) -> Deploy:
    return Deploy(tmp_path, cli_tree)


# -- the CLI tree check itself ---------------------------------------------------------


def test_the_tree_check_refuses_what_real_gcloud_refuses(cli_tree: Path, deploy: Deploy) -> None:
    tree = json.loads(cli_tree.read_text())
    assert cli_problem(["run", "jobs", "execute", "j", "--region=r", "--wait"], tree) is None
    assert cli_problem(["run", "jobs", "execute", "j", "--no-wait"], tree) is None
    assert cli_problem(["scheduler", "jobs", "create", "http", "j", "--http-method=POST"], tree) is None
    assert "unrecognized flag --bogus" in str(cli_problem(["run", "jobs", "execute", "j", "--bogus=1"], tree))
    assert "invalid choice 'lanch'" in str(cli_problem(["run", "jobs", "lanch", "j"], tree))
    assert "not one of" in str(cli_problem(["scheduler", "jobs", "create", "http", "j", "--http-method=FETCH"], tree))
    assert "takes no value" in str(cli_problem(["run", "jobs", "execute", "j", "--wait=yes"], tree))
    assert "command group" in str(cli_problem(["run", "jobs"], tree))
    assert "invalid choice 'policies' for gcloud monitoring" in str(
        cli_problem(["monitoring", "policies", "create", "--policy-from-file=f"], tree)
    )  # GA has no alert policies: only alpha does
    # ... and the fake answers such a call as gcloud does, exit 2, recorded as invalid.
    result = subprocess.run(["gcloud", "tasks", "queues", "describe", "q", "--zone=x"],
                            env=deploy.env, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "unrecognized flag --zone" in result.stderr
    assert "invalid" in deploy.calls()[0]


# -- deploy ------------------------------------------------------------------------------


def test_missing_settings_fail_fast_naming_each(deploy: Deploy) -> None:
    result = deploy.run(CLOUD_SQL_INSTANCE="<unset>", ANPI_CALL_URL="<unset>", DB_PASSWORD_SECRET="")
    assert result.returncode != 0
    for name in ("CLOUD_SQL_INSTANCE", "ANPI_CALL_URL", "DB_PASSWORD_SECRET"):
        assert name in result.stderr
    assert deploy.calls() == []


@pytest.mark.parametrize("command", [["--dry-run"], ["status"]])
def test_without_a_gcloud_login_one_line_says_to_log_in(deploy: Deploy, command: list[str]) -> None:
    """Checked before anything else, --dry-run and the day-2 commands included, instead
    of failing later on a describe with gcloud's login hint buried in its error."""
    deploy.set_state(logged_out=True)
    result = deploy.run(*command)
    assert result.returncode == 1
    [error] = [line for line in result.stderr.splitlines() if not line.startswith("+ gcloud ")]
    assert error == "[deploy] error: gcloud has no active account: run gcloud auth login"
    assert [c["argv"][:2] for c in deploy.calls()] == [["auth", "list"]]


def test_the_project_is_google_cloud_project_or_gcloud_s_own(deploy: Deploy) -> None:
    none = deploy.run("--dry-run", GOOGLE_CLOUD_PROJECT="<unset>")
    assert none.returncode == 1
    [error] = [line for line in none.stderr.splitlines() if not line.startswith("+ gcloud ")]
    assert error == ("[deploy] error: no project: set GOOGLE_CLOUD_PROJECT (deploy.env or the"
                     " environment) or run gcloud config set project PROJECT_ID")  # fmt: skip
    assert [c["argv"][:2] for c in deploy.calls()] == [["auth", "list"], ["config", "get"]]
    deploy.set_state(config_project="anpi-prod", resources={"queue/anpi-call-queue": {}})
    configured = deploy.run("--deploy-only", "--skip-test", GOOGLE_CLOUD_PROJECT="<unset>")
    assert configured.returncode == 0, configured.stderr
    assert "project anpi-prod (gcloud config; GOOGLE_CLOUD_PROJECT is not set)" in configured.stderr
    assert container_env(deploy.rendered_job())["GOOGLE_CLOUD_PROJECT"] == "anpi-prod"
    assert all("--project=anpi-prod" in argv for argv in deploy.mutating() if argv[0] != "projects")
    # GOOGLE_CLOUD_PROJECT wins, and gcloud is not asked.
    deploy.run("status", GOOGLE_CLOUD_PROJECT="other")
    assert not deploy.find("config") and deploy.find("--project=other")


def test_malformed_settings_fail_fast(deploy: Deploy) -> None:
    result = deploy.run(CLOUD_SQL_INSTANCE="anpi-db", ANPI_CALL_URL="http://x/call",
                        ALERT_EMAIL="ops@example.com, nobody", DB_NAME="a\nb")  # fmt: skip
    assert result.returncode != 0
    for name in ("CLOUD_SQL_INSTANCE", "ANPI_CALL_URL", "'nobody' is not an email", "DB_NAME holds"):
        assert name in result.stderr
    assert deploy.calls() == []
    # The quick-run job and trigger must not replace the hourly ones.
    same = deploy.run(CHANGES_JOB_NAME=JOB, CHANGES_SCHEDULER_JOB_NAME="anpi-call-scheduler-job",
                      CHANGES_SCHEDULE="* * *")  # fmt: skip
    assert same.returncode == 1
    for problem in ("CHANGES_JOB_NAME must differ from JOB_NAME",
                    "CHANGES_SCHEDULER_JOB_NAME must differ from SCHEDULER_JOB_NAME",
                    "CHANGES_SCHEDULE must be a cron schedule of 5 fields, or empty"):  # fmt: skip
        assert problem in same.stderr
    assert deploy.calls() == []


def test_first_full_run(deploy: Deploy) -> None:
    result = deploy.run()
    assert result.returncode == 0, result.stderr
    assert all(c["rc"] == 0 for c in deploy.calls() if not READ_ONLY & set(c["argv"]))
    [enable] = deploy.find("services", "enable")
    for api in ("run", "cloudtasks", "cloudscheduler", "cloudbuild", "artifactregistry",
                "sqladmin", "secretmanager", "iam", "monitoring", "logging"):  # fmt: skip
        assert f"{api}.googleapis.com" in enable

    [queue] = deploy.find("tasks", "queues", "create")
    assert "anpi-call-queue" in queue and "--location=asia-northeast1" in queue
    for setting in ("--max-attempts=4", "--min-backoff=30s", "--max-backoff=120s",
                    "--max-retry-duration=600s", "--max-dispatches-per-second=10",
                    "--max-concurrent-dispatches=50"):  # fmt: skip
        assert setting in queue

    bindings = deploy.bindings()
    assert ("secret", "anpi-db-password", RUNTIME_SA, "roles/secretmanager.secretAccessor") in bindings
    for role in QUEUE_ROLES:
        assert ("queue", "anpi-call-queue", RUNTIME_SA, role) in bindings
    # The scheduler's account may run both jobs, and nothing more (no runWithOverrides).
    assert {b for b in bindings if b[2] == f"serviceAccount:{SCHEDULER_SA}"} == {
        ("run-job", JOB, f"serviceAccount:{SCHEDULER_SA}", "roles/run.invoker"),
        ("run-job", CHANGES_JOB, f"serviceAccount:{SCHEDULER_SA}", "roles/run.invoker"),
    }
    # Cloud Build's account: push to the repository only, logs and source on the project.
    assert ("repository", "anpi", BUILD_SA, "roles/artifactregistry.writer") in bindings
    # Least privilege: nothing else on the project, no invoker on the project.
    assert {b for b in bindings if b[0] == "project"} == {
        ("project", "anpi-prod", RUNTIME_SA, "roles/cloudsql.client"),
        ("project", "anpi-prod", BUILD_SA, "roles/logging.logWriter"),
        ("project", "anpi-prod", BUILD_SA, "roles/storage.objectViewer"),
    }

    # Two triggers: the hourly run, and the quick run every minute, each of its own job.
    assert len(deploy.find("scheduler", "jobs", "create", "http")) == 2
    for name, schedule, job in (("anpi-call-scheduler-job", "0 * * * *", JOB),
                                ("anpi-call-changes-scheduler-job", "* * * * *", CHANGES_JOB)):  # fmt: skip
        scheduler = deploy.scheduler(name)
        assert scheduler[2] == "create" and f"--schedule={schedule}" in scheduler
        assert "--time-zone=Asia/Tokyo" in scheduler
        assert (
            "--uri=https://asia-northeast1-run.googleapis.com/apis/run.googleapis.com/v1/"
            f"namespaces/anpi-prod/jobs/{job}:run"
        ) in scheduler
        assert f"--oauth-service-account-email={SCHEDULER_SA}" in scheduler
        assert not [a for a in scheduler if a.startswith(("--oidc", "--message-body"))]  # no overrides

    # The smoke test: --check (database, grants, every row), then --dry-run (the queue),
    # then one quick run of the quick-run job as it is (its own args, no override).
    check, dry, changes = deploy.find("run", "jobs", "execute")
    assert check[3] == JOB and "--args=--check" in check and "--wait" in check
    assert dry[3] == JOB and "--args=--dry-run" in dry and "--wait" in dry
    assert changes[3] == CHANGES_JOB and "--wait" in changes
    assert not [a for a in changes if a.startswith("--args")]

    # Order: APIs, accounts, queue, repository, image, job, scheduler, alerts, smoke test.
    order = [c["argv"] for c in deploy.calls() if not READ_ONLY & set(c["argv"])]
    firsts = [order.index(next(o for o in order if o[: len(key)] == key)) for key in (
        ["services", "enable"], ["iam", "service-accounts"], ["tasks", "queues"],
        ["artifacts", "repositories"], ["builds", "submit"], ["run", "jobs"],
        ["scheduler", "jobs"], ["logging", "metrics"], ["alpha", "monitoring"])]  # fmt: skip
    assert firsts == sorted(firsts)
    assert order[-1][:3] == ["run", "jobs", "execute"]
    # Every command is printed before it runs.
    assert result.stderr.count("\n+ gcloud ") + result.stderr.startswith("+ gcloud ") >= len(deploy.calls())


def test_rendered_job_yaml(deploy: Deploy) -> None:
    assert deploy.run("--skip-test").returncode == 0
    job = deploy.rendered_job()
    assert job["apiVersion"] == "run.googleapis.com/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == JOB
    execution = job["spec"]["template"]
    assert (
        execution["metadata"]["annotations"]["run.googleapis.com/cloudsql-instances"]
        == "anpi-prod:asia-northeast1:anpi-db"
    )
    assert execution["spec"]["taskCount"] == 1 and execution["spec"]["parallelism"] == 1
    task = execution["spec"]["template"]["spec"]
    assert task["serviceAccountName"] == RUNTIME_SA.split(":")[1]
    assert task["maxRetries"] == 2
    assert task["timeoutSeconds"] == 1800
    [container] = task["containers"]
    assert not container.get("args")
    assert container["image"].startswith("asia-northeast1-docker.pkg.dev/anpi-prod/anpi/anpi-call-scheduler:")
    env = container_env(job)
    assert env["INSTANCE_CONNECTION_NAME"] == "anpi-prod:asia-northeast1:anpi-db"
    assert env["DB_PASSWORD"] == {"secretKeyRef": {"name": "anpi-db-password", "key": "7"}}
    assert env["ANPI_CALL_URL"] == "https://webhook.example.com/call"
    assert env["ENQUEUE_MAX_PER_SECOND"] == "500" and env["QUEUE_PER_SHARD"] == "0"
    assert env["QUEUE_MAX_DISPATCHES_PER_SECOND"] == "10"
    # Every variable job.yaml sets is one the job reads.
    source = (ROOT / "main.py").read_text()
    assert [name for name in env if f'"{name}"' not in source] == []

    # The quick-run job: the same job but for its args, its name, no retry (the next
    # minute's run is its retry) and a shorter timeout.
    quick = deploy.rendered_job(CHANGES_JOB)
    quick_task = quick["spec"]["template"]["spec"]["template"]["spec"]
    [quick_container] = quick_task["containers"]
    assert quick_container.pop("args") == ["--changes"]
    assert (quick_task.pop("maxRetries"), quick_task.pop("timeoutSeconds")) == (0, 300)
    assert quick["metadata"].pop("name") == CHANGES_JOB
    container.pop("args", None)
    task.pop("maxRetries"), task.pop("timeoutSeconds"), job["metadata"].pop("name")
    assert quick == job  # all the rest alike: image, env, taskCount, Cloud SQL annotation


def test_values_survive_into_job_yaml_exactly(deploy: Deploy) -> None:
    """`&` (bash 5.2's patsub_replacement), `#` (a YAML comment), quotes, spaces and YAML
    keywords and numbers come back from the rendered job.yaml exactly as they went in."""
    values = {
        "ANPI_CALL_URL": "https://hook.example.com/call?a=1&b=2&&c=&#frag 'x' \"y\" \\z",
        "DB_USER": "yes",
        "DB_NAME": "0123",
        "DB_PASSWORD_SECRET": "no",
        "DEFAULT_TIMEZONE": "Asia/Tokyo # not a comment",
        "CLOUD_TASKS_QUEUE": "null",
    }
    deploy.set_state(secrets=["no"], resources={"queue/null": {}})
    result = deploy.run("--skip-test", "--deploy-only", **values)
    assert result.returncode == 0, result.stderr
    env = container_env(deploy.rendered_job())
    assert env["ANPI_CALL_URL"] == values["ANPI_CALL_URL"]
    assert env["DB_USER"] == "yes" and env["DB_NAME"] == "0123"
    assert env["DEFAULT_TIMEZONE"] == values["DEFAULT_TIMEZONE"]
    assert env["CLOUD_TASKS_QUEUE"] == "null"
    assert env["DB_PASSWORD"]["secretKeyRef"]["name"] == "no"


def test_second_full_run_updates_without_a_rejected_create(deploy: Deploy) -> None:
    assert deploy.run(ALERT_EMAIL="ops@example.com").returncode == 0
    second = deploy.run(ALERT_EMAIL="ops@example.com")
    assert second.returncode == 0, second.stderr
    assert all(c["rc"] == 0 for c in deploy.calls())  # every describe found its resource
    assert not deploy.find("create")  # every resource existed: updated, not created
    assert deploy.find("tasks", "queues", "update")
    assert deploy.find("scheduler", "jobs", "update", "http")
    assert len(deploy.find("logging", "metrics", "update")) == 3
    # Unchanged policies are left alone (an update would restart the absence condition).
    assert not deploy.find("policies", "update") and second.stderr.count("is up to date") == 6


def test_dry_run_changes_nothing(deploy: Deploy) -> None:
    result = deploy.run("--dry-run", ALERT_EMAIL="ops@example.com")
    assert result.returncode == 0, result.stderr
    assert deploy.mutating() == []
    # ... but prints every command it would run.
    for words in ("gcloud services enable", "gcloud tasks queues create", "gcloud builds submit",
                  "gcloud run jobs replace", "gcloud scheduler jobs create http",
                  "gcloud beta monitoring channels create", "gcloud logging metrics create",
                  "gcloud alpha monitoring policies create", "gcloud run jobs execute"):  # fmt: skip
        assert f"+ {words}" in result.stderr


def test_infrastructure_only(deploy: Deploy) -> None:
    assert deploy.run("--infrastructure-only").returncode == 0
    assert deploy.find("tasks", "queues", "create")
    assert deploy.find("artifacts", "repositories", "create")
    assert deploy.find("alpha", "monitoring", "policies", "create")
    assert not deploy.find("builds", "submit") and not deploy.find("run", "jobs") and not deploy.find("scheduler")


def test_deploy_only(deploy: Deploy) -> None:
    assert deploy.run("--infrastructure-only").returncode == 0
    result = deploy.run("--deploy-only")
    assert result.returncode == 0, result.stderr
    assert not deploy.find("services") and not deploy.find("monitoring")
    assert [q[:4] for q in deploy.find("tasks", "queues")] == [["tasks", "queues", "describe", "anpi-call-queue"]]
    assert deploy.find("builds", "submit") and deploy.find("run", "jobs", "replace")
    assert deploy.find("scheduler", "jobs", "create", "http")
    assert deploy.find("run", "jobs", "execute")


def test_deploy_only_stops_when_a_queue_the_shards_need_is_missing(deploy: Deploy) -> None:
    """TASK_COUNT=4 on one queue so far: before building or deploying anything, it names
    the missing queues and the command that creates them; only describes ran."""
    deploy.set_state(resources={"queue/anpi-call-queue": {}})
    for flags in (["--deploy-only"], ["--deploy-only", "--dry-run"]):
        result = deploy.run(*flags, TASK_COUNT="4")
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1] == (
            "[deploy] error: --deploy-only: TASK_COUNT=4 QUEUE_PER_SHARD=1 needs queues that do not exist:"
            " anpi-call-queue-0 anpi-call-queue-1 anpi-call-queue-2 anpi-call-queue-3; create them first"
            " with ./deploy.sh --infrastructure-only (or run the full ./deploy.sh)"
        )
        assert deploy.mutating() == [] and not deploy.find("builds")
    # One of the four exists: the other three are named.
    deploy.set_state(resources={**deploy.read_state()["resources"], "queue/anpi-call-queue-0": {}})
    assert "exist: anpi-call-queue-1 anpi-call-queue-2 anpi-call-queue-3;" in deploy.run(
        "--deploy-only", TASK_COUNT="4").stderr  # fmt: skip


def test_a_describe_that_is_denied_stops_the_script(deploy: Deploy) -> None:
    """Only NOT_FOUND means absent: PERMISSION_DENIED must not lead to a create."""
    deploy.set_state(faults={"deny": ["tasks queues describe"]})
    result = deploy.run()
    assert result.returncode == 1
    assert "PERMISSION_DENIED" in result.stderr  # gcloud's own error
    assert "cannot tell whether it exists: gcloud tasks queues describe anpi-call-queue" in result.stderr
    assert not deploy.find("tasks", "queues", "create") and not deploy.find("builds")


def test_iam_bindings_are_retried_while_a_new_account_propagates(deploy: Deploy) -> None:
    deploy.set_state(faults={"iam_not_yet": 2})
    result = deploy.run("--infrastructure-only")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("IAM not ready yet") == 2
    attempts = [c["rc"] for c in deploy.calls() if "add-iam-policy-binding" in c["argv"]]
    assert attempts[:3] == [1, 1, 0]  # the first binding: twice "does not exist", then done
    assert deploy.waits() == ["1", "2"]  # backoff
    assert ("project", "anpi-prod", RUNTIME_SA, "roles/cloudsql.client") in deploy.bindings()


def test_iam_retries_are_bounded(deploy: Deploy) -> None:
    deploy.set_state(faults={"iam_not_yet": 100})
    result = deploy.run("--infrastructure-only", IAM_RETRY_SECONDS="3")
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "failed (after 3s of retries): gcloud projects add-iam-policy-binding" in result.stderr
    assert len([c for c in deploy.calls() if "add-iam-policy-binding" in c["argv"]]) == 3
    assert deploy.waits() == ["1", "2"]  # the next wait, 4 s, would pass the 3 s limit


def test_the_smoke_test_waits_for_iam_and_retries_once(deploy: Deploy) -> None:
    deploy.set_state(faults={"execute_fail": 1})
    result = deploy.run(IAM_WAIT_SECONDS="1")
    assert result.returncode == 0, result.stderr
    assert "waiting 1s for the new IAM grants" in result.stderr
    assert "retrying once in 1s" in result.stderr
    assert [c["rc"] for c in deploy.calls() if "execute" in c["argv"]] == [1, 0, 0, 0]
    assert deploy.waits() == ["1", "1"]  # for the grants, then before the retry


def test_skip_test_and_a_failing_smoke_test(deploy: Deploy) -> None:
    assert deploy.run("--skip-test").returncode == 0
    assert not deploy.find("execute")
    deploy.set_state(faults={"execute_fail": -1})
    failed = deploy.run("--deploy-only")
    assert failed.returncode != 0
    assert "smoke test failed (--check)" in failed.stderr
    assert len(deploy.find("execute")) == 2  # tried, then retried once


def test_oidc_account_gets_service_account_user(deploy: Deploy) -> None:
    account = "anpi-call-invoker@anpi-prod.iam.gserviceaccount.com"
    deploy.set_state(resources={f"service-account/{account}": {}})
    assert deploy.run("--skip-test", TASKS_OIDC_SERVICE_ACCOUNT=account).returncode == 0
    assert ("service-account", account, RUNTIME_SA, "roles/iam.serviceAccountUser") in deploy.bindings()


def test_image_tag_names_the_commit_and_an_uncommitted_tree(deploy: Deploy) -> None:
    deploy.set_state(resources={"queue/anpi-call-queue": {}})

    def tag() -> str:
        assert deploy.run("--skip-test", "--deploy-only").returncode == 0
        [build] = deploy.find("builds", "submit")
        return next(a for a in build if a.startswith("--tag=")).rsplit(":", 1)[1]

    assert tag().startswith("nogit-")  # a copy without git
    git = ["git", "-C", str(deploy.dir), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    assert tag() == sha
    (deploy.dir / "job.yaml").write_text((deploy.dir / "job.yaml").read_text() + "\n")
    dirty = tag()
    assert dirty.startswith(f"{sha}-dirty-") and len(dirty) == len(sha) + len("-dirty-20261202T090000Z")


# -- deploy.env -------------------------------------------------------------------------

TRICKY_DOTENV = """\
# a comment
export GOOGLE_CLOUD_PROJECT=anpi-prod
CLOUD_SQL_INSTANCE=anpi-prod:asia-northeast1:anpi-db
SCHEDULE="0 * * * *"   # every hour
DB_USER = 'anpi_job'
DB_NAME=anpi # inline comment
ANPI_CALL_URL="https://hook.example.com/call?a=1&b=2#frag"
DB_PASSWORD_SECRET=anpi-db-password#not-a-comment
ALERT_EMAIL= # empty, then a comment
REGION='asia-northeast1'
QUOTED="say \\"hi\\" \\t tab \\n newline \\\\ back"
SINGLE='it\\'s \\n raw'
SPACES=  padded value<3 spaces>
EMPTY=
EXPANDED=${GOOGLE_CLOUD_PROJECT}-x-${MISSING:-fallback}-${ALSO_MISSING}
NOVALUE
""".replace("<3 spaces>", "   ")


def dotenv_as_deploy_reads_it(tmp_path: Path, text: str, names: list[str]) -> dict[str, str | None] | None:
    """Source deploy.sh and read `text` with its parser: name -> value (None: unset), or
    None when it refuses the file."""
    path = tmp_path / "deploy.env"
    path.write_text(text)
    script = f'source {ROOT / "deploy.sh"}; read_dotenv {path}; for n in {" ".join(names)}; do ' \
        'if [[ -v $n ]]; then printf "%s=%s\\0" "$n" "${!n}"; fi; done'  # fmt: skip
    result = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"]},
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        assert f"{path}:" in result.stderr  # refused naming the file and line
        return None
    values = dict(item.split("=", 1) for item in result.stdout.split("\0") if item)
    return {name: values.get(name) for name in names}


def test_deploy_env_is_read_as_python_dotenv_reads_it(tmp_path: Path) -> None:
    expected = dotenv_values(stream=io.StringIO(TRICKY_DOTENV))
    names = list(expected)
    assert "NOVALUE" in names and expected["SCHEDULE"] == "0 * * * *"
    assert dotenv_as_deploy_reads_it(tmp_path, TRICKY_DOTENV, names) == dict(expected)


# ASCII and Japanese: Unicode spaces such as U+00A0 are whitespace to Python, not to
# bash, and no setting holds one. Plus the pieces the rules are about.
DOTENV_VALUES = st.lists(
    st.text(st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("安否確認"), max_size=6)
    | st.sampled_from(["${V0}", "${V1:-d}", "${NONE}", "${X:-}", "\\n", "\\t", "\\\\", " #c", "#", "'", '"', " "]),
    max_size=4,
).map("".join)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["V0", "V1", "V2", "V3"]),  # names repeat
                          st.sampled_from(["plain", "single", "double", "escapes", "export"]),
                          DOTENV_VALUES),
                min_size=1, max_size=8))  # fmt: skip
def test_deploy_env_matches_python_dotenv_on_any_value(
    tmp_path_factory: pytest.TempPathFactory, lines: list[tuple[str, str, str]]
) -> None:
    text, names = "", ["V0", "V1", "V2", "V3"]
    for name, style, value in lines:
        if style == "single":
            text += f"{name}='{value.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'\n"
        elif style == "double":
            text += f'{name}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"\n'
        elif style == "escapes":  # backslashes left as they are: \n, \t ... are decoded
            text += f'{name}="{value}"\n'
        else:
            text += f"{'export ' if style == 'export' else ''}{name}={value}\n"
    got = dotenv_as_deploy_reads_it(tmp_path_factory.mktemp("env"), text, names)
    bindings = list(parse_stream(io.StringIO(text)))
    if any(b.error or "\n" in b.original.string.rstrip("\n") for b in bindings):
        # python-dotenv skips a line it cannot parse and lets a quoted value run on
        # over lines; deploy.sh stops at both, naming the line.
        assert got is None, text
    else:
        expected = dotenv_values(stream=io.StringIO(text))
        assert got == {n: expected.get(n) for n in names}, text


def test_deploy_env_file_wins_only_over_unset_variables(deploy: Deploy) -> None:
    (deploy.dir / "deploy.env").write_text(
        TRICKY_DOTENV + 'DB_NAME="from file, lost to the environment"\n'
    )
    deploy.set_state(secrets=["anpi-db-password#not-a-comment"])
    env_only = {k: "<unset>" for k in SETTINGS if k not in ("DB_NAME", "IAM_WAIT_SECONDS")}
    result = deploy.run("--skip-test", **env_only, DB_NAME="from_env")
    assert result.returncode == 0, result.stderr
    assert "--schedule=0 * * * *" in deploy.scheduler("anpi-call-scheduler-job")  # no quotes, no comment
    env = container_env(deploy.rendered_job())
    assert env["ANPI_CALL_URL"] == "https://hook.example.com/call?a=1&b=2#frag"
    assert env["DB_USER"] == "anpi_job" and env["DB_NAME"] == "from_env"
    assert env["DB_PASSWORD"]["secretKeyRef"]["name"] == "anpi-db-password#not-a-comment"


def test_help_and_unknown_flags(deploy: Deploy) -> None:
    helped = deploy.run("--help")
    assert helped.returncode == 0
    for word in ("--infrastructure-only", "status", "logs [--since 2h] [--severity", "execute [--dry-run | --changes] [--wait]",
                 "pause | resume", "rollback TAG", "missed [--since 24h]"):  # fmt: skip
        assert word in helped.stdout
    assert deploy.run("--bogus").returncode != 0
    assert deploy.run("logs", "--bogus").returncode != 0
    assert deploy.calls() == []


def test_an_unknown_command_is_named_as_one(deploy: Deploy) -> None:
    result = deploy.run("frobnicate")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "unknown command: frobnicate" in line and "unknown flag" not in line
    for command in ("deploy", "status", "logs", "missed", "execute", "pause", "resume", "rollback"):
        assert command in line.split("commands:")[1]
    assert deploy.calls() == []


# -- alerts -------------------------------------------------------------------------------


def test_alerts_are_created_once_and_updated_on_a_rerun(deploy: Deploy) -> None:
    first = deploy.run("--infrastructure-only")
    assert first.returncode == 0, first.stderr
    assert "ALERT_EMAIL is not set: the alert policies exist but notify nobody" in first.stderr
    state = deploy.read_state()
    policies = {p["displayName"]: p for p in state["policies"].values()}
    assert sorted(policies) == sorted([
        f"{JOB}: an execution failed", f"{JOB}: no successful execution for 2 hours",
        f"{JOB}: rows became invalid", f"{JOB}: calls failed or were not attempted",
        f"{JOB}: quick runs keep failing", f"{JOB}: calls were missed"])  # fmt: skip
    assert all(p["notificationChannels"] == [] for p in policies.values())
    assert all("./deploy.sh" in p["documentation"]["content"] for p in policies.values())

    [failed] = policies[f"{JOB}: an execution failed"]["conditions"]
    assert 'metric.type="run.googleapis.com/job/completed_execution_count"' in failed["conditionThreshold"]["filter"]
    assert 'metric.labels.result="failed"' in failed["conditionThreshold"]["filter"]
    [absent] = policies[f"{JOB}: no successful execution for 2 hours"]["conditions"]
    assert absent["conditionAbsent"]["duration"] == "7200s"
    assert 'metric.labels.result="succeeded"' in absent["conditionAbsent"]["filter"]
    [invalid] = policies[f"{JOB}: rows became invalid"]["conditions"]
    assert f"logging.googleapis.com/user/{JOB}-invalid-rows" in invalid["conditionThreshold"]["filter"]
    metrics = {m[3]: next(a for a in m if a.startswith("--log-filter=")) for m in deploy.find("metrics", "create")}
    assert set(metrics) == {f"{JOB}-invalid-rows", f"{JOB}-calls-not-placed", f"{JOB}-calls-missed"}
    # The log-based metrics count both jobs' lines; the execution policies of the hourly
    # run are about the hourly job alone, and quick runs alert only when they keep failing.
    both = f'(resource.labels.job_name="{JOB}" OR resource.labels.job_name="{CHANGES_JOB}")'
    assert all(both in f for f in metrics.values())
    for condition in (failed["conditionThreshold"], absent["conditionAbsent"]):
        assert f'resource.labels.job_name="{JOB}" AND' in condition["filter"] and CHANGES_JOB not in condition["filter"]
    [quick] = [c["conditionThreshold"] for c in policies[f"{JOB}: quick runs keep failing"]["conditions"]]
    assert f'resource.labels.job_name="{CHANGES_JOB}" AND' in quick["filter"] and f'"{JOB}"' not in quick["filter"]
    assert 'metric.labels.result="failed"' in quick["filter"]
    assert (quick["thresholdValue"], quick["aggregations"][0]["alignmentPeriod"]) == (3, "900s")
    missed = policies[f"{JOB}: calls were missed"]
    [condition] = [c["conditionThreshold"] for c in missed["conditions"]]
    assert f"logging.googleapis.com/user/{JOB}-calls-missed" in condition["filter"]
    assert condition["thresholdValue"] == 0 and condition["aggregations"][0]["perSeriesAligner"] == "ALIGN_SUM"
    doc = missed["documentation"]["content"]
    assert "`./deploy.sh missed --since 24h`" in doc and "how many calls were missed" in doc

    # Rerun, now with two addresses (one repeated): two channels, the same four
    # policies, updated because their definition changed.
    second = deploy.run("--infrastructure-only", ALERT_EMAIL="ops@example.com, oncall@example.com ops@example.com")
    assert second.returncode == 0, second.stderr
    assert len(deploy.find("beta", "monitoring", "channels", "create")) == 2
    assert not deploy.find("policies", "create") and not deploy.find("metrics", "create")
    assert len(deploy.find("policies", "update")) == 6
    state = deploy.read_state()
    assert len(state["policies"]) == 6
    channels = sorted(state["channels"].values())
    assert all(sorted(p["notificationChannels"]) == channels for p in state["policies"].values())
    # A third run reuses the channels and leaves the policies as they are.
    assert deploy.run("--infrastructure-only", ALERT_EMAIL="ops@example.com,oncall@example.com").returncode == 0
    assert not deploy.find("channels", "create") and len(deploy.read_state()["channels"]) == 2
    assert not deploy.find("policies", "update")


def test_a_policy_waits_for_its_new_log_metric(deploy: Deploy) -> None:
    deploy.set_state(faults={"metric_not_ready": 2})
    result = deploy.run("--infrastructure-only")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("the new log-based metric not ready yet") == 2
    assert len(deploy.read_state()["policies"]) == 6


@pytest.mark.parametrize("listing", ["beta monitoring channels list", "alpha monitoring policies list",
                                     "tasks queues list", "tasks list"])  # fmt: skip
def test_a_failed_listing_stops_the_script(deploy: Deploy, listing: str) -> None:
    """A listing that fails inside $(...) must not read as "none": no second channel,
    no "0 pending tasks, delete it"."""
    assert deploy.run("--skip-test", TASK_COUNT="3", ALERT_EMAIL="ops@example.com").returncode == 0
    deploy.set_state(faults={"deny": [listing]})
    result = deploy.run("--skip-test", TASK_COUNT="2", ALERT_EMAIL="ops@example.com")  # queue-2 left over
    assert result.returncode == 1 and "PERMISSION_DENIED" in result.stderr
    assert not deploy.find("create")
    if listing.startswith("tasks"):
        assert "no longer used" not in result.stderr  # never "0 pending tasks, delete it"
    assert len(deploy.read_state()["channels"]) == 1 and len(deploy.read_state()["policies"]) == 6


def test_a_dry_run_on_a_project_whose_apis_are_not_enabled(deploy: Deploy) -> None:
    deploy.set_state(faults={"disabled": ["iam", "tasks", "artifacts", "builds", "logging", "beta",
                                          "alpha", "secrets", "scheduler", "run", "projects"]})  # fmt: skip
    result = deploy.run("--dry-run", ALERT_EMAIL="ops@example.com")
    assert result.returncode == 0, result.stderr
    assert deploy.mutating() == []
    for words in ("gcloud tasks queues create", "gcloud alpha monitoring policies create",
                  "gcloud run jobs replace", "gcloud scheduler jobs create http"):  # fmt: skip
        assert f"+ {words}" in result.stderr


def test_the_log_metrics_match_the_job_s_own_log_lines(deploy: Deploy) -> None:
    """The filters name what main.py really writes: the invalid-row line (ERROR, its
    message) and the summary's counters."""
    assert deploy.run("--infrastructure-only").returncode == 0
    filters = {m[3]: next(a for a in m if a.startswith("--log-filter=")) for m in deploy.find("metrics", "create")}
    row = main.UserRow(id=7, phone_number="+819012345678", call_weekdays="x", call_time=None,
                       timezone=None, pause_from=None, pause_until=None)  # fmt: skip
    lines: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = lines.append  # type: ignore[method-assign]
    main.log.addHandler(handler)
    call = main.Call(7, "+819012345678", dt.datetime(2026, 11, 30, tzinfo=dt.UTC), main.zoneinfo.ZoneInfo("Asia/Tokyo"))
    try:
        main.RunSummary().invalid(row, main.InvalidRow("call_weekdays 'x': unknown word 'x'"))
        main.RunSummary().missed(call, None)
    finally:
        main.log.removeHandler(handler)
    entry, missed_entry = (json.loads(main.JsonFormatter().format(line)) for line in lines)
    assert entry["severity"] == "ERROR"
    invalid = filters[f"{JOB}-invalid-rows"]
    assert "severity=ERROR" in invalid and f'jsonPayload.message:"{entry["message"][:19]}"' in invalid
    not_placed = filters[f"{JOB}-calls-not-placed"]
    fields = {f.name for f in dataclasses.fields(main.RunSummary)}
    for name in ("tasks_failed", "tasks_not_attempted"):
        assert f"jsonPayload.{name}>0" in not_placed and name in fields
    # The audit's line for each missed call: ERROR, this message, these fields.
    missed = filters[f"{JOB}-calls-missed"]
    assert missed_entry["severity"] == "ERROR"
    assert f'severity=ERROR AND jsonPayload.message:"{missed_entry["message"]}"' in missed
    assert {"user_id", "scheduled_at", "phone"} <= set(missed_entry)


def test_missed_lists_the_missed_calls_of_both_jobs(deploy: Deploy) -> None:
    def entry(time: str, job: str, message: str, user: int, severity: str = "ERROR") -> dict[str, Any]:
        return {"timestamp": time, "severity": severity, "resource": {"labels": {"job_name": job}},
                "jsonPayload": {"message": message, "user_id": user, "phone": f"***{user:04d}",
                                "scheduled_at": f"2026-12-02T0{user}:00:00+09:00"}}  # fmt: skip

    missed = "call missed: no complete run covered it"
    deploy.set_state(log_entries=[  # newest first, as `logging read --order=desc` gives them
        entry("2026-12-02T10:15:00Z", CHANGES_JOB, missed, 8),
        entry("2026-12-02T10:00:00Z", "another-job", missed, 9),
        entry("2026-12-02T09:15:00Z", JOB, "invalid row skipped: x", 3),
        entry("2026-12-02T09:15:00Z", JOB, missed, 7),
    ])  # fmt: skip
    result = deploy.run("missed", "--since=2d")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "TIME\tUSER_ID\tSCHEDULED_AT\tPHONE\n"
        "2026-12-02T09:15:00Z\t7\t2026-12-02T07:00:00+09:00\t***0007\n"
        "2026-12-02T10:15:00Z\t8\t2026-12-02T08:00:00+09:00\t***0008\n"
    )
    assert result.stderr.splitlines()[-1] == "[deploy] 2 missed call(s) in the last 2d"
    [read] = deploy.find("logging", "read")
    assert "--freshness=2d" in read and "--order=desc" in read
    assert deploy.run("missed").returncode == 0 and "--freshness=24h" in deploy.find("logging", "read")[0]
    deploy.set_state(log_entries=[])
    none = deploy.run("missed")
    assert none.returncode == 0 and none.stdout == "TIME\tUSER_ID\tSCHEDULED_AT\tPHONE\n"
    assert "no missed calls in the last 24h" in none.stderr
    assert deploy.run("missed", "--since", "soon").returncode == 1
    assert deploy.run("missed", "--bogus").returncode == 1 and deploy.calls() == []
    deploy.set_state(faults={"deny": ["logging read"]})
    assert deploy.run("missed").returncode == 1


# -- day 2 --------------------------------------------------------------------------------


def test_an_empty_changes_schedule_turns_the_quick_runs_off_by_pausing(deploy: Deploy) -> None:
    """Off on a new project: no quick-run trigger is created, none is smoke-tested. Off
    later: the existing trigger is paused (reversible), never deleted. On again: it is
    updated, stays paused until `resume`, and the deploy says so."""
    first = deploy.run(CHANGES_SCHEDULE="")
    assert first.returncode == 0, first.stderr
    assert [a[4] for a in deploy.find("scheduler", "jobs", "create")] == ["anpi-call-scheduler-job"]
    assert [a[3] for a in deploy.find("run", "jobs", "execute")] == [JOB, JOB]
    assert deploy.rendered_job(CHANGES_JOB)  # the job is kept current, for `execute --changes`
    assert "quick runs are off (CHANGES_SCHEDULE is empty)" in first.stderr
    status = deploy.run("status", CHANGES_SCHEDULE="")  # no quick-run trigger: not a failure
    assert status.returncode == 0, status.stderr
    assert "(quick runs are off: CHANGES_SCHEDULE is empty)\n(none)\n" in status.stdout

    quick = ("--deploy-only", "--skip-test")  # the triggers are all this is about
    assert deploy.run(*quick).returncode == 0  # on: created, enabled
    off = deploy.run(*quick, CHANGES_SCHEDULE="")
    assert off.returncode == 0, off.stderr
    [pause] = deploy.find("scheduler", "jobs", "pause")
    assert pause[3] == "anpi-call-changes-scheduler-job" and not deploy.find("delete")
    assert not deploy.find("scheduler", "jobs", "update", "http", "anpi-call-changes-scheduler-job")
    state = deploy.read_state()["resources"]
    assert state["scheduler-job/anpi-call-changes-scheduler-job"]["state"] == "pause"
    assert deploy.run(*quick, CHANGES_SCHEDULE="").returncode == 0
    assert not deploy.find("pause")  # already paused

    # Day 2 with the quick runs off: pause/resume leave their trigger alone.
    resume = deploy.run("resume", CHANGES_SCHEDULE="")
    assert resume.returncode == 0 and [a[3] for a in deploy.find("resume")] == ["anpi-call-scheduler-job"]

    on = deploy.run(*quick, CHANGES_SCHEDULE="*/5 * * * *")
    assert on.returncode == 0, on.stderr
    assert "--schedule=*/5 * * * *" in deploy.scheduler("anpi-call-changes-scheduler-job")
    assert "scheduler anpi-call-changes-scheduler-job is paused; ./deploy.sh resume restarts it" in on.stderr
    assert deploy.run("resume").returncode == 0
    assert [a[3] for a in deploy.find("resume")] == ["anpi-call-scheduler-job", "anpi-call-changes-scheduler-job"]


def test_day_two_commands(deploy: Deploy) -> None:
    assert deploy.run("--skip-test").returncode == 0
    deploy.set_state(resources={**deploy.read_state()["resources"],
                                "queue/anpi-call-queue": {"depth": 3}})  # fmt: skip

    status = deploy.run("status")
    assert status.returncode == 0, status.stderr
    issued = [[w for w in c["argv"] if not w.startswith("-")][:4] for c in deploy.calls()]
    for command in (["run", "jobs", "describe", JOB], ["run", "jobs", "describe", CHANGES_JOB],
                    ["scheduler", "jobs", "describe", "anpi-call-scheduler-job"],
                    ["scheduler", "jobs", "describe", "anpi-call-changes-scheduler-job"],
                    ["tasks", "queues", "describe", "anpi-call-queue"], ["tasks", "list"],
                    ["alpha", "monitoring", "policies", "list"]):  # fmt: skip
        assert command in issued, command
    assert [next(a for a in argv if a.startswith("--job=")) for argv in deploy.find("executions", "list", "--limit=5")] \
        == [f"--job={JOB}", f"--job={CHANGES_JOB}"]  # fmt: skip
    assert "== queue anpi-call-queue: pending tasks\n3\n" in status.stdout
    assert status.stderr.count("+ gcloud ") == len(deploy.calls())
    assert deploy.mutating() == []

    logs = deploy.run("logs", "--since", "30m", "--severity=warning")
    assert logs.returncode == 0, logs.stderr
    [read] = deploy.find("logging", "read")
    assert (f'(resource.labels.job_name="{JOB}" OR resource.labels.job_name="{CHANGES_JOB}")'
            " AND severity>=WARNING") in read[2] and "--freshness=30m" in read  # fmt: skip
    assert "--format=value(timestamp,resource.labels.job_name,severity," in " ".join(read)
    assert deploy.run("logs").returncode == 0 and "--freshness=2h" in deploy.find("logging", "read")[0]
    assert deploy.run("logs", "--since", "soon").returncode == 1

    assert deploy.run("execute", "--dry-run", "--wait").returncode == 0
    [execute] = deploy.find("run", "jobs", "execute")
    assert execute[3] == JOB and "--args=--dry-run" in execute and "--wait" in execute
    assert deploy.run("execute").returncode == 0
    assert not [a for a in deploy.find("execute")[0] if a.startswith(("--args", "--wait"))]
    assert deploy.run("execute", "--changes", "--wait").returncode == 0
    [quick] = deploy.find("run", "jobs", "execute")
    assert quick[3] == CHANGES_JOB and "--wait" in quick and not [a for a in quick if a.startswith("--args")]
    both = deploy.run("execute", "--changes", "--dry-run")
    assert both.returncode == 1 and "--changes and --dry-run exclude each other" in both.stderr

    schedulers = ("scheduler-job/anpi-call-scheduler-job", "scheduler-job/anpi-call-changes-scheduler-job")
    assert deploy.run("pause").returncode == 0
    assert [deploy.read_state()["resources"][s]["state"] for s in schedulers] == ["pause", "pause"]
    assert deploy.run("resume").returncode == 0
    assert [deploy.read_state()["resources"][s]["state"] for s in schedulers] == ["resume", "resume"]
    # A pause that fails for one trigger still pauses the other, then says so (exit 1).
    deploy.set_state(faults={"deny": ["scheduler jobs pause anpi-call-scheduler-job"]})
    half = deploy.run("pause")
    assert half.returncode == 1 and "not every scheduler job could be paused" in half.stderr
    assert [deploy.read_state()["resources"][s]["state"] for s in schedulers] == ["resume", "pause"]
    deploy.set_state(faults={})

    image = deploy.read_state()["images"][0]
    deploy.set_state(images=["asia-northeast1-docker.pkg.dev/anpi-prod/anpi/anpi-call-scheduler:abc1234",
                             image])  # fmt: skip
    rolled = deploy.run("rollback", "abc1234")
    assert rolled.returncode == 0, rolled.stderr
    updates = deploy.find("run", "jobs", "update")
    assert [u[3] for u in updates] == [JOB, CHANGES_JOB]
    assert all("--image=asia-northeast1-docker.pkg.dev/anpi-prod/anpi/anpi-call-scheduler:abc1234" in u
               for u in updates)  # fmt: skip
    assert f"to undo this rollback: ./deploy.sh rollback {image.rsplit(':', 1)[1]}" in rolled.stderr
    assert ("an image from before main.py --changes fails every quick run; then stop them with gcloud scheduler"
            " jobs pause anpi-call-changes-scheduler-job --location=asia-northeast1 --project=anpi-prod"
            ) in rolled.stderr  # fmt: skip
    missing = deploy.run("rollback", "nosuchtag")
    assert missing.returncode == 1 and "no image" in missing.stderr
    assert not deploy.find("run", "jobs", "update")
    assert deploy.run("rollback").returncode == 1


def test_status_exits_1_when_a_section_could_not_be_read(deploy: Deploy) -> None:
    """Every section is still printed; the exit code says the screen is incomplete."""
    nothing = deploy.run("status")  # nothing deployed: no job, scheduler or queue
    assert nothing.returncode == 1
    sections = nothing.stdout.count("\n== ")
    assert nothing.stderr.count("] could not read ") == 6  # 2 jobs, 2 triggers, queue, its tasks
    assert f"status: 6 of {sections} section(s) could not be read" in nothing.stderr.splitlines()[-1]
    deploy.set_state(resources={"queue/anpi-call-queue": {}})
    assert deploy.run("--deploy-only", "--skip-test").returncode == 0
    deploy.set_state(faults={"deny": ["alpha monitoring policies list"]})
    denied = deploy.run("status")
    assert denied.returncode == 1 and "could not read alert policies" in denied.stderr
    assert "== alert policies" in denied.stdout


def test_day_two_commands_need_only_the_project(deploy: Deploy) -> None:
    unset = {k: "<unset>" for k in SETTINGS if k != "GOOGLE_CLOUD_PROJECT"}
    assert deploy.run("pause", **unset).returncode == 1  # no scheduler job yet: gcloud's error
    assert deploy.find("scheduler", "jobs", "pause")
    no_project = deploy.run("pause", GOOGLE_CLOUD_PROJECT="<unset>")
    assert no_project.returncode == 1 and "no project: set GOOGLE_CLOUD_PROJECT" in no_project.stderr
    assert deploy.mutating() == []


# -- one queue per shard (TASK_COUNT > 1) ------------------------------------------------


def test_four_shards_get_four_queues_each_with_the_full_cap(deploy: Deploy) -> None:
    result = deploy.run("--skip-test", TASK_COUNT="4")
    assert result.returncode == 0, result.stderr
    queues = [f"anpi-call-queue-{i}" for i in range(4)]
    assert [q[3] for q in deploy.find("tasks", "queues", "create")] == queues
    for queue in queues:
        for role in QUEUE_ROLES:
            assert ("queue", queue, RUNTIME_SA, role) in deploy.bindings()
    job = deploy.rendered_job()
    assert job["spec"]["template"]["spec"]["taskCount"] == 4
    env = container_env(job)
    assert env["QUEUE_PER_SHARD"] == "1" and env["ENQUEUE_MAX_PER_SECOND"] == "500"
    assert env["CLOUD_TASKS_QUEUE"] == "anpi-call-queue"  # the job adds -i itself

    before = deploy.read_state()
    rerun = deploy.run("--skip-test", TASK_COUNT="4")
    assert rerun.returncode == 0 and not deploy.find("create")
    assert [q[3] for q in deploy.find("tasks", "queues", "update")] == queues
    after = deploy.read_state()
    assert {tuple(b) for b in after["bindings"]} == {tuple(b) for b in before["bindings"]}
    assert sorted(after["resources"]) == sorted(before["resources"])
    assert "no longer used" not in rerun.stderr


def test_shrinking_task_count_names_the_leftover_queues_and_deletes_none(deploy: Deploy) -> None:
    assert deploy.run("--skip-test", TASK_COUNT="4").returncode == 0
    deploy.set_state(resources={**deploy.read_state()["resources"],
                                "queue/anpi-call-queue-3": {"depth": 12}})  # fmt: skip
    result = deploy.run("--skip-test", TASK_COUNT="3")
    assert result.returncode == 0, result.stderr
    assert "queue anpi-call-queue-3 is no longer used by the job; its 12 pending task(s)" in result.stderr
    assert "gcloud tasks queues delete anpi-call-queue-3" in result.stderr
    assert not deploy.find("delete") and [q[3] for q in deploy.find("queues", "update")] == [
        f"anpi-call-queue-{i}" for i in range(3)
    ]
    # Back to one shared queue: the per-shard queues are left over in turn.
    back = deploy.run("--skip-test", TASK_COUNT="1")
    assert back.returncode == 0 and "queue anpi-call-queue-0 is no longer used" in back.stderr
    assert container_env(deploy.rendered_job())["QUEUE_PER_SHARD"] == "0"


def test_one_shared_queue_splits_the_cap(deploy: Deploy) -> None:
    assert deploy.run("--skip-test", TASK_COUNT="4", QUEUE_PER_SHARD="0").returncode == 0
    assert [q[3] for q in deploy.find("tasks", "queues", "create")] == ["anpi-call-queue"]
    env = container_env(deploy.rendered_job())
    assert env["ENQUEUE_MAX_PER_SECOND"] == "125" and env["QUEUE_PER_SHARD"] == "0"


def test_job_yaml_template_parses() -> None:
    template = yaml.safe_load((ROOT / "job.yaml").read_text())
    assert template["kind"] == "Job"
    spec = template["spec"]["template"]["spec"]["template"]["spec"]
    assert {"serviceAccountName", "maxRetries", "timeoutSeconds", "containers"} <= set(spec)


def test_shellcheck_and_hadolint() -> None:
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "shellcheck", ROOT / "deploy.sh"], check=True)
    subprocess.run([bin_dir / "hadolint", ROOT / "Dockerfile"], check=True)


def test_image_dependency_set_runs_the_entrypoint(tmp_path: Path, db: Database) -> None:
    """requirements.txt alone, in a fresh virtualenv, runs `python main.py` (the image's
    ENTRYPOINT): no package from the development environment is needed."""
    venv.create(tmp_path / "venv")  # pip comes from the test's environment (--python)
    python = tmp_path / "venv" / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "install", "--quiet", "--no-compile", "-r", ROOT / "requirements.txt"],
        check=True,
        timeout=600,
    )
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:30"}])
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "main.py", app / "main.py")
    result = subprocess.run(
        [python, "main.py", "--dry-run", "--now", "2026-11-30T09:00:00+09:00"],
        cwd=app,
        env={**job_env(db), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["calls_planned"] == 1
    freeze = subprocess.run([*pip, "freeze"], capture_output=True, text=True, check=True)
    pinned = {ln.split("==")[0].lower() for ln in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in ln}  # fmt: skip
    installed = {ln.split("==")[0].lower() for ln in freeze.stdout.splitlines() if "==" in ln}
    assert installed <= pinned  # every installed package is pinned


def scale_out_commands(document: str) -> list[str]:
    """The commands of the block under the `scale-out` marker, comments left out."""
    text = (ROOT / document).read_text()
    match = re.search(r"<!-- scale-out[^>]*-->\n```sh\n(.*?)```", text, re.S)
    assert match, f"{document} has no scale-out block"
    return [re.sub(r"\s+#.*", "", line) for line in match[1].splitlines()]


def test_the_documented_scale_out_steps_work(deploy: Deploy) -> None:
    """docs/operations.md's steps, as they are, on a deployment of one task: four
    queues, both jobs with four tasks each on their own queue, the old queue named as
    left over and kept; the Japanese document gives the same commands."""
    steps = scale_out_commands("docs/operations.md")
    assert steps == scale_out_commands("docs/ja/operations.md")
    assert deploy.run().returncode == 0  # the first deploy: one task, one queue
    (deploy.dir / "deploy.env").write_text("TASK_COUNT=4\n")  # the docs' first step
    deploy.log.write_text("")
    env = {**deploy.env, **SETTINGS}
    outputs = []
    for step in steps:
        result = subprocess.run(
            ["bash", "-e", "-c", step], cwd=deploy.dir, env=env, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, f"{step}: {result.stderr}"
        outputs.append(result.stdout + result.stderr)
    assert not [c for c in deploy.calls() if "invalid" in c], "a call the real CLI would refuse"
    queues = [f"anpi-call-queue-{i}" for i in range(4)]
    assert [q[3] for q in deploy.find("tasks", "queues", "create")] == queues
    for name in (JOB, CHANGES_JOB):
        job = deploy.rendered_job(name)
        assert job["spec"]["template"]["spec"]["taskCount"] == 4
        assert container_env(job)["QUEUE_PER_SHARD"] == "1"
    assert any("queue anpi-call-queue is no longer used by the job" in out for out in outputs)
    assert not deploy.find("queues", "delete")
