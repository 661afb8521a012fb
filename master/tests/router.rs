//! The API's validation answers, driven through `router(state)` with `tower::ServiceExt::oneshot`:
//! no listener, and no Postgres or RabbitMQ behind it (both point at a closed port), since bad
//! input is refused before either is asked.
#![allow(clippy::unwrap_used)]

mod support;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use cimaster_master::auth::Role;
use cimaster_master::routes::router;
use cimaster_master::Application;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use utoipa::OpenApi;

async fn app() -> Application {
    let mut config = support::config("postgres://nobody:nothing@127.0.0.1:1/none", &support::unique_prefix());
    config.broker.url = secrecy::SecretString::from("amqp://nobody:nothing@127.0.0.1:1/%2f".to_owned());
    Application::build(config).await.unwrap()
}

/// Sends one request through the router; the status and the problem document.
async fn send(app: &Application, method: &str, uri: &str, token: Option<Role>, body: &str) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
    if let Some(role) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {}", support::token(role)));
    }
    let response =
        router(app.state().clone()).oneshot(request.body(Body::from(body.to_owned())).unwrap()).await.unwrap();
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{uri}: {}", String::from_utf8_lossy(&bytes));
    let problem: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(problem["status"], status.as_u16(), "{problem}");
    (status, problem)
}

/// The statuses the OpenAPI document lists for the operation serving `method uri`, if it has one.
fn documented(doc: &Value, method: &str, uri: &str) -> Option<Vec<String>> {
    let path = uri.split('?').next().unwrap();
    let segments: Vec<&str> = path.split('/').collect();
    let (_, item) = doc["paths"].as_object().unwrap().iter().find(|(template, _)| {
        let parts: Vec<&str> = template.split('/').collect();
        parts.len() == segments.len()
            && parts.iter().zip(&segments).all(|(part, segment)| part.starts_with('{') || part == segment)
    })?;
    let responses = item[method.to_lowercase()]["responses"].as_object()?;
    Some(responses.keys().cloned().collect())
}

#[tokio::test]
async fn bad_input_is_refused_before_any_service_is_asked() {
    let app = app().await;
    let admin = Some(Role::Admin);
    let cases = [
        ("GET", "/jobs", None, "", StatusCode::UNAUTHORIZED, "bearer token"),
        (
            "PUT",
            "/jobs/unit",
            Some(Role::Read),
            r#"{"kind": "freestyle", "image": "b", "script": "x"}"#,
            StatusCode::FORBIDDEN,
            "admin",
        ),
        (
            "PUT",
            "/jobs/Not%20a%20name",
            admin,
            r#"{"kind": "freestyle", "image": "b", "script": "x"}"#,
            StatusCode::BAD_REQUEST,
            "job name",
        ),
        (
            "PUT",
            "/jobs/unit",
            admin,
            r#"{"kind": "freestyle", "image": "b", "script": "x", "colour": 1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "colour",
        ),
        ("PUT", "/jobs/unit", admin, "{not json", StatusCode::BAD_REQUEST, ""),
        // The role is checked before the body is read: a reader's bad body is refused for the role.
        ("PUT", "/jobs/unit", Some(Role::Read), "{not json", StatusCode::FORBIDDEN, "admin"),
        ("POST", "/jobs/unit/runs", Some(Role::Read), r#"{"commitSha": "xyz"}"#, StatusCode::FORBIDDEN, "trigger"),
        (
            "POST",
            "/jobs/unit/runs",
            admin,
            r#"{"commitSha": "xyz"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "40 hex digits",
        ),
        ("GET", "/jobs/unit/runs?limit=abc", admin, "", StatusCode::BAD_REQUEST, "limit"),
        ("GET", "/getvacant?job=j&build=1&wait=soon", admin, "", StatusCode::BAD_REQUEST, "wait"),
        // NUL never reaches Postgres (which cannot store it), in a body, a path or a query.
        (
            "PUT",
            "/jobs/unit",
            admin,
            r#"{"kind": "freestyle", "image": "b", "script": "echo \u0000"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "NUL",
        ),
        (
            "POST",
            "/jobs/unit/runs",
            admin,
            r#"{"parameters": {"A": "x\u0000"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "NUL",
        ),
        ("PUT", "/pool/clusters/c%00", admin, "{}", StatusCode::BAD_REQUEST, "NUL"),
        ("GET", "/jobs/unit/runs?status=queued%00", admin, "", StatusCode::BAD_REQUEST, "NUL"),
        ("GET", "/getvacant?job=j%00&build=1", admin, "", StatusCode::BAD_REQUEST, "NUL"),
        // Numbers past any duration.
        ("GET", "/holdcluster?cluster=c&name=n&desc=d&hours=inf", admin, "", StatusCode::BAD_REQUEST, "hours"),
        (
            "GET",
            "/holdcluster?cluster=c&name=n&desc=d&hours=1e300",
            admin,
            "",
            StatusCode::UNPROCESSABLE_ENTITY,
            "at most",
        ),
        ("GET", "/pool/report?window=300000y", admin, "", StatusCode::BAD_REQUEST, "window"),
        (
            "GET",
            "/jobs/j/runs/0190e6a4-0000-7000-8000-000000000000/results/console?after=9223372036854775808",
            admin,
            "",
            StatusCode::BAD_REQUEST,
            "after",
        ),
    ];
    let doc = serde_json::to_value(cimaster_master::http::ApiDoc::openapi()).unwrap();
    for (method, uri, role, body, expected, mentions) in cases {
        let (status, problem) = send(&app, method, uri, role, body).await;
        assert_eq!(status, expected, "{method} {uri}: {problem}");
        // Every answer of a documented operation is documented for it.
        if let Some(statuses) = documented(&doc, method, uri) {
            assert!(statuses.contains(&status.as_str().to_owned()), "{method} {uri}: {status} is not in {statuses:?}");
        }
        let detail = problem["detail"].as_str().unwrap_or_default().to_lowercase();
        assert!(detail.contains(&mentions.to_lowercase()), "{method} {uri}: `{detail}` should mention `{mentions}`");
    }
}

/// A body that never ends: whoever reads it waits for ever.
fn endless() -> Body {
    Body::from_stream(futures::stream::pending::<Result<axum::body::Bytes, std::io::Error>>())
}

/// The status of the answer to `request`, which must come within seconds.
async fn status_of(app: &Application, request: Request<Body>) -> StatusCode {
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), router(app.state().clone()).oneshot(request));
    answer.await.expect("answered without reading the whole body").unwrap().status()
}

