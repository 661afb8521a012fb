-- The shared test-cluster pool.
CREATE SEQUENCE cluster_lease_tokens;

CREATE TABLE clusters (
    name             TEXT PRIMARY KEY,
    region           TEXT NOT NULL,
    purpose          TEXT NOT NULL,
    osimage          TEXT,
    labels           JSONB NOT NULL DEFAULT '{}',
    -- Current lease; lease_token is NULL when the cluster is vacant. Tokens only grow (fencing).
    lease_token      BIGINT,
    lease_holder     TEXT,
    lease_job        TEXT,
    lease_build      TEXT,
    lease_run        UUID,
    leased_at        TIMESTAMPTZ,
    lease_expires_at TIMESTAMPTZ,
    -- Hold for debugging; while it lasts the cluster is not handed out (a leased cluster keeps its
    -- lease and is held when the lease ends).
    hold_by          TEXT,
    hold_reason      TEXT,
    hold_until       TIMESTAMPTZ,
    disabled_reason  TEXT,
    disabled_at      TIMESTAMPTZ,
    infra_failures   INTEGER NOT NULL DEFAULT 0,
    last_job         TEXT,
    last_build       TEXT,
    last_trigger     TEXT,
    vacant_since     TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One lease per (job, build): a retried acquire gets the same lease.
CREATE UNIQUE INDEX clusters_lease_identity ON clusters (lease_job, lease_build) WHERE lease_token IS NOT NULL;
CREATE INDEX clusters_vacant ON clusters (purpose, vacant_since) WHERE lease_token IS NULL;

-- Every change to the pool, for audit and usage reports.
CREATE TABLE cluster_events (
    id       BIGSERIAL PRIMARY KEY,
    cluster  TEXT NOT NULL,
    kind     TEXT NOT NULL,
    actor    TEXT NOT NULL,
    token    BIGINT,
    job      TEXT,
    build    TEXT,
    detail   TEXT,
    -- On `leased`: how long the acquire waited for a vacant cluster.
    wait_ms  BIGINT,
    at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX cluster_events_by_cluster ON cluster_events (cluster, id);

-- Acquires waiting for a cluster: served by priority (higher first), then first come, first served.
CREATE TABLE cluster_waiters (
    id          BIGSERIAL PRIMARY KEY,
    purpose     TEXT NOT NULL,
    osimage     TEXT,
    priority    INTEGER NOT NULL DEFAULT 0,
    holder      TEXT NOT NULL,
    job         TEXT NOT NULL,
    build       TEXT NOT NULL,
    since       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A waiter that vanished without leaving stops blocking others at this time.
    expires_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX cluster_waiters_queue ON cluster_waiters (purpose, priority DESC, id);
