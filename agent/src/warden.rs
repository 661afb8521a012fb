//! The warden: no run outlives its lease, whatever happens to its agent.
//!
//! The agent stops a run it cannot keep (see `lease`), but only while it lives and reaches its
//! engine. A run's containers belong to the engine: an agent SIGKILLed, killed for memory, crashed,
//! frozen, whose own container was removed or whose connection to the engine broke leaves them
//! running while the lease runs out and the reaper hands the run to another agent. So each agent
//! keeps a warden on its engine: a small container (bash and curl from the agent's git image) with
//! the engine's API socket, no network and no share in any run, started before the agent takes
//! work. Its stdin is the agent's attach stream:
//!
//! - before an attempt makes its first container, and every beat after, the agent tells the warden
//!   how long that attempt's containers may live if it hears nothing more: until the moment its own
//!   fencing would have killed them, `renewed + fence_after + stop_grace`, where `renewed` is when
//!   the last successful renewal of the attempt's lease (and of its test cluster's) was sent;
//! - when that time passes without a newer word, the warden SIGKILLs the attempt's containers;
//! - when its stdin ends — the engine closes it the moment the agent's connection drops — it kills
//!   every container of the agent at once and exits.
//!
//! A beat sent at `s` with `left = renewed + fence_after + stop_grace - s` arrives `transit` later,
//! and the warden counts `left` from its arrival on a monotonic clock:
//!
//! ```text
//! containers gone by  renewed + fence_after + stop_grace + transit + kill
//!                   = renewed + lease - margin + transit + kill
//!                   < renewed + lease                 while transit + kill < margin
//! ```
//!
//! The lease cannot expire before `renewed + lease` (Postgres applied the renewal no earlier than
//! it was sent), and the reaper starts the next attempt only after it expires: the old attempt's
//! containers are gone first. The margin (`CIMASTER_LEASE_MARGIN`, 5 s by default) covers the beat's
//! passage through the engine and one list and one kill call on a local socket (milliseconds each).
//! A live agent that loses its lease has stopped the attempt by the same moment (SIGTERM at
//! `renewed + fence_after`, SIGKILL a stop grace later), so the warden only ever acts for an agent
//! that cannot. A warden that dies under a live agent is started again at the next beat; an attempt
//! that starts meanwhile waits for it (up to 10 s, then ends `error` without a container), and the
//! attempts already running are unguarded until then (a second at most when the engine is well).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::docker::{Chunk, DockerClient, DockerError, StartedWarden};
use crate::lease::{Fence, LeaseTiming};

/// How long a warden may take to say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Longest time between beats.
const MAX_BEAT: Duration = Duration::from_secs(1);
/// A beat the warden does not take within this long marks it as gone.
const WRITE_WITHIN: Duration = Duration::from_secs(5);
/// How long an attempt waits for a warden being started again before it gives up.
const WAIT_FOR_WARDEN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WardenError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("the warden did not start: {0}")]
    NotReady(String),
    #[error("this agent has no warden just now (it is being started again)")]
    Down,
    #[error("the warden stopped listening: {0}")]
    Write(#[source] std::io::Error),
}

/// An attempt, as the warden's lines and its containers' labels name it.
type Key = (String, u32);

pub struct Warden {
    docker: DockerClient,
    agent: String,
    image: String,
    /// The engine's API socket, as a path on the engine's host.
    socket: String,
    timing: LeaseTiming,
    input: tokio::sync::Mutex<Option<Input>>,
    watched: Mutex<Watched>,
}

/// The running warden's stdin, and whether its output (so the warden) has ended.
struct Input {
    writer: Pin<Box<dyn AsyncWrite + Send>>,
    ended: Arc<AtomicBool>,
}

#[derive(Default)]
struct Watched {
    /// The fences of the attempts with containers to bound.
    attempts: HashMap<Key, Vec<Fence>>,
    /// Attempts that ended since the last beat.
    ended: Vec<Key>,
}

/// An attempt under the warden's watch, until it is dropped.
pub struct Watch {
    warden: Arc<Warden>,
    key: Key,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watched = self.warden.watched();
        watched.attempts.remove(&self.key);
        watched.ended.push(self.key.clone());
    }
}

impl Warden {
    /// Starts the agent's warden and waits until it reaches the engine's API.
    pub(crate) async fn start(
        docker: DockerClient,
        agent: String,
        image: String,
        socket: String,
        timing: LeaseTiming,
    ) -> Result<Arc<Warden>, WardenError> {
        let warden = Warden {
            docker,
            agent,
            image,
            socket,
            timing,
            input: tokio::sync::Mutex::new(None),
            watched: Mutex::default(),
        };
        let input = warden.launch().await?;
        *warden.input.lock().await = Some(input);
        Ok(Arc::new(warden))
    }

