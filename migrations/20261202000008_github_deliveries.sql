-- Every webhook delivery GitHub sent, by its X-GitHub-Delivery id (a redelivery is recognised):
-- what it was, and what came of it. A delivery to act on is `pending` until a master replica
-- claims and handles it; one ignored at once is `done` with the reason.
CREATE TABLE github_deliveries (
    id            TEXT PRIMARY KEY,
    event         TEXT NOT NULL,
    action        TEXT,
    repository    TEXT,
    sender        TEXT,
    payload       JSONB,
    state         TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done')),
    claimed_until TIMESTAMPTZ,
    outcome       TEXT,
    runs          UUID[] NOT NULL DEFAULT '{}',
    received_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    done_at       TIMESTAMPTZ
);

CREATE INDEX github_deliveries_pending ON github_deliveries (received_at) WHERE state = 'pending';
CREATE INDEX github_deliveries_recent ON github_deliveries (received_at DESC, id DESC);
