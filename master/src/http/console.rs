//! The console log of a run's attempt, served whole or followed as it grows: from Postgres while
//! the attempt runs, from S3 once its log is stored; a follower is woken by the replica's listener
//! (`wakeups`), stops when its client goes and ends at the follow limit.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cimaster_common::storage::console_key;
use cimaster_store::console;
use cimaster_store::runs::{self, Progress};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::query::ApiQuery;
use super::results::chosen_attempt;
use super::AppState;
use crate::http::Reader;
use crate::wakeups::ConsoleWake;

pub fn router() -> axum::Router<AppState> {
    axum::Router::new().route("/jobs/{name}/runs/{id}/results/console", axum::routing::get(console))
}

/// How often a follower looks without being woken (a notification can be lost).
const FALLBACK_TICK: Duration = Duration::from_secs(5);

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// Keep the response open and stream new output until the attempt ends.
    #[serde(default)]
    follow: bool,
    /// Which attempt's log (default: the current one).
    attempt: Option<i32>,
    /// Start after this many bytes of the log: a client that lost its stream (say, to a master
    /// replica that went away) resumes where it was, from any replica, without gaps or repeats.
    #[serde(default)]
    after: u64,
}

/// The run's console log (stdout and stderr in order, each line prefixed with its timestamp).
#[utoipa::path(get, path = "/jobs/{name}/runs/{id}/results/console", tag = "results",
    params(("name" = String, Path, description = "job name"), ("id" = Uuid, Path, description = "run id"), ConsoleQuery),
    responses((status = 200, description = "the log so far, or streamed with follow=true", content_type = "text/plain"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn console(
    State(state): State<AppState>,
    _caller: Reader,
    Path((name, id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<ConsoleQuery>,
) -> Result<Response, ApiError> {
    // No log is that long, and S3 ranges end at 2^63 - 1.
    if i64::try_from(query.after).is_err() {
        return Err(ApiError::BadRequest(format!("`after` is at most {}", i64::MAX)));
    }
    let (run, attempt, _) = chosen_attempt(&state, &name, &id, query.attempt).await?;
    let rx = open(&state, run, attempt, query.after, query.follow);
    let body =
        Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], body)
        .into_response())
}

type Tx = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// The attempt's log from byte `after` on, as it is read (and, with `follow`, as it grows until the
/// attempt ends or the follow limit): from Postgres while live, from S3 once stored. Never held
/// whole; the reading stops when the receiver is dropped.
pub(crate) fn open(
    state: &AppState,
    run: Uuid,
    attempt: i32,
    after: u64,
    follow: bool,
) -> mpsc::Receiver<Result<Bytes, std::io::Error>> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let pool = state.pool.clone();
    let s3 = state.s3.clone();
    let bucket = state.bucket.clone();
    // Subscribed before the first read, so nothing written in between goes unheard.
    let wakeups = follow.then(|| state.wakeups.console());
    let until = tokio::time::Instant::now() + state.follow_limit;
    tokio::spawn(async move {
        let _open = wakeups.is_some().then(FollowGauge::open);
        let from = Position { attempt, follow: wakeups.map(|wakeups| Follow { wakeups, until }), after };
        if let Err(err) = pump(&pool, &s3, &bucket, run, from, &tx).await {
            tracing::warn!(run_id = %run, error = %err, "console stream failed");
            let _ = tx.send(Err(std::io::Error::other(err.to_string()))).await;
        }
    });
    rx
}

/// Which log a console request reads, and from where.
struct Position {
    attempt: i32,
    /// Set when the client follows the log as it grows.
    follow: Option<Follow>,
    /// Bytes of the log the client already has.
    after: u64,
}

/// Counts a follow in `cimaster_console_follows` for as long as it is open.
struct FollowGauge;

impl FollowGauge {
    fn open() -> Self {
        metrics::gauge!(crate::telemetry::CONSOLE_FOLLOWS).increment(1.0);
        Self
    }
}

impl Drop for FollowGauge {
    fn drop(&mut self) {
        metrics::gauge!(crate::telemetry::CONSOLE_FOLLOWS).decrement(1.0);
    }
}

