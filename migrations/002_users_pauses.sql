-- anpi-call-scheduler migration 002: pauses (a hospital stay, a short stay) that end
-- by themselves, and the job's covering index extended to the new columns.
-- Apply once with:  mysql -h HOST -u USER -p DB_NAME < migrations/002_users_pauses.sql

ALTER TABLE users
  ADD COLUMN pause_from  DATE NULL COMMENT 'first local date without calls (a hospital stay), NULL = open' AFTER is_active,
  ADD COLUMN pause_until DATE NULL COMMENT 'last local date without calls, NULL = open: calls resume the day after' AFTER pause_from,
  DROP INDEX idx_users_due,
  ADD KEY idx_users_due (is_active, timezone, call_time, call_weekdays, phone_number, pause_from, pause_until);
