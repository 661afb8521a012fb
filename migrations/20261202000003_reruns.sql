-- A rerun names the run it repeats (`POST /jobs/{name}/runs/{id}/rerun`).
ALTER TABLE runs ADD COLUMN rerun_of uuid;
