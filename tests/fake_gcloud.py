#!/usr/bin/env python3
"""A recording fake `gcloud` for deploy.sh tests; installed on PATH as `gcloud`.

Every call is appended to $FAKE_GCLOUD_LOG as one JSON line ({"argv": [...], "rc": N,
"file": <contents of a YAML file passed to `run jobs replace`>}). Resource state lives in
$FAKE_GCLOUD_STATE (JSON): describe fails with NOT_FOUND until the resource is created,
and create of an existing resource fails with ALREADY_EXISTS, as gcloud does. A command
this fake does not know fails loudly, so a test notices an unexpected call.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any


def positional(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("-")]


def flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str]) -> int:
    state_path = Path(os.environ["FAKE_GCLOUD_STATE"])
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    resources: dict[str, dict[str, Any]] = state.setdefault("resources", {})
    record: dict[str, Any] = {"argv": argv}

    def done(rc: int, out: str = "", err: str = "") -> int:
        record["rc"] = rc
        with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
            log.write(json.dumps(record) + "\n")
        state_path.write_text(json.dumps(state))
        if out:
            print(out)
        if err:
            print(err, file=sys.stderr)
        return rc

    words = positional(argv)
    # Resource kinds by command path: (group words, kind, index of the name).
    kinds = {
        ("iam", "service-accounts"): "service-account",
        ("tasks", "queues"): "queue",
        ("artifacts", "repositories"): "repository",
        ("scheduler", "jobs"): "scheduler-job",
        ("run", "jobs"): "run-job",
        ("secrets",): "secret",
    }
    prefix = next((p for p in kinds if tuple(words[: len(p)]) == p), (words[0],) if words else ())
    kind = kinds.get(prefix, "")
    verb = words[len(prefix)] if len(words) > len(prefix) else ""
    rest = words[len(prefix) + 1 :]

    if words[:2] == ["services", "enable"]:
        state.setdefault("apis", []).extend(words[2:])
        return done(0)
    if words[:2] == ["projects", "add-iam-policy-binding"]:
        state.setdefault("bindings", []).append(
            ["project", words[2], flag(argv, "member"), flag(argv, "role")]
        )
        return done(0)
    if words[:2] == ["builds", "submit"]:
        state.setdefault("images", []).append(flag(argv, "tag"))
        return done(0)
    if kind == "secret" and verb == "versions":
        return done(0, out="projects/p/secrets/s/versions/7")
    if kind == "run-job" and verb == "replace":
        record["file"] = Path(rest[0]).read_text()
        name = re.search(r"^  name: (\S+)", record["file"], re.M)
        resources[f"run-job/{name[1] if name else '?'}"] = {}
        return done(0)
    if kind == "run-job" and verb == "execute":
        if os.environ.get("FAKE_GCLOUD_EXECUTE_FAIL"):
            return done(1, err="ERROR: (gcloud.run.jobs.execute) The execution failed.")
        return done(0)
    if not kind:
        return done(2, err=f"fake gcloud: unknown command {argv}")

    # create/update/describe/add-iam-policy-binding on a named resource.
    if kind in ("scheduler-job",) and verb in ("create", "update"):
        rest = rest[1:]  # `create http NAME`
    name = rest[0] if rest else ""
    key = f"{kind}/{name}"
    if kind == "service-account" and verb == "create":
        key = f"{kind}/{name}@{flag(argv, 'project')}.iam.gserviceaccount.com"
    exists = key in resources or (kind == "secret" and name in state.get("secrets", []))
    if verb == "describe":
        if exists:
            return done(0, out=f"name: {name}")
        return done(1, err=f"ERROR: NOT_FOUND: {kind} {name} not found")
    if verb == "create":
        if exists:
            return done(1, err=f"ERROR: ALREADY_EXISTS: {kind} {name} already exists")
        resources[key] = {"argv": argv}
        return done(0)
    if verb == "update":
        if not exists:
            return done(1, err=f"ERROR: NOT_FOUND: {kind} {name} not found")
        resources[key] = {"argv": argv}
        return done(0)
    if verb == "add-iam-policy-binding":
        if not exists:
            return done(1, err=f"ERROR: NOT_FOUND: {kind} {name} not found")
        state.setdefault("bindings", []).append(
            [kind, name, flag(argv, "member"), flag(argv, "role")]
        )
        return done(0)
    return done(2, err=f"fake gcloud: unknown command {argv}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
