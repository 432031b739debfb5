#!/usr/bin/env bash
# Deploys anpi-call-scheduler to Google Cloud in one idempotent command, and runs it day
# to day: `./deploy.sh` sets up or updates everything (APIs, service accounts with least
# privilege, the Cloud Tasks queues, the image, two Cloud Run Jobs (the hourly run and
# the quick run, `main.py --changes`) and their triggers, the alerts, then a smoke
# test); `./deploy.sh status|logs|missed|execute|pause|resume|rollback` are the day-2
# commands. Every gcloud command is printed (`+ gcloud ...`) before it runs.
#
# Settings come from the environment or from deploy.env beside this script (see
# deploy.env.example), read by the rules python-dotenv uses. Run ./deploy.sh --help.
#
# Not created here: the Cloud SQL tables and the job's database user. Load schema.sql
# and grant that user SELECT on users and SELECT, INSERT, UPDATE, DELETE on
# scheduled_calls and job_runs; without them the job (and the smoke test) exits 2
# naming the grant.
set -euo pipefail
# A failure inside $(...) fails the assignment, so set -e sees it.
shopt -s inherit_errexit
# bash 5.2 puts the matched text in place of `&` in ${var//pattern/replacement}.
shopt -u patsub_replacement 2>/dev/null || true

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly APIS=(
  run.googleapis.com cloudtasks.googleapis.com cloudscheduler.googleapis.com
  cloudbuild.googleapis.com artifactregistry.googleapis.com sqladmin.googleapis.com
  secretmanager.googleapis.com iam.googleapis.com monitoring.googleapis.com
  logging.googleapis.com
)
# Listing, reading and deleting stale tasks (reconciling) needs more than enqueuer;
# these three, granted on each queue only, are the narrowest roles that allow it.
readonly QUEUE_ROLES=(roles/cloudtasks.enqueuer roles/cloudtasks.viewer roles/cloudtasks.taskDeleter)
# Cloud Tasks asks for ramp-up above this many creates/s on one queue.
readonly QUEUE_CREATE_CAP=500
readonly SEVERITIES=(DEFAULT DEBUG INFO NOTICE WARNING ERROR CRITICAL ALERT EMERGENCY)
# The one log line (severity ERROR) main.py writes for each call that no complete run
# covered, with the fields user_id, scheduled_at and phone (masked).
readonly MISSED_CALL_MESSAGE="call missed: no complete run covered it"
# The two jobs rendered from job.yaml: the hourly run retries a failed task; a quick run
# does not (the next minute's run is its retry) and is given less time.
readonly HOURLY_MAX_RETRIES=2 HOURLY_TIMEOUT_SECONDS=1800
readonly CHANGES_MAX_RETRIES=0 CHANGES_TIMEOUT_SECONDS=300

# Temporary files and directories, removed when the script exits, however it exits.
TEMP_PATHS=()
trap 'rm -rf "${TEMP_PATHS[@]}"' EXIT
# Policies whose log-based metric is new fail until Cloud Monitoring knows the metric
# ("Cannot find metric(s)"): up to 10 minutes.
readonly METRIC_READY_SECONDS=600

DRY_RUN=0
DO_INFRA=1
DO_DEPLOY=1
DO_TEST=1

usage() {
  cat <<'EOF'
Usage: ./deploy.sh [--infrastructure-only | --deploy-only] [--skip-test] [--dry-run]
       ./deploy.sh status | logs [--since 2h] [--severity WARNING] | missed [--since 24h]
       ./deploy.sh execute [--dry-run | --changes] [--wait] | pause | resume | rollback TAG

Deploy (no command): sets up or updates everything, in order:
  1. validate settings, gcloud login  6. build the image, deploy both Cloud Run Jobs
  2. enable the APIs                  7. the Cloud Scheduler triggers: hourly runs
  3. service accounts and IAM            (SCHEDULE), quick runs (CHANGES_SCHEDULE)
  4. the Cloud Tasks queue(s)         8. alerts: log metrics, email channels, policies
  5. image repository, build account  9. smoke test: execute the job with --check,
                                         then with --dry-run, then one quick run

  --infrastructure-only  steps 1-5 and 8 (no image, job, scheduler or smoke test)
  --deploy-only          steps 1, 6, 7 and 9 (image, job, scheduler, smoke test); stops
                         first, changing nothing, if a queue the job needs is missing
  --skip-test            leave out step 9
  --dry-run              print every gcloud command; run only read-only ones

Two Cloud Run Jobs run one image: JOB_NAME, the hourly run, and CHANGES_JOB_NAME, the
quick run (main.py --changes) every minute; CHANGES_SCHEDULE= (empty) pauses it.

Day 2 (each prints the gcloud commands it runs):
  status                 both jobs' image and settings and last 5 executions, both
                         triggers' state and next run, each queue's depth and rate,
                         the alert policies; exit 1 if any of it could not be read
  logs [--since 2h] [--severity LEVEL]
                         both jobs' log entries of the last 2h (or --since: 30m, 1d...)
                         at LEVEL or above (default: all)
  missed [--since 24h]   the calls no complete run covered in the last 24h (or --since),
                         as the jobs logged them: time, user_id, scheduled_at, phone
  execute [--dry-run | --changes] [--wait]
                         start an execution now (--dry-run: the job plans and creates
                         nothing; --changes: a quick run, of the quick-run job);
                         --wait: until it ends, exit 1 if it failed
  pause | resume         stop or restart both triggers (the quick runs' only while
                         CHANGES_SCHEDULE is set)
  rollback TAG           point both jobs at an earlier image tag of the repository

  -h, --help             this help

Settings (environment or deploy.env): CLOUD_SQL_INSTANCE, DB_USER, DB_NAME,
DB_PASSWORD_SECRET and ANPI_CALL_URL are required to deploy; the day-2 commands need
none. Every command needs gcloud logged in (gcloud auth login) and a project:
GOOGLE_CLOUD_PROJECT, else gcloud's own (gcloud config set project). See
deploy.env.example for all.
EOF
}

log() { printf '[deploy] %s\n' "$*" >&2; }
fail() {
  printf '[deploy] error: %s\n' "$*" >&2
  exit 1
}

# Prints a command as `+ gcloud ...`, quoting only the words that need it.
show() {
  local out="+" word
  for word in "$@"; do
    if [[ "${word}" =~ ^[][A-Za-z0-9_./:=@,+%~-]+$ ]]; then
      out+=" ${word}"
    else
      out+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "${out}" >&2
}

# Runs a command that changes something; with --dry-run only prints it.
run() {
  show "$@"
  if ((DRY_RUN)); then
    return 0
  fi
  "$@"
}

# Runs a command even under --dry-run: read-only ones (describe, list) and the day-2
# commands, which do what they are asked at once.
call() {
  show "$@"
  "$@"
}

# Runs a read-only listing of the deploy and prints what it prints. Under --dry-run an
# API not enabled yet (a real run enables it first) gives an empty answer; any other
# failure prints gcloud's error and returns non-zero.
query() {
  show "$@"
  if "$@" 2>"${QUERY_ERRORS}"; then
    return 0
  fi
  if ((DRY_RUN)) && grep -qE 'SERVICE_DISABLED|has not been used' "${QUERY_ERRORS}"; then
    log "an API is not enabled yet (a real run enables it first): taken as empty"
    return 0
  fi
  cat "${QUERY_ERRORS}" >&2
  return 1
}

# Whether the resource a describe command names exists: 0 yes (its output is then in
# DESCRIBED), 1 NOT_FOUND. Any other failure (a permission, an API still enabling, the
# network) stops the script with gcloud's own error, instead of leading to a create that
# fails with ALREADY_EXISTS.
exists() {
  local err
  show "$@"
  if DESCRIBED="$("$@" 2>"${QUERY_ERRORS}")"; then
    return 0
  fi
  err="$(<"${QUERY_ERRORS}")"
  if not_found "${err}"; then
    return 1
  fi
  if ((DRY_RUN)) && [[ "${err}" =~ SERVICE_DISABLED|has\ not\ been\ used ]]; then
    log "an API is not enabled yet (a real run enables it first): taken as absent"
    return 1
  fi
  printf '%s\n' "${err}" >&2
  fail "cannot tell whether it exists: $*"
}

# Whether gcloud's error $1 says that the resource does not exist (and nothing else).
not_found() {
  [[ "$1" != *PERMISSION_DENIED* && "$1" =~ NOT_FOUND|Cannot\ find ]]
}

