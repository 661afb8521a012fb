//! One file per group of commands.

mod follow;
pub mod jobs;
pub mod pool;
pub mod runs;
pub mod secrets;
pub mod session;
