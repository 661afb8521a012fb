-- The heads CIMaster heard of for each pull request, and when a webhook first brought each: a bare
-- `/ok-to-test` approves the head only if it was heard of before the comment arrived (a push after
-- the comment needs a new approval).
CREATE TABLE github_pull_heads (
    repository   TEXT NOT NULL,
    pull_request BIGINT NOT NULL,
    sha          TEXT NOT NULL,
    seen_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (repository, pull_request, sha)
);
