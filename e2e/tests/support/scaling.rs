//! The scaling scenario (`cimaster_e2e::scale`) on a test's own database and queue prefix, at a
//! size for the test suite.

use std::time::Duration;

use cimaster_e2e::scale::{self, Environment, Outcome, Scenario};
use sqlx::PgPool;

/// Runs a scenario on the test's own database and queue prefix.
pub async fn run_scenario(pool: &PgPool, scenario: &Scenario) -> Outcome {
    let prefix = format!("e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let environment = Environment {
        binaries: super::binary("cimaster").parent().unwrap().to_owned(),
        database_url: super::database_url(pool),
        prefix: prefix.clone(),
        dev_script: concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/dev").into(),
    };
    let outcome = scale::run(scenario, &environment).await;
    super::delete_topology(&prefix);
    let outcome = outcome.unwrap();
    outcome.print(scenario);
    outcome
}

/// 48 runs of 0–3 s in three bursts; one to three agents of four runs each.
pub fn small(chaos: bool) -> Scenario {
    Scenario {
        runs: 48,
        min_agents: 1,
        max_agents: 3,
        runs_per_agent: 4,
        max_seconds: 3,
        bursts: 3,
        burst_every: Duration::from_secs(4),
        cooldown: Duration::from_secs(4),
        chaos,
        lease: Duration::from_secs(8),
        seed: 11,
        deadline: Duration::from_secs(240),
        baseline: false,
    }
}
