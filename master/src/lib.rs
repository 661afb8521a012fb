//! The CIMaster master: a stateless REST API over Postgres (state) and RabbitMQ (dispatch).

pub mod auth;
pub mod broker;
pub mod codehost;
pub mod config;
pub mod db;
pub mod dispatch;
pub mod github;
pub mod http;
pub mod observer;
pub mod oidc;
pub mod pool;
pub mod reaper;
pub mod repo;
pub mod routes;
pub mod scheduler;
pub mod serve;
pub mod startup;
pub mod telemetry;
pub mod ticker;
pub mod trigger;
pub mod ui;
pub mod wakeups;

pub use config::Config;
pub use startup::{shutdown_signal, Application};
