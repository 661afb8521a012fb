//! Sidecar services on the run's network, reachable by their names; their readiness checks; and
//! their (masked) output, kept as results once the job is done.
//!
//! TCP and HTTP checks run where the job will reach the services from, wherever the agent itself
//! runs: in the network's sandbox, whose namespace the job joins, or from a probe container on the
//! run's network when the network has no sandbox. Command checks run inside the service.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cimaster_common::results::KIND_SERVICE_LOG;
use cimaster_common::{Readiness, ServiceName, ServiceSpec};
use tokio::task::JoinHandle;

use super::output::pump_to_memory;
use super::results::Body;
use super::{Attempt, AttemptError, Stop};
use crate::docker::JobContainer;
use cimaster_store::results;

/// Between two readiness checks.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// A started sidecar and the task collecting its output.
pub(crate) struct Running {
    name: String,
    id: String,
    log: JoinHandle<Vec<u8>>,
}

impl Running {
    pub(super) fn stop_collecting(&self) {
        self.log.abort();
    }
}

impl Attempt<'_> {
    /// Starts every service, then waits for each one's readiness check.
    pub(super) async fn start_services(&mut self, services: &BTreeMap<ServiceName, ServiceSpec>) -> Result<(), Stop> {
        let network = self.network().name.clone();
        for (name, service) in services {
            self.start_service(name, service, &network).await?;
        }
        let needs_probe =
            services.values().filter_map(|s| s.ready.as_ref()).any(|r| r.tcp.is_some() || r.http.is_some());
        // Checks run where the job will: in the network's sandbox when it has one.
        let probe = match (needs_probe, self.network().sandbox.as_ref()) {
            (false, _) => None,
            (true, Some(sandbox)) => Some(sandbox.id.clone()),
            (true, None) => Some(self.start_probe(&network).await?),
        };
        for (name, service) in services {
            let Some(ready) = &service.ready else { continue };
            let Some(id) = self.held.services.iter().find(|s| s.name == name.as_str()).map(|s| s.id.clone()) else {
                continue;
            };
            let waited = self.interrupts.step(self.wait_ready(name.as_str(), &id, probe.as_deref(), ready)).await??;
            self.console.note(&format!("service {name} is ready ({:.1}s)", waited.as_secs_f64())).await;
        }
        Ok(())
    }

    async fn start_service(&mut self, name: &ServiceName, service: &ServiceSpec, network: &str) -> Result<(), Stop> {
        let failed = |source| AttemptError::Service { name: name.to_string(), source };
        let docker = &self.executor.docker;
        self.console.note(&format!("starting service {name} ({})", service.image)).await;
        self.interrupts.step(docker.ensure_image(&service.image)).await?.map_err(failed)?;
        let spec = JobContainer {
            role: format!("svc-{name}"),
            image: service.image.clone(),
            script: service.command.clone(),
            env: service.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            nano_cpus: Some((service.resources.cpus * 1e9) as i64),
            memory_bytes: Some(i64::try_from(service.resources.memory.bytes()).unwrap_or(i64::MAX)),
            network: network.to_owned(),
            aliases: vec![name.to_string()],
            ..Default::default()
        };
        let started = self.interrupts.step(docker.start_job(&self.labels, spec)).await?.map_err(failed)?;
        let id = started.id;
        self.held.containers.push(id.clone());
        let log = pump_to_memory(started.output, self.masker.clone());
        self.held.services.push(Running { name: name.to_string(), id, log });
        Ok(())
    }

    async fn start_probe(&mut self, network: &str) -> Result<String, Stop> {
        let docker = &self.executor.docker;
        let spec = JobContainer {
            role: "probe".into(),
            image: self.executor.git_image.clone(),
            script: Some("exec sleep infinity".into()),
            // It only opens connections: a sliver of a CPU and a little memory.
            nano_cpus: Some(250_000_000),
            memory_bytes: Some(64 << 20),
            network: network.to_owned(),
            ..Default::default()
        };
        self.interrupts.step(docker.ensure_image(&self.executor.git_image)).await?.map_err(AttemptError::ProbeImage)?;
        let probe = self.interrupts.step(docker.start_job(&self.labels, spec)).await?.map_err(AttemptError::Probe)?;
        self.held.containers.push(probe.id.clone());
        Ok(probe.id)
    }

    /// Checks a service until its check passes, the service exits, or the check's timeout.
    async fn wait_ready(
        &self,
        name: &str,
        id: &str,
        probe: Option<&str>,
        ready: &Readiness,
    ) -> Result<Duration, AttemptError> {
        let docker = &self.executor.docker;
        let started = Instant::now();
        let limit = Duration::from_secs(u64::from(ready.timeout_seconds));
        loop {
            if let Some(code) = docker.exited(id).await {
                return Err(AttemptError::ServiceExited { name: name.to_owned(), code });
            }
            let Some(check) = Check::of(name, id, probe, ready) else { return Ok(started.elapsed()) };
            let last = match docker.exec(check.container, check.cmd, check.env).await {
                Ok(0) => return Ok(started.elapsed()),
                Ok(code) => format!("{} failed (exit {code})", check.what),
                Err(err) => format!("{}: {err}", check.what),
            };
            if started.elapsed() >= limit {
                return Err(AttemptError::NotReady { name: name.to_owned(), seconds: limit.as_secs(), last });
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }

    /// Stops the sidecars (at once: their work is done) and keeps each one's output as a result.
    pub(super) async fn keep_service_logs(&mut self) {
        let services: Vec<Running> = self.held.services.drain(..).collect();
        let docker = &self.executor.docker;
        futures::future::join_all(services.iter().map(|service| async move {
            if let Err(err) = docker.stop(&service.id, Duration::ZERO).await {
                tracing::warn!(error = %err, service = service.name, "cannot stop the service");
            }
        }))
        .await;
        let mut stored = Vec::new();
        for service in services {
            let log = match tokio::time::timeout(Duration::from_secs(10), service.log).await {
                Ok(Ok(log)) => log,
                _ => continue,
            };
            let name = format!("{}.log", service.name);
            let body = Body::Bytes(log);
            stored.extend(self.put_result(KIND_SERVICE_LOG, &name, "text/plain; charset=utf-8", body, None).await);
        }
        let executor = self.executor;
        if let Err(err) = results::record_results(&executor.pool, self.claim, &executor.agent, &stored).await {
            tracing::error!(error = %err, "cannot record the service logs");
        }
    }
}

/// One readiness check: where it runs, what it runs, and how the console names it.
struct Check<'a> {
    container: &'a str,
    cmd: Vec<String>,
    env: Vec<String>,
    what: String,
}

