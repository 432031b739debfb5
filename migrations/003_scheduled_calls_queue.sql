-- anpi-call-scheduler migration 003: the queue each recorded task belongs to, so that
-- a call keeps its queue when TASK_COUNT changes with QUEUE_PER_SHARD=1
-- (docs/how-it-works.md, "Sharding"). Rows written before it keep NULL: CLOUD_TASKS_QUEUE.
-- Apply once with:  mysql -h HOST -u USER -p DB_NAME < migrations/003_scheduled_calls_queue.sql
-- Apply it before deploying the version that needs it: that version exits 2 without it.

ALTER TABLE scheduled_calls ADD COLUMN queue VARCHAR(100) NULL
  COMMENT 'the Cloud Tasks queue the task belongs to, fixed by the first writer, NULL = CLOUD_TASKS_QUEUE'
  AFTER reason;
