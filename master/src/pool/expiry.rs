//! Ends expired leases and holds. Runs in every replica: each expiry is one conditional UPDATE, so a
//! lease or hold is ended exactly once whichever replica gets there first.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::store;
use crate::ticker::Ticker;

pub async fn run_expiry(pool: PgPool, interval: Duration, cancel: CancellationToken) {
    let mut ticker = Ticker::new(interval, cancel);
    while ticker.tick().await {
        match store::expire(&pool).await {
            Ok(store::Expired { leases, holds }) if leases + holds > 0 => {
                metrics::counter!("cimaster_pool_lease_expiries_total").increment(leases);
                metrics::counter!("cimaster_pool_hold_expiries_total").increment(holds);
                tracing::info!(leases, holds, "expired pool leases and holds");
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "pool expiry pass failed"),
        }
        if let Ok(census) = store::census(&pool).await {
            for state in ["vacant", "leased", "held", "disabled"] {
                let purposes: std::collections::BTreeSet<&str> = census.iter().map(|(p, _, _)| p.as_str()).collect();
                for purpose in purposes {
                    let count = census.iter().find(|(p, s, _)| p == purpose && s == state).map_or(0, |(_, _, n)| *n);
                    metrics::gauge!("cimaster_pool_clusters", "purpose" => purpose.to_owned(), "state" => state)
                        .set(count as f64);
                }
            }
        }
    }
}