/// A follow: woken when the run prints or moves, until the follow limit.
struct Follow {
    wakeups: broadcast::Receiver<ConsoleWake>,
    until: tokio::time::Instant,
}

impl Follow {
    /// Waits until `run` may have news: its wake-up, a slow tick (a missed notification), the
    /// follow limit (`false`) or the client going away (`false`).
    async fn news(&mut self, run: Uuid, tx: &Tx) -> bool {
        let until = self.until;
        let tick = tokio::time::Instant::now() + FALLBACK_TICK;
        let wakeups = &mut self.wakeups;
        let heard = async {
            loop {
                match wakeups.recv().await {
                    Ok(ConsoleWake::Run(id)) if id != run => continue,
                    // Its own, everyone's, or some missed (lagged): look.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        tokio::select! {
            () = heard => true,
            () = tokio::time::sleep_until(tick.min(until)) => tokio::time::Instant::now() < until,
            () = tx.closed() => false,
        }
    }
}

/// Sends the log: Postgres chunks while the attempt is live, then the rest from S3 once stored.
async fn pump(
    pool: &PgPool,
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    run: Uuid,
    from: Position,
    tx: &Tx,
) -> anyhow::Result<()> {
    let Position { attempt, mut follow, after } = from;
    // Bytes of the log gone by: sent, or skipped because the client has them.
    let mut passed: u64 = 0;
    let mut next_seq: i64 = 0;
    loop {
        if tx.is_closed() {
            return Ok(()); // the client went away
        }
        let state = runs::progress_by_id(pool, run).await?.ok_or_else(|| anyhow::anyhow!("run vanished"))?;
        let stored = stored_key(&state, run, attempt);
        if let Some(key) = stored {
            if stream_s3(s3, bucket, &key, passed.max(after), tx).await? {
                return Ok(());
            }
        }
        // Read the state before the chunks: if it says "ended", every chunk is already written.
        let ended = !state.is_live(attempt);
        loop {
            let chunks = console::chunks(pool, run, attempt, next_seq, 64).await?;
            if chunks.is_empty() {
                break;
            }
            for (seq, data) in chunks {
                next_seq = seq + 1;
                let start = passed;
                passed += data.len() as u64;
                if passed <= after {
                    continue;
                }
                let unseen = Bytes::from(data).slice(after.saturating_sub(start) as usize..);
                if tx.send(Ok(unseen)).await.is_err() {
                    return Ok(()); // the client went away
                }
            }
        }
        // An ended attempt whose log is not in S3 (the upload failed, or its agent died) is whole
        // in Postgres, and has just been sent.
        match &mut follow {
            Some(follow) if !ended => {
                if !follow.news(run, tx).await {
                    return Ok(()); // the follow limit, or the client went away
                }
            }
            _ => return Ok(()),
        }
    }
}

/// The S3 key of this attempt's stored log, if it has been stored.
fn stored_key(state: &Progress, run: Uuid, attempt: i32) -> Option<String> {
    if state.attempt == attempt {
        state.console_key.clone()
    } else {
        // Earlier attempts keep their log under the conventional key, if their agent stored it.
        u32::try_from(attempt).ok().map(|attempt| console_key(cimaster_common::RunId(run), attempt))
    }
}

/// Streams the stored log from byte `skip` on. `false` when the object does not exist.
async fn stream_s3(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, skip: u64, tx: &Tx) -> anyhow::Result<bool> {
    let mut request = s3.get_object().bucket(bucket).key(key);
    if skip > 0 {
        request = request.range(format!("bytes={skip}-"));
    }
    let object = match request.send().await {
        Ok(object) => object,
        Err(err) => {
            let service = err.as_service_error();
            if service.is_some_and(|e| e.is_no_such_key()) {
                return Ok(false);
            }
            // A range starting at the end of the object: nothing left to send.
            if err.raw_response().is_some_and(|r| r.status().as_u16() == 416) {
                return Ok(true);
            }
            return Err(err.into());
        }
    };
    let mut body = object.body;
    while let Some(chunk) = body.next().await {
        if tx.send(Ok(chunk?)).await.is_err() {
            break;
        }
    }
    Ok(true)
}