# Runs a command that changes something, like `run`, retrying while its error matches
# the regex $2, a state Google Cloud leaves by itself: with backoff (1 s, 2 s, 4 s ... at
# most 30 s apart) for $3 seconds in all; $1 names what is awaited. Any other error
# stops the script at once, as does the end of the wait.
retry_while() {
  local what="$1" pattern="$2" limit="$3" err delay=1 waited=0
  shift 3
  show "$@"
  if ((DRY_RUN)); then
    return 0
  fi
  while ! err="$("$@" 2>&1 >/dev/null)"; do
    if [[ ! "${err}" =~ ${pattern} ]] || ((waited + delay > limit)); then
      printf '%s\n' "${err}" >&2
      fail "failed (after ${waited}s of retries): $*"
    fi
    log "${what} not ready yet (${err%%$'\n'*}); retrying in ${delay}s"
    sleep "${delay}"
    waited=$((waited + delay))
    delay=$((delay * 2 > 30 ? 30 : delay * 2))
  done
}

# Adds an IAM binding. Right after an account is created, bindings naming it fail with
# "does not exist" until it has propagated, and two writers of one policy meet
# "concurrent policy changes": both are retried for IAM_RETRY_SECONDS. Any other error
# (the target itself is missing, a permission) stops the script at once.
bind() {
  retry_while IAM 'does not exist|concurrent policy changes|ABORTED' "${IAM_RETRY_SECONDS}" "$@"
}

# --- settings -----------------------------------------------------------------------

# Undoes the escapes python-dotenv decodes, into REPLY: $2 lists the escapable characters.
unescape() {
  local value="$1" escapable="$2" out="" char i
  for ((i = 0; i < ${#value}; i++)); do
    char="${value:i:1}"
    if [[ "${char}" == "\\" ]] && ((i + 1 < ${#value})) && [[ "${escapable}" == *"${value:i+1:1}"* ]]; then
      i=$((i + 1))
      case "${value:i:1}" in
        a) char=$'\a' ;;
        b) char=$'\b' ;;
        f) char=$'\f' ;;
        n) char=$'\n' ;;
        r) char=$'\r' ;;
        t) char=$'\t' ;;
        v) char=$'\v' ;;
        *) char="${value:i:1}" ;;
      esac
    fi
    out+="${char}"
  done
  REPLY="${out}"
}

