//! The agent registry: each agent's own report, written on start and every heartbeat, and what
//! `GET /agents` and `GET /queues` read.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// What an agent says about itself.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub id: &'a str,
    pub version: &'a str,
    pub queues: &'a [String],
    pub cpus: f64,
    pub memory: u64,
    pub cpus_used: f64,
    pub memory_used: u64,
    pub runs: u32,
    /// Host CPU use, 0.0–1.0.
    pub host_cpu: f64,
    pub draining: bool,
    /// Whether the engine remaps user namespaces (`userns-remap`).
    pub userns_remap: bool,
    /// Whether the agent set its egress rules on the engine.
    pub egress_rules: bool,
}

/// Writes the agent's report; `started` restarts its `startedAt` (a new process under the id).
pub async fn report(pool: &PgPool, report: &Report<'_>, started: bool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO agents (id, version, queues, cpus, memory, cpus_used, memory_used, runs, host_cpu, draining,
                             userns_remap, egress_rules)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $12, $13)
         ON CONFLICT (id) DO UPDATE SET version = $2, queues = $3, cpus = $4, memory = $5, cpus_used = $6,
             memory_used = $7, runs = $8, host_cpu = $9, draining = $10, last_seen = now(),
             started_at = CASE WHEN $11 THEN now() ELSE agents.started_at END,
             userns_remap = $12, egress_rules = $13",
    )
    .bind(report.id)
    .bind(report.version)
    .bind(report.queues)
    .bind(report.cpus)
    .bind(i64::try_from(report.memory).unwrap_or(i64::MAX))
    .bind(report.cpus_used)
    .bind(i64::try_from(report.memory_used).unwrap_or(i64::MAX))
    .bind(i32::try_from(report.runs).unwrap_or(i32::MAX))
    .bind(report.host_cpu)
    .bind(report.draining)
    .bind(started)
    .bind(report.userns_remap)
    .bind(report.egress_rules)
    .execute(pool)
    .await?;
    Ok(())
}

/// An agent that stopped on its own (after draining) leaves the registry.
pub async fn leave(pool: &PgPool, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM agents WHERE id = $1").bind(id).execute(pool).await?;
    Ok(())
}

/// An agent as listed: `state` is `active`, `draining`, or `lost` (not seen for `lost_after`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    pub id: String,
    pub state: String,
    pub version: String,
    pub queues: Vec<String>,
    pub cpus: f64,
    pub memory: i64,
    pub cpus_used: f64,
    pub memory_used: i64,
    /// Runs in progress.
    pub runs: i32,
    /// Host CPU use, 0.0–1.0.
    pub host_cpu: f64,
    /// Whether the agent's engine remaps user namespaces: root in a job is then no one on the
    /// host (the recommended setting).
    pub userns_remap: bool,
    /// Whether the agent set its egress rules on the engine (see the README's security model).
    pub egress_rules: bool,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// Deletes the agents not seen for `forget_after`; returns how many.
pub async fn forget(pool: &PgPool, forget_after: std::time::Duration) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM agents WHERE last_seen < now() - make_interval(secs => $1)")
        .bind(forget_after.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected())
}

/// Every agent not yet forgotten, by id.
pub async fn list(pool: &PgPool, lost_after: std::time::Duration) -> Result<Vec<AgentView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, CASE WHEN last_seen < now() - make_interval(secs => $1) THEN 'lost'
                         WHEN draining THEN 'draining' ELSE 'active' END AS state,
                version, queues, cpus, memory, cpus_used, memory_used, runs, host_cpu, userns_remap, egress_rules,
                started_at, last_seen
         FROM agents ORDER BY id",
    )
    .bind(lost_after.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// A queue as an autoscaler reads it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    pub queue: String,
    /// Runs queued and not yet started.
    pub waiting: i64,
    pub running: i64,
    /// `waiting + running`: what an autoscaler divides by the runs one agent takes.
    pub demand: i64,
    /// Agents serving the queue that take work (not draining, not lost).
    pub agents: i64,
    /// What those agents have free.
    pub free_cpus: f64,
    pub free_memory: i64,
    /// How long the oldest waiting run has waited, in seconds (0 when none waits).
    pub oldest_waiting_seconds: f64,
}

/// Every queue that has runs waiting or running, an agent serving it, or is named in `listed`
/// (queues an autoscaler reads even while they are idle and have no agent).
pub async fn queues(
    pool: &PgPool,
    lost_after: std::time::Duration,
    listed: &[String],
) -> Result<Vec<QueueView>, sqlx::Error> {
    sqlx::query_as(
        "WITH live AS (
             SELECT unnest(queues) AS queue, cpus - cpus_used AS free_cpus, memory - memory_used AS free_memory
             FROM agents WHERE NOT draining AND last_seen >= now() - make_interval(secs => $1)
         ), served AS (
             SELECT queue, count(*) AS agents, sum(free_cpus) AS free_cpus, sum(free_memory) AS free_memory
             FROM live GROUP BY queue
         ), work AS (
             SELECT queue, count(*) FILTER (WHERE status = 'queued') AS waiting,
                    count(*) FILTER (WHERE status = 'running') AS running,
                    min(created_at) FILTER (WHERE status = 'queued') AS oldest
             FROM runs WHERE status IN ('queued', 'running') GROUP BY queue
         ), names AS (
             SELECT queue FROM work UNION SELECT queue FROM served UNION SELECT unnest($2::text[])
         )
         SELECT n.queue,
                coalesce(w.waiting, 0) AS waiting, coalesce(w.running, 0) AS running,
                coalesce(w.waiting, 0) + coalesce(w.running, 0) AS demand,
                coalesce(s.agents, 0) AS agents, coalesce(s.free_cpus, 0)::float8 AS free_cpus,
                coalesce(s.free_memory, 0)::bigint AS free_memory,
                coalesce(extract(epoch FROM now() - w.oldest), 0)::float8 AS oldest_waiting_seconds
         FROM names n LEFT JOIN work w ON w.queue = n.queue LEFT JOIN served s ON s.queue = n.queue
         ORDER BY 1",
    )
    .bind(lost_after.as_secs_f64())
    .bind(listed)
    .fetch_all(pool)
    .await
}
