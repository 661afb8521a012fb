//! The master as the runs' OIDC identity provider: discovery and JWKS served without a token, the
//! first key made at start, rotation that keeps the previous key published, retired keys dropped
//! from the JWKS after their time, and one key per rotation however many replicas race.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use cimaster_common::secrets::SecretBox;
use cimaster_master::oidc::Keys;
use cimaster_store::oidc_keys;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use sqlx::PgPool;
use support::TestApp;

const PUBLIC_URL: &str = "https://ci.example.test/";
const ISSUER: &str = "https://ci.example.test";

async fn app(pool: PgPool) -> TestApp {
    TestApp::spawn_with(pool, |config| config.github.public_url = Some(PUBLIC_URL.to_owned())).await
}

fn keys(rotation: Duration) -> Keys {
    let secrets = SecretBox::from_base64(&SecretString::from(support::SECRETS_KEY)).unwrap();
    Keys::new(Some(PUBLIC_URL), Some(&secrets), rotation).unwrap()
}

/// A token signed with the key that signs now, as an agent signs one.
async fn sign_now(pool: &PgPool) -> (String, String) {
    let secrets = SecretBox::from_base64(&SecretString::from(support::SECRETS_KEY)).unwrap();
    let key = oidc_keys::signing(pool, &secrets).await.unwrap().expect("a signing key");
    assert_eq!(key.issuer, ISSUER);
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": key.issuer, "sub": "job:unit", "aud": "sts.example", "iat": now, "exp": now + 600});
    let encoding = EncodingKey::from_rsa_pem(key.private_pem.expose_secret().as_bytes()).unwrap();
    (jsonwebtoken::encode(&header, &claims, &encoding).unwrap(), key.kid)
}

/// The JWKS as served, without a token.
async fn served_jwks(app: &TestApp) -> JwkSet {
    let reply = app.anonymous().get("/.well-known/jwks.json").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_value(reply.body).unwrap()
}

/// Verifies `token` as a relying party does: its `kid` looked up in `jwks`, audience and issuer
/// checked.
fn verify(jwks: &JwkSet, token: &str) -> Result<Value, String> {
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let jwk = jwks.find(&kid).ok_or_else(|| format!("key {kid} is not published"))?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&["sts.example"]);
    validation.set_issuer(&[ISSUER]);
    let key = DecodingKey::from_jwk(jwk).unwrap();
    jsonwebtoken::decode::<Value>(token, &key, &validation).map(|data| data.claims).map_err(|err| err.to_string())
}

