"""deploy.sh against a recording fake gcloud; the Dockerfile and job.yaml without Docker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, Database, job_env

SETTINGS = {
    "GOOGLE_CLOUD_PROJECT": "anpi-prod",
    "CLOUD_SQL_INSTANCE": "anpi-prod:asia-northeast1:anpi-db",
    "DB_USER": "anpi_job",
    "DB_NAME": "anpi",
    "DB_PASSWORD_SECRET": "anpi-db-password",
    "ANPI_CALL_URL": "https://webhook.example.com/call",
}
READ_ONLY = {"describe", "list", "versions"}
RUNTIME_SA = "serviceAccount:anpi-call-job@anpi-prod.iam.gserviceaccount.com"
SCHEDULER_SA = "anpi-call-scheduler@anpi-prod.iam.gserviceaccount.com"


class Deploy:
    """A copy of deploy.sh and job.yaml with a fake gcloud first on PATH."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "repo"
        self.dir.mkdir()
        for name in ("deploy.sh", "job.yaml"):
            shutil.copy(ROOT / name, self.dir / name)
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'fake_gcloud.py'} \"$@\"\n")
        gcloud.chmod(0o755)
        self.log = tmp / "gcloud.log"
        self.state = tmp / "gcloud.json"
        self.state.write_text(json.dumps({"secrets": ["anpi-db-password"], "resources": {}}))
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp),
            "FAKE_GCLOUD_LOG": str(self.log),
            "FAKE_GCLOUD_STATE": str(self.state),
        }

    def run(self, *flags: str, **settings: str) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        env = {**self.env, **SETTINGS, **settings}
        env = {k: v for k, v in env.items() if v is not None and v != "<unset>"}
        return subprocess.run(
            ["bash", str(self.dir / "deploy.sh"), *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def mutating(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls() if not READ_ONLY & set(c["argv"])]

    def find(self, *words: str) -> list[list[str]]:
        return [argv for argv in (c["argv"] for c in self.calls()) if all(w in argv for w in words)]


@pytest.fixture
def deploy(tmp_path: Path) -> Deploy:
    return Deploy(tmp_path)


def test_missing_settings_fail_fast_naming_each(deploy: Deploy) -> None:
    result = deploy.run(GOOGLE_CLOUD_PROJECT="<unset>", ANPI_CALL_URL="<unset>", DB_PASSWORD_SECRET="")
    assert result.returncode != 0
    for name in ("GOOGLE_CLOUD_PROJECT", "ANPI_CALL_URL", "DB_PASSWORD_SECRET"):
        assert name in result.stderr
    assert deploy.calls() == []


def test_malformed_settings_fail_fast(deploy: Deploy) -> None:
    result = deploy.run(CLOUD_SQL_INSTANCE="anpi-db", ANPI_CALL_URL="http://x/call")
    assert result.returncode != 0
    assert "CLOUD_SQL_INSTANCE" in result.stderr and "ANPI_CALL_URL" in result.stderr
    assert deploy.mutating() == []


def test_first_full_run(deploy: Deploy) -> None:
    result = deploy.run()
    assert result.returncode == 0, result.stderr
    assert all(c["rc"] == 0 for c in deploy.calls() if not READ_ONLY & set(c["argv"]))
    [enable] = deploy.find("services", "enable")
    for api in ("run", "cloudtasks", "cloudscheduler", "cloudbuild", "artifactregistry",
                "sqladmin", "secretmanager", "iam"):  # fmt: skip
        assert f"{api}.googleapis.com" in enable

    [queue] = deploy.find("tasks", "queues", "create")
    assert "--location=asia-northeast1" in queue
    for setting in ("--max-attempts=4", "--min-backoff=30s", "--max-backoff=120s",
                    "--max-retry-duration=600s", "--max-dispatches-per-second=10",
                    "--max-concurrent-dispatches=50"):  # fmt: skip
        assert setting in queue

    state = json.loads(deploy.state.read_text())
    bindings = {tuple(b) for b in state["bindings"]}
    assert ("project", "anpi-prod", RUNTIME_SA, "roles/cloudsql.client") in bindings
    assert ("secret", "anpi-db-password", RUNTIME_SA, "roles/secretmanager.secretAccessor") in bindings
    for role in ("roles/cloudtasks.enqueuer", "roles/cloudtasks.viewer", "roles/cloudtasks.taskDeleter"):
        assert ("queue", "anpi-call-queue", RUNTIME_SA, role) in bindings
    assert (
        "run-job", "anpi-call-create-task-job", f"serviceAccount:{SCHEDULER_SA}", "roles/run.invoker"
    ) in bindings
    # Least privilege: nothing else on the project, no invoker on the project.
    assert [b for b in bindings if b[0] == "project"] == [
        ("project", "anpi-prod", RUNTIME_SA, "roles/cloudsql.client")
    ]

    [scheduler] = deploy.find("scheduler", "jobs", "create", "http")
    assert "anpi-call-scheduler-job" in scheduler
    assert "--schedule=0 * * * *" in scheduler
    assert "--time-zone=Asia/Tokyo" in scheduler
    assert (
        "--uri=https://asia-northeast1-run.googleapis.com/apis/run.googleapis.com/v1/"
        "namespaces/anpi-prod/jobs/anpi-call-create-task-job:run"
    ) in scheduler
    assert f"--oauth-service-account-email={SCHEDULER_SA}" in scheduler
    assert not [a for a in scheduler if a.startswith("--oidc")]

    # The smoke test: --check (database, grants, every row), then --dry-run (the queue).
    check, dry = deploy.find("run", "jobs", "execute")
    assert "--args=--check" in check and "--wait" in check
    assert "--args=--dry-run" in dry and "--wait" in dry

    # Order: APIs, accounts, queue, image, job, scheduler, smoke test.
    order = [c["argv"][:3] for c in deploy.calls() if not READ_ONLY & set(c["argv"])]
    firsts = [order.index(next(o for o in order if o[:2] == key)) for key in (
        ["services", "enable"], ["iam", "service-accounts"], ["tasks", "queues"],
        ["builds", "submit"], ["run", "jobs"], ["scheduler", "jobs"])]  # fmt: skip
    assert firsts == sorted(firsts)
    assert order[-1] == ["run", "jobs", "execute"]


def test_rendered_job_yaml(deploy: Deploy) -> None:
    assert deploy.run("--skip-test", TASK_COUNT="4").returncode == 0
    [replace] = [c for c in deploy.calls() if c["argv"][:3] == ["run", "jobs", "replace"]]
    job = yaml.safe_load(replace["file"])
    assert job["apiVersion"] == "run.googleapis.com/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == "anpi-call-create-task-job"
    execution = job["spec"]["template"]
    assert (
        execution["metadata"]["annotations"]["run.googleapis.com/cloudsql-instances"]
        == "anpi-prod:asia-northeast1:anpi-db"
    )
    assert execution["spec"]["taskCount"] == 4 and execution["spec"]["parallelism"] == 4
    task = execution["spec"]["template"]["spec"]
    assert task["serviceAccountName"] == RUNTIME_SA.split(":")[1]
    assert task["maxRetries"] >= 1
    assert task["timeoutSeconds"] > 0
    [container] = task["containers"]
    assert container["image"].startswith(
        "asia-northeast1-docker.pkg.dev/anpi-prod/anpi/anpi-call-scheduler:"
    )
    env = {e["name"]: e for e in container["env"]}
    assert env["INSTANCE_CONNECTION_NAME"]["value"] == "anpi-prod:asia-northeast1:anpi-db"
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "anpi-db-password", "key": "7"}
    assert "value" not in env["DB_PASSWORD"]
    assert env["ANPI_CALL_URL"]["value"] == "https://webhook.example.com/call"
    assert env["ENQUEUE_MAX_PER_SECOND"]["value"] == "125"  # 500/s shared by 4 shards
    assert "__" not in replace["file"]


def test_job_yaml_template_parses(deploy: Deploy) -> None:
    template = yaml.safe_load((ROOT / "job.yaml").read_text())
    assert template["kind"] == "Job"
    spec = template["spec"]["template"]["spec"]["template"]["spec"]
    assert {"serviceAccountName", "maxRetries", "timeoutSeconds", "containers"} <= set(spec)


def test_second_full_run_updates_without_a_rejected_create(deploy: Deploy) -> None:
    assert deploy.run().returncode == 0
    second = deploy.run()
    assert second.returncode == 0, second.stderr
    assert all(c["rc"] == 0 for c in deploy.calls() if not READ_ONLY & set(c["argv"]))
    assert not deploy.find("create")  # every resource existed: updated, not created
    assert deploy.find("tasks", "queues", "update")
    assert deploy.find("scheduler", "jobs", "update", "http")


def test_dry_run_changes_nothing(deploy: Deploy) -> None:
    result = deploy.run("--dry-run")
    assert result.returncode == 0, result.stderr
    assert deploy.mutating() == []
    # ... but prints every command it would run.
    for words in ("gcloud services enable", "gcloud tasks queues create", "gcloud builds submit",
                  "gcloud run jobs replace", "gcloud scheduler jobs create http",
                  "gcloud run jobs execute"):  # fmt: skip
        assert f"+ {words}" in result.stderr


def test_infrastructure_only(deploy: Deploy) -> None:
    assert deploy.run("--infrastructure-only").returncode == 0
    assert deploy.find("tasks", "queues", "create")
    assert deploy.find("artifacts", "repositories", "create")
    assert not deploy.find("builds") and not deploy.find("run", "jobs") and not deploy.find("scheduler")


def test_deploy_only(deploy: Deploy) -> None:
    assert deploy.run("--infrastructure-only").returncode == 0
    result = deploy.run("--deploy-only")
    assert result.returncode == 0, result.stderr
    assert not deploy.find("services") and not deploy.find("tasks", "queues")
    assert deploy.find("builds", "submit") and deploy.find("run", "jobs", "replace")
    assert deploy.find("scheduler", "jobs", "create", "http")
    assert deploy.find("run", "jobs", "execute")


def test_skip_test_and_a_failing_smoke_test(deploy: Deploy) -> None:
    assert deploy.run("--skip-test").returncode == 0
    assert not deploy.find("execute")
    deploy.env["FAKE_GCLOUD_EXECUTE_FAIL"] = "1"
    failed = deploy.run()
    assert failed.returncode != 0
    assert "smoke test failed" in failed.stderr


def test_oidc_account_gets_service_account_user(deploy: Deploy) -> None:
    account = "anpi-call-invoker@anpi-prod.iam.gserviceaccount.com"
    state = json.loads(deploy.state.read_text())
    state["resources"][f"service-account/{account}"] = {}
    deploy.state.write_text(json.dumps(state))
    assert deploy.run("--skip-test", TASKS_OIDC_SERVICE_ACCOUNT=account).returncode == 0
    bindings = {tuple(b) for b in json.loads(deploy.state.read_text())["bindings"]}
    assert ("service-account", account, RUNTIME_SA, "roles/iam.serviceAccountUser") in bindings


def test_deploy_env_file_and_help(deploy: Deploy) -> None:
    (deploy.dir / "deploy.env").write_text(
        "\n".join(f"{k}={v}" for k, v in SETTINGS.items() if k != "DB_NAME") + "\nDB_NAME=from_file\n"
    )
    env_only = {k: "<unset>" for k in SETTINGS}
    result = deploy.run("--skip-test", **env_only)
    assert result.returncode == 0, result.stderr
    [replace] = [c for c in deploy.calls() if c["argv"][:3] == ["run", "jobs", "replace"]]
    assert "value: from_file" in replace["file"]
    helped = deploy.run("--help")
    assert helped.returncode == 0 and "--infrastructure-only" in helped.stdout
    assert deploy.run("--bogus").returncode != 0


def test_shellcheck_and_hadolint() -> None:
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "shellcheck", ROOT / "deploy.sh"], check=True)
    subprocess.run([bin_dir / "hadolint", ROOT / "Dockerfile"], check=True)


def test_image_dependency_set_runs_the_entrypoint(tmp_path: Path, db: Database) -> None:
    """requirements.txt alone, in a fresh virtualenv, runs `python main.py` (the image's
    ENTRYPOINT): no package from the development environment is needed."""
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-r", ROOT / "requirements.txt"],
        check=True,
        timeout=600,
    )  # fmt: skip
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
    freeze = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    pinned = {ln.split("==")[0].lower() for ln in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in ln}  # fmt: skip
    installed = {ln.split("==")[0].lower() for ln in freeze.stdout.splitlines() if "==" in ln}
    assert installed <= pinned | {"pip", "setuptools"}  # every installed package is pinned
