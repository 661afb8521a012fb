//! Logging set-up for the master and the agent: to stderr, JSON lines when
//! `CIMASTER_LOG_FORMAT=json`, the level from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// Installs the process-wide subscriber; `json` comes from `--log-format`/`CIMASTER_LOG_FORMAT`.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Whether the environment asks for JSON logs.
pub fn json_from_env() -> bool {
    std::env::var("CIMASTER_LOG_FORMAT").is_ok_and(|format| format == "json")
}
