//! Checking a trigger against its job: the right kind of ref for the job's kind, and only the
//! parameters the job declares, merged over its defaults.

use std::collections::BTreeMap;

use cimaster_common::{JobName, JobSpec, TriggerRequest};
use sha2::{Digest, Sha256};

use super::TriggerError;

/// The run's parameters: the job's defaults with the trigger's overrides.
pub fn parameters(
    job: &JobName,
    spec: &JobSpec,
    request: &TriggerRequest,
) -> Result<BTreeMap<String, String>, TriggerError> {
    check_ref(job, spec, request)?;
    let declared = spec.parameters();
    let mut parameters: BTreeMap<String, String> =
        declared.iter().map(|(name, value)| (name.to_string(), value.clone())).collect();
    for (name, value) in &request.parameters {
        if !declared.contains_key(name) {
            let known = declared.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>();
            return Err(TriggerError::Invalid(format!(
                "job `{job}` has no parameter `{name}`; it declares {}",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
        parameters.insert(name.to_string(), value.clone());
    }
    Ok(parameters)
}

/// Git jobs take exactly one of a commit and a branch; freestyle jobs take neither.
fn check_ref(job: &JobName, spec: &JobSpec, request: &TriggerRequest) -> Result<(), TriggerError> {
    let problem = match (spec, &request.commit_sha, &request.branch_name) {
        (JobSpec::Git(_), Some(_), Some(_)) => {
            format!("git job `{job}` takes either `commitSha` or `branchName`, not both")
        }
        (JobSpec::Git(_), None, None) => {
            format!("git job `{job}` needs `commitSha` (40 hex digits) or `branchName` in the body")
        }
        (JobSpec::Freestyle(_), Some(_), _) | (JobSpec::Freestyle(_), _, Some(_)) => {
            format!("freestyle job `{job}` has no repository: leave out `commitSha` and `branchName`")
        }
        _ => return Ok(()),
    };
    Err(TriggerError::Invalid(problem))
}

/// A digest of the request, kept with an idempotency key so a reuse with another body is refused.
pub fn request_hash(request: &TriggerRequest) -> String {
    let canonical = serde_json::to_vec(request).expect("a trigger request always serialises");
    hex::encode(Sha256::digest(canonical))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: serde_json::Value) -> JobSpec {
        serde_json::from_value(value).unwrap()
    }

    fn request(value: serde_json::Value) -> TriggerRequest {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn git_jobs_need_exactly_one_ref() {
        let job = JobName::parse("e2e").unwrap();
        let git = spec(json!({"kind": "git", "repository": "https://h/r"}));
        let sha = "0".repeat(40);
        assert!(parameters(&job, &git, &request(json!({"branchName": "main"}))).is_ok());
        assert!(parameters(&job, &git, &request(json!({"commitSha": sha}))).is_ok());
        let both = parameters(&job, &git, &request(json!({"commitSha": sha, "branchName": "main"})));
        assert!(both.unwrap_err().to_string().contains("not both"));
        assert!(parameters(&job, &git, &request(json!({}))).unwrap_err().to_string().contains("needs"));
    }

    #[test]
    fn parameters_override_defaults_and_unknown_ones_are_refused() {
        let job = JobName::parse("unit").unwrap();
        let free =
            spec(json!({"kind": "freestyle", "image": "b", "script": "x", "parameters": {"TARGET": "all", "N": "1"}}));
        let merged = parameters(&job, &free, &request(json!({"parameters": {"TARGET": "lib"}}))).unwrap();
        assert_eq!(merged["TARGET"], "lib");
        assert_eq!(merged["N"], "1");
        let err = parameters(&job, &free, &request(json!({"parameters": {"TARGT": "x"}}))).unwrap_err();
        assert!(err.to_string().contains("no parameter `TARGT`; it declares `N`, `TARGET`"), "{err}");
        let err = parameters(&job, &free, &request(json!({"branchName": "main"}))).unwrap_err();
        assert!(err.to_string().contains("leave out"));
    }
}
