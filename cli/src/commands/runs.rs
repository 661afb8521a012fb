//! Runs: `cim run`, `rerun`, `logs`, `abort`, `runs ls|show`, `results`, `artifacts get`.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use cimaster_common::{BranchName, CommitSha, EnvName, TriggerRequest};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::follow::{self, Follow, Target};
use crate::client::{encode, read_json, Api};
use crate::error::{failed, CliError, Result};
use crate::output::{ago, duration, status, table, text, Output};

/// A run: `JOB/ID`, or its id alone.
#[derive(clap::Args)]
pub struct RunRef {
    /// `JOB/ID`, or the run's id alone.
    run: String,
}

impl RunRef {
    /// The run's job and id (an id alone is looked up).
    async fn resolve(&self, api: &Api) -> Result<(String, String)> {
        if let Some((job, id)) = self.run.split_once('/') {
            return Ok((job.to_owned(), id.to_owned()));
        }
        let run = api.get(&format!("/runs/{}", encode(&self.run))).await?;
        Ok((text(&run, "job"), text(&run, "id")))
    }
}

/// When to stop following or waiting.
#[derive(clap::Args)]
pub struct Watch {
    /// Stream the run's console live, then print how it ended; the exit code says it.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Wait for the run to end without its log; the exit code says how it ended.
    #[arg(long, conflicts_with = "follow")]
    wait: bool,
    /// With --follow or --wait: give up after this long (exit 3), e.g. `30m`; the run goes on.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// On Ctrl-C while following, abort the run instead of leaving it running.
    #[arg(long)]
    abort_on_interrupt: bool,
}

#[derive(clap::Args)]
pub struct RunArgs {
    job: String,
    /// A parameter override, `NAME=value` (repeatable).
    #[arg(short = 'p', long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Git jobs: run the branch's newest commit.
    #[arg(long, conflicts_with = "commit")]
    branch: Option<String>,
    /// Git jobs: run this commit.
    #[arg(long)]
    commit: Option<String>,
    /// The same key returns the same run: give one when a script may run this command twice.
    #[arg(long)]
    idempotency_key: Option<String>,
    #[command(flatten)]
    watch: Watch,
    #[command(flatten)]
    output: Output,
}

pub async fn run(api: &Api, args: RunArgs) -> Result<()> {
    let request = TriggerRequest {
        commit_sha: args.commit.as_deref().map(CommitSha::parse).transpose().map_err(|err| failed(err.to_string()))?,
        branch_name: args
            .branch
            .as_deref()
            .map(BranchName::parse)
            .transpose()
            .map_err(|err| failed(err.to_string()))?,
        parameters: parameters(&args.params)?,
    };
    let body = serde_json::to_value(&request).map_err(|err| failed(err.to_string()))?;
    let path = format!("/jobs/{}/runs", encode(&args.job));
    let key = args.idempotency_key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let created = trigger(api, &path, Some(&body), &key).await?;
    started(api, &created, &args.watch, &args.output).await
}

#[derive(clap::Args)]
pub struct RerunArgs {
    #[command(flatten)]
    run: RunRef,
    #[command(flatten)]
    watch: Watch,
    #[command(flatten)]
    output: Output,
}

pub async fn rerun(api: &Api, args: RerunArgs) -> Result<()> {
    let (job, id) = args.run.resolve(api).await?;
    let path = format!("/jobs/{}/runs/{}/rerun", encode(&job), encode(&id));
    let created = trigger(api, &path, None, &uuid::Uuid::new_v4().to_string()).await?;
    started(api, &created, &args.watch, &args.output).await
}

/// `NAME=value` pairs as the API's parameters.
fn parameters(pairs: &[String]) -> Result<BTreeMap<EnvName, String>> {
    pairs
        .iter()
        .map(|pair| {
            let (name, value) =
                pair.split_once('=').ok_or_else(|| failed(format!("-p `{pair}`: give a parameter as NAME=value")))?;
            let name = EnvName::parse(name).map_err(|err| failed(format!("-p `{pair}`: {err}")))?;
            Ok((name, value.to_owned()))
        })
        .collect()
}

