#!/usr/bin/env python3
"""A recording fake `gcloud` for deploy.sh tests; installed on PATH as `gcloud`.

Every call is first checked against the real Google Cloud CLI's command and flag tree
(the installed CLI's `gcloud_completions.py`, pruned to the groups deploy.sh may use and
saved as JSON at $FAKE_GCLOUD_TREE by `write_tree`). An unknown command, flag or choice
fails as gcloud does, with exit 2, and is recorded with its reason under "invalid".

Every call is appended to $FAKE_GCLOUD_LOG as one JSON line ({"argv": [...], "rc": N},
plus "file": the contents of a file passed to `run jobs replace` or `--policy-from-file`).
Resource state lives in $FAKE_GCLOUD_STATE (JSON): describe fails with NOT_FOUND until
the resource is created, create of an existing one fails with ALREADY_EXISTS, as gcloud
does; `scheduler jobs describe --format=value(state)` answers ENABLED or PAUSED (after
`pause`). gcloud's own login and project: `auth list` answers the account "deployer@example.com"
unless the state's "logged_out" is true (then nothing, as real gcloud does); `config get
project` answers the state's "config_project" (unset by default: "(unset)" on stderr). Faults, set by a test in the state's "faults": "deny" (command prefixes answered
PERMISSION_DENIED), "disabled" (command prefixes answered SERVICE_DISABLED, an API not
enabled yet), "iam_not_yet" (that many IAM bindings fail with "does not exist" first),
"metric_not_ready" (that many policy writes fail with "Cannot find metric(s)" first),
"execute_fail" (that many executions fail first; -1: all). `logging read` answers from
the state's "log_entries" when a test sets them (see read_logs).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported at run time: this starts once per gcloud call
    from pathlib import Path
    from typing import Any

CLI_TREE_SOURCE = "/usr/lib/google-cloud-sdk/data/cli/gcloud_completions.py"
# The groups deploy.sh may use; a command outside them is unknown to this fake.
GROUPS = ("services", "iam", "projects", "secrets", "tasks", "artifacts", "builds", "run",
          "scheduler", "logging", "monitoring", "auth", "config")  # fmt: skip
TRACK_GROUPS = {"alpha": ("monitoring",), "beta": ("monitoring",)}


def read(path: str) -> str:
    with open(path) as file:
        return file.read()


def write_tree(path: Path) -> None:
    """Save the pruned command and flag tree of the installed Google Cloud CLI."""
    if not os.path.exists(CLI_TREE_SOURCE):
        raise RuntimeError(
            f"{CLI_TREE_SOURCE} is missing: install the Google Cloud CLI"
            " (apt-get install google-cloud-cli) to check deploy.sh's gcloud calls"
        )
    import runpy

    tree = runpy.run_path(CLI_TREE_SOURCE)["STATIC_COMPLETION_CLI_TREE"]
    commands = {name: tree["commands"][name] for name in GROUPS}
    for track, groups in TRACK_GROUPS.items():
        track_commands = tree["commands"][track]["commands"]
        commands[track] = {"commands": {g: track_commands[g] for g in groups}, "flags": {}}
    path.write_text(json.dumps({"commands": commands, "flags": tree["flags"]}))


def cli_problem(argv: list[str], tree: dict[str, Any]) -> str | None:
    """Why real gcloud would refuse `argv` (unknown command, flag or choice), or None."""
    node, path, positionals = tree, ["gcloud"], 0
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--"):
            name, has_value, value = arg.partition("=")
            allowed = {**tree["flags"], **node["flags"]}
            kind = allowed.get(name)
            if kind is None and name.startswith("--no-") and allowed.get("--" + name[5:]) == "bool":
                kind = "negated"
            if kind is None:
                return f"unrecognized flag {name} for {' '.join(path)}"
            if kind in ("bool", "negated"):
                if has_value:
                    return f"{name} takes no value ({' '.join(path)})"
                continue
            if not has_value:  # gcloud takes `--name value` too; deploy.sh writes `=`
                return f"{name} needs a value, written {name}=VALUE ({' '.join(path)})"
            if isinstance(kind, list) and value.replace("_", "-").lower() not in kind:
                return f"{name}={value}: not one of {kind} ({' '.join(path)})"
        elif arg.startswith("-") and arg != "-":
            return f"unrecognized flag {arg} for {' '.join(path)}"
        elif node["commands"] and not positionals:
            if arg not in node["commands"]:
                return f"invalid choice {arg!r} for {' '.join(path)}"
            node = node["commands"][arg]
            path.append(arg)
        else:
            positionals += 1
    if node["commands"]:
        return f"{' '.join(path)} is a command group, not a command"
    return None


def positional(args: list[str]) -> list[str]:
    """The words of `args` that are not flags or flag values (flags use --name=value)."""
    return [a for a in args if not a.startswith("-")]


def flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def quoted(filter_text: str | None, field: str) -> tuple[str, str] | None:
    """(operator, value) of `field="value"` or `field:"value"` in a --filter, or None."""
    match = re.search(rf'{re.escape(field)}([=:])"([^"]*)"', filter_text or "")
    return (match[1], match[2]) if match else None


# Resource kinds by command path, and the verbs that name a resource.
KINDS = {
    ("iam", "service-accounts"): "service-account",
    ("tasks", "queues"): "queue",
    ("artifacts", "repositories"): "repository",
    ("scheduler", "jobs"): "scheduler-job",
    ("run", "jobs"): "run-job",
    ("secrets",): "secret",
    ("logging", "metrics"): "log-metric",
}


def main(argv: list[str]) -> int:
    state_path = os.environ["FAKE_GCLOUD_STATE"]
    state: dict[str, Any] = json.loads(read(state_path)) if os.path.exists(state_path) else {}
    resources: dict[str, dict[str, Any]] = state.setdefault("resources", {})
    faults: dict[str, Any] = state.setdefault("faults", {})
    record: dict[str, Any] = {"argv": argv}

    def done(rc: int, out: str = "", err: str = "") -> int:
        record["rc"] = rc
        with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
            log.write(json.dumps(record) + "\n")
        with open(state_path, "w") as file:
            file.write(json.dumps(state))
        if out:
            print(out)
        if err:
            print(err, file=sys.stderr)
        return rc

    tree = json.loads(read(os.environ["FAKE_GCLOUD_TREE"]))
    if problem := cli_problem(argv, tree):
        record["invalid"] = problem
        return done(2, err=f"ERROR: (gcloud) {problem}")

    words = positional(argv)
    command = " ".join(words)
    for prefix in faults.get("deny", []):
        if command.startswith(prefix):
            return done(1, err=f"ERROR: (gcloud.{'.'.join(prefix.split())}) PERMISSION_DENIED:"
                               " Permission denied on resource (or it may not exist).")  # fmt: skip
    for prefix in faults.get("disabled", []):
        if command.startswith(prefix):
            return done(1, err="ERROR: (gcloud) PERMISSION_DENIED: API has not been used in project"
                               " 123 before or it is disabled. [reason: SERVICE_DISABLED]")  # fmt: skip
    if "add-iam-policy-binding" in words and faults.get("iam_not_yet", 0) > 0:
        faults["iam_not_yet"] -= 1
        member = flag(argv, "member")
        return done(
            1, err=f"ERROR: (gcloud) INVALID_ARGUMENT: Service account {member} does not exist."
        )

    if words[:2] == ["auth", "list"]:
        if state.get("logged_out"):
            return done(0, err="No credentialed accounts.\n\nTo login, run:\n  $ gcloud auth login `ACCOUNT`")
        return done(0, out="deployer@example.com")
    if words[:3] == ["config", "get", "project"]:
        project = state.get("config_project", "")
        return done(0, out=project) if project else done(0, err="(unset)")
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
    if words[:2] == ["builds", "get-default-service-account"]:
        project = flag(argv, "project")
        return done(
            0, out=f"projects/{project}/serviceAccounts/123-compute@developer.gserviceaccount.com"
        )
    if words[:4] == ["artifacts", "docker", "images", "describe"]:
        if words[4] in state.get("images", []):
            return done(0, out="sha256:0123")
        return done(
            1, err=f"ERROR: (gcloud.artifacts.docker.images.describe) NOT_FOUND: {words[4]}"
        )
    if words[:2] == ["tasks", "list"]:
        queue = flag(argv, "queue")
        if f"queue/{queue}" not in resources:
            return done(1, err=f"ERROR: (gcloud.tasks.list) NOT_FOUND: queue {queue}")
        depth = resources[f"queue/{queue}"].get("depth", 0)
        return done(0, out="\n".join(f"task-{i}" for i in range(depth)))
    if words[:2] == ["logging", "read"]:
        if "log_entries" not in state:
            return done(0, out="2026-12-02T09:00:01Z\tINFO\trun started")
        return done(0, out=read_logs(state["log_entries"], words[2], flag(argv, "format") or ""))
    if words[:4] == ["run", "jobs", "executions", "list"]:
        return done(0, out="anpi-call-create-task-job-abcde  2026-12-02T09:00:00Z  1  0")
    if words[1:3] == ["monitoring", "channels"]:
        return channels(words[3], argv, state, done)
    if words[1:3] == ["monitoring", "policies"]:
        return policies(words[3], argv, state, record, done)

    prefix = next((p for p in KINDS if tuple(words[: len(p)]) == p), ())
    kind = KINDS.get(prefix, "")
    verb = words[len(prefix)] if len(words) > len(prefix) else ""
    rest = words[len(prefix) + 1 :]
    if kind == "secret" and verb == "versions":
        return done(0, out="projects/p/secrets/s/versions/7")
    if kind == "run-job" and verb == "replace":
        record["file"] = read(rest[0])
        name = re.search(r"^  name: \"?([^\"\s]+)", record["file"], re.M)
        resources[f"run-job/{name[1] if name else '?'}"] = {"file": record["file"]}
        return done(0)
    if kind == "run-job" and verb == "execute":
        if faults.get("execute_fail", 0) != 0:
            faults["execute_fail"] -= 1 if faults["execute_fail"] > 0 else 0
            return done(1, err="ERROR: (gcloud.run.jobs.execute) The execution failed.")
        state.setdefault("executions", []).append(argv)
        return done(0)
    if kind == "queue" and verb == "list":
        names = [k.split("/", 1)[1] for k in resources if k.startswith("queue/")]
        location = flag(argv, "location")
        return done(0, out="\n".join(f"projects/p/locations/{location}/queues/{n}" for n in names))
    if not kind:
        return done(2, err=f"fake gcloud: unknown command {argv}")

    # create/update/describe/add-iam-policy-binding/pause/resume on a named resource.
    if kind == "scheduler-job" and verb in ("create", "update"):
        rest = rest[1:]  # `create http NAME`
    name = rest[0] if rest else ""
    key = f"{kind}/{name}"
    if kind == "service-account" and verb == "create":
        key = f"{kind}/{name}@{flag(argv, 'project')}.iam.gserviceaccount.com"
    exists = key in resources or (kind == "secret" and name in state.get("secrets", []))
    not_found = f"ERROR: (gcloud.{'.'.join(prefix)}.{verb}) NOT_FOUND: {kind} {name} not found"
    if verb == "describe":
        if exists and kind == "scheduler-job" and flag(argv, "format") == "value(state)":
            return done(0, out="PAUSED" if resources[key].get("state") == "pause" else "ENABLED")
        if exists:
            image = re.search(r"- image: \"?([^\"\s]+)", resources[key].get("file", ""))
            return done(0, out=image[1] if image else f"name: {name}")
        if kind == "run-job":  # `gcloud run jobs describe` words it so
            return done(1, err=f"ERROR: (gcloud.run.jobs.describe) Cannot find job [{name}].")
        return done(1, err=not_found)
    if verb == "create":
        if exists:
            return done(1, err=f"ERROR: ALREADY_EXISTS: {kind} {name} already exists")
        resources[key] = {"argv": argv}
        return done(0)
    if verb in ("update", "pause", "resume"):
        if not exists:
            return done(1, err=not_found)
        resources[key].update({"argv": argv} if verb == "update" else {"state": verb})
        if kind == "run-job" and flag(argv, "image"):
            resources[key]["file"] = f"- image: {flag(argv, 'image')}"
        return done(0)
    if verb == "add-iam-policy-binding":
        if not exists:
            return done(1, err=not_found)
        state.setdefault("bindings", []).append(
            [kind, name, flag(argv, "member"), flag(argv, "role")]
        )
        return done(0)
    return done(2, err=f"fake gcloud: unknown command {argv}")


def read_logs(entries: list[dict[str, Any]], query: str, form: str) -> str:
    """`logging read` over the state's "log_entries" (kept newest first): the entries of
    the jobs the query names whose message holds its jsonPayload.message:"..." text, as
    --format=value(field,...) prints them (tab-separated, dotted paths)."""
    jobs = re.findall(r'resource\.labels\.job_name="([^"]*)"', query)
    message = quoted(query, "jsonPayload.message")
    fields = re.fullmatch(r"value\((.*)\)", form)
    lines = []
    for entry in entries:
        if jobs and entry["resource"]["labels"]["job_name"] not in jobs:
            continue
        if message and message[1] not in entry["jsonPayload"]["message"]:
            continue
        values = []
        for path in fields[1].split(",") if fields else []:
            value: Any = entry
            for key in path.split("."):
                value = value.get(key, "") if isinstance(value, dict) else ""
            values.append(str(value))
        lines.append("\t".join(values))
    return "\n".join(lines)


def channels(verb: str, argv: list[str], state: dict[str, Any], done: Any) -> int:
    channels: dict[str, str] = state.setdefault("channels", {})  # email -> name
    if verb == "list":
        email = quoted(flag(argv, "filter"), "labels.email_address")
        return done(0, out=channels.get(email[1], "") if email else "\n".join(channels.values()))
    if verb == "create":
        email = (flag(argv, "channel-labels") or "").removeprefix("email_address=")
        name = f"projects/{flag(argv, 'project')}/notificationChannels/{len(channels) + 1}"
        channels[email] = name
        return done(0, out=name)
    return done(2, err=f"fake gcloud: unknown command {argv}")


def policies(
    verb: str, argv: list[str], state: dict[str, Any], record: dict[str, Any], done: Any
) -> int:
    policies: dict[str, dict[str, Any]] = state.setdefault("policies", {})  # name -> policy
    if verb == "list":
        wanted = quoted(flag(argv, "filter"), "displayName")
        found = [
            (name, policy) for name, policy in policies.items()
            if wanted is None or (policy["displayName"] == wanted[1] if wanted[0] == "="
                                  else wanted[1] in policy["displayName"])
        ]  # fmt: skip
        if flag(argv, "format") == "value(name,displayName,userLabels.anpi_spec)":
            lines = [f"{n}\t{p['displayName']}\t{p.get('userLabels', {}).get('anpi_spec', '')}"
                     for n, p in found]  # fmt: skip
            return done(0, out="\n".join(lines))
        return done(0, out="\n".join(n for n, _ in found))
    source = flag(argv, "policy-from-file")
    record["file"] = read(source) if source else ""
    policy = json.loads(record["file"])
    faults = state["faults"]
    if faults.get("metric_not_ready", 0) > 0:
        faults["metric_not_ready"] -= 1
        return done(1, err=f"ERROR: (gcloud.alpha.monitoring.policies.{verb}) NOT_FOUND: Cannot find"
                           " metric(s) that match type = \"logging.googleapis.com/user/x\".")  # fmt: skip
    if verb == "create":
        name = f"projects/{flag(argv, 'project')}/alertPolicies/{len(policies) + 1}"
        policies[name] = policy
        return done(0, out=name)
    if verb == "update":
        name = positional(argv)[4]
        if name not in policies:
            return done(1, err=f"ERROR: NOT_FOUND: alert policy {name}")
        policies[name] = policy
        return done(0)
    return done(2, err=f"fake gcloud: unknown command {argv}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
