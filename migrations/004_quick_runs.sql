-- anpi-call-scheduler migration 004: quick runs and the audit of missed calls.
-- scheduled_calls.created_at tells an id whose task was surely created from one only
-- recorded; job_runs notes each run's window, so quick runs (--changes) know how far
-- ahead the hourly runs placed calls, and every run can name the calls no complete run
-- covered. Apply once, before deploying the version that needs it (it exits 2 without):
--   mysql -h HOST -u USER -p DB_NAME < migrations/004_quick_runs.sql
-- then grant the job's user: GRANT SELECT, INSERT, UPDATE, DELETE ON DB_NAME.job_runs TO ...
-- Rows written before it have created_at NULL: the next run confirms them again.

ALTER TABLE scheduled_calls ADD COLUMN created_at DATETIME NULL
  COMMENT 'when CreateTask confirmed the task (the job''s clock, UTC), NULL = recorded only'
  AFTER queue;
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
