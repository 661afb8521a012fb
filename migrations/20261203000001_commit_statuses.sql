-- Commit statuses on the code host. A run started by a code-host event knows its repository (and
-- whether its change came from a fork, whose runs get no secrets unless the job opts in).
ALTER TABLE runs
    ADD COLUMN repository text,
    ADD COLUMN from_fork boolean NOT NULL DEFAULT false,
    -- Who asked for an abort: a running run's final message names them.
    ADD COLUMN aborted_by text;
CREATE INDEX runs_by_commit ON runs (job, commit_sha, created_at DESC) WHERE commit_sha IS NOT NULL;

-- What each (repository, commit, context) should show. A row follows a run (its state is derived
-- from the run's status whenever the reporter looks) or holds a fixed state (a pull request
-- waiting for /ok-to-test). The newest row of a target wins; older ones are settled unposted.
-- `posted` is the key of what was last posted; a row is settled once its final state is posted or
-- it was dropped.
CREATE TABLE commit_statuses (
    id              bigserial PRIMARY KEY,
    repository      text NOT NULL,
    sha             text NOT NULL,
    context         text NOT NULL,
    run_id          uuid UNIQUE REFERENCES runs (id) ON DELETE CASCADE,
    state           text CHECK (state IN ('pending', 'success', 'failure', 'error')),
    description     text,
    posted          text,
    settled         boolean NOT NULL DEFAULT false,
    outcome         text,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_until   timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((run_id IS NULL) = (state IS NOT NULL))
);
CREATE INDEX commit_statuses_unsettled ON commit_statuses (next_attempt_at) WHERE NOT settled;
CREATE INDEX commit_statuses_target ON commit_statuses (repository, sha, context, id);

-- `/ok-to-test`: a trusted user vouched for a pull request at one head commit.
CREATE TABLE github_approvals (
    repository  text NOT NULL,
    pull_request bigint NOT NULL,
    sha         text NOT NULL,
    approved_by text NOT NULL,
    approved_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repository, pull_request, sha)
);

-- A code host's token that reads a repository (a GitHub App's installation token), sealed with the
-- secrets key: the master keeps it fresh, agents clone with it.
CREATE TABLE repository_tokens (
    repository text PRIMARY KEY,
    nonce      bytea NOT NULL,
    ciphertext bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
