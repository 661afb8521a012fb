-- The keys that sign runs' OIDC ID tokens (RS256). The master makes them and rotates them; an agent
-- signs each attempt's token with the one that signs now; `/.well-known/jwks.json` publishes the
-- public parts of those that sign or signed recently.
CREATE TABLE oidc_keys (
    kid             text PRIMARY KEY,
    -- The `iss` of the tokens it signs (CIMASTER_PUBLIC_URL when it was made): agents need no
    -- setting of their own, and a changed URL makes a new key.
    issuer          text NOT NULL,
    -- The public key as JWK parts, base64url without padding.
    n               text NOT NULL,
    e               text NOT NULL,
    -- The private key (PKCS#1 PEM), sealed with CIMASTER_SECRETS_KEY like job secrets.
    nonce           bytea NOT NULL,
    sealed_key      bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- When a newer key took over signing; NULL while this one signs.
    retired_at      timestamptz,
    -- Until when a retired key stays published, so that tokens it signed still verify.
    published_until timestamptz,
    CHECK ((retired_at IS NULL) = (published_until IS NULL))
);

-- One key signs at a time.
CREATE UNIQUE INDEX oidc_keys_one_signing ON oidc_keys ((true)) WHERE retired_at IS NULL;
