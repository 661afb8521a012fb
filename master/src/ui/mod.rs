//! The web UI under `/ui`: pages rendered on the server (askama templates in `templates/ui`) from
//! the same data, by the same rules, as the API; a login that keeps the caller's token in a cookie;
//! and a little JavaScript of our own (`assets/ui.js`) for the live parts: the console, the runs
//! list updating itself, relative times. Pages work without it, the live parts aside.
//!
//! Paths mirror the API's (`/ui/jobs/{name}/runs/{id}` is `/jobs/{name}/runs/{id}`); actions are
//! POSTs under the same paths, each carrying the session's CSRF token.

mod agents;
mod ansi;
mod charts;
mod error;
mod format;
mod jobs;
mod page;
mod pool;
mod runs;
mod session;

use axum::response::Redirect;
use axum::routing::{get, post};
use axum::{Extension, Router};

use crate::http::AppState;

pub use runs::Api;

/// The UI's routes; `api` is the API itself, which downloads are asked of.
pub fn router(api: Api) -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui/login", get(session::login_form).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/assets/{name}", get(page::asset))
        .route("/ui/runs", get(runs::list))
        .route("/ui/jobs", get(jobs::list))
        .route("/ui/jobs/{name}", get(jobs::show))
        .route("/ui/jobs/{name}/runs", post(jobs::trigger))
        .route("/ui/jobs/{name}/runs/{id}", get(runs::show))
        .route("/ui/jobs/{name}/runs/{id}/abort", post(runs::abort))
        .route("/ui/jobs/{name}/runs/{id}/rerun", post(runs::rerun))
        .route("/ui/jobs/{name}/runs/{id}/console", get(runs::console))
        .route("/ui/jobs/{name}/runs/{id}/results/{*file}", get(runs::download).layer(Extension(api)))
        .route("/ui/pool", get(pool::show))
        .route("/ui/pool/clusters/{name}/{action}", post(pool::act))
        .route("/ui/agents", get(agents::show))
}
