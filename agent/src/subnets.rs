//! Subnets for run networks from a range of the agent's own (`CIMASTER_AGENT_NETWORK_POOL`), instead
//! of the engine's default address pools, which hold about 31 bridge networks per engine — fewer than
//! an agent's concurrent runs can need. The range is cut into /27 blocks (30 addresses: the job, its
//! services and a probe); an agent tries them in turn from a starting point of its own, and a block
//! the engine reports as taken (by another agent's network, or anything else) is skipped.

use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// The prefix length of each run network's subnet.
pub const BLOCK_PREFIX: u32 = 27;

/// A range of IPv4 addresses for run networks, e.g. `10.240.0.0/16`.
#[derive(Debug, Clone)]
pub struct SubnetPool {
    base: u32,
    blocks: u32,
    next: Arc<AtomicU32>,
}

impl FromStr for SubnetPool {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let usage = || format!("`{value}` is not an IPv4 range like 10.240.0.0/16 (at most /{BLOCK_PREFIX})");
        let (address, prefix) = value.split_once('/').ok_or_else(usage)?;
        let address: Ipv4Addr = address.parse().map_err(|_| usage())?;
        let prefix: u32 = prefix.parse().map_err(|_| usage())?;
        if !(8..=BLOCK_PREFIX).contains(&prefix) {
            return Err(usage());
        }
        let mask = u32::MAX << (32 - prefix);
        let base = u32::from(address);
        if base & !mask != 0 {
            return Err(format!("`{value}` has host bits set; the range starts at {}", Ipv4Addr::from(base & mask)));
        }
        Ok(Self { base, blocks: 1 << (BLOCK_PREFIX - prefix), next: Arc::default() })
    }
}

impl SubnetPool {
    /// Starts this agent's tries at a point of its own, so agents sharing an engine and a range
    /// seldom try the same blocks.
    pub fn starting_for(self, agent: &str) -> Self {
        let spread = agent.bytes().fold(2166136261u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(16777619));
        self.next.store(spread % self.blocks, Ordering::Relaxed);
        self
    }

    /// How many subnets the range holds.
    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    /// The next subnet to try, in CIDR form; the blocks come round again after the last.
    pub fn next(&self) -> String {
        let block = self.next.fetch_add(1, Ordering::Relaxed) % self.blocks;
        let address = Ipv4Addr::from(self.base + (block << (32 - BLOCK_PREFIX)));
        format!("{address}/{BLOCK_PREFIX}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_cut_into_blocks_tried_in_turn() {
        let pool: SubnetPool = "10.240.0.0/25".parse().unwrap();
        assert_eq!(pool.blocks(), 4);
        let tried: Vec<String> = (0..5).map(|_| pool.next()).collect();
        assert_eq!(tried, ["10.240.0.0/27", "10.240.0.32/27", "10.240.0.64/27", "10.240.0.96/27", "10.240.0.0/27"]);
    }

    #[test]
    fn agents_start_at_points_of_their_own() {
        let a = "10.240.0.0/16".parse::<SubnetPool>().unwrap().starting_for("agent-a");
        let b = "10.240.0.0/16".parse::<SubnetPool>().unwrap().starting_for("agent-b");
        assert_ne!(a.next(), b.next());
    }

    #[test]
    fn ranges_that_cannot_hold_a_block_or_are_not_ranges_are_refused() {
        for bad in ["10.240.0.0", "10.240.0.0/28", "10.240.0.1/16", "10.240.0.0/x", "fd00::/64", "10.240.0.0/4"] {
            let error = bad.parse::<SubnetPool>().unwrap_err();
            assert!(error.contains(bad.split('/').next().unwrap()), "{bad}: {error}");
        }
    }
}