    /// Puts an attempt under watch; its first deadline is written to the warden when this returns
    /// (waiting a little for a warden that is being started again).
    pub async fn watch(self: &Arc<Self>, run: String, attempt: u32, fences: Vec<Fence>) -> Result<Watch, WardenError> {
        let key = (run, attempt);
        self.watched().attempts.insert(key.clone(), fences);
        let watch = Watch { warden: self.clone(), key };
        let give_up = Instant::now() + WAIT_FOR_WARDEN;
        loop {
            match self.beat().await {
                Ok(()) => return Ok(watch),
                Err(WardenError::Down) if Instant::now() < give_up => tokio::time::sleep(MAX_BEAT / 4).await,
                Err(err) => return Err(err),
            }
        }
    }

    /// Tells the warden every attempt's deadline, each beat, until `stop`; then closes its stdin
    /// (the warden kills whatever the agent left and exits). Starts a warden again when one died.
    pub async fn keep(self: Arc<Self>, stop: CancellationToken) {
        let every = self.timing.renew_every().min(MAX_BEAT);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            let down = self.input.lock().await.as_ref().is_none_or(|input| input.ended.load(Ordering::SeqCst));
            if down {
                match self.launch().await {
                    Ok(input) => {
                        tracing::warn!("the warden was started again");
                        *self.input.lock().await = Some(input);
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "cannot start the warden again; attempts start no container");
                        continue;
                    }
                }
            }
            if let Err(err) = self.beat().await {
                tracing::error!(error = %err, "the warden did not take the attempts' deadlines");
            }
        }
        if let Some(mut input) = self.input.lock().await.take() {
            let _ = input.writer.shutdown().await;
        }
    }

    /// Writes every watched attempt's deadline and every ended attempt's end.
    async fn beat(&self) -> Result<(), WardenError> {
        let mut input = self.input.lock().await;
        if input.as_ref().is_some_and(|input| input.ended.load(Ordering::SeqCst)) {
            *input = None;
        }
        let writer = &mut input.as_mut().ok_or(WardenError::Down)?.writer;
        let lines = self.lines(Instant::now());
        let written = async {
            writer.write_all(lines.as_bytes()).await?;
            writer.flush().await
        };
        let written = match tokio::time::timeout(WRITE_WITHIN, written).await {
            Ok(written) => written,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the warden took no beat for 5 s")),
        };
        if let Err(err) = written {
            *input = None;
            return Err(WardenError::Write(err));
        }
        Ok(())
    }

    /// `RUN ATTEMPT done` for each attempt that ended, then `RUN ATTEMPT MILLIS` for each watched.
    fn lines(&self, now: Instant) -> String {
        let mut watched = self.watched();
        let mut lines = String::new();
        for (run, attempt) in watched.ended.drain(..) {
            lines.push_str(&format!("{run} {attempt} done\n"));
        }
        for ((run, attempt), fences) in &watched.attempts {
            let gone_by = fences.iter().filter_map(|fence| fence.gone_by(&self.timing)).min();
            if let Some(gone_by) = gone_by {
                let left = gone_by.saturating_duration_since(now).as_millis();
                lines.push_str(&format!("{run} {attempt} {left}\n"));
            }
        }
        lines
    }

    /// Starts a warden container and waits for its word that it reaches the engine; its output is
    /// logged from then on, and its end marks the agent as without a warden.
    async fn launch(&self) -> Result<Input, WardenError> {
        let StartedWarden { id, mut output, input } =
            self.docker.start_warden(&self.agent, &self.image, &self.socket).await?;
        let mut said = String::new();
        let ready = tokio::time::timeout(READY_WITHIN, async {
            while let Some(chunk) = output.next().await {
                if let Ok(Chunk::Stdout(bytes) | Chunk::Stderr(bytes)) = chunk {
                    said.push_str(&String::from_utf8_lossy(&bytes));
                    if said.contains("warden ready\n") {
                        return true;
                    }
                }
            }
            false
        })
        .await;
        if ready != Ok(true) {
            self.docker.remove_container(&id).await;
            return Err(WardenError::NotReady(said.trim().to_owned()));
        }
        tracing::info!(container = &id[..12.min(id.len())], "the warden watches this agent's runs");
        let ended = Arc::new(AtomicBool::new(false));
        let ends = ended.clone();
        tokio::spawn(async move {
            while let Some(chunk) = output.next().await {
                if let Ok(Chunk::Stdout(bytes) | Chunk::Stderr(bytes)) = chunk {
                    tracing::warn!(said = %String::from_utf8_lossy(&bytes).trim(), "warden");
                }
            }
            tracing::warn!("the warden's output ended");
            ends.store(true, Ordering::SeqCst);
        });
        Ok(Input { writer: input, ended })
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.watched.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
