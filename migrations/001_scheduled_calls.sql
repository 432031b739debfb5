-- anpi-call-scheduler migration 001: the job's own record of each call's task id.
-- For a database made before scheduled_calls existed. Idempotent. Apply with:
--   mysql -h HOST -u USER -p DB_NAME < migrations/001_scheduled_calls.sql
-- then grant the job's user: GRANT SELECT, INSERT, UPDATE, DELETE ON DB_NAME.scheduled_calls TO ...

CREATE TABLE IF NOT EXISTS scheduled_calls (
  call_at     DATETIME     NOT NULL COMMENT 'the call instant, UTC',
  user_id     BIGINT       NOT NULL,
  alternative SMALLINT     NOT NULL COMMENT '0 = the base task id, N = its -rN alternative',
  task_id     VARCHAR(100) NOT NULL COMMENT 'Cloud Tasks task id: the last part of the task name',
  state       ENUM('planned', 'deleting', 'deleted') NOT NULL
              COMMENT 'planned = given to the call, deleting = being deleted (may have run), deleted = surely deleted before its time',
  reason      VARCHAR(200) NULL COMMENT 'why it was deleted',
  called_at   DATETIME     NULL COMMENT 'for the webhook: when it placed the call (the job never sets it)',
  updated_at  TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  -- The job reads one window of calls (call_at range) and purges old ones by call_at.
  PRIMARY KEY (call_at, user_id, alternative),
  UNIQUE KEY uq_scheduled_calls_task (task_id),
  KEY idx_scheduled_calls_user (user_id, call_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
