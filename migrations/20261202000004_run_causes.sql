-- Why a run exists: the event that started it and, for code-host events, the change and who.
ALTER TABLE runs
    ADD COLUMN event text NOT NULL DEFAULT 'api'
        CHECK (event IN ('api', 'pull_request', 'push', 'comment', 'schedule')),
    ADD COLUMN pull_request bigint,
    ADD COLUMN sender text,
    ADD COLUMN base_branch text,
    ADD COLUMN base_sha text;
CREATE INDEX runs_by_pull_request ON runs (pull_request, id DESC) WHERE pull_request IS NOT NULL;
