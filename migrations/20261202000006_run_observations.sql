-- Each run is counted once, by one master replica, into `cimaster_dispatch_seconds` (trigger →
-- container started) and `cimaster_run_seconds` (trigger → finished). Runs from before this
-- migration count as observed; new runs start unobserved.
ALTER TABLE runs ADD COLUMN dispatch_observed BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE runs ADD COLUMN finish_observed BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE runs ALTER COLUMN dispatch_observed SET DEFAULT FALSE;
ALTER TABLE runs ALTER COLUMN finish_observed SET DEFAULT FALSE;

-- Active runs and finished ones not yet counted: small, whatever the history.
CREATE INDEX runs_unobserved ON runs (created_at) WHERE NOT finish_observed;
