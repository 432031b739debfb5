-- anpi-call-scheduler: the table the job reads, and the table it owns.
-- Load with:  mysql -h HOST -u USER -p DB_NAME < schema.sql
-- An existing database is brought up to date by the files in migrations/, in order.
--
-- The job reads `users` and never writes it; everything else about a user (name,
-- family contacts, call results) may live in other columns or tables.

CREATE TABLE IF NOT EXISTS users (
  id            BIGINT       NOT NULL PRIMARY KEY,
  name          VARCHAR(100) NULL COMMENT 'for people, not read by the job',
  phone_number  VARCHAR(32)  NOT NULL COMMENT 'E.164 or national: +819012345678, 090-1234-5678, 03-1234-5678',
  call_weekdays VARCHAR(64)  NULL COMMENT 'e.g. 月水金, 平日, 土日祝, 平日(祝日除く), mon-fri, daily, 1-5, NULL or empty = no calls',
  call_time     TIME         NULL COMMENT 'local wall-clock time 00:00:00-23:59:59, NULL = no calls',
  timezone      VARCHAR(64)  NULL COMMENT 'IANA zone, e.g. Asia/Tokyo, NULL or empty = DEFAULT_TIMEZONE',
  is_active     TINYINT      NOT NULL DEFAULT 1 COMMENT '1 = called, anything else = not called',
  pause_from    DATE         NULL COMMENT 'first local date without calls (a hospital stay), NULL = open',
  pause_until   DATE         NULL COMMENT 'last local date without calls, NULL = open: calls resume the day after',
  updated_at    TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  -- Serves the job's query: one range scan per zone over the call times due in the
  -- run's window (is_active = 1 AND timezone = ? AND call_time BETWEEN ...). It also
  -- holds the other columns the job reads, so the scan never visits the table rows.
  KEY idx_users_due (is_active, timezone, call_time, call_weekdays, phone_number, pause_from, pause_until)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The job's own record: one row per task id it gave a call. A row is written (and
-- committed) before the task is created, its create confirmed afterwards (created_at),
-- marked deleting before the task is deleted, and deleted once DeleteTask answered
-- while the call was still ahead, so the job can tell a task that ran from one that was
-- deleted (Cloud Tasks cannot). See docs/how-it-works.md, "Exactly once".
CREATE TABLE IF NOT EXISTS scheduled_calls (
  call_at     DATETIME     NOT NULL COMMENT 'the call instant, UTC',
  user_id     BIGINT       NOT NULL,
  alternative SMALLINT     NOT NULL COMMENT '0 = the base task id, N = its -rN alternative',
  task_id     VARCHAR(100) NOT NULL COMMENT 'Cloud Tasks task id: the last part of the task name',
  state       ENUM('planned', 'deleting', 'deleted') NOT NULL
              COMMENT 'planned = given to the call, deleting = being deleted (may have run), deleted = surely deleted before its time',
  reason      VARCHAR(200) NULL COMMENT 'why it was deleted',
  queue       VARCHAR(100) NULL COMMENT 'the Cloud Tasks queue the task belongs to, fixed by the first writer, NULL = CLOUD_TASKS_QUEUE',
  created_at  DATETIME     NULL COMMENT 'when CreateTask confirmed the task (the job''s clock, UTC), NULL = recorded only',
  called_at   DATETIME     NULL COMMENT 'for the webhook: when it placed the call (the job never sets it)',
  updated_at  TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  -- The job reads one window of calls (call_at range) and purges old ones by call_at.
  PRIMARY KEY (call_at, user_id, alternative),
  UNIQUE KEY uq_scheduled_calls_task (task_id),
  KEY idx_scheduled_calls_user (user_id, call_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The job's runs: one row per real run of a shard that got to its end. Quick runs
-- read how far ahead the hourly runs placed calls; every run audits the time that has
-- left every window for calls no complete run covered (the summary's calls_missed).
-- Times are the job's clock, UTC.
CREATE TABLE IF NOT EXISTS job_runs (
  id            BIGINT      NOT NULL AUTO_INCREMENT PRIMARY KEY,
  ran_at        DATETIME(6) NOT NULL COMMENT 'when the run began',
  kind          ENUM('hourly', 'changes') NOT NULL COMMENT 'changes = a quick run (--changes)',
  shard_index   INT         NOT NULL,
  shard_count   INT         NOT NULL,
  window_start  DATETIME(6) NOT NULL COMMENT 'the calls it planned: window_start <= call < window_end',
  window_end    DATETIME(6) NOT NULL,
  complete      TINYINT     NOT NULL COMMENT '1 = it exited 0: every call of its window placed',
  audited_until DATETIME(6) NULL COMMENT 'calls before this were audited for misses, NULL = not audited',
  KEY idx_job_runs_window (window_end),
  KEY idx_job_runs_shard (shard_count, shard_index, kind)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The job's database user needs exactly these privileges, e.g.:
--   CREATE USER 'anpi_job'@'%' IDENTIFIED BY '<from Secret Manager>';
--   GRANT SELECT ON anpi.users TO 'anpi_job'@'%';
--   GRANT SELECT, INSERT, UPDATE, DELETE ON anpi.scheduled_calls TO 'anpi_job'@'%';
--   GRANT SELECT, INSERT, UPDATE, DELETE ON anpi.job_runs TO 'anpi_job'@'%';
-- Without them the job exits 2 before it creates any task, naming the missing grant.