# Expands ${NAME} and ${NAME:-default} as python-dotenv does, into REPLY: from the
# environment (exported variables only), which by then holds the file's earlier values
# too; unset and no default: empty.
interpolate() {
  local value="$1" out="" name
  local match default
  while [[ "${value}" =~ \$\{[^}:]*(:-[^}]*)?\} ]]; do
    match="${BASH_REMATCH[0]}"
    out+="${value%%"${match}"*}"
    value="${value#*"${match}"}"
    name="${match:2:${#match}-3}"
    default=""
    if [[ "${name}" == *:-* ]]; then
      default="${name#*:-}"
      name="${name%%:-*}"
    fi
    if [[ "${name}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ && "$(declare -p "${name}" 2>/dev/null)" =~ ^declare\ -[a-zA-Z]*x ]]; then
      out+="${!name}"
    else
      out+="${default}"
    fi
  done
  REPLY="${out}${value}"
}

# Reads a dotenv file by python-dotenv's rules: `export`, `KEY = value`, '...' (escapes
# \\ and \'), "..." (escapes \\ \' \" \a \b \f \n \r \t \v), # comments after a value
# and on their own lines, ${VAR} expansion; a key given twice takes its last value. A
# variable already in the environment wins, as with load_dotenv(override=False).
# Refused, naming the line: a key that is not a shell name, and a quoted value that goes
# on past its line.
read_dotenv() {
  local file="$1" line number=0 key equals rest value
  local -A from_file=()
  local sq_re="^'((\\\\.|[^'\\\\])*)'[[:space:]]*(#.*)?$"
  local dq_re='^"((\\.|[^"\\])*)"[[:space:]]*(#.*)?$'
  local line_re='^[[:space:]]*(export[[:space:]]+)?([^=#[:space:]]+)[[:space:]]*(=[[:space:]]*)?(.*)$'
  while IFS= read -r line || [[ -n "${line}" ]]; do
    number=$((number + 1))
    line="${line%$'\r'}"
    [[ "${line}" =~ ^[[:space:]]*(#.*)?$ ]] && continue
    [[ "${line}" =~ ${line_re} ]] || fail "${file}:${number}: cannot read this line"
    key="${BASH_REMATCH[2]}" equals="${BASH_REMATCH[3]}" rest="${BASH_REMATCH[4]}"
    [[ "${key}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || fail "${file}:${number}: '${key}' is not a variable name"
    if [[ -z "${equals}" ]]; then
      [[ "${rest}" =~ ^(#.*)?$ ]] || fail "${file}:${number}: cannot read this line"
      continue # KEY alone: python-dotenv gives it no value
    fi
    if [[ "${rest}" == "#"* && "${equals}" != "=" ]]; then
      value="" # `KEY= # comment`
    elif [[ "${rest}" == "'"* ]]; then
      [[ "${rest}" =~ ${sq_re} ]] || fail "${file}:${number}: a quoted value must end on its line"
      unescape "${BASH_REMATCH[1]}" "\\'"
      value="${REPLY}"
    elif [[ "${rest}" == '"'* ]]; then
      [[ "${rest}" =~ ${dq_re} ]] || fail "${file}:${number}: a quoted value must end on its line"
      unescape "${BASH_REMATCH[1]}" "\\'\"abfnrtv"
      value="${REPLY}"
    else
      value="${rest}"
      if [[ "${value}" =~ [[:space:]]+# ]]; then
        value="${value%%"${BASH_REMATCH[0]}"*}"
      fi
      value="${value%"${value##*[![:space:]]}"}"
    fi
    interpolate "${value}"
    if [[ -n "${from_file[${key}]:-}" || ! -v "${key}" ]]; then
      export "${key}=${REPLY}"
      from_file[${key}]=1
    fi
  done <"${file}"
}

load_settings() {
  if [[ -f "${SCRIPT_DIR}/deploy.env" ]]; then
    read_dotenv "${SCRIPT_DIR}/deploy.env"
  fi
  REGION="${REGION:-asia-northeast1}"
  CLOUD_TASKS_QUEUE="${CLOUD_TASKS_QUEUE:-anpi-call-queue}"
  JOB_NAME="${JOB_NAME:-anpi-call-create-task-job}"
  SCHEDULER_JOB_NAME="${SCHEDULER_JOB_NAME:-anpi-call-scheduler-job}"
  SCHEDULE="${SCHEDULE:-0 * * * *}"
  # The quick run (main.py --changes): its own job and trigger. Set but empty: off.
  CHANGES_JOB_NAME="${CHANGES_JOB_NAME:-anpi-call-changes-job}"
  CHANGES_SCHEDULER_JOB_NAME="${CHANGES_SCHEDULER_JOB_NAME:-anpi-call-changes-scheduler-job}"
  CHANGES_SCHEDULE="${CHANGES_SCHEDULE-* * * * *}"
  SCHEDULER_TIME_ZONE="${SCHEDULER_TIME_ZONE:-Asia/Tokyo}"
  DEFAULT_TIMEZONE="${DEFAULT_TIMEZONE:-Asia/Tokyo}"
  TASK_COUNT="${TASK_COUNT:-1}"
  QUEUE_PER_SHARD="${QUEUE_PER_SHARD:-$([[ "${TASK_COUNT}" == 1 ]] && echo 0 || echo 1)}"
  ARTIFACT_REPOSITORY="${ARTIFACT_REPOSITORY:-anpi}"
  RUNTIME_SA_NAME="${RUNTIME_SA_NAME:-anpi-call-job}"
  SCHEDULER_SA_NAME="${SCHEDULER_SA_NAME:-anpi-call-scheduler}"
  TASKS_OIDC_SERVICE_ACCOUNT="${TASKS_OIDC_SERVICE_ACCOUNT:-}"
  DB_USER="${DB_USER:-}"
  DB_NAME="${DB_NAME:-}"
  DB_PASSWORD_SECRET_VERSION="${DB_PASSWORD_SECRET_VERSION:-}"
  ALERT_EMAIL="${ALERT_EMAIL:-}"
  IAM_RETRY_SECONDS="${IAM_RETRY_SECONDS:-120}"
  IAM_WAIT_SECONDS="${IAM_WAIT_SECONDS:-60}"
  # A failed call is retried a few times within minutes, never hours later.
  QUEUE_MAX_DISPATCHES_PER_SECOND="${QUEUE_MAX_DISPATCHES_PER_SECOND:-10}"
  QUEUE_MAX_CONCURRENT_DISPATCHES="${QUEUE_MAX_CONCURRENT_DISPATCHES:-50}"
  QUEUE_MAX_ATTEMPTS="${QUEUE_MAX_ATTEMPTS:-4}"
  QUEUE_MIN_BACKOFF="${QUEUE_MIN_BACKOFF:-30s}"
  QUEUE_MAX_BACKOFF="${QUEUE_MAX_BACKOFF:-120s}"
  QUEUE_MAX_DOUBLINGS="${QUEUE_MAX_DOUBLINGS:-2}"
  QUEUE_MAX_RETRY_DURATION="${QUEUE_MAX_RETRY_DURATION:-600s}"
}

# Loads, checks and completes the settings, then asks gcloud for its login and project:
# $1 = deploy, every setting a deploy needs; day2, what the day-2 commands need.
prepare() {
  load_settings
  validate_settings "$1"
  check_gcloud
  derive_settings
}

# The settings' own checks, before any gcloud command. The project is checked with
# gcloud's login (check_gcloud), since gcloud's own project may stand in for it.
validate_settings() {
  local required=() missing=() problems=() name email
  if [[ "$1" == deploy ]]; then
    required+=(CLOUD_SQL_INSTANCE DB_USER DB_NAME DB_PASSWORD_SECRET ANPI_CALL_URL)
  fi
  for name in "${required[@]}"; do
    [[ -n "${!name:-}" ]] || missing+=("${name}")
  done
  ((${#missing[@]} == 0)) || fail "missing required settings: ${missing[*]} (environment or deploy.env)"
  if [[ "$1" == deploy ]]; then
    [[ "${CLOUD_SQL_INSTANCE}" =~ ^[^:]+:[^:]+:[^:]+$ ]] ||
      problems+=("CLOUD_SQL_INSTANCE must be PROJECT:REGION:INSTANCE")
    [[ "${ANPI_CALL_URL}" =~ ^https:// ]] || problems+=("ANPI_CALL_URL must be an https:// URL")
  fi
  [[ "${TASK_COUNT}" =~ ^[1-9][0-9]*$ ]] || problems+=("TASK_COUNT must be a positive integer")
  [[ "${QUEUE_PER_SHARD}" =~ ^[01]$ ]] || problems+=("QUEUE_PER_SHARD must be 0 or 1")
  [[ "${CHANGES_JOB_NAME}" != "${JOB_NAME}" ]] || problems+=("CHANGES_JOB_NAME must differ from JOB_NAME")
  [[ "${CHANGES_SCHEDULER_JOB_NAME}" != "${SCHEDULER_JOB_NAME}" ]] ||
    problems+=("CHANGES_SCHEDULER_JOB_NAME must differ from SCHEDULER_JOB_NAME")
  local -a fields=()
  read -r -a fields <<<"${CHANGES_SCHEDULE}"
  ((${#fields[@]} == 0 || ${#fields[@]} == 5)) ||
    problems+=("CHANGES_SCHEDULE must be a cron schedule of 5 fields, or empty (no quick runs)")
  for name in IAM_RETRY_SECONDS IAM_WAIT_SECONDS; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || problems+=("${name} must be a whole number of seconds")
  done
  # ALERT_EMAIL: addresses separated by commas and/or spaces.
  local -a emails=()
  IFS=$', \t' read -r -a emails <<<"${ALERT_EMAIL}"
  local -A seen=()
  ALERT_EMAILS=()
  for email in "${emails[@]}"; do
    [[ -n "${seen[${email}]:-}" ]] && continue
    seen[${email}]=1
    ALERT_EMAILS+=("${email}")
    [[ "${email}" =~ ^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$ ]] ||
      problems+=("ALERT_EMAIL: '${email}' is not an email address")
  done
  # Every value that reaches job.yaml is quoted there; a control character cannot be.
  for name in JOB_NAME CHANGES_JOB_NAME REGION CLOUD_SQL_INSTANCE DB_USER DB_NAME DB_PASSWORD_SECRET \
    DB_PASSWORD_SECRET_VERSION GOOGLE_CLOUD_PROJECT CLOUD_TASKS_QUEUE ANPI_CALL_URL \
    TASKS_OIDC_SERVICE_ACCOUNT DEFAULT_TIMEZONE QUEUE_MAX_DISPATCHES_PER_SECOND; do
    [[ "${!name:-}" != *[[:cntrl:]]* ]] || problems+=("${name} holds a control character")
  done
  ((${#problems[@]} == 0)) || fail "invalid settings: $(printf '%s; ' "${problems[@]}")"
}

# gcloud must be logged in, and the project known, before anything else runs: otherwise
# the first describe fails with the login hint buried in its error. The project is
# GOOGLE_CLOUD_PROJECT or, when that is unset, gcloud's own (gcloud config set project).
check_gcloud() {
  local account project
  account="$(query gcloud auth list --filter=status:ACTIVE --format='value(account)')" ||
    fail "cannot ask gcloud for its account (see the error above)"
  [[ -n "${account}" ]] || fail "gcloud has no active account: run gcloud auth login"
  if [[ -z "${GOOGLE_CLOUD_PROJECT:-}" ]]; then
    project="$(query gcloud config get project)" || fail "cannot ask gcloud for its project (see the error above)"
    [[ -n "${project}" && "${project}" != *[[:cntrl:][:space:]]* ]] ||
      fail "no project: set GOOGLE_CLOUD_PROJECT (deploy.env or the environment) or run gcloud config set project PROJECT_ID"
    GOOGLE_CLOUD_PROJECT="${project}"
    log "project ${project} (gcloud config; GOOGLE_CLOUD_PROJECT is not set)"
  fi
  log "gcloud account ${account}, project ${GOOGLE_CLOUD_PROJECT}"
}

# Names and lists that follow from the settings.
derive_settings() {
  RUNTIME_SA="${RUNTIME_SA_NAME}@${GOOGLE_CLOUD_PROJECT}.iam.gserviceaccount.com"
  SCHEDULER_SA="${SCHEDULER_SA_NAME}@${GOOGLE_CLOUD_PROJECT}.iam.gserviceaccount.com"
  IMAGE_REPO="${REGION}-docker.pkg.dev/${GOOGLE_CLOUD_PROJECT}/${ARTIFACT_REPOSITORY}/anpi-call-scheduler"
  PROJECT_FLAGS=(--project="${GOOGLE_CLOUD_PROJECT}")
  # The log entries of both jobs: the hourly run's and the quick run's.
  JOBS_FILTER="resource.type=\"cloud_run_job\" AND (resource.labels.job_name=\"${JOB_NAME}\" OR resource.labels.job_name=\"${CHANGES_JOB_NAME}\")"
  QUEUES=()
  local i
  if ((QUEUE_PER_SHARD)); then
    # Shard i uses queue-i alone, so each queue takes the whole create cap.
    for ((i = 0; i < TASK_COUNT; i++)); do
      QUEUES+=("${CLOUD_TASKS_QUEUE}-${i}")
    done
    ENQUEUE_MAX_PER_SECOND="${QUEUE_CREATE_CAP}"
  else
    # All shards share one queue: they share its cap.
    QUEUES=("${CLOUD_TASKS_QUEUE}")
    ENQUEUE_MAX_PER_SECOND="$((QUEUE_CREATE_CAP / TASK_COUNT > 0 ? QUEUE_CREATE_CAP / TASK_COUNT : 1))"
  fi
}

# --- deploy steps -----------------------------------------------------------------

enable_apis() {
  log "enabling APIs"
  run gcloud services enable "${APIS[@]}" "${PROJECT_FLAGS[@]}"
}

ensure_service_account() {
  local name="$1" email="$2" display="$3"
  if exists gcloud iam service-accounts describe "${email}" "${PROJECT_FLAGS[@]}"; then
    log "service account ${email} exists"
  else
    run gcloud iam service-accounts create "${name}" --display-name="${display}" "${PROJECT_FLAGS[@]}"
  fi
}

setup_service_accounts() {
  log "service accounts and IAM"
  ensure_service_account "${RUNTIME_SA_NAME}" "${RUNTIME_SA}" "anpi-call-scheduler job (runtime)"
  ensure_service_account "${SCHEDULER_SA_NAME}" "${SCHEDULER_SA}" "anpi-call-scheduler trigger"
  bind gcloud projects add-iam-policy-binding "${GOOGLE_CLOUD_PROJECT}" \
    --member="serviceAccount:${RUNTIME_SA}" --role=roles/cloudsql.client --condition=None
  bind gcloud secrets add-iam-policy-binding "${DB_PASSWORD_SECRET}" \
    --member="serviceAccount:${RUNTIME_SA}" --role=roles/secretmanager.secretAccessor \
    "${PROJECT_FLAGS[@]}"
  if [[ -n "${TASKS_OIDC_SERVICE_ACCOUNT}" ]]; then
    # Creating tasks that carry this account's OIDC token needs actAs on it.
    bind gcloud iam service-accounts add-iam-policy-binding "${TASKS_OIDC_SERVICE_ACCOUNT}" \
      --member="serviceAccount:${RUNTIME_SA}" --role=roles/iam.serviceAccountUser \
      "${PROJECT_FLAGS[@]}"
  fi
}

setup_queues() {
  local settings=(
    --location="${REGION}"
    --max-dispatches-per-second="${QUEUE_MAX_DISPATCHES_PER_SECOND}"
    --max-concurrent-dispatches="${QUEUE_MAX_CONCURRENT_DISPATCHES}"
    --max-attempts="${QUEUE_MAX_ATTEMPTS}"
    --min-backoff="${QUEUE_MIN_BACKOFF}"
    --max-backoff="${QUEUE_MAX_BACKOFF}"
    --max-doublings="${QUEUE_MAX_DOUBLINGS}"
    --max-retry-duration="${QUEUE_MAX_RETRY_DURATION}"
    "${PROJECT_FLAGS[@]}"
  )
  local queue role
  for queue in "${QUEUES[@]}"; do
    log "Cloud Tasks queue ${queue} in ${REGION}"
    if exists gcloud tasks queues describe "${queue}" --location="${REGION}" "${PROJECT_FLAGS[@]}"; then
      run gcloud tasks queues update "${queue}" "${settings[@]}"
    else
      run gcloud tasks queues create "${queue}" "${settings[@]}"
    fi
    for role in "${QUEUE_ROLES[@]}"; do
      bind gcloud tasks queues add-iam-policy-binding "${queue}" --location="${REGION}" \
        --member="serviceAccount:${RUNTIME_SA}" --role="${role}" "${PROJECT_FLAGS[@]}"
    done
  done
  report_leftover_queues
}

# Queues of an earlier TASK_COUNT or QUEUE_PER_SHARD: named here, never deleted, since
# their pending tasks still run at their time (docs/operations.md, "Scale out").
report_leftover_queues() {
  local names name queue wanted depth
  names="$(query gcloud tasks queues list --location="${REGION}" --format='value(name)' \
    "${PROJECT_FLAGS[@]}")" || fail "cannot list the queues of ${REGION}"
  for name in ${names}; do
    name="${name##*/}"
    [[ "${name}" =~ ^${CLOUD_TASKS_QUEUE}(-[0-9]+)?$ ]] || continue
    wanted=0
    for queue in "${QUEUES[@]}"; do
      [[ "${queue}" == "${name}" ]] && wanted=1
    done
    ((wanted)) && continue
    depth="$(queue_depth "${name}")" || fail "cannot count the tasks of queue ${name}"
    log "queue ${name} is no longer used by the job; its ${depth} pending task(s) still run" \
      "on time, and calls recorded on it are kept there. Delete it once it is empty and the" \
      "job has run 2 h 15 min with the new settings: gcloud tasks queues delete ${name} --location=${REGION} --project=${GOOGLE_CLOUD_PROJECT}"
  done
}

# Pending tasks of a queue, counted up to 10,000 ("10000+" beyond).
queue_depth() {
  local names count=0 name
  names="$(query gcloud tasks list --queue="$1" --location="${REGION}" --limit=10001 \
    --format='value(name)' "${PROJECT_FLAGS[@]}")" || return 1
  for name in ${names}; do
    count=$((count + 1))
  done
  ((count > 10000)) && count="10000+"
  printf '%s\n' "${count}"
}

# --deploy-only creates no queue: every queue the job's TASK_COUNT and QUEUE_PER_SHARD
# will use must exist already, or its shards' calls would fail. Read-only.
require_queues() {
  local queue missing=()
  for queue in "${QUEUES[@]}"; do
    exists gcloud tasks queues describe "${queue}" --location="${REGION}" "${PROJECT_FLAGS[@]}" ||
      missing+=("${queue}")
  done
  ((${#missing[@]} == 0)) ||
    fail "--deploy-only: TASK_COUNT=${TASK_COUNT} QUEUE_PER_SHARD=${QUEUE_PER_SHARD} needs queues that do not exist: ${missing[*]}; create them first with ./deploy.sh --infrastructure-only (or run the full ./deploy.sh)"
}

setup_repository() {
  if exists gcloud artifacts repositories describe "${ARTIFACT_REPOSITORY}" \
    --location="${REGION}" "${PROJECT_FLAGS[@]}"; then
    log "Artifact Registry repository ${ARTIFACT_REPOSITORY} exists"
  else
    run gcloud artifacts repositories create "${ARTIFACT_REPOSITORY}" --repository-format=docker \
      --location="${REGION}" --description="anpi-call-scheduler images" "${PROJECT_FLAGS[@]}"
  fi
  # The account Cloud Build runs as (on new projects the Compute Engine default account,
  # which new organisations leave without roles) needs to read the uploaded source,
  # push to this repository and write build logs.
  local account
  account="$(query gcloud builds get-default-service-account --region="${REGION}" \
    --format='value(serviceAccountEmail)' "${PROJECT_FLAGS[@]}")" ||
    fail "cannot ask Cloud Build for its default service account"
  account="${account##*/}"
  if [[ -z "${account}" ]] && ((DRY_RUN)); then
    account="CLOUD_BUILD_DEFAULT_ACCOUNT" # the API is not enabled yet
  fi
  [[ -n "${account}" ]] || fail "Cloud Build reports no default service account in ${REGION}"
  log "Cloud Build runs as ${account}"
  bind gcloud artifacts repositories add-iam-policy-binding "${ARTIFACT_REPOSITORY}" \
    --location="${REGION}" --member="serviceAccount:${account}" \
    --role=roles/artifactregistry.writer "${PROJECT_FLAGS[@]}"
  local role
  for role in roles/logging.logWriter roles/storage.objectViewer; do
    bind gcloud projects add-iam-policy-binding "${GOOGLE_CLOUD_PROJECT}" \
      --member="serviceAccount:${account}" --role="${role}" --condition=None
  done
}

# --- alerts -----------------------------------------------------------------------

# $1 as a JSON string, quotes included.
json_string() {
  local value="$1"
  value="${value//\\/\\\\}"
  value="${value//\"/\\\"}"
  value="${value//$'\n'/\\n}"
  value="${value//$'\t'/\\t}"
  printf '"%s"' "${value}"
}

ensure_log_metric() {
  local name="$1" description="$2" filter="$3"
  if exists gcloud logging metrics describe "${name}" "${PROJECT_FLAGS[@]}"; then
    run gcloud logging metrics update "${name}" --description="${description}" \
      --log-filter="${filter}" "${PROJECT_FLAGS[@]}"
  else
    run gcloud logging metrics create "${name}" --description="${description}" \
      --log-filter="${filter}" "${PROJECT_FLAGS[@]}"
  fi
}

# The email channels of ALERT_EMAIL, created when missing, as a JSON list of names.
alert_channels() {
  local email name names=()
  for email in "${ALERT_EMAILS[@]}"; do
    name="$(query gcloud beta monitoring channels list \
      --filter="type=\"email\" AND labels.email_address=\"${email}\"" --limit=1 \
      --format='value(name)' "${PROJECT_FLAGS[@]}")" || fail "cannot list the channels for ${email}"
    if [[ -z "${name}" ]]; then
      name="$(run gcloud beta monitoring channels create --type=email \
        --display-name="anpi-call-scheduler: ${email}" --channel-labels="email_address=${email}" \
        --format='value(name)' "${PROJECT_FLAGS[@]}")" || fail "cannot create the channel for ${email}"
      if ((DRY_RUN)); then
        name="projects/${GOOGLE_CLOUD_PROJECT}/notificationChannels/NEW"
      fi
      [[ "${name}" == projects/*/notificationChannels/* ]] ||
        fail "channels create for ${email} printed no channel name: '${name}'"
    fi
    names+=("$(json_string "${name}")")
  done
  local IFS=,
  printf '[%s]' "${names[*]}"
}

# Creates the policy in file $2 or, found by its display name $1 in POLICIES (the
# listing: name, display name, anpi_spec), updates it when its definition changed (the
# label anpi_spec holds a checksum of it). An unchanged policy is left alone: an update
# restarts an absence condition, which then needs fresh data before it can fire. A policy on a log-based metric created seconds ago is refused
# until Cloud Monitoring knows the metric: retried for METRIC_READY_SECONDS.
ensure_policy() {
  local display="$1" file="$2" spec text name="" spec_now="" each_name each_display each_spec
  spec="$(cksum <"${file}")"
  spec="${spec%% *}"
  text="$(<"${file}")"
  printf '%s\n' "${text//__SPEC__/${spec}}" >"${file}"
  while IFS=$'\t' read -r each_name each_display each_spec; do
    if [[ "${each_display}" == "${display}" ]]; then
      name="${each_name}" spec_now="${each_spec}"
      break
    fi
  done <<<"${POLICIES}"
  if [[ -z "${name}" ]]; then
    once_metric_is_known gcloud alpha monitoring policies create --policy-from-file="${file}" \
      "${PROJECT_FLAGS[@]}"
  elif [[ "${spec_now}" == "${spec}" ]]; then
    log "alert policy '${display}' is up to date"
  else
    once_metric_is_known gcloud alpha monitoring policies update "${name}" \
      --policy-from-file="${file}" "${PROJECT_FLAGS[@]}"
  fi
}

once_metric_is_known() {
  retry_while "the new log-based metric" 'Cannot find metric' "${METRIC_READY_SECONDS}" "$@"
}

# One alert policy as JSON: display name, condition (JSON), documentation (markdown).
policy_json() {
  cat <<EOF
{
  "displayName": $(json_string "$1"),
  "combiner": "OR",
  "conditions": [$2],
  "documentation": {"content": $(json_string "$3"), "mimeType": "text/markdown"},
  "alertStrategy": {"autoClose": "1800s"},
  "notificationChannels": ${CHANNELS},
  "userLabels": {"anpi_spec": "__SPEC__"},
  "enabled": true
}
EOF
}

# A condition on a metric's sum over a rolling window: above a threshold, or absent for
# $3. $4 is the threshold (default 0), $5 the window (default 300s). No data (the usual
# state of these sparse counts) closes a threshold's incident, so the next failure
# opens a new one and notifies again.
condition_json() {
  local display="$1" filter="$2" absent_for="${3:-}" threshold="${4:-0}" window="${5:-300s}"
  local aggregation="\"aggregations\": [{\"alignmentPeriod\": \"${window}\", \"perSeriesAligner\": \"ALIGN_SUM\", \"crossSeriesReducer\": \"REDUCE_SUM\"}]"
  if [[ -n "${absent_for}" ]]; then
    printf '{"displayName": %s, "conditionAbsent": {"filter": %s, %s, "duration": "%s", "trigger": {"count": 1}}}' \
      "$(json_string "${display}")" "$(json_string "${filter}")" "${aggregation}" "${absent_for}"
  else
    printf '{"displayName": %s, "conditionThreshold": {"filter": %s, %s, "comparison": "COMPARISON_GT", "thresholdValue": %s, "duration": "0s", "trigger": {"count": 1}, "evaluationMissingData": "EVALUATION_MISSING_DATA_INACTIVE"}}' \
      "$(json_string "${display}")" "$(json_string "${filter}")" "${aggregation}" "${threshold}"
  fi
}

# Log-based metrics count the lines of both jobs (a quick run logs an invalid row, a
# call it could not place or a missed call like the hourly run). The execution policies
# differ: a failed or absent execution is about the hourly run, while one failed quick
# run needs nothing (the next minute's run is its retry): only quick runs that keep
# failing alert.
setup_alerts() {
  log "alerts: log-based metrics, notification channels, alert policies"
  local run_job='resource.type="cloud_run_job" AND resource.labels.job_name='
  local count='metric.type="run.googleapis.com/job/completed_execution_count"'
  local executions="${run_job}\"${JOB_NAME}\" AND ${count}"
  local quick_executions="${run_job}\"${CHANGES_JOB_NAME}\" AND ${count}"
  local user_metric="resource.type=\"cloud_run_job\" AND metric.type=\"logging.googleapis.com/user"
  local both="${JOB_NAME} or ${CHANGES_JOB_NAME}"
  ensure_log_metric "${JOB_NAME}-invalid-rows" \
    "Rows of users that ${both} cannot call (one per invalid row and run)" \
    "${JOBS_FILTER} AND severity=ERROR AND jsonPayload.message:\"invalid row skipped\""
  ensure_log_metric "${JOB_NAME}-calls-not-placed" \
    "Runs of ${both} that left calls off the queue (tasks_failed or tasks_not_attempted)" \
    "${JOBS_FILTER} AND (jsonPayload.tasks_failed>0 OR jsonPayload.tasks_not_attempted>0)"
  ensure_log_metric "${JOB_NAME}-calls-missed" \
    "Calls the table wanted that no complete run of ${both} covered (one line per call)" \
    "${JOBS_FILTER} AND severity=ERROR AND jsonPayload.message:\"${MISSED_CALL_MESSAGE}\""
  CHANNELS="$(alert_channels)" || exit 1
  if [[ -z "${ALERT_EMAIL}" ]]; then
    log "ALERT_EMAIL is not set: the alert policies exist but notify nobody." \
      "Set ALERT_EMAIL and re-run ./deploy.sh --infrastructure-only"
  fi
  local dir
  dir="$(mktemp -d "${TMPDIR:-/tmp}/anpi-alerts.XXXXXX")"
  TEMP_PATHS+=("${dir}")
  local -a names=(
    "${JOB_NAME}: an execution failed"
    "${JOB_NAME}: no successful execution for 2 hours"
    "${JOB_NAME}: rows became invalid"
    "${JOB_NAME}: calls failed or were not attempted"
    "${JOB_NAME}: quick runs keep failing"
    "${JOB_NAME}: calls were missed"
  )
  policy_json "${names[0]}" \
    "$(condition_json "failed executions" "${executions} AND metric.labels.result=\"failed\"")" \
    "An execution of Cloud Run Job ${JOB_NAME} failed: calls of its window may be missing from the queue. First run \`./deploy.sh logs --since 2h --severity WARNING\` and read the last summary and its \`error\`. Once the cause is fixed, \`./deploy.sh execute --wait\` places what is missing; a rerun calls no one twice." \
    >"${dir}/failed.json"
  policy_json "${names[1]}" \
    "$(condition_json "no succeeded execution" "${executions} AND metric.labels.result=\"succeeded\"" 7200s)" \
    "No execution of Cloud Run Job ${JOB_NAME} succeeded in the last 2 hours: nobody's calls are being scheduled. The scheduler may be paused or broken, or every run fails. First run \`./deploy.sh status\` (scheduler state, last executions); \`./deploy.sh resume\` if it is paused, then \`./deploy.sh execute --wait\`." \
    >"${dir}/absent.json"
  policy_json "${names[2]}" \
    "$(condition_json "invalid rows logged" "${user_metric}/${JOB_NAME}-invalid-rows\"")" \
    "A row of \`users\` is invalid, so that person will NOT be called until it is fixed (a bad phone number, weekday, time or zone). First run \`./deploy.sh logs --since 2h --severity ERROR\`: each \`invalid row skipped\` line names the \`user_id\`, the column and the reason. Fix the row; the next run calls them." \
    >"${dir}/invalid.json"
  policy_json "${names[3]}" \
    "$(condition_json "runs with calls not placed" "${user_metric}/${JOB_NAME}-calls-not-placed\"")" \
    "A run of Cloud Run Job ${JOB_NAME} or ${CHANGES_JOB_NAME} could not put some calls on the queue (\`tasks_failed\` or \`tasks_not_attempted\` above 0 in its summary). First run \`./deploy.sh logs --since 2h --severity WARNING\`; once Cloud Tasks answers again, \`./deploy.sh execute --wait\` places them." \
    >"${dir}/not-placed.json"
  policy_json "${names[4]}" \
    "$(condition_json "more than 3 failed quick runs in 15 minutes" "${quick_executions} AND metric.labels.result=\"failed\"" "" 3 900s)" \
    "Quick runs (Cloud Run Job ${CHANGES_JOB_NAME}, \`main.py --changes\`) keep failing: more than 3 failed in 15 minutes. A changed setting now reaches the queue only at the next hourly run, so a call moved to within the hour may be missed. One failure alone does not alert: the next run is its retry. First run \`./deploy.sh status\` (last executions of both jobs) and \`./deploy.sh logs --since 1h --severity WARNING\` (the quick run's lines name ${CHANGES_JOB_NAME}). \`./deploy.sh execute --changes --wait\` tries one after a fix." \
    >"${dir}/quick-failing.json"
  policy_json "${names[5]}" \
    "$(condition_json "calls missed (one per call)" "${user_metric}/${JOB_NAME}-calls-missed\"")" \
    "Calls that users' settings wanted were MISSED: no complete run of ${JOB_NAME} or ${CHANGES_JOB_NAME} covered them, so those people were not called. The value in this notification is how many calls were missed in the 5 minutes it covers (one \`${MISSED_CALL_MESSAGE}\` line per call). First run \`./deploy.sh missed --since 24h\`: it lists each missed call (time, user_id, scheduled_at, masked phone), so that someone can reach those people. Then find why no run completed: \`./deploy.sh status\` and \`./deploy.sh logs --since 2h --severity WARNING\`." \
    >"${dir}/missed.json"
  # Listed once: each policy has its own display name, so no write here changes what
  # another one finds.
  POLICIES="$(query gcloud alpha monitoring policies list \
    --format='value(name,displayName,userLabels.anpi_spec)' "${PROJECT_FLAGS[@]}")" ||
    fail "cannot list the alert policies"
  local i files=(failed absent invalid not-placed quick-failing missed)
  for i in "${!names[@]}"; do
    ensure_policy "${names[i]}" "${dir}/${files[i]}.json"
  done
}

# --- build, job, scheduler, smoke test ----------------------------------------------

# The newest enabled version of the password secret, unless one is pinned already.
secret_version() {
  if [[ -n "${DB_PASSWORD_SECRET_VERSION}" ]]; then
    printf '%s' "${DB_PASSWORD_SECRET_VERSION}"
    return
  fi
  local version
  version="$(query gcloud secrets versions list "${DB_PASSWORD_SECRET}" --filter=state:enabled \
    --sort-by=~createTime --limit=1 --format='value(name)' "${PROJECT_FLAGS[@]}")" ||
    fail "cannot list the versions of secret ${DB_PASSWORD_SECRET}"
  if [[ -z "${version}" ]] && ((DRY_RUN)); then
    version="NEWEST_ENABLED" # the API is not enabled yet
  fi
  [[ -n "${version}" ]] || fail "secret ${DB_PASSWORD_SECRET} has no enabled version (DB_PASSWORD_SECRET)"
  printf '%s' "${version##*/}"
}

# The image tag: the commit, and when the tree has uncommitted changes, also when it
# was built (`<sha>-dirty-<UTC time>`), so an image never claims a commit it is not.
image_tag() {
  local sha stamp
  stamp="$(date -u +%Y%m%dT%H%M%SZ)"
  if ! sha="$(git -C "${SCRIPT_DIR}" rev-parse --short HEAD 2>/dev/null)"; then
    printf 'nogit-%s' "${stamp}"
  elif [[ -n "$(git -C "${SCRIPT_DIR}" status --porcelain 2>/dev/null)" ]]; then
    printf '%s-dirty-%s' "${sha}" "${stamp}"
  else
    printf '%s' "${sha}"
  fi
}

# $1 as a YAML double-quoted scalar: a string whatever it holds (`yes`, `0123`, `#`).
yaml_string() {
  local value="$1"
  value="${value//\\/\\\\}"
  value="${value//\"/\\\"}"
  printf '"%s"' "${value}"
}

# job.yaml for one of the two jobs: $1 image, $2 secret version, $3 job name, $4 its args
# (words), then its retries and timeout; written to the file $7.
render_job_yaml() {
  local image="$1" version="$2" name="$3" args="$4" retries="$5" timeout="$6" out="$7"
  local text key value word list="" words=()
  text="$(<"${SCRIPT_DIR}/job.yaml")"
  read -r -a words <<<"${args}"
  for word in "${words[@]}"; do
    list+="${list:+, }$(yaml_string "${word}")"
  done
  local -A values=(
    [JOB_NAME]="${name}" [REGION]="${REGION}" [CLOUD_SQL_INSTANCE]="${CLOUD_SQL_INSTANCE}"
    [RUNTIME_SERVICE_ACCOUNT]="${RUNTIME_SA}" [IMAGE]="${image}"
    [DB_USER]="${DB_USER}" [DB_NAME]="${DB_NAME}" [DB_PASSWORD_SECRET]="${DB_PASSWORD_SECRET}"
    [DB_PASSWORD_SECRET_VERSION]="${version}" [GOOGLE_CLOUD_PROJECT]="${GOOGLE_CLOUD_PROJECT}"
    [CLOUD_TASKS_QUEUE]="${CLOUD_TASKS_QUEUE}" [ANPI_CALL_URL]="${ANPI_CALL_URL}"
    [TASKS_OIDC_SERVICE_ACCOUNT]="${TASKS_OIDC_SERVICE_ACCOUNT}"
    [DEFAULT_TIMEZONE]="${DEFAULT_TIMEZONE}" [ENQUEUE_MAX_PER_SECOND]="${ENQUEUE_MAX_PER_SECOND}"
    [QUEUE_PER_SHARD]="${QUEUE_PER_SHARD}"
    [QUEUE_MAX_DISPATCHES_PER_SECOND]="${QUEUE_MAX_DISPATCHES_PER_SECOND}"
  )
  for key in "${!values[@]}"; do
    value="$(yaml_string "${values[${key}]}")"
    text="${text//"__${key}__"/"${value}"}"
  done
  text="${text//"__TASK_COUNT__"/"${TASK_COUNT}"}" # integers, validated or constant
  text="${text//"__MAX_RETRIES__"/"${retries}"}"
  text="${text//"__TIMEOUT_SECONDS__"/"${timeout}"}"
  text="${text//"__ARGS__"/"[${list}]"}"
  if [[ "${text}" =~ __[A-Z_]+__ ]]; then
    fail "job.yaml has a placeholder deploy.sh does not fill: ${BASH_REMATCH[0]}"
  fi
  printf '%s\n' "${text}" >"${out}"
}

# One image, two jobs: the hourly run and the quick run. Both are deployed even while
# CHANGES_SCHEDULE is empty, so that `execute --changes` and a later resume never run
# an image older than the hourly job's.
deploy_jobs() {
  local image version
  image="${IMAGE_REPO}:$(image_tag)"
  log "building ${image} with Cloud Build"
  run gcloud builds submit "${SCRIPT_DIR}" --tag="${image}" --region="${REGION}" "${PROJECT_FLAGS[@]}"
  version="$(secret_version)"
  deploy_job "${image}" "${version}" "${JOB_NAME}" "" "${HOURLY_MAX_RETRIES}" "${HOURLY_TIMEOUT_SECONDS}"
  deploy_job "${image}" "${version}" "${CHANGES_JOB_NAME}" --changes "${CHANGES_MAX_RETRIES}" \
    "${CHANGES_TIMEOUT_SECONDS}"
}

# Renders and replaces one job (the arguments of render_job_yaml but the file), and
# lets the scheduler's account run it: roles/run.invoker, on this job only.
deploy_job() {
  local name="$3" rendered
  rendered="$(mktemp "${TMPDIR:-/tmp}/anpi-job.XXXXXX.yaml")"
  TEMP_PATHS+=("${rendered}")
  render_job_yaml "$@" "${rendered}"
  log "deploying Cloud Run Job ${name} (DB password secret version $2)"
  run gcloud run jobs replace "${rendered}" --region="${REGION}" "${PROJECT_FLAGS[@]}"
  bind gcloud run jobs add-iam-policy-binding "${name}" --region="${REGION}" \
    --member="serviceAccount:${SCHEDULER_SA}" --role=roles/run.invoker "${PROJECT_FLAGS[@]}"
}

setup_schedulers() {
  setup_scheduler "${SCHEDULER_JOB_NAME}" "${JOB_NAME}" "${SCHEDULE}"
  if [[ -n "${CHANGES_SCHEDULE}" ]]; then
    setup_scheduler "${CHANGES_SCHEDULER_JOB_NAME}" "${CHANGES_JOB_NAME}" "${CHANGES_SCHEDULE}"
    return
  fi
  # Quick runs off: an existing trigger is paused, which is reversible, never deleted.
  local off="quick runs are off (CHANGES_SCHEDULE is empty)"
  if ! exists gcloud scheduler jobs describe "${CHANGES_SCHEDULER_JOB_NAME}" --location="${REGION}" \
    --format='value(state)' "${PROJECT_FLAGS[@]}"; then
    log "${off}: no trigger ${CHANGES_SCHEDULER_JOB_NAME} is created"
  elif [[ "${DESCRIBED}" == PAUSED ]]; then
    log "${off}: trigger ${CHANGES_SCHEDULER_JOB_NAME} stays paused"
  else
    log "${off}: pausing trigger ${CHANGES_SCHEDULER_JOB_NAME} (kept; to restart it, set" \
      "CHANGES_SCHEDULE, deploy, then ./deploy.sh resume)"
    run gcloud scheduler jobs pause "${CHANGES_SCHEDULER_JOB_NAME}" --location="${REGION}" \
      "${PROJECT_FLAGS[@]}"
  fi
}

# Creates or updates trigger $1, which starts Cloud Run Job $2 on cron schedule $3. A
# paused trigger stays paused (a deploy does not undo ./deploy.sh pause); it is named.
setup_scheduler() {
  local name="$1" job="$2" schedule="$3"
  log "Cloud Scheduler ${name}: '${schedule}' ${SCHEDULER_TIME_ZONE}, runs ${job}"
  # OAuth, not OIDC: the target is a googleapis.com API. No body: the job's own args.
  local settings=(
    --location="${REGION}"
    --schedule="${schedule}"
    --time-zone="${SCHEDULER_TIME_ZONE}"
    --uri="https://${REGION}-run.googleapis.com/apis/run.googleapis.com/v1/namespaces/${GOOGLE_CLOUD_PROJECT}/jobs/${job}:run"
    --http-method=POST
    --oauth-service-account-email="${SCHEDULER_SA}"
    "${PROJECT_FLAGS[@]}"
  )
  if exists gcloud scheduler jobs describe "${name}" --location="${REGION}" \
    --format='value(state)' "${PROJECT_FLAGS[@]}"; then
    run gcloud scheduler jobs update http "${name}" "${settings[@]}"
    [[ "${DESCRIBED}" != PAUSED ]] || log "scheduler ${name} is paused; ./deploy.sh resume restarts it"
  else
    run gcloud scheduler jobs create http "${name}" "${settings[@]}"
  fi
}

smoke_test() {
  # --check: the connection, the schema, the grants and every row; --dry-run: the queue.
  # New grants take a minute or more to reach Cloud Run: wait after granting, and give
  # each execution one retry after another wait before calling it failed.
  if ((DO_INFRA && IAM_WAIT_SECONDS > 0 && !DRY_RUN)); then
    log "waiting ${IAM_WAIT_SECONDS}s for the new IAM grants to take effect (IAM_WAIT_SECONDS)"
    sleep "${IAM_WAIT_SECONDS}"
  fi
  local run_as
  for run_as in --check --dry-run; do
    smoke_run "${run_as}" gcloud run jobs execute "${JOB_NAME}" --region="${REGION}" \
      --args="${run_as}" --wait "${PROJECT_FLAGS[@]}"
  done
  # The quick-run job as its trigger starts it: its own args (--changes), no override.
  if [[ -n "${CHANGES_SCHEDULE}" ]]; then
    smoke_run --changes gcloud run jobs execute "${CHANGES_JOB_NAME}" --region="${REGION}" --wait \
      "${PROJECT_FLAGS[@]}"
  else
    log "smoke test: no quick run (CHANGES_SCHEDULE is empty)"
  fi
}

# One execution of the smoke test, named $1, retried once after IAM_WAIT_SECONDS.
smoke_run() {
  local what="$1" attempt
  shift
  log "smoke test: one execution with ${what}"
  for attempt in 1 2; do
    if run "$@"; then
      return 0
    fi
    ((attempt == 1)) || fail "smoke test failed (${what}): see ./deploy.sh status and ./deploy.sh logs --severity WARNING"
    log "smoke test (${what}) failed; IAM may still be propagating: retrying once in ${IAM_WAIT_SECONDS}s"
    sleep "${IAM_WAIT_SECONDS}"
  done
}

parse_deploy_flags() {
  while (($#)); do
    case "$1" in
      --infrastructure-only) DO_DEPLOY=0 DO_TEST=0 ;;
      --deploy-only) DO_INFRA=0 ;;
      --skip-test) DO_TEST=0 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      *)
        usage >&2
        fail "unknown flag: $1"
        ;;
    esac
    shift
  done
  if ((!DO_INFRA && !DO_DEPLOY)); then
    fail "--infrastructure-only and --deploy-only exclude each other"
  fi
}

deploy() {
  parse_deploy_flags "$@"
  prepare deploy
  ((DRY_RUN)) && log "dry run: printing commands that change something, running none"
  if ((DO_INFRA)); then
    enable_apis
    setup_service_accounts
    setup_queues
    setup_repository
  elif ((DO_DEPLOY)); then
    require_queues
  fi
  if ((DO_DEPLOY)); then
    deploy_jobs
    setup_schedulers
  fi
  # After the job and its trigger, so that calls are placed even while a new project's
  # log-based metrics are still unknown to the policies.
  if ((DO_INFRA)); then
    setup_alerts
  fi
  if ((DO_TEST)); then
    smoke_test
  fi
  log "done"
}

# --- day 2 ------------------------------------------------------------------------

# Prints a heading, then runs a read-only command; a failure is reported and counted,
# not fatal, so that one missing resource does not hide the rest of the screen.
SECTIONS=0
SECTIONS_FAILED=0
section() {
  local title="$1"
  shift
  printf '\n== %s\n' "${title}"
  SECTIONS=$((SECTIONS + 1))
  if ! "$@"; then
    log "could not read ${title} (see the error above)"
    SECTIONS_FAILED=$((SECTIONS_FAILED + 1))
  fi
}

# Runs a describe, read-only; a resource that does not exist prints "(none)".
describe_if_any() {
  show "$@"
  if "$@" 2>"${QUERY_ERRORS}"; then
    return 0
  fi
  if not_found "$(<"${QUERY_ERRORS}")"; then
    printf '(none)\n'
    return 0
  fi
  cat "${QUERY_ERRORS}" >&2
  return 1
}

# Exits 1 when any section could not be read: the screen is incomplete.
status() {
  (($# == 0)) || fail "status: takes no arguments"
  prepare day2
  local queue job
  for job in "${JOB_NAME}" "${CHANGES_JOB_NAME}"; do
    section "job ${job}: image and settings" call gcloud run jobs describe "${job}" \
      --region="${REGION}" "${PROJECT_FLAGS[@]}" \
      --format='yaml(spec.template.spec.taskCount,spec.template.spec.template.spec.containers[0].image,spec.template.spec.template.spec.containers[0].args,spec.template.spec.template.spec.containers[0].env)'
    section "job ${job}: last 5 executions" call gcloud run jobs executions list --job="${job}" \
      --region="${REGION}" --limit=5 "${PROJECT_FLAGS[@]}" \
      --format='table(metadata.name,metadata.creationTimestamp,status.completionTime,status.succeededCount,status.failedCount)'
  done
  local scheduler=(--location="${REGION}" "${PROJECT_FLAGS[@]}"
    --format='table(state,schedule,timeZone,scheduleTime:label=NEXT_RUN,lastAttemptTime,status.code)')
  section "scheduler ${SCHEDULER_JOB_NAME} (hourly runs): state and next run" call gcloud scheduler \
    jobs describe "${SCHEDULER_JOB_NAME}" "${scheduler[@]}"
  if [[ -n "${CHANGES_SCHEDULE}" ]]; then
    section "scheduler ${CHANGES_SCHEDULER_JOB_NAME} (quick runs): state and next run" call gcloud \
      scheduler jobs describe "${CHANGES_SCHEDULER_JOB_NAME}" "${scheduler[@]}"
  else
    section "scheduler ${CHANGES_SCHEDULER_JOB_NAME} (quick runs are off: CHANGES_SCHEDULE is empty)" \
      describe_if_any gcloud scheduler jobs describe "${CHANGES_SCHEDULER_JOB_NAME}" "${scheduler[@]}"
  fi
  for queue in "${QUEUES[@]}"; do
    section "queue ${queue}: rate" call gcloud tasks queues describe "${queue}" \
      --location="${REGION}" "${PROJECT_FLAGS[@]}" \
      --format='table(state,rateLimits.maxDispatchesPerSecond,rateLimits.maxConcurrentDispatches,retryConfig.maxAttempts)'
    section "queue ${queue}: pending tasks" queue_depth "${queue}"
  done
  section "alert policies" call gcloud alpha monitoring policies list \
    --filter="displayName:\"${JOB_NAME}: \"" "${PROJECT_FLAGS[@]}" \
    --format='table(displayName,enabled,notificationChannels.len():label=CHANNELS)'
  ((SECTIONS_FAILED == 0)) ||
    fail "status: ${SECTIONS_FAILED} of ${SECTIONS} section(s) could not be read (see the errors above)"
}

logs() {
  local since=2h severity=DEFAULT
  while (($#)); do
    case "$1" in
      --since) since="${2:-}" && shift ;;
      --since=*) since="${1#*=}" ;;
      --severity) severity="${2:-}" && shift ;;
      --severity=*) severity="${1#*=}" ;;
      *) fail "logs: unknown flag $1 (logs [--since 2h] [--severity WARNING])" ;;
    esac
    shift
  done
  check_since logs "${since}"
  severity="${severity^^}"
  [[ " ${SEVERITIES[*]} " == *" ${severity} "* ]] ||
    fail "logs --severity ${severity}: want one of ${SEVERITIES[*]}"
  prepare day2
  local entries
  entries="$(call gcloud logging read "${JOBS_FILTER} AND severity>=${severity}" \
    --freshness="${since}" --order=desc --limit=1000 "${PROJECT_FLAGS[@]}" \
    --format='value(timestamp,resource.labels.job_name,severity,jsonPayload.message,textPayload,jsonPayload)')"
  [[ -z "${entries}" ]] || oldest_first "${entries}"
}

# The calls no complete run covered, as main.py's audit logged them (one ERROR line
# each), from both jobs: time, user_id, scheduled_at, masked phone; oldest first.
missed() {
  local since=24h
  while (($#)); do
    case "$1" in
      --since) since="${2:-}" && shift ;;
      --since=*) since="${1#*=}" ;;
      *) fail "missed: unknown flag $1 (missed [--since 24h])" ;;
    esac
    shift
  done
  check_since missed "${since}"
  prepare day2
  local entries lines=() more=""
  entries="$(call gcloud logging read \
    "${JOBS_FILTER} AND severity=ERROR AND jsonPayload.message:\"${MISSED_CALL_MESSAGE}\"" \
    --freshness="${since}" --order=desc --limit=1000 "${PROJECT_FLAGS[@]}" \
    --format='value(timestamp,jsonPayload.user_id,jsonPayload.scheduled_at,jsonPayload.phone)')" ||
    fail "cannot read the logs (see the error above)"
  printf 'TIME\tUSER_ID\tSCHEDULED_AT\tPHONE\n'
  if [[ -z "${entries}" ]]; then
    log "no missed calls in the last ${since}"
    return
  fi
  oldest_first "${entries}"
  mapfile -t lines <<<"${entries}"
  ((${#lines[@]} < 1000)) || more=" (the newest 1,000 only: narrow --since)"
  log "${#lines[@]} missed call(s) in the last ${since}${more}"
}

# $2 must be a duration for `gcloud logging read --freshness`; $1 names the command.
check_since() {
  [[ "$2" =~ ^[0-9]+[smhd]$ ]] || fail "$1 --since $2: want a duration such as 30m, 2h, 1d"
}

# Prints the lines of $1, which a listing gave newest first (the newest 1,000 entries),
# oldest first.
oldest_first() {
  printf '%s\n' "$1" | awk '{ line[NR] = $0 } END { for (i = NR; i > 0; i--) print line[i] }'
}

# The hourly job (--dry-run: with that arg), or with --changes the quick-run job as its
# trigger runs it.
execute() {
  local flags=() quick=0 dry=0
  while (($#)); do
    case "$1" in
      --dry-run) dry=1 ;;
      --changes) quick=1 ;;
      --wait) flags+=(--wait) ;;
      *) fail "execute: unknown flag $1 (execute [--dry-run | --changes] [--wait])" ;;
    esac
    shift
  done
  ((!(dry && quick))) || fail "execute: --changes and --dry-run exclude each other"
  ((!dry)) || flags+=(--args=--dry-run)
  prepare day2
  local job="${JOB_NAME}"
  ((!quick)) || job="${CHANGES_JOB_NAME}"
  call gcloud run jobs execute "${job}" --region="${REGION}" "${flags[@]}" "${PROJECT_FLAGS[@]}"
}

# pause | resume: both triggers, the quick runs' only while CHANGES_SCHEDULE is set. One
# that fails does not keep the other from being paused; the exit code then says so.
schedulers() {
  local verb="$1" name failed=0
  (($# == 1)) || fail "${verb}: takes no arguments"
  prepare day2
  local names=("${SCHEDULER_JOB_NAME}")
  if [[ -n "${CHANGES_SCHEDULE}" ]]; then
    names+=("${CHANGES_SCHEDULER_JOB_NAME}")
  else
    log "quick runs are off (CHANGES_SCHEDULE is empty): ${CHANGES_SCHEDULER_JOB_NAME} is left as it is"
  fi
  for name in "${names[@]}"; do
    call gcloud scheduler jobs "${verb}" "${name}" --location="${REGION}" "${PROJECT_FLAGS[@]}" ||
      failed=1
  done
  ((!failed)) || fail "${verb}: not every scheduler job could be ${verb%e}ed (see the errors above)"
}

rollback() {
  local tag="${1:-}"
  [[ $# == 1 && "${tag}" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] ||
    fail "usage: ./deploy.sh rollback TAG (an image tag, such as the commit of an earlier deploy)"
  prepare day2
  local current job
  # Both jobs are read before either is changed.
  for job in "${JOB_NAME}" "${CHANGES_JOB_NAME}"; do
    current="$(call gcloud run jobs describe "${job}" --region="${REGION}" "${PROJECT_FLAGS[@]}" \
      --format='value(spec.template.spec.template.spec.containers[0].image)')" ||
      fail "cannot read the image of job ${job}; nothing was changed"
    log "job ${job} runs ${current}; to undo this rollback: ./deploy.sh rollback ${current##*:}"
  done
  call gcloud artifacts docker images describe "${IMAGE_REPO}:${tag}" "${PROJECT_FLAGS[@]}" \
    --format='value(image_summary.fully_qualified_digest)' ||
    fail "no image ${IMAGE_REPO}:${tag} (the tags: gcloud artifacts docker tags list ${IMAGE_REPO} --project=${GOOGLE_CLOUD_PROJECT})"
  for job in "${JOB_NAME}" "${CHANGES_JOB_NAME}"; do
    call gcloud run jobs update "${job}" --image="${IMAGE_REPO}:${tag}" --region="${REGION}" \
      "${PROJECT_FLAGS[@]}" || fail "job ${job} could not be moved to ${tag}; run ./deploy.sh rollback ${tag} again"
  done
  log "an image from before main.py --changes fails every quick run; then stop them with" \
    "gcloud scheduler jobs pause ${CHANGES_SCHEDULER_JOB_NAME} --location=${REGION} --project=${GOOGLE_CLOUD_PROJECT}"
}

main() {
  command -v gcloud >/dev/null || fail "gcloud not found: install the Google Cloud CLI"
  QUERY_ERRORS="$(mktemp "${TMPDIR:-/tmp}/anpi-gcloud.XXXXXX")" # gcloud's errors, for query
  TEMP_PATHS+=("${QUERY_ERRORS}")
  local command="${1:-deploy}"
  case "${command}" in
    status | logs | missed | execute | pause | resume | rollback)
      shift
      [[ "${1:-}" == -h || "${1:-}" == --help ]] && usage && exit 0
      case "${command}" in
        pause | resume) schedulers "${command}" "$@" ;;
        *) "${command}" "$@" ;;
      esac
      ;;
    deploy)
      (($#)) && shift
      deploy "$@"
      ;;
    -*) deploy "$@" ;;
    *) fail "unknown command: ${command} (commands: deploy, status, logs, missed, execute, pause, resume, rollback; ./deploy.sh --help)" ;;
  esac
}

# Sourced (the tests read its dotenv parser), it defines the functions and runs nothing.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
