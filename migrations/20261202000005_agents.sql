-- Agents as they report themselves: what they hand out and use, what they run, whether they drain.
-- A row is written at start and on every heartbeat; one not seen for a while is shown as lost, and
-- forgotten later.
CREATE TABLE agents (
    id text PRIMARY KEY,
    version text NOT NULL,
    queues text[] NOT NULL,
    cpus double precision NOT NULL,
    memory bigint NOT NULL,
    cpus_used double precision NOT NULL DEFAULT 0,
    memory_used bigint NOT NULL DEFAULT 0,
    runs integer NOT NULL DEFAULT 0,
    host_cpu double precision NOT NULL DEFAULT 0,
    draining boolean NOT NULL DEFAULT false,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now()
);
