//! One file per group of commands.

mod follow;
pub mod jobs;
pub mod pool;
mod pool_import;
pub mod runs;
pub mod secrets;
pub mod session;
