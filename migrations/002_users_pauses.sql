-- anpi-call-scheduler migration 002: pauses (a hospital stay, a short stay) that end
-- by themselves, and the job's covering index extended to the new columns.
-- Apply once with:  mysql -h HOST -u USER -p DB_NAME < migrations/002_users_pauses.sql
-- One statement per change (MySQL has no ADD COLUMN IF NOT EXISTS): if the file stops
-- part-way, run the statements after the one that failed by hand. If your users table
-- never had idx_users_due, leave out the DROP INDEX statement.

ALTER TABLE users ADD COLUMN pause_from DATE NULL
  COMMENT 'first local date without calls (a hospital stay), NULL = open' AFTER is_active;
ALTER TABLE users ADD COLUMN pause_until DATE NULL
  COMMENT 'last local date without calls, NULL = open: calls resume the day after' AFTER pause_from;
ALTER TABLE users DROP INDEX idx_users_due;
ALTER TABLE users ADD KEY idx_users_due
  (is_active, timezone, call_time, call_weekdays, phone_number, pause_from, pause_until);