/// Posts the trigger, retrying with the same key when the master could not be reached or was
/// briefly unavailable: the key makes sure a retry never starts a second run.
async fn trigger(api: &Api, path: &str, body: Option<&Value>, key: &str) -> Result<Value> {
    let request = || {
        let request = api.request(Method::POST, path).header("Idempotency-Key", key);
        match body {
            Some(body) => request.json(body),
            None => request,
        }
    };
    let mut pause = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        let sent = request().send().await;
        let transient = match &sent {
            Err(err) => err.is_connect() || err.is_timeout(),
            Ok(response) => response.status() == StatusCode::SERVICE_UNAVAILABLE,
        };
        if !transient || attempt == 4 {
            return read_json(api.checked(sent).await?).await;
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
        attempt += 1;
    }
}

/// Says which run started and where to see it, then follows or waits when asked.
async fn started(api: &Api, created: &Value, watch: &Watch, output: &Output) -> Result<()> {
    let (job, id) = (text(created, "job"), text(created, "id"));
    output.print(created, |run| {
        println!("run {job}/{id} {}", status(&text(run, "status")));
        println!("  {}{}", api.base, run["links"]["self"].as_str().unwrap_or_default());
    });
    if !(watch.follow || watch.wait) {
        return Ok(());
    }
    let how = Follow {
        log: watch.follow,
        deadline: watch.timeout.map(|timeout| tokio::time::Instant::now() + timeout),
        abort_on_interrupt: watch.abort_on_interrupt,
    };
    follow::to_the_end(api, &Target { job: &job, id: &id }, &how).await
}

#[derive(clap::Args)]
pub struct LogsArgs {
    #[command(flatten)]
    run: RunRef,
    /// Follow the log live until the run ends.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Which attempt's log (default: the current one).
    #[arg(long)]
    attempt: Option<u32>,
}

pub async fn logs(api: &Api, args: LogsArgs) -> Result<()> {
    let (job, id) = args.run.resolve(api).await?;
    let run = Target { job: &job, id: &id };
    if args.follow && args.attempt.is_none() {
        let how = Follow { log: true, deadline: None, abort_on_interrupt: false };
        return match follow::to_the_end(api, &run, &how).await {
            // `logs -f` reports the log, not the run's verdict.
            Err(CliError::RunFailed(_) | CliError::RunAborted(_)) => Ok(()),
            other => other,
        };
    }
    let mut path = format!("{}/results/console?follow={}", run.path(), args.follow);
    if let Some(attempt) = args.attempt {
        path.push_str(&format!("&attempt={attempt}"));
    }
    let response = api.send(api.request(Method::GET, &path)).await?;
    let mut body = response.bytes_stream();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|err| failed(format!("the log stream broke: {err}")))?;
        stdout.write_all(&chunk).and_then(|()| stdout.flush()).map_err(|err| failed(err.to_string()))?;
    }
    Ok(())
}

