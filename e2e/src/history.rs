//! A history of executions as the jobs themselves report them, and a checker that reads it: the
//! witness the fault tests and the scaling benchmark read for "lost" and "run twice".
//!
//! Each job calls the recorder over HTTP (`GET /<run>/<attempt>/start|beat|end`, sent with `nc`)
//! from inside its container, every tenth of a second while it runs. The recorder stamps each call with its own clock.
//! An execution is the span from an attempt's first call to its last; the checker fails on a run
//! with two overlapping executions, a run without a final status, and a run that `succeeded`
//! without its job having reported its end.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct Event {
    pub run: String,
    pub attempt: u32,
    pub what: String,
    pub at: Instant,
}

pub struct Recorder {
    pub port: u16,
    events: Arc<Mutex<Vec<Event>>>,
    server: JoinHandle<()>,
}

impl Recorder {
    /// Listens on every address of this machine: jobs reach it through their network's gateway.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("0.0.0.0:0").await?;
        let port = listener.local_addr()?.port();
        let events = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let events = events.clone();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let events = events.clone();
                    tokio::spawn(async move {
                        let mut request = vec![0u8; 1024];
                        let Ok(Ok(read)) =
                            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await
                        else {
                            return;
                        };
                        let at = Instant::now();
                        let line = String::from_utf8_lossy(&request[..read]).lines().next().unwrap_or("").to_owned();
                        let path = line.split(' ').nth(1).unwrap_or("");
                        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
                        if let [run, attempt, what] = parts[..] {
                            if let Ok(attempt) = attempt.parse() {
                                let event = Event { run: run.to_owned(), attempt, what: what.to_owned(), at };
                                events.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(event);
                            }
                        }
                        let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").await;
                    });
                }
            })
        };
        Ok(Self { port, events, server })
    }

    /// A job script that reports its start, a beat every tenth of a second for about `quarters`
    /// quarter seconds, and its end; it fails if the recorder cannot be reached at its start or end.
    /// Beats this close leave no overlap of two executions longer than a tenth of a second unseen.
    pub fn script(&self, quarters: u32) -> String {
        format!(
            r#"{say}
say start || exit 3
i=0
while [ $i -lt {beats} ]; do say beat; sleep 0.1; i=$((i + 1)); done
say end || exit 4"#,
            say = self.say(),
            beats = quarters * 5 / 2
        )
    }

    /// A job script that reports its start, beats every tenth of a second for the seconds in the
    /// environment variable `variable` (a job parameter; timed on the container's monotonic clock),
    /// and reports its end.
    pub fn sleeping_script(&self, variable: &str) -> String {
        format!(
            r#"{say}
now() {{ read -r up _ </proc/uptime; echo "${{up%.*}}${{up#*.}}"; }}
say start || exit 3
end=$(( $(now) + ${variable} * 100 ))
while [ "$(now)" -lt "$end" ]; do say beat; sleep 0.1; done
say end || exit 4"#,
            say = self.say()
        )
    }

    /// The shell function `say WHAT` that reports to the recorder through the network's gateway.
    fn say(&self) -> String {
        format!(
            r#"GW=$(ip route | awk '/^default/ {{print $3}}')
say() {{ printf 'GET /%s/%s/%s HTTP/1.0\r\n\r\n' "$CIMASTER_RUN_ID" "$CIMASTER_ATTEMPT" "$1" | nc -w 2 "$GW" {port} >/dev/null; }}"#,
            port = self.port
        )
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Attempts of `run` that reported at least their start.
    pub fn started(&self, run: &str) -> usize {
        let events = self.events.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut attempts: Vec<u32> = events.iter().filter(|e| e.run == run).map(|e| e.attempt).collect();
        attempts.dedup();
        attempts.sort_unstable();
        attempts.dedup();
        attempts.len()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// One attempt's execution as its job reported it.
#[derive(Debug, Clone)]
pub struct Execution {
    pub attempt: u32,
    pub first: Instant,
    pub last: Instant,
    pub ended: bool,
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub runs: usize,
    /// Runs that needed more than one attempt.
    pub retried: usize,
    pub lost: Vec<String>,
    pub double: Vec<String>,
    pub unfinished_successes: Vec<String>,
    /// Per run: the executions, by attempt.
    pub executions: BTreeMap<String, Vec<Execution>>,
}

impl Verdict {
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty() && self.double.is_empty() && self.unfinished_successes.is_empty()
    }

    pub fn summary(&self, scenario: &str) -> String {
        format!(
            "{scenario}: runs {}, retried {}, lost {}, double {}, succeeded without an end {}",
            self.runs,
            self.retried,
            self.lost.len(),
            self.double.len(),
            self.unfinished_successes.len()
        )
    }
}

/// Reads the history against the runs' final rows: (run id, status, attempt).
pub fn check(events: &[Event], runs: &[(String, String, u32)]) -> Verdict {
    let mut verdict = Verdict { runs: runs.len(), ..Default::default() };
    for (run, status, attempt) in runs {
        let mut by_attempt: BTreeMap<u32, Execution> = BTreeMap::new();
        for event in events.iter().filter(|e| &e.run == run) {
            let execution = by_attempt.entry(event.attempt).or_insert(Execution {
                attempt: event.attempt,
                first: event.at,
                last: event.at,
                ended: false,
            });
            execution.first = execution.first.min(event.at);
            execution.last = execution.last.max(event.at);
            execution.ended |= event.what == "end";
        }
        let executions: Vec<Execution> = by_attempt.into_values().collect();
        if matches!(status.as_str(), "queued" | "running") {
            verdict.lost.push(run.clone());
        }
        if *attempt > 1 {
            verdict.retried += 1;
        }
        let overlapping = executions
            .iter()
            .enumerate()
            .any(|(i, a)| executions[i + 1..].iter().any(|b| a.first <= b.last && b.first <= a.last));
        if overlapping {
            verdict.double.push(run.clone());
        }
        let final_ended = executions.iter().any(|e| e.attempt == *attempt && e.ended);
        if status == "succeeded" && !final_ended {
            verdict.unfinished_successes.push(run.clone());
        }
        verdict.executions.insert(run.clone(), executions);
    }
    verdict
}

/// Runs queued or running.
pub async fn open_runs(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')").fetch_one(pool).await
}

/// Every run's (id, status, attempt), as [`check`] reads them.
pub async fn runs(pool: &sqlx::PgPool) -> Result<Vec<(String, String, u32)>, sqlx::Error> {
    let runs: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT id::text, status, attempt FROM runs ORDER BY id").fetch_all(pool).await?;
    Ok(runs.into_iter().map(|(id, status, attempt)| (id, status, attempt.max(1) as u32)).collect())
}
