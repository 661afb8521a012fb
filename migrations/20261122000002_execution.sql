-- Execution by agents: attempts, live console chunks, stored logs.

-- When the current attempt was queued; the dispatcher's grace period counts from here.
ALTER TABLE runs ADD COLUMN queued_at TIMESTAMPTZ NOT NULL DEFAULT now();
-- S3 key of the console log once the attempt has ended and the log is uploaded.
ALTER TABLE runs ADD COLUMN console_key TEXT;
ALTER TABLE runs ADD COLUMN console_bytes BIGINT;

DROP INDEX runs_unpublished;
CREATE INDEX runs_unpublished ON runs (queued_at) WHERE status = 'queued' AND published_at IS NULL;
CREATE INDEX runs_leases ON runs (lease_expires_at) WHERE status = 'running';

-- One row per attempt: who ran it and how it ended (`lost` when its agent stopped renewing the lease).
CREATE TABLE run_attempts (
    run_id      UUID NOT NULL,
    attempt     INTEGER NOT NULL,
    agent       TEXT NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- When the job container started (after image, network and container creation).
    container_started_at TIMESTAMPTZ,
    ended_at    TIMESTAMPTZ,
    outcome     TEXT CHECK (outcome IN ('succeeded', 'failed', 'aborted', 'timed_out', 'error', 'lost')),
    exit_code   INTEGER,
    message     TEXT,
    PRIMARY KEY (run_id, attempt)
);

-- Console output of running attempts, in order, readable live by every master replica. Deleted once
-- the whole log is in S3.
CREATE TABLE run_console (
    run_id   UUID NOT NULL,
    attempt  INTEGER NOT NULL,
    seq      BIGINT NOT NULL,
    data     BYTEA NOT NULL,
    PRIMARY KEY (run_id, attempt, seq)
);
