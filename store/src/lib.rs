//! The schema's SQL, one module per table family, used by the master and the agent. Each query is
//! written once, here; callers get typed rows back and compare statuses as [`RunStatus`], never as
//! strings.
//!
//! [`RunStatus`]: cimaster_common::RunStatus

pub mod agents;
pub mod approvals;
pub mod attempts;
pub mod channels;
pub mod console;
pub mod deliveries;
pub mod jobs;
pub mod observations;
pub mod oidc_keys;
pub mod outbox;
pub mod pool;
pub mod repository_tokens;
pub mod results;
pub mod runs;
pub mod schedules;
pub mod secrets;
pub mod statuses;

/// The schema's migrations, applied by the master at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Whether Postgres answers at all (readiness).
pub async fn ping(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(drop)
}
