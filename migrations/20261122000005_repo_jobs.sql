-- Git jobs: the job config file read from the repository at the run's commit, as parsed.
ALTER TABLE runs ADD COLUMN config JSONB;

-- Result files collected from an attempt (JUnit reports, artifacts, service logs), stored in S3.
CREATE TABLE run_results (
    run_id       UUID NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('junit', 'artifact', 'service-log')),
    name         TEXT NOT NULL,
    bytes        BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    object_key   TEXT NOT NULL,
    -- For JUnit reports: the summary the agent read from the file (totals and failed cases).
    summary      JSONB,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, attempt, kind, name)
);
