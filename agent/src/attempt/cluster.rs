//! A test cluster for the run: leased from the pool before anything starts (waiting in the pool's
//! queue while none is vacant, which the run's message says), renewed like the run's own lease —
//! an attempt whose cluster lease cannot be renewed is stopped before the pool can hand the cluster
//! on — and released at every ending.

use std::time::Duration;

use cimaster_common::ClusterRequirement;
use cimaster_store::pool::{self, AcquireRequest, ClusterView, PoolError, ReleaseOutcome};
use tokio::task::JoinHandle;

use super::{Attempt, AttemptError, Stop};
use crate::lease::{self, Renewal};
use cimaster_store::attempts;

/// How often a waiting attempt asks the pool again.
const POLL: Duration = Duration::from_millis(500);

/// The attempt's cluster lease and the task renewing it.
pub(crate) struct Leased {
    token: i64,
    renewing: JoinHandle<()>,
}

impl Attempt<'_> {
    /// Leases a cluster and hands its name, region and labels to the job's environment.
    pub(super) async fn lease_cluster(&mut self, requirement: &ClusterRequirement) -> Result<(), Stop> {
        let (cluster, granted) = self.wait_for_cluster(requirement).await?;
        let Some(lease) = cluster.lease.clone() else {
            return Err(AttemptError::ClusterLeaseGone(cluster.name).into());
        };
        self.console.note(&format!("leased cluster {} ({}) for this run", cluster.name, cluster.region)).await;
        self.env.push(format!("CIMASTER_CLUSTER={}", cluster.name));
        self.env.push(format!("CIMASTER_CLUSTER_REGION={}", cluster.region));
        self.env
            .push(format!("CIMASTER_CLUSTER_LABELS={}", serde_json::to_string(&cluster.labels).unwrap_or_default()));
        let (pool, timing, token) = (self.executor.leases.clone(), self.executor.timing, lease.token);
        let agent = self.executor.agent.clone();
        let renew = move || {
            let (pool, agent) = (pool.clone(), agent.clone());
            async move {
                match pool::heartbeat(&pool, token, timing.lease(), pool::Actor::holder(&agent)).await {
                    Ok(_) => Ok(Renewal::Held),
                    Err(PoolError::Conflict(_) | PoolError::NotFound(_) | PoolError::NotYours(_)) => Ok(Renewal::Lost),
                    Err(err) => Err(err),
                }
            }
        };
        // The warden bounds the attempt by this lease too, from its grant on.
        self.interrupts.cluster.renewed_at(granted);
        let renewing = tokio::spawn(lease::keep("cluster", timing, granted, renew, self.interrupts.cluster.clone()));
        self.held.cluster = Some(Leased { token, renewing });
        Ok(())
    }

    /// Asks the pool until it hands out a cluster, keeping the attempt's place in its queue.
    async fn wait_for_cluster(
        &self,
        requirement: &ClusterRequirement,
    ) -> Result<(ClusterView, tokio::time::Instant), Stop> {
        let (pool, claim) = (&self.executor.pool, self.claim);
        let started = std::time::Instant::now();
        let mut request = AcquireRequest {
            purpose: requirement.purpose.clone(),
            osimage: requirement.osimage.clone(),
            job: pool::run_job(claim.run),
            build: claim.attempt.to_string(),
            holder: self.executor.agent.clone(),
            run: Some(claim.run.0),
            ttl: self.executor.timing.lease(),
            waited: Duration::ZERO,
            priority: 0,
            waiter: None,
            cluster: None,
        };
        let mut waiting = false;
        let outcome = loop {
            request.waited = started.elapsed();
            let granted = tokio::time::Instant::now();
            match pool::acquire(pool, &request).await {
                Ok(Some(lease)) => {
                    if waiting {
                        let _ = attempts::set_message(pool, claim, None).await;
                    }
                    break pool::get(pool, &lease.cluster)
                        .await
                        .map(|cluster| (cluster, granted))
                        .map_err(|err| AttemptError::Cluster(err.to_string()).into());
                }
                Ok(None) => {
                    if !waiting {
                        waiting = true;
                        let note = format!("waiting for a test cluster with purpose `{}`", requirement.purpose);
                        self.console.note(&note).await;
                        let _ = attempts::set_message(pool, claim, Some(&note)).await;
                    }
                    // Keep (or take) this attempt's place in the queue.
                    match request.waiter {
                        Some(waiter) => {
                            let _ = pool::touch(pool, waiter, self.executor.timing.lease()).await;
                        }
                        None => request.waiter = pool::enqueue(pool, &request, self.executor.timing.lease()).await.ok(),
                    }
                }
                Err(PoolError::Invalid(message)) => break Err(AttemptError::Cluster(message).into()),
                Err(err) => tracing::warn!(error = %err, "cannot lease a cluster yet"),
            }
            if let Err(stop) = self.interrupts.step(tokio::time::sleep(POLL)).await {
                break Err(stop);
            }
        };
        if let Some(waiter) = request.waiter {
            let _ = pool::dequeue(pool, waiter).await;
        }
        outcome
    }

    /// Gives the cluster back to the pool (its lease would expire anyway if this agent died).
    pub(super) async fn release_cluster(&mut self) {
        let Some(Leased { token, renewing }) = self.held.cluster.take() else { return };
        renewing.abort();
        let release = pool::release(
            &self.executor.pool,
            pool::Release::Token(token),
            ReleaseOutcome::Ok,
            pool::Actor::holder(&self.executor.agent),
            3,
        );
        match tokio::time::timeout(self.executor.timing.renew_every(), release).await {
            Ok(Ok(cluster)) => self.console.note(&format!("released cluster {}", cluster.name)).await,
            Ok(Err(err)) => tracing::warn!(error = %err, "cannot release the cluster; its lease will expire"),
            Err(_) => tracing::warn!("releasing the cluster did not answer in time; its lease will expire"),
        }
    }
}
