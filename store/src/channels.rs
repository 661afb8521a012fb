//! The `NOTIFY` channels the schema speaks on, named once.

/// A cluster was freed or a waiter left the queue (payload: the purpose, or empty).
pub const CLUSTER_FREED: &str = "cimaster_cluster_freed";
/// A run's log grew or its state moved (payload: the run id); sent by triggers on `run_console`
/// and `runs`.
pub const CONSOLE: &str = "cimaster_console";
/// Abort requested for a running run (payload: the run id).
pub const RUN_ABORT: &str = "cimaster_run_abort";