#[tokio::test]
async fn webhooks_that_cannot_be_authentic_are_refused_before_their_body_is_read() {
    let delivery = |signature: Option<&str>| {
        let mut request = Request::post("/hooks/github")
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-github-event", "ping")
            .header("x-github-delivery", "d-1");
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        request.body(endless()).unwrap()
    };
    let app = app().await;
    assert_eq!(status_of(&app, delivery(None)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_of(&app, delivery(Some("sha256=0123"))).await, StatusCode::UNAUTHORIZED);
    let too_long = Request::post("/hooks/github")
        .header(header::CONTENT_LENGTH, (26 << 20).to_string())
        .header("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))
        .body(endless())
        .unwrap();
    assert_eq!(status_of(&app, too_long).await, StatusCode::PAYLOAD_TOO_LARGE);

    let mut config = support::config("postgres://nobody:nothing@127.0.0.1:1/none", &support::unique_prefix());
    config.broker.url = secrecy::SecretString::from("amqp://nobody:nothing@127.0.0.1:1/%2f".to_owned());
    config.github.webhook_secrets.clear();
    let unconfigured = Application::build(config).await.unwrap();
    let signature = format!("sha256={}", "0".repeat(64));
    assert_eq!(status_of(&unconfigured, delivery(Some(&signature))).await, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_login_form_is_refused_past_a_few_kib() {
    let app = app().await;
    let form = |token: &str, declared: bool| {
        let body = format!("token={token}&next=%2Fui%2Fruns");
        let mut request = Request::post("/ui/login").header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if declared {
            request = request.header(header::CONTENT_LENGTH, body.len().to_string());
        }
        request.body(Body::from(body)).unwrap()
    };
    let long = "a".repeat(9 << 10);
    assert_eq!(status_of(&app, form(&long, true)).await, StatusCode::PAYLOAD_TOO_LARGE, "a long declared length");
    assert_eq!(status_of(&app, form(&long, false)).await, StatusCode::PAYLOAD_TOO_LARGE, "a long body");
    let endless_login = Request::post("/ui/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::CONTENT_LENGTH, (1 << 20).to_string())
        .body(endless())
        .unwrap();
    assert_eq!(status_of(&app, endless_login).await, StatusCode::PAYLOAD_TOO_LARGE, "refused before it is read");
    assert_eq!(status_of(&app, form("not-a-token", true)).await, StatusCode::UNAUTHORIZED, "a short form is read");
}
