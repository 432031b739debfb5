-- anpi-call-scheduler: the table the job reads.
-- Load with:  mysql -h HOST -u USER -p DB_NAME < schema.sql
--
-- The job only reads `users`; everything else about a user (name, family contacts,
-- call results) may live in other columns or tables.

CREATE TABLE IF NOT EXISTS users (
  id            BIGINT       NOT NULL PRIMARY KEY,
  name          VARCHAR(100) NULL COMMENT 'for people, not read by the job',
  phone_number  VARCHAR(32)  NOT NULL COMMENT 'E.164: + then 8-15 digits, e.g. +819012345678',
  call_weekdays VARCHAR(64)  NULL COMMENT 'e.g. 月水金, 平日, mon-fri, daily, 1-5, NULL or empty = no calls',
  call_time     TIME         NULL COMMENT 'local wall-clock time 00:00:00-23:59:59, NULL = no calls',
  timezone      VARCHAR(64)  NULL COMMENT 'IANA zone, e.g. Asia/Tokyo, NULL or empty = DEFAULT_TIMEZONE',
  is_active     TINYINT      NOT NULL DEFAULT 1 COMMENT '1 = called, anything else = paused',
  updated_at    TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  -- Serves the job's query: one range scan per zone over the call times due in the
  -- run's window (is_active = 1 AND timezone = ? AND call_time BETWEEN ...). It also
  -- holds the other columns the job reads, so the scan never visits the table rows.
  KEY idx_users_due (is_active, timezone, call_time, call_weekdays, phone_number)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The job never writes. Give its database user SELECT on this table only, e.g.:
--   CREATE USER 'anpi_job'@'%' IDENTIFIED BY '<from Secret Manager>';
--   GRANT SELECT ON anpi.users TO 'anpi_job'@'%';
