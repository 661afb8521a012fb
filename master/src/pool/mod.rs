//! The shared test-cluster pool: inventory, leases with fencing tokens, holds, and the event history.
//! All state is in Postgres; every operation is one statement or one short transaction, so any
//! master replica serves any request without retries.

pub mod expiry;

pub use cimaster_store::pool as store;
pub use store::{AcquireRequest, ClusterView, Lease, PoolError, ReleaseOutcome};
