//! Runs' OIDC ID tokens end to end: a job that asks for one gets a token in `CIMASTER_ID_TOKEN`,
//! masked in its console, that a relying party verifies with a standard JOSE library against the
//! keys the master publishes (discovery document, then its `jwks_uri`); a job that does not ask
//! gets none.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use cimaster_common::{IdTokenClaims, RunEvent};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use sqlx::PgPool;
use support::{busybox_job as job, run_id, AgentOptions, Stack};

/// The master's public URL: the tokens' issuer.
const PUBLIC_URL: &str = "https://ci.example.test";

#[sqlx::test(migrations = "../migrations")]
async fn a_run_gets_an_id_token_that_verifies_against_the_published_keys(pool: PgPool) {
    let mut stack = Stack::start_with(pool, vec![("CIMASTER_PUBLIC_URL", PUBLIC_URL.to_owned())]).await;
    stack.add_agent(AgentOptions::default()).await;
    // The token leaves the run as a result file: the console masks it.
    let mut with_token = job(r#"printf %s "$CIMASTER_ID_TOKEN" > token.txt; echo "token: $CIMASTER_ID_TOKEN""#);
    with_token["idToken"] = json!({"audience": "sts.example"});
    with_token["workingDir"] = json!("/out");
    with_token["results"] = json!({"artifacts": ["token.txt"]});
    stack.put_job("deploy", with_token).await;
    let without = job(r#"if [ -n "${CIMASTER_ID_TOKEN+set}" ]; then echo "has a token"; exit 1; fi; echo "no token""#);
    stack.put_job("plain", without).await;

    let path = stack.trigger("deploy").await;
    let plain = stack.trigger("plain").await;
    let run = stack.wait_finished(&path, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let response =
        stack.api.request(reqwest::Method::GET, &format!("{path}/results/artifacts/token.txt")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let token = response.text().await.unwrap();
    assert_eq!(token.split('.').count(), 3, "a compact JWS: {token}");
    let console = stack.console(&path).await;
    assert!(console.contains("token: ***"), "{console}");
    assert!(!console.contains(&token) && !console.contains(token.split('.').nth(2).unwrap()), "{console}");
    assert!(console.contains("ID token for audience sts.example"), "{console}");

    // A relying party: the discovery document, without a token, then the keys at its `jwks_uri`.
    let anonymous = &stack.api.http;
    let discovery: Value = anonymous
        .get(stack.api.url("/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], PUBLIC_URL);
    let jwks_uri = discovery["jwks_uri"].as_str().unwrap();
    // The public URL names a host this test cannot reach: the same path on the master.
    let jwks_path = jwks_uri.strip_prefix(PUBLIC_URL).unwrap();
    let jwks: JwkSet = anonymous.get(stack.api.url(jwks_path)).send().await.unwrap().json().await.unwrap();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    let jwk = jwks.find(&kid).unwrap_or_else(|| panic!("key {kid} is not in {jwks:?}"));
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&["sts.example"]);
    validation.set_issuer(&[PUBLIC_URL]);
    validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<IdTokenClaims>(&token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
        .unwrap()
        .claims;
    assert_eq!(claims.aud, "sts.example");
    assert_eq!(claims.sub, "job:deploy");
    assert_eq!(claims.job, "deploy");
    assert_eq!(claims.run_id, run_id(&path));
    assert_eq!(claims.attempt, 1);
    assert_eq!(claims.event, RunEvent::Api);
    assert_eq!(claims.triggered_by, "e2e");
    assert!(!claims.from_fork && claims.repository.is_none() && claims.git_ref.is_none());
    assert!(claims.exp - claims.iat <= 3600 && claims.exp > claims.iat, "{claims:?}");

    // The same token for another audience is refused.
    validation.set_audience(&["vault.example"]);
    assert!(jsonwebtoken::decode::<IdTokenClaims>(&token, &DecodingKey::from_jwk(jwk).unwrap(), &validation).is_err());

    let run = stack.wait_finished(&plain, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let console = stack.console(&plain).await;
    assert!(console.contains("no token") && !console.contains("ID token"), "{console}");
}
