-- The runs lists (`GET /runs`, `/ui/runs`) filter by job, status, branch or event and page by id,
-- newest first: one index per filter, in the list's order, so a filter that matches few runs does
-- not scan all of them.
CREATE INDEX runs_by_job_id ON runs (job, id DESC);
CREATE INDEX runs_by_status_id ON runs (status, id DESC);
CREATE INDEX runs_by_branch_id ON runs (branch_name, id DESC) WHERE branch_name IS NOT NULL;
CREATE INDEX runs_by_event_id ON runs (event, id DESC);
