//! `GET /agents` and `GET /queues`: which agents exist and what they run, and how deep each queue
//! is — what autoscalers read.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use cimaster_store::agents::{self, AgentView, QueueView};
use serde::Serialize;

use super::error::ApiError;
use super::{AppState, Reader};

pub fn router() -> Router<AppState> {
    Router::new().route("/agents", get(list_agents)).route("/queues", get(list_queues))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
}

/// Every agent seen lately: `active`, `draining` (it got SIGTERM and finishes what it runs), or
/// `lost` (not heard from for `CIMASTER_AGENT_LOST_AFTER`).
#[utoipa::path(get, path = "/agents", tag = "agents", responses((status = 200, body = AgentList)),
    security(("bearer" = [])))]
pub(super) async fn list_agents(State(state): State<AppState>, _caller: Reader) -> Result<Json<AgentList>, ApiError> {
    let agents = agents::list(&state.pool, state.agents.lost_after).await?;
    Ok(Json(AgentList { agents }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueView>,
}

/// Per queue: runs waiting and running, the agents serving it and what they have free, and how
/// long the oldest waiting run has waited. Queues named in `CIMASTER_QUEUES` are listed even when
/// idle.
#[utoipa::path(get, path = "/queues", tag = "agents", responses((status = 200, body = QueueList)),
    security(("bearer" = [])))]
pub(super) async fn list_queues(State(state): State<AppState>, _caller: Reader) -> Result<Json<QueueList>, ApiError> {
    let queues = agents::queues(&state.pool, state.agents.lost_after, &state.agents.queues).await?;
    Ok(Json(QueueList { queues }))
}

/// Sets the queue and agent gauges from the registry, for a scrape of `/metrics`.
pub(super) async fn refresh_gauges(state: &AppState) {
    let Ok(queues) = agents::queues(&state.pool, state.agents.lost_after, &state.agents.queues).await else { return };
    for queue in queues {
        let name = queue.queue.clone();
        metrics::gauge!("cimaster_queue_runs", "queue" => name.clone(), "state" => "waiting").set(queue.waiting as f64);
        metrics::gauge!("cimaster_queue_runs", "queue" => name.clone(), "state" => "running").set(queue.running as f64);
        metrics::gauge!("cimaster_queue_oldest_waiting_seconds", "queue" => name).set(queue.oldest_waiting_seconds);
    }
    let Ok(agents) = agents::list(&state.pool, state.agents.lost_after).await else {
        return;
    };
    for state_name in ["active", "draining", "lost"] {
        let count = agents.iter().filter(|agent| agent.state == state_name).count();
        metrics::gauge!("cimaster_agents", "state" => state_name).set(count as f64);
    }
}