impl<'a> Check<'a> {
    /// `None` when the service declares no check this agent can run.
    fn of(name: &str, service: &'a str, probe: Option<&'a str>, ready: &Readiness) -> Option<Self> {
        match (&ready.command, &ready.tcp, &ready.http, probe) {
            (Some(command), _, _, _) => Some(Check {
                container: service,
                cmd: vec!["sh".into(), "-c".into(), command.clone()],
                env: Vec::new(),
                what: format!("`{command}`"),
            }),
            (None, Some(port), _, Some(probe)) => Some(Check {
                container: probe,
                cmd: bash(PROBE_TCP),
                env: vec![format!("PROBE_HOST={name}"), format!("PROBE_PORT={port}")],
                what: format!("tcp {name}:{port}"),
            }),
            (None, None, Some(http), Some(probe)) => Some(Check {
                container: probe,
                cmd: bash(PROBE_HTTP),
                env: vec![
                    format!("PROBE_HOST={name}"),
                    format!("PROBE_PORT={}", http.port),
                    format!("PROBE_PATH={}", http.path),
                ],
                what: format!("GET http://{name}:{}{}", http.port, http.path),
            }),
            _ => None,
        }
    }
}

/// Readiness checks run by bash in the probe container: a TCP connect, and an HTTP GET answered
/// 2xx or 3xx, each within 2 s. Host, port and path arrive in the environment.
const PROBE_TCP: &str = r#"exec 3<>"/dev/tcp/$PROBE_HOST/$PROBE_PORT""#;
const PROBE_HTTP: &str = r#"exec 3<>"/dev/tcp/$PROBE_HOST/$PROBE_PORT" || exit 1
printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$PROBE_PATH" "$PROBE_HOST" >&3
read -r _ code _ <&3
[ "$code" -ge 200 ] 2>/dev/null && [ "$code" -lt 400 ]"#;

fn bash(script: &str) -> Vec<String> {
    ["timeout", "2", "bash", "-c", script].iter().map(|part| (*part).to_owned()).collect()
}
