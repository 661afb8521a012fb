//! The `NOTIFY` channels the schema speaks on, named once.

/// A cluster was freed or a waiter left the queue (payload: the purpose, or empty).
pub const CLUSTER_FREED: &str = "cimaster_cluster_freed";
/// A run's log grew or its state moved (payload: the run id); sent by triggers on `run_console`
/// and `runs`.
pub const CONSOLE: &str = "cimaster_console";
/// Abort requested for a running run (payload: the run id).
pub const RUN_ABORT: &str = "cimaster_run_abort";
/// Code-host work to do: a webhook delivery was recorded, or a commit status is to be shown.
pub const GITHUB_WORK: &str = "cimaster_github_work";

/// Wakes whoever listens on `channel` (when the surrounding transaction, if any, commits).
pub async fn notify<'e>(db: impl sqlx::PgExecutor<'e>, channel: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, '')").bind(channel).execute(db).await?;
    Ok(())
}
