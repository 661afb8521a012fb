//! What the end-to-end tests (`tests/`) and the benchmarks (`src/bin/`) share: the execution
//! history jobs report to, the product's executables started as processes, and the scaling
//! scenario.

pub mod cpu;
pub mod fake_github;
pub mod history;
pub mod processes;
pub mod scale;
