//! Logging set-up for the master and the agent: to stderr, JSON lines when
//! `CIMASTER_LOG_FORMAT=json`, the level from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// The `--log-format` option (`CIMASTER_LOG_FORMAT`) of the master and the agent.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// `text` for people, `json` for one JSON object per line.
    #[arg(long = "log-format", env = "CIMASTER_LOG_FORMAT", default_value = "text",
          value_parser = ["text", "json"], global = true)]
    pub log_format: String,
}

impl LogArgs {
    pub fn init(&self) {
        init(self.log_format == "json");
    }
}

/// Installs the process-wide subscriber.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
