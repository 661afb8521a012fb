-- A scheduled job's next slot. Each master replica claims due slots here (no leader): the claim
-- lasts a while, the run is created with the slot as its idempotency key, and the slot advances to
-- the first one after now (slots missed while every master was down fire once, not each).
CREATE TABLE job_schedules (
    job            TEXT PRIMARY KEY REFERENCES jobs (name) ON DELETE CASCADE,
    next_fire_at   TIMESTAMPTZ NOT NULL,
    claimed_until  TIMESTAMPTZ,
    last_slot      TIMESTAMPTZ,
    last_run       UUID,
    -- Why the last slot started nothing: the previous run still ran, or the trigger was refused.
    last_outcome   TEXT
);

CREATE INDEX job_schedules_due ON job_schedules (next_fire_at);
