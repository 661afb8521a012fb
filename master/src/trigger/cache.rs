//! A replica-local cache of freestyle job specs, so a trigger reads the job once. It is only a hint:
//! the run's insert checks the job's version, and a miss or a changed job reads it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use cimaster_common::{JobName, JobSpec};

/// A job's spec as last read by this replica. Only a hint: triggers verify version and `updated_at`
/// in the statement that inserts the run, and re-read the job when it changed.
#[derive(Clone)]
pub struct CachedJob {
    pub spec: Arc<JobSpec>,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

/// Per-replica cache of job specs, bounded in size.
#[derive(Clone, Default)]
pub struct JobCache {
    entries: Arc<Mutex<HashMap<String, CachedJob>>>,
}

impl JobCache {
    const MAX_ENTRIES: usize = 10_000;

    pub fn get(&self, name: &JobName) -> Option<CachedJob> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(name.as_str()).cloned()
    }

    pub fn put(&self, name: &JobName, job: CachedJob) -> CachedJob {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= Self::MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(name.to_string(), job.clone());
        job
    }

    pub fn forget(&self, name: &JobName) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(name.as_str());
    }
}
