#!/usr/bin/env bash
# Deploys anpi-call-scheduler to Google Cloud in one idempotent command: APIs, service
# accounts with least privilege, the Cloud Tasks queue, the image, the Cloud Run Job and
# its hourly Cloud Scheduler trigger, then a dry-run smoke test. Safe to re-run: every
# step updates what exists instead of creating it again.
#
# Settings come from the environment or from deploy.env beside this script (see
# deploy.env.example). Run ./deploy.sh --help for the flags.
#
# Not created here: the Cloud SQL tables and the job's database user. Load schema.sql
# and grant that user SELECT on users and SELECT, INSERT, UPDATE, DELETE on
# scheduled_calls; without them the job (and the smoke test) exits 2 naming the grant.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly APIS=(
  run.googleapis.com cloudtasks.googleapis.com cloudscheduler.googleapis.com
  cloudbuild.googleapis.com artifactregistry.googleapis.com sqladmin.googleapis.com
  secretmanager.googleapis.com iam.googleapis.com
)
# Listing, reading and deleting stale tasks (reconciling) needs more than enqueuer;
# these three, granted on the queue only, are the narrowest roles that allow it.
readonly QUEUE_ROLES=(roles/cloudtasks.enqueuer roles/cloudtasks.viewer roles/cloudtasks.taskDeleter)

DRY_RUN=0
DO_INFRA=1
DO_DEPLOY=1
DO_TEST=1

usage() {
  cat <<'EOF'
Usage: ./deploy.sh [--infrastructure-only | --deploy-only] [--skip-test] [--dry-run]

With no flag, does everything, in order:
  1. validate settings            5. build the image, deploy the Cloud Run Job
  2. enable the APIs              6. the hourly Cloud Scheduler trigger
  3. service accounts and IAM     7. smoke test: execute the job with --check, then --dry-run
  4. the Cloud Tasks queue

  --infrastructure-only  steps 1-4 only (APIs, accounts, queue, image repository)
  --deploy-only          steps 1 and 5-7 only (image, job, scheduler, smoke test)
  --skip-test            leave out step 7
  --dry-run              print every gcloud command; run only read-only ones
  -h, --help             this help

Settings (environment or deploy.env): GOOGLE_CLOUD_PROJECT, CLOUD_SQL_INSTANCE,
DB_USER, DB_NAME, DB_PASSWORD_SECRET and ANPI_CALL_URL are required; see
deploy.env.example for all of them.
EOF
}

log() { printf '[deploy] %s\n' "$*" >&2; }
fail() {
  printf '[deploy] error: %s\n' "$*" >&2
  exit 1
}

# Runs a command that changes something; with --dry-run only prints it.
run() {
  printf '+ %s\n' "$*" >&2
  if ((DRY_RUN)); then
    return 0
  fi
  "$@"
}

# Runs a read-only command (describe/list), also under --dry-run. Output goes to stdout.
query() {
  "$@" 2>/dev/null
}

