//! Wiring: `Application::build` binds the listener and starts the background tasks; `run_until`
//! serves until the shutdown future resolves, then drains everything.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::Config;
use crate::dispatch::{run_dispatcher, ConfirmLog};
use crate::http::AppState;
use crate::routes::router;
use crate::serve::{serve, ServerLimits};
use crate::trigger::{JobCache, Triggers};
use crate::{db, telemetry};

pub struct Application {
    listener: TcpListener,
    limits: ServerLimits,
    state: AppState,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let verifier = Verifier::from_config(&config.auth).context("JWT configuration")?;
        let secrets = config
            .secrets_key
            .as_ref()
            .map(cimaster_common::secrets::SecretBox::from_base64)
            .transpose()
            .context("CIMASTER_SECRETS_KEY")?;
        let pool = db::pool(&config.database).context("CIMASTER_DATABASE_URL")?;
        if config.migrate_on_start {
            db::migrate(&pool).await.context("applying database migrations")?;
        }
        let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;

        let cancel = CancellationToken::new();
        let broker =
            Broker::new(config.broker.url.clone(), config.broker.prefix.clone(), config.broker.publish_timeout);
        let (confirms, confirm_task) = ConfirmLog::spawn(pool.clone(), cancel.clone());
        let (wakeups, wakeups_task) = crate::wakeups::Wakeups::spawn(&pool, cancel.clone());
        let tasks = vec![
            wakeups_task,
            tokio::spawn(broker.clone().maintain(cancel.clone())),
            tokio::spawn(run_dispatcher(pool.clone(), broker.clone(), config.dispatch.clone(), cancel.clone())),
            tokio::spawn(crate::reaper::run_reaper(
                pool.clone(),
                broker.clone(),
                confirms.clone(),
                config.reaper.clone(),
                cancel.clone(),
            )),
            tokio::spawn(crate::pool::expiry::run_expiry(pool.clone(), config.pool.expiry_interval, cancel.clone())),
            tokio::spawn(crate::observer::run_observer(pool.clone(), config.agents.clone(), cancel.clone())),
            confirm_task,
        ];
        let max_timeout_seconds = u32::try_from(config.max_timeout.as_secs()).unwrap_or(u32::MAX);
        let jobs = JobCache::default();
        let host: Option<Arc<dyn crate::codehost::CodeHost>> =
            crate::github::api::GithubApi::from_config(&config.github)?.map(|api| Arc::new(api) as _);
        let triggers = Triggers {
            pool: pool.clone(),
            broker: broker.clone(),
            confirms: confirms.clone(),
            jobs: jobs.clone(),
            repos: Arc::new(crate::repo::RepoReader::new(&config.git)),
            secrets: secrets.clone(),
            max_timeout_seconds,
            host: host.clone(),
        };
        let mut tasks = tasks;
        let oidc =
            crate::oidc::Keys::new(config.github.public_url.as_deref(), secrets.as_ref(), config.oidc.key_rotation);
        if let Some(keys) = oidc {
            // The first key is there before the master serves (runs that ask for a token need it);
            // a failure here is retried by the rotation loop.
            if let Err(err) = keys.rotate_if_due(&pool).await {
                tracing::warn!(error = %err, "no ID token signing key yet; trying again in the background");
            }
            tasks.push(tokio::spawn(crate::oidc::run_rotation(pool.clone(), keys, cancel.clone())));
        }
        tasks.push(tokio::spawn(crate::scheduler::run_scheduler(
            triggers.clone(),
            config.schedule_interval,
            cancel.clone(),
        )));
        let integration = crate::codehost::Integration { triggers: triggers.clone() };
        tasks.push(tokio::spawn(crate::codehost::handle::run_handler(
            integration.clone(),
            config.github.handle_interval,
            wakeups.github(),
            cancel.clone(),
        )));
        if let Some(host) = host {
            let reporter = crate::codehost::report::Reporter {
                pool: pool.clone(),
                host,
                public_url: config.github.public_url.clone(),
            };
            tasks.push(tokio::spawn(crate::codehost::report::run_reporter(
                reporter,
                config.github.report_interval,
                wakeups.github(),
                cancel.clone(),
            )));
            tasks.push(tokio::spawn(crate::codehost::resync::run_resync(
                integration,
                config.github.resync_interval,
                cancel.clone(),
            )));
        }
        let state = AppState {
            pool,
            broker,
            verifier: Arc::new(verifier),
            confirms,
            metrics: telemetry::metrics_handle(),
            max_timeout_seconds,
            jobs,
            triggers,
            s3: config.s3.client(),
            bucket: config.s3.bucket.clone(),
            pool_config: config.pool.clone(),
            agents: config.agents.clone(),
            request_timeout: config.http.request_timeout,
            follow_limit: config.http.follow_limit,
            wakeups,
            secrets,
            github: config.github.clone(),
        };
        let limits = ServerLimits {
            header_timeout: config.http.header_timeout,
            max_connections: config.http.max_connections,
            shutdown_grace: config.http.shutdown_grace,
        };
        Ok(Self { listener, limits, state, cancel, tasks })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let cancel = self.cancel.clone();
        tracing::info!(addr = %self.local_addr(), "cimaster master listening");
        let result = serve(self.listener, router(self.state), self.limits, async move {
            shutdown.await;
            tracing::info!("shutting down");
            cancel.cancel();
        })
        .await
        .context("HTTP server");
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        result
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
