-- A job's secrets go with it: deleting the job deletes them, so a job re-created under the same
-- name starts with none.
DELETE FROM job_secrets s WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.name = s.job);
ALTER TABLE job_secrets
    ADD CONSTRAINT job_secrets_job FOREIGN KEY (job) REFERENCES jobs (name) ON DELETE CASCADE;