load_settings() {
  if [[ -f "${SCRIPT_DIR}/deploy.env" ]]; then
    # Real environment variables win over deploy.env.
    local line key
    while IFS= read -r line || [[ -n "${line}" ]]; do
      [[ "${line}" =~ ^[[:space:]]*(#|$) ]] && continue
      key="${line%%=*}"
      key="${key// /}"
      [[ "${key}" =~ ^[A-Z_][A-Z0-9_]*$ ]] || fail "deploy.env: cannot read line: ${line}"
      if [[ -z "${!key:-}" ]]; then
        export "${key}=${line#*=}"
      fi
    done <"${SCRIPT_DIR}/deploy.env"
  fi
  REGION="${REGION:-asia-northeast1}"
  CLOUD_TASKS_QUEUE="${CLOUD_TASKS_QUEUE:-anpi-call-queue}"
  JOB_NAME="${JOB_NAME:-anpi-call-create-task-job}"
  SCHEDULER_JOB_NAME="${SCHEDULER_JOB_NAME:-anpi-call-scheduler-job}"
  SCHEDULE="${SCHEDULE:-0 * * * *}"
  SCHEDULER_TIME_ZONE="${SCHEDULER_TIME_ZONE:-Asia/Tokyo}"
  DEFAULT_TIMEZONE="${DEFAULT_TIMEZONE:-Asia/Tokyo}"
  TASK_COUNT="${TASK_COUNT:-1}"
  ARTIFACT_REPOSITORY="${ARTIFACT_REPOSITORY:-anpi}"
  RUNTIME_SA_NAME="${RUNTIME_SA_NAME:-anpi-call-job}"
  SCHEDULER_SA_NAME="${SCHEDULER_SA_NAME:-anpi-call-scheduler}"
  TASKS_OIDC_SERVICE_ACCOUNT="${TASKS_OIDC_SERVICE_ACCOUNT:-}"
  DB_USER="${DB_USER:-}"
  DB_NAME="${DB_NAME:-}"
  DB_PASSWORD_SECRET_VERSION="${DB_PASSWORD_SECRET_VERSION:-}"
  # A failed call is retried a few times within minutes, never hours later.
  QUEUE_MAX_DISPATCHES_PER_SECOND="${QUEUE_MAX_DISPATCHES_PER_SECOND:-10}"
  QUEUE_MAX_CONCURRENT_DISPATCHES="${QUEUE_MAX_CONCURRENT_DISPATCHES:-50}"
  QUEUE_MAX_ATTEMPTS="${QUEUE_MAX_ATTEMPTS:-4}"
  QUEUE_MIN_BACKOFF="${QUEUE_MIN_BACKOFF:-30s}"
  QUEUE_MAX_BACKOFF="${QUEUE_MAX_BACKOFF:-120s}"
  QUEUE_MAX_DOUBLINGS="${QUEUE_MAX_DOUBLINGS:-2}"
  QUEUE_MAX_RETRY_DURATION="${QUEUE_MAX_RETRY_DURATION:-600s}"
}

validate_settings() {
  local missing=() name
  for name in GOOGLE_CLOUD_PROJECT CLOUD_SQL_INSTANCE DB_USER DB_NAME DB_PASSWORD_SECRET ANPI_CALL_URL; do
    [[ -n "${!name:-}" ]] || missing+=("${name}")
  done
  ((${#missing[@]} == 0)) || fail "missing required settings: ${missing[*]} (environment or deploy.env)"
  local problems=()
  [[ "${CLOUD_SQL_INSTANCE}" =~ ^[^:]+:[^:]+:[^:]+$ ]] ||
    problems+=("CLOUD_SQL_INSTANCE must be PROJECT:REGION:INSTANCE")
  [[ "${ANPI_CALL_URL}" =~ ^https:// ]] || problems+=("ANPI_CALL_URL must be an https:// URL")
  [[ "${TASK_COUNT}" =~ ^[1-9][0-9]*$ ]] || problems+=("TASK_COUNT must be a positive integer")
  ((${#problems[@]} == 0)) || fail "invalid settings: $(printf '%s; ' "${problems[@]}")"

  RUNTIME_SA="${RUNTIME_SA_NAME}@${GOOGLE_CLOUD_PROJECT}.iam.gserviceaccount.com"
  SCHEDULER_SA="${SCHEDULER_SA_NAME}@${GOOGLE_CLOUD_PROJECT}.iam.gserviceaccount.com"
  IMAGE_REPO="${REGION}-docker.pkg.dev/${GOOGLE_CLOUD_PROJECT}/${ARTIFACT_REPOSITORY}/anpi-call-scheduler"
  # Cloud Tasks asks for ramp-up above 500 creates/s on one queue: share it out.
  ENQUEUE_MAX_PER_SECOND="$((500 / TASK_COUNT > 0 ? 500 / TASK_COUNT : 1))"
  PROJECT_FLAGS=(--project="${GOOGLE_CLOUD_PROJECT}")
}

enable_apis() {
  log "enabling APIs"
  run gcloud services enable "${APIS[@]}" "${PROJECT_FLAGS[@]}"
}

ensure_service_account() {
  local name="$1" email="$2" display="$3"
  if query gcloud iam service-accounts describe "${email}" "${PROJECT_FLAGS[@]}" >/dev/null; then
    log "service account ${email} exists"
  else
    run gcloud iam service-accounts create "${name}" --display-name="${display}" "${PROJECT_FLAGS[@]}"
  fi
}

setup_service_accounts() {
  log "service accounts and IAM"
  ensure_service_account "${RUNTIME_SA_NAME}" "${RUNTIME_SA}" "anpi-call-scheduler job (runtime)"
  ensure_service_account "${SCHEDULER_SA_NAME}" "${SCHEDULER_SA}" "anpi-call-scheduler trigger"
  run gcloud projects add-iam-policy-binding "${GOOGLE_CLOUD_PROJECT}" \
    --member="serviceAccount:${RUNTIME_SA}" --role=roles/cloudsql.client --condition=None
  run gcloud secrets add-iam-policy-binding "${DB_PASSWORD_SECRET}" \
    --member="serviceAccount:${RUNTIME_SA}" --role=roles/secretmanager.secretAccessor \
    "${PROJECT_FLAGS[@]}"
  if [[ -n "${TASKS_OIDC_SERVICE_ACCOUNT}" ]]; then
    # Creating tasks that carry this account's OIDC token needs actAs on it.
    run gcloud iam service-accounts add-iam-policy-binding "${TASKS_OIDC_SERVICE_ACCOUNT}" \
      --member="serviceAccount:${RUNTIME_SA}" --role=roles/iam.serviceAccountUser \
      "${PROJECT_FLAGS[@]}"
  fi
}

setup_queue() {
  log "Cloud Tasks queue ${CLOUD_TASKS_QUEUE} in ${REGION}"
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
  if query gcloud tasks queues describe "${CLOUD_TASKS_QUEUE}" --location="${REGION}" \
    "${PROJECT_FLAGS[@]}" >/dev/null; then
    run gcloud tasks queues update "${CLOUD_TASKS_QUEUE}" "${settings[@]}"
  else
    run gcloud tasks queues create "${CLOUD_TASKS_QUEUE}" "${settings[@]}"
  fi
  local role
  for role in "${QUEUE_ROLES[@]}"; do
    run gcloud tasks queues add-iam-policy-binding "${CLOUD_TASKS_QUEUE}" --location="${REGION}" \
      --member="serviceAccount:${RUNTIME_SA}" --role="${role}" "${PROJECT_FLAGS[@]}"
  done
}

setup_repository() {
  if query gcloud artifacts repositories describe "${ARTIFACT_REPOSITORY}" \
    --location="${REGION}" "${PROJECT_FLAGS[@]}" >/dev/null; then
    log "Artifact Registry repository ${ARTIFACT_REPOSITORY} exists"
  else
    run gcloud artifacts repositories create "${ARTIFACT_REPOSITORY}" --repository-format=docker \
      --location="${REGION}" --description="anpi-call-scheduler images" "${PROJECT_FLAGS[@]}"
  fi
}

# The newest enabled version of the password secret, unless one is pinned already.
secret_version() {
  if [[ -n "${DB_PASSWORD_SECRET_VERSION}" ]]; then
    printf '%s' "${DB_PASSWORD_SECRET_VERSION}"
    return
  fi
  local version
  version="$(query gcloud secrets versions list "${DB_PASSWORD_SECRET}" --filter=state:enabled \
    --sort-by=~createTime --limit=1 --format='value(name)' "${PROJECT_FLAGS[@]}" || true)"
  [[ -n "${version}" ]] || fail "secret ${DB_PASSWORD_SECRET} has no enabled version (DB_PASSWORD_SECRET)"
  printf '%s' "${version##*/}"
}

render_job_yaml() {
  local image="$1" version="$2" out="$3" text key
  text="$(<"${SCRIPT_DIR}/job.yaml")"
  local -A values=(
    [JOB_NAME]="${JOB_NAME}" [REGION]="${REGION}" [CLOUD_SQL_INSTANCE]="${CLOUD_SQL_INSTANCE}"
    [TASK_COUNT]="${TASK_COUNT}" [RUNTIME_SERVICE_ACCOUNT]="${RUNTIME_SA}" [IMAGE]="${image}"
    [DB_USER]="${DB_USER}" [DB_NAME]="${DB_NAME}" [DB_PASSWORD_SECRET]="${DB_PASSWORD_SECRET}"
    [DB_PASSWORD_SECRET_VERSION]="${version}" [GOOGLE_CLOUD_PROJECT]="${GOOGLE_CLOUD_PROJECT}"
    [CLOUD_TASKS_QUEUE]="${CLOUD_TASKS_QUEUE}" [ANPI_CALL_URL]="${ANPI_CALL_URL}"
    [TASKS_OIDC_SERVICE_ACCOUNT]="${TASKS_OIDC_SERVICE_ACCOUNT}"
    [DEFAULT_TIMEZONE]="${DEFAULT_TIMEZONE}" [ENQUEUE_MAX_PER_SECOND]="${ENQUEUE_MAX_PER_SECOND}"
  )
  for key in "${!values[@]}"; do
    text="${text//__${key}__/${values[${key}]}}"
  done
  if [[ "${text}" =~ __[A-Z_]+__ ]]; then
    fail "job.yaml has a placeholder deploy.sh does not fill: ${BASH_REMATCH[0]}"
  fi
  printf '%s\n' "${text}" >"${out}"
}

deploy_job() {
  local tag image version rendered
  tag="$(git -C "${SCRIPT_DIR}" rev-parse --short HEAD 2>/dev/null || date -u +%Y%m%d%H%M%S)"
  image="${IMAGE_REPO}:${tag}"
  log "building ${image} with Cloud Build"
  run gcloud builds submit "${SCRIPT_DIR}" --tag="${image}" --region="${REGION}" "${PROJECT_FLAGS[@]}"
  version="$(secret_version)"
  rendered="$(mktemp "${TMPDIR:-/tmp}/anpi-job.XXXXXX.yaml")"
  # shellcheck disable=SC2064 # expand now: the path is fixed
  trap "rm -f '${rendered}'" EXIT
  render_job_yaml "${image}" "${version}" "${rendered}"
  log "deploying Cloud Run Job ${JOB_NAME} (DB password secret version ${version})"
  run gcloud run jobs replace "${rendered}" --region="${REGION}" "${PROJECT_FLAGS[@]}"
  run gcloud run jobs add-iam-policy-binding "${JOB_NAME}" --region="${REGION}" \
    --member="serviceAccount:${SCHEDULER_SA}" --role=roles/run.invoker "${PROJECT_FLAGS[@]}"
}

setup_scheduler() {
  log "Cloud Scheduler ${SCHEDULER_JOB_NAME}: '${SCHEDULE}' ${SCHEDULER_TIME_ZONE}"
  # OAuth, not OIDC: the target is a googleapis.com API.
  local settings=(
    --location="${REGION}"
    --schedule="${SCHEDULE}"
    --time-zone="${SCHEDULER_TIME_ZONE}"
    --uri="https://${REGION}-run.googleapis.com/apis/run.googleapis.com/v1/namespaces/${GOOGLE_CLOUD_PROJECT}/jobs/${JOB_NAME}:run"
    --http-method=POST
    --oauth-service-account-email="${SCHEDULER_SA}"
    "${PROJECT_FLAGS[@]}"
  )
  if query gcloud scheduler jobs describe "${SCHEDULER_JOB_NAME}" --location="${REGION}" \
    "${PROJECT_FLAGS[@]}" >/dev/null; then
    run gcloud scheduler jobs update http "${SCHEDULER_JOB_NAME}" "${settings[@]}"
  else
    run gcloud scheduler jobs create http "${SCHEDULER_JOB_NAME}" "${settings[@]}"
  fi
}

smoke_test() {
  # --check: the connection, the schema, the grants and every row; --dry-run: the queue.
  local args
  for args in --check --dry-run; do
    log "smoke test: one execution with ${args}"
    run gcloud run jobs execute "${JOB_NAME}" --region="${REGION}" --args="${args}" --wait \
      "${PROJECT_FLAGS[@]}" || fail "smoke test failed (${args}): see 'gcloud run jobs executions list --job=${JOB_NAME} --region=${REGION}'"
  done
}

parse_flags() {
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

main() {
  parse_flags "$@"
  command -v gcloud >/dev/null || fail "gcloud not found: install the Google Cloud CLI"
  load_settings
  validate_settings
  ((DRY_RUN)) && log "dry run: printing commands that change something, running none"
  if ((DO_INFRA)); then
    enable_apis
    setup_service_accounts
    setup_queue
    setup_repository
  fi
  if ((DO_DEPLOY)); then
    deploy_job
    setup_scheduler
  fi
  if ((DO_TEST)); then
    smoke_test
  fi
  log "done"
}

main "$@"