pub async fn abort(api: &Api, run: RunRef) -> Result<()> {
    let (job, id) = run.resolve(api).await?;
    let answer =
        api.json(api.request(Method::POST, &format!("/jobs/{}/runs/{}/abort", encode(&job), encode(&id)))).await?;
    match text(&answer, "status").as_str() {
        "aborted" => println!("run {job}/{id} aborted"),
        other => println!("run {job}/{id} is {other}: its agent has been told to abort it"),
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum RunsCommand {
    /// Runs, newest first (every job's, or one job's).
    Ls(ListArgs),
    /// One run in full.
    Show {
        #[command(flatten)]
        run: RunRef,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// Only this job's runs.
    #[arg(long)]
    job: Option<String>,
    /// Only runs in these states, e.g. `failed,error`.
    #[arg(long)]
    status: Option<String>,
    /// Only runs of this branch.
    #[arg(long)]
    branch: Option<String>,
    /// Only runs started by this event: api, pull_request, push, comment, schedule.
    #[arg(long, value_parser = ["api", "pull_request", "push", "comment", "schedule"])]
    event: Option<String>,
    /// Only runs of this pull request.
    #[arg(long)]
    pr: Option<u64>,
    /// How many (1 to 200).
    #[arg(long, default_value_t = 20)]
    limit: u32,
    #[command(flatten)]
    output: Output,
}

pub async fn runs(api: &Api, command: RunsCommand) -> Result<()> {
    match command {
        RunsCommand::Ls(args) => {
            let mut query = vec![format!("limit={}", args.limit)];
            if let Some(job) = &args.job {
                query.push(format!("job={}", encode(job)));
            }
            if let Some(status) = &args.status {
                query.push(format!("status={}", encode(status)));
            }
            if let Some(branch) = &args.branch {
                query.push(format!("branchName={}", encode(branch)));
            }
            if let Some(event) = &args.event {
                query.push(format!("event={event}"));
            }
            if let Some(number) = args.pr {
                query.push(format!("pullRequest={number}"));
            }
            let page = api.get(&format!("/runs?{}", query.join("&"))).await?;
            args.output.print(&page, |page| {
                let rows: Vec<Vec<String>> = page["runs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|run| {
                        let took = match (run["startedAt"].as_str(), run["finishedAt"].as_str()) {
                            (Some(from), Some(to)) => duration(from, to),
                            _ => String::new(),
                        };
                        let commit: String = text(run, "commitSha").chars().take(8).collect();
                        let event = match run["pullRequest"].as_i64() {
                            Some(number) => format!("{} #{number}", text(run, "event")),
                            None => text(run, "event"),
                        };
                        vec![
                            format!("{}/{}", text(run, "job"), text(run, "id")),
                            status(&text(run, "status")),
                            took,
                            event,
                            text(run, "branchName"),
                            commit,
                            text(run, "triggeredBy"),
                            ago(&text(run, "createdAt")),
                        ]
                    })
                    .collect();
                table(&["RUN", "STATUS", "DURATION", "EVENT", "BRANCH", "COMMIT", "BY", "CREATED"], &rows);
            });
        }
        RunsCommand::Show { run, output } => {
            let (job, id) = run.resolve(api).await?;
            let run = api.get(&format!("/jobs/{}/runs/{}", encode(&job), encode(&id))).await?;
            output.print(&run, show_run);
        }
    }
    Ok(())
}

fn show_run(run: &Value) {
    let line = |label: &str, value: String| {
        if !value.is_empty() {
            println!("{:<12} {value}", format!("{label}:"));
        }
    };
    line("run", format!("{}/{}", text(run, "job"), text(run, "id")));
    line("status", status(&text(run, "status")));
    line("message", text(run, "message"));
    line("attempt", text(run, "attempt"));
    line("queue", text(run, "queue"));
    line("agent", text(run, "agent"));
    line("branch", text(run, "branchName"));
    line("commit", text(run, "commitSha"));
    line("by", text(run, "triggeredBy"));
    line("event", text(run, "event"));
    line("pull request", text(run, "pullRequest"));
    line("sender", text(run, "sender"));
    line("base", [text(run, "baseBranch"), text(run, "baseSha")].join(" ").trim().to_owned());
    line("rerun of", text(run, "rerunOf"));
    line("created", text(run, "createdAt"));
    line("started", text(run, "startedAt"));
    line("finished", text(run, "finishedAt"));
    if let (Some(from), Some(to)) = (run["startedAt"].as_str(), run["finishedAt"].as_str()) {
        line("took", duration(from, to));
    }
    line("exit code", text(run, "exitCode"));
    if let Some(parameters) = run["parameters"].as_object() {
        for (name, value) in parameters {
            line("parameter", format!("{name}={}", value.as_str().unwrap_or_default()));
        }
    }
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ResultsArgs {
    #[command(subcommand)]
    junit: Option<ResultsCommand>,
    #[command(flatten)]
    run: Option<RunRef>,
    #[command(flatten)]
    output: Output,
}

#[derive(clap::Subcommand)]
pub enum ResultsCommand {
    /// The JUnit summary: totals and each failed case with its message.
    Junit {
        #[command(flatten)]
        run: RunRef,
        #[command(flatten)]
        output: Output,
    },
}

pub async fn results(api: &Api, args: ResultsArgs) -> Result<()> {
    match (args.junit, args.run) {
        (Some(ResultsCommand::Junit { run, output }), _) => {
            let (job, id) = run.resolve(api).await?;
            let junit = api.get(&format!("/jobs/{}/runs/{}/results/junit", encode(&job), encode(&id))).await?;
            output.print(&junit, |junit| follow::print_junit(junit, &mut std::io::stdout()));
            let failed = junit["failures"].as_u64().unwrap_or(0) + junit["errors"].as_u64().unwrap_or(0);
            if failed > 0 && output.format == crate::output::Format::Table {
                return Err(CliError::RunFailed(format!("{failed} tests failed")));
            }
            Ok(())
        }
        (None, Some(run)) => {
            let (job, id) = run.resolve(api).await?;
            let list = api.get(&format!("/jobs/{}/runs/{}/results", encode(&job), encode(&id))).await?;
            args.output.print(&list, |list| {
                let rows: Vec<Vec<String>> = list["results"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|entry| {
                        vec![
                            text(entry, "kind"),
                            text(entry, "name"),
                            text(entry, "attempt"),
                            text(entry, "size"),
                            text(entry, "state"),
                        ]
                    })
                    .collect();
                table(&["KIND", "NAME", "ATTEMPT", "BYTES", "STATE"], &rows);
            });
            Ok(())
        }
        (None, None) => Err(failed("name a run: `cim results JOB/ID` or `cim results junit JOB/ID`")),
    }
}

#[derive(clap::Subcommand)]
pub enum ArtifactsCommand {
    /// Download one artifact, streamed to a file or stdout.
    Get {
        #[command(flatten)]
        run: RunRef,
        /// The artifact's path, as `cim results RUN` lists it.
        path: String,
        /// Where to write it (default: stdout).
        #[arg(short = 'o', long = "output")]
        file: Option<std::path::PathBuf>,
    },
}

pub async fn artifacts(api: &Api, command: ArtifactsCommand) -> Result<()> {
    let ArtifactsCommand::Get { run, path, file } = command;
    let (job, id) = run.resolve(api).await?;
    let segments: Vec<String> = path.trim_start_matches('/').split('/').map(encode).collect();
    let url = format!("/jobs/{}/runs/{}/results/artifacts/{}", encode(&job), encode(&id), segments.join("/"));
    let response = api.send(api.request(Method::GET, &url)).await?;
    let mut body = response.bytes_stream();
    let mut sink: Box<dyn tokio::io::AsyncWrite + Unpin> = match &file {
        Some(file) => {
            Box::new(tokio::fs::File::create(file).await.map_err(|err| failed(format!("{}: {err}", file.display())))?)
        }
        None => Box::new(tokio::io::stdout()),
    };
    let mut bytes = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|err| failed(format!("the download broke after {bytes} bytes: {err}")))?;
        bytes += chunk.len() as u64;
        sink.write_all(&chunk).await.map_err(|err| failed(err.to_string()))?;
    }
    sink.flush().await.map_err(|err| failed(err.to_string()))?;
    if let Some(file) = file {
        eprintln!("wrote {bytes} bytes to {}", file.display());
    }
    Ok(())
}
