-- Job secrets, encrypted with AES-256-GCM (key from CIMASTER_SECRETS_KEY). Never returned by the API.
CREATE TABLE job_secrets (
    job         TEXT NOT NULL,
    name        TEXT NOT NULL,
    nonce       BYTEA NOT NULL,
    ciphertext  BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_by  TEXT NOT NULL,
    PRIMARY KEY (job, name)
);
