//! Agents and queues (`/ui/agents`): what each agent runs and has free, and how deep each queue is.

use axum::extract::State;
use axum::response::Response;
use chrono::Utc;
use cimaster_store::agents::{self, AgentView, QueueView};

use super::error::UiError;
use super::format;
use super::page::{render, Chrome, Nav};
use super::session::Viewer;
use crate::http::AppState;

pub struct AgentRow {
    pub agent: AgentView,
    pub memory: String,
    pub memory_used: String,
    pub seen: String,
    pub up: String,
    pub class: &'static str,
}

#[derive(askama::Template)]
#[template(path = "ui/agents.html")]
struct AgentsPage {
    page: Chrome,
    agents: Vec<AgentRow>,
    queues: Vec<(QueueView, String, String)>,
}

pub async fn show(State(state): State<AppState>, viewer: Viewer) -> Result<Response, UiError> {
    let now = Utc::now();
    let agents = agents::list(&state.pool, state.agents.lost_after)
        .await?
        .into_iter()
        .map(|agent| AgentRow {
            memory: format::bytes(agent.memory),
            memory_used: format::bytes(agent.memory_used),
            seen: format::relative(agent.last_seen, now),
            up: format::between(agent.started_at, now),
            class: match agent.state.as_str() {
                "active" => "ok",
                "draining" => "wait",
                _ => "bad",
            },
            agent,
        })
        .collect();
    let queues = agents::queues(&state.pool, state.agents.lost_after, &state.agents.queues)
        .await?
        .into_iter()
        .map(|queue| {
            let free_memory = format::bytes(queue.free_memory);
            let oldest = if queue.waiting > 0 { format::duration(queue.oldest_waiting_seconds) } else { String::new() };
            (queue, free_memory, oldest)
        })
        .collect();
    render(&AgentsPage { page: Chrome::new("Agents", Nav::Agents, &viewer), agents, queues })
}
