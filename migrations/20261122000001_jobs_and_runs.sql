-- Jobs as configured through PUT /jobs/{name}. `spec` is the parsed, default-filled job spec.
CREATE TABLE jobs (
    name        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('freestyle', 'git')),
    spec        JSONB NOT NULL,
    version     BIGINT NOT NULL DEFAULT 1,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per run. The row is the outbox too: a queued run with published_at NULL has not been
-- confirmed by RabbitMQ yet, and the dispatcher of any master replica publishes it.
CREATE TABLE runs (
    id               UUID PRIMARY KEY,
    job              TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'aborted', 'timed_out', 'error')),
    attempt          INTEGER NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    queue            TEXT NOT NULL,
    commit_sha       TEXT,
    branch_name      TEXT,
    parameters       JSONB NOT NULL DEFAULT '{}',
    spec             JSONB NOT NULL,
    triggered_by     TEXT NOT NULL,
    idempotency_key  TEXT,
    request_hash     TEXT,
    agent            TEXT,
    exit_code        INTEGER,
    message          TEXT,
    abort_requested  BOOLEAN NOT NULL DEFAULT FALSE,
    lease_expires_at TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at     TIMESTAMPTZ,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT runs_idempotency UNIQUE (job, idempotency_key)
);

CREATE INDEX runs_by_job ON runs (job, created_at DESC, id DESC);
CREATE INDEX runs_unpublished ON runs (created_at) WHERE status = 'queued' AND published_at IS NULL;
CREATE INDEX runs_active ON runs (job) WHERE status IN ('queued', 'running');
