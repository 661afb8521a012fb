//! The master's one router: the API and the web UI, under the layers every request passes.

use axum::Router;

use crate::http::{self, AppState};
use crate::ui;

pub fn router(state: AppState) -> Router {
    let api = http::routes();
    // The web UI asks the API itself for downloads, on the signed-in caller's behalf.
    let ui = ui::router(ui::Api(api.clone().with_state(state.clone())));
    http::layered(api.merge(ui), state)
}
