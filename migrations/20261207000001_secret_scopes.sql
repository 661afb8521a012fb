-- A secret can be limited to branches (globs) and events: a run outside its scope starts without it.
-- NULL: no limit, as before.
ALTER TABLE job_secrets
    ADD COLUMN branches text[],
    ADD COLUMN events text[];

-- The branches whose tip the run's commit was when the master created the run (or the branch a
-- signed push moved): the only branches a branch-limited secret is judged against. Empty for pull
-- requests, and for a commit that was no branch's tip.
ALTER TABLE runs ADD COLUMN tip_of text[] NOT NULL DEFAULT '{}';
