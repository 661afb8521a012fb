-- How an agent's engine isolates its runs, as the agent reports it: whether the engine remaps user
-- namespaces (root in a job is no one on the host) and whether the agent set its egress rules.
ALTER TABLE agents
    ADD COLUMN userns_remap boolean NOT NULL DEFAULT false,
    ADD COLUMN egress_rules boolean NOT NULL DEFAULT false;
