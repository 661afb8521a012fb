//! Agents that scale with the queue: the scaling scenario (`cimaster_e2e::scale`) at a size for the
//! test suite. `scripts/bench scale` runs it at full size.
#![allow(clippy::unwrap_used)]

mod support;

use sqlx::PgPool;
use support::scaling::{run_scenario, small};

#[sqlx::test(migrations = "../migrations")]
async fn agents_scale_up_and_back_down_with_the_queue_and_every_run_ends_once(pool: PgPool) {
    let scenario = small(false);
    let outcome = run_scenario(&pool, &scenario).await;
    assert_eq!((outcome.lost, outcome.double), (0, 0), "{outcome:#?}");
    assert_eq!(outcome.succeeded, scenario.runs, "{outcome:#?}");
    // Scale-downs drained: nothing aborted, nothing handed to another agent.
    assert_eq!((outcome.aborted, outcome.retried, outcome.agents_exited), (0, 0, 0), "{outcome:#?}");
    assert_eq!(outcome.peak_agents, scenario.max_agents, "never reached the maximum: {outcome:#?}");
    assert_eq!(outcome.final_agents, scenario.min_agents, "never came back to the minimum: {outcome:#?}");
    assert!(outcome.agents_stopped >= scenario.max_agents - scenario.min_agents, "{outcome:#?}");
}