#[sqlx::test(migrations = "../migrations")]
async fn discovery_points_at_the_keys_that_verify_tokens(pool: PgPool) {
    let app = app(pool.clone()).await;
    let reply = app.anonymous().get("/.well-known/openid-configuration").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["issuer"], ISSUER);
    assert_eq!(reply.body["jwks_uri"], format!("{ISSUER}/.well-known/jwks.json"));
    assert_eq!(reply.body["id_token_signing_alg_values_supported"], json!(["RS256"]));

    // The first key was made at start.
    let raw = app.anonymous().get("/.well-known/jwks.json").await;
    let published = &raw.body["keys"][0];
    assert_eq!(
        (&published["kty"], &published["alg"], &published["use"]),
        (&json!("RSA"), &json!("RS256"), &json!("sig"))
    );
    let jwks = served_jwks(&app).await;
    assert_eq!(jwks.keys.len(), 1);
    let (token, kid) = sign_now(&pool).await;
    assert_eq!(jwks.keys[0].common.key_id.as_deref(), Some(kid.as_str()));
    assert_eq!(verify(&jwks, &token).unwrap()["sub"], "job:unit");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn rotation_keeps_the_previous_key_published_until_its_time_is_up(pool: PgPool) {
    let app = app(pool.clone()).await;
    let (first_token, first) = sign_now(&pool).await;

    // Not due yet: nothing changes.
    assert!(!keys(Duration::from_secs(3600)).rotate_if_due(&pool).await.unwrap());
    // Due (a key signs for no time at all): a new key signs, the first one stays published.
    assert!(keys(Duration::ZERO).rotate_if_due(&pool).await.unwrap());
    let (second_token, second) = sign_now(&pool).await;
    assert_ne!(first, second);
    let jwks = served_jwks(&app).await;
    let kids: Vec<_> = jwks.keys.iter().map(|key| key.common.key_id.clone().unwrap()).collect();
    assert_eq!(kids, [second.clone(), first.clone()], "the signing key first, then the retired one");
    verify(&jwks, &first_token).unwrap();
    verify(&jwks, &second_token).unwrap();

    // A key retired with no time left to be published is gone from the JWKS at once, and tokens it
    // signed no longer verify; the one retired before is still published.
    let mut unpublishing = keys(Duration::ZERO);
    unpublishing.keep_published = Duration::ZERO;
    assert!(unpublishing.rotate_if_due(&pool).await.unwrap());
    let (_, third) = sign_now(&pool).await;
    let jwks = served_jwks(&app).await;
    let kids: Vec<_> = jwks.keys.iter().map(|key| key.common.key_id.clone().unwrap()).collect();
    assert_eq!(kids, [third, first]);
    let refused = verify(&jwks, &second_token).unwrap_err();
    assert!(refused.contains("not published"), "{refused}");
    verify(&jwks, &first_token).unwrap();
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn replicas_that_rotate_at_once_install_one_key(pool: PgPool) {
    let app = app(pool.clone()).await;
    sqlx::query("UPDATE oidc_keys SET created_at = now() - interval '2 hours'").execute(&pool).await.unwrap();
    let rotations = (0..4).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { keys(Duration::from_secs(3600)).rotate_if_due(&pool).await.unwrap() })
    });
    let installed = futures::future::join_all(rotations).await.into_iter().filter(|won| *won.as_ref().unwrap()).count();
    assert_eq!(installed, 1);
    assert_eq!(served_jwks(&app).await.keys.len(), 2, "the new key and the one it replaced");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_changed_public_url_makes_a_key_for_the_new_issuer(pool: PgPool) {
    let app = app(pool.clone()).await;
    let secrets = SecretBox::from_base64(&SecretString::from(support::SECRETS_KEY)).unwrap();
    let moved = Keys::new(Some("https://ci.example.org"), Some(&secrets), Duration::from_secs(3600)).unwrap();
    assert!(moved.rotate_if_due(&pool).await.unwrap());
    let key = oidc_keys::signing(&pool, &secrets).await.unwrap().unwrap();
    assert_eq!(key.issuer, "https://ci.example.org");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn without_a_public_url_no_tokens_are_issued(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let reply = app.anonymous().get("/.well-known/openid-configuration").await;
    reply.expect_problem(404, "CIMASTER_PUBLIC_URL");
    let reply = app.anonymous().get("/.well-known/jwks.json").await;
    reply.expect_problem(404, "CIMASTER_PUBLIC_URL");
    let secrets = SecretBox::from_base64(&SecretString::from(support::SECRETS_KEY)).unwrap();
    assert!(oidc_keys::signing(&pool, &secrets).await.unwrap().is_none());
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_asks_for_a_token_with_an_audience(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let admin = app.admin();
    let mut job = support::freestyle("default");
    job["idToken"] = json!({"audience": "sts.amazonaws.com"});
    let reply = admin.put("/jobs/deploy", job.clone()).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.body["idToken"], json!({"audience": "sts.amazonaws.com"}));
    for (bad, says) in [(json!({"audience": ""}), "idToken.audience"), (json!({"audience": "a", "ttl": 5}), "ttl")] {
        job["idToken"] = bad;
        admin.put("/jobs/deploy", job.clone()).await.expect_problem(422, says);
    }
    app.stop().await;
}
