//! Following a run to its end: its console streamed live (resuming where it was when a stream
//! ends early, and starting over for a new attempt), or only its status; then the outcome.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use cimaster_common::RunStatus;
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;
use tokio::time::Instant;

use crate::client::Api;
use crate::error::{failed, CliError, Result};
use crate::output::{duration, paint, status, Style};

/// A run, by its job and id.
pub struct Target<'a> {
    pub job: &'a str,
    pub id: &'a str,
}

impl Target<'_> {
    pub fn path(&self) -> String {
        format!("/jobs/{}/runs/{}", self.job, self.id)
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.job, self.id)
    }
}

/// How to follow.
pub struct Follow {
    /// Stream the console (else only wait for the end).
    pub log: bool,
    /// Give up (exit 3) at this time; the run goes on.
    pub deadline: Option<Instant>,
    /// On Ctrl-C, abort the run instead of detaching.
    pub abort_on_interrupt: bool,
}

/// Follows the run until it ends, then prints the outcome; the exit code says how it ended.
pub async fn to_the_end(api: &Api, run: &Target<'_>, how: &Follow) -> Result<()> {
    let followed = async {
        let finished = if how.log { stream(api, run).await? } else { wait(api, run).await? };
        outcome(api, run, &finished).await
    };
    let deadline = async {
        match how.deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = followed => ended,
        () = deadline => Err(CliError::TimedOut(format!(
            "--timeout passed while run {} was still going; it goes on (`cim abort {}` stops it)",
            run.name(), run.name()
        ))),
        _ = tokio::signal::ctrl_c() => interrupted(api, run, how.abort_on_interrupt).await,
    }
}

async fn interrupted(api: &Api, run: &Target<'_>, abort: bool) -> Result<()> {
    if abort {
        api.send(api.request(Method::POST, &format!("{}/abort", run.path()))).await?;
        Err(CliError::RunAborted(format!("interrupted: run {} is being aborted", run.name())))
    } else {
        Err(CliError::Interrupted(format!(
            "interrupted: stopped following; run {} goes on. Abort it with `cim abort {}`",
            run.name(),
            run.name()
        )))
    }
}

fn ended(run: &Value) -> bool {
    run["status"].as_str().and_then(|status| status.parse::<RunStatus>().ok()).is_some_and(RunStatus::is_terminal)
}

/// Streams the console of each attempt in turn until the run has ended; returns the run.
async fn stream(api: &Api, run: &Target<'_>) -> Result<Value> {
    let mut attempt = 0;
    let mut after: u64 = 0;
    let mut stdout = std::io::stdout();
    loop {
        let current = api.get(&run.path()).await?;
        let now = current["attempt"].as_i64().unwrap_or(1);
        if now != attempt {
            if attempt != 0 {
                eprintln!(
                    "{}",
                    paint(Style::Dim, &format!("--- attempt {now} (the agent of attempt {attempt} was lost)"))
                );
            }
            attempt = now;
            after = 0;
        }
        let was_over = ended(&current);
        let path = format!("{}/results/console?attempt={attempt}&after={after}&follow={}", run.path(), !was_over);
        let response = api.send(api.request(Method::GET, &path)).await?;
        let mut body = response.bytes_stream();
        let from = after;
        while let Some(chunk) = body.next().await {
            // A stream cut short (a master replica going away) resumes from where it was.
            let Ok(chunk) = chunk else { break };
            after += chunk.len() as u64;
            stdout.write_all(&chunk).and_then(|()| stdout.flush()).map_err(|err| failed(err.to_string()))?;
        }
        if was_over {
            return Ok(current);
        }
        // The next turn reads the run again; a stream that ended with nothing new is not
        // reopened at once.
        if after == from {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Waits for the end, showing the status on stderr when it is a terminal; returns the run.
async fn wait(api: &Api, run: &Target<'_>) -> Result<Value> {
    let spinner = std::io::stderr().is_terminal();
    let frames = ['|', '/', '-', '\\'];
    let mut tick = 0;
    loop {
        let current = api.get(&run.path()).await?;
        if ended(&current) {
            if spinner {
                eprint!("\r\x1b[2K");
            }
            return Ok(current);
        }
        if spinner {
            let state = current["status"].as_str().unwrap_or("?");
            let agent = current["agent"].as_str().map(|agent| format!(" on {agent}")).unwrap_or_default();
            eprint!("\r\x1b[2K{} {} {state}{agent}", frames[tick % frames.len()], run.name());
            tick += 1;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Prints how the run ended (status, duration, failed tests) and turns it into the exit code.
async fn outcome(api: &Api, run: &Target<'_>, finished: &Value) -> Result<()> {
    let state = finished["status"].as_str().unwrap_or("?").to_owned();
    let took = match (finished["startedAt"].as_str(), finished["finishedAt"].as_str()) {
        (Some(from), Some(to)) => format!(" in {}", duration(from, to)),
        _ => String::new(),
    };
    let exit = finished["exitCode"].as_i64().map(|code| format!(", exit code {code}")).unwrap_or_default();
    let message = finished["message"].as_str().map(|message| format!(": {message}")).unwrap_or_default();
    eprintln!("{} {}{took}{exit}{message}", run.name(), status(&state));
    if let Ok(junit) = api.get(&format!("{}/results/junit", run.path())).await {
        print_junit(&junit, &mut std::io::stderr());
    }
    match state.as_str() {
        "succeeded" => Ok(()),
        "aborted" => Err(CliError::RunAborted(format!("run {} was aborted", run.name()))),
        _ => Err(CliError::RunFailed(format!("run {} ended {state}", run.name()))),
    }
}

/// The JUnit summary: totals, then each failed case with its message's first line.
pub fn print_junit(junit: &Value, out: &mut dyn Write) {
    let count = |field: &str| junit[field].as_u64().unwrap_or(0);
    let bad = count("failures") + count("errors");
    let _ = writeln!(out, "tests: {} run, {} failed, {} skipped", count("tests"), bad, count("skipped"));
    for case in junit["failed"].as_array().into_iter().flatten() {
        let name =
            [case["classname"].as_str(), case["name"].as_str()].into_iter().flatten().collect::<Vec<_>>().join(".");
        let message = case["message"].as_str().unwrap_or("").lines().next().unwrap_or("");
        let _ = writeln!(out, "  {} {name}: {message}", paint(Style::Red, case["kind"].as_str().unwrap_or("failure")));
    }
    if count("failedNotListed") > 0 {
        let _ = writeln!(out, "  … and {} more", count("failedNotListed"));
    }
}
