//! One `LISTEN` connection per replica, shared by every request that waits on the database: waiting
//! acquires (a cluster freed) and console follows (a run's log grew or its state moved), and by the
//! code-host loops (a delivery to handle, a status to post). A waiter
//! holds no database connection while it waits. Notifications can be missed (the connection drops,
//! the database restarts): everyone is woken when the listener reconnects, and each waiter keeps a
//! slow tick of its own as well.

use std::time::Duration;

use cimaster_store::channels;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a console follower hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleWake {
    /// This run's log grew or its state moved.
    Run(Uuid),
    /// Anything may have changed (the listener reconnected).
    Everyone,
}

#[derive(Clone)]
pub struct Wakeups {
    clusters: watch::Sender<u64>,
    console: broadcast::Sender<ConsoleWake>,
    github: watch::Sender<u64>,
}

impl Wakeups {
    /// Starts the listener on a connection of its own (not one of `pool`'s), until `cancel`.
    pub fn spawn(pool: &PgPool, cancel: CancellationToken) -> (Self, JoinHandle<()>) {
        let wakeups =
            Self { clusters: watch::channel(0).0, console: broadcast::channel(1024).0, github: watch::channel(0).0 };
        let own = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with((*pool.connect_options()).clone().application_name("cimaster-master-listen"));
        let task = tokio::spawn(wakeups.clone().listen(own, cancel));
        (wakeups, task)
    }

    /// Changes whenever a cluster may have been freed.
    pub fn clusters(&self) -> watch::Receiver<u64> {
        self.clusters.subscribe()
    }

    /// Changes whenever a webhook delivery was recorded or a commit status is to be shown.
    pub fn github(&self) -> watch::Receiver<u64> {
        self.github.subscribe()
    }

    /// Every console wake-up, for any run; a follower picks its own.
    pub fn console(&self) -> broadcast::Receiver<ConsoleWake> {
        self.console.subscribe()
    }

    async fn listen(self, pool: PgPool, cancel: CancellationToken) {
        loop {
            match self.connect(&pool).await {
                Ok(listener) => {
                    // Whatever happened while nobody listened is worth a look.
                    self.wake_everyone();
                    if self.relay(listener, &cancel).await {
                        return;
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot LISTEN; waiters fall back on their ticks"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn connect(&self, pool: &PgPool) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen_all([channels::CLUSTER_FREED, channels::CONSOLE, channels::GITHUB_WORK]).await?;
        Ok(listener)
    }

    /// Passes notifications on until the connection fails (`false`) or `cancel` (`true`).
    async fn relay(&self, mut listener: PgListener, cancel: &CancellationToken) -> bool {
        loop {
            let received = tokio::select! {
                () = cancel.cancelled() => return true,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) => self.pass_on(notification.channel(), notification.payload()),
                // The connection was lost; the next `try_recv` reconnects.
                Ok(None) => self.wake_everyone(),
                Err(err) => {
                    tracing::warn!(error = %err, "the LISTEN connection failed");
                    self.wake_everyone();
                    return false;
                }
            }
        }
    }

    fn pass_on(&self, channel: &str, payload: &str) {
        if channel == channels::CLUSTER_FREED {
            self.clusters.send_modify(|count| *count += 1);
        } else if channel == channels::GITHUB_WORK {
            self.github.send_modify(|count| *count += 1);
        } else if let Ok(run) = payload.parse::<Uuid>() {
            let _ = self.console.send(ConsoleWake::Run(run));
        }
    }

    fn wake_everyone(&self) {
        self.clusters.send_modify(|count| *count += 1);
        self.github.send_modify(|count| *count += 1);
        let _ = self.console.send(ConsoleWake::Everyone);
    }
}
