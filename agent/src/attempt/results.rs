//! What a run keeps: result files copied out of the stopped job container (JUnit reports, with
//! their summary, and artifacts), sidecars' logs, and the console log — each stored in S3 through
//! the agent's disk and recorded in Postgres, fenced like every write of the attempt.

use std::collections::HashSet;
use std::path::Path;

use cimaster_common::results::{JunitSummary, ListingBudget, KIND_JUNIT, MAX_LISTED_FAILURES_IN_ALL};
use cimaster_common::secrets::Masker;
use cimaster_common::storage::{console_key, result_key};
use cimaster_common::Results;

use super::{Attempt, Executor};
use crate::archive::{self, Found};
use crate::storage;
use cimaster_store::attempts::{Claim, StoredConsole};
use cimaster_store::results::{self, StoredResult};

/// The largest JUnit report the agent summarises (larger ones are kept, not read).
const MAX_SUMMARISED: u64 = 32 << 20;

/// Hides the job's secrets in everything a summary quotes from the report. A text the reader cut
/// short loses the bytes next to its cut too, where part of a secret could hide.
fn mask_summary(summary: &mut JunitSummary, masker: &Masker) {
    let hold = masker.longest().saturating_sub(1);
    let mask = |text: &mut String| {
        trim_cut_edges(text, hold);
        *text = String::from_utf8_lossy(&masker.mask(text.as_bytes())).into_owned();
    };
    for case in &mut summary.failed {
        mask(&mut case.message);
        mask(&mut case.text);
        mask(&mut case.system_out);
        mask(&mut case.system_err);
        mask(&mut case.name);
        mask(&mut case.classname);
        mask(&mut case.suite);
        if let Some(file) = case.file.as_mut() {
            mask(file);
        }
    }
}

/// Drops `hold` bytes beside a `…` that marks a cut: before it at the end, after it at the start.
fn trim_cut_edges(text: &mut String, hold: usize) {
    if let Some(cut) = text.strip_suffix('…') {
        let mut keep = cut.len().saturating_sub(hold);
        while !cut.is_char_boundary(keep) {
            keep -= 1;
        }
        *text = format!("{}…", &cut[..keep]);
    }
    if let Some(cut) = text.strip_prefix('…') {
        let mut from = hold.min(cut.len());
        while !cut.is_char_boundary(from) {
            from += 1;
        }
        *text = format!("…{}", &cut[from..]);
    }
}

/// The names result files are recorded, shown and stored in S3 under: the files' paths with the
/// job's secrets masked (a file can be named after one). A name that masking made the same as
/// another file's gets a number before its extension, so neither replaces the other.
fn masked_names(masker: &Masker, names: &[&str]) -> Vec<String> {
    let masked: Vec<String> =
        names.iter().map(|name| String::from_utf8_lossy(&masker.mask(name.as_bytes())).into_owned()).collect();
    // Names that masking left alone keep them; the others take what is free.
    let mut taken: HashSet<String> =
        names.iter().zip(&masked).filter(|(name, masked)| **name == masked.as_str()).map(|(_, m)| m.clone()).collect();
    names
        .iter()
        .zip(masked)
        .map(|(name, masked)| {
            if *name == masked {
                return masked;
            }
            let (stem, extension) = match masked.rfind('.') {
                Some(dot) if dot > masked.rfind('/').map_or(0, |slash| slash + 1) => masked.split_at(dot),
                _ => (masked.as_str(), ""),
            };
            let free = std::iter::once(masked.clone())
                .chain((2..).map(|n| format!("{stem}-{n}{extension}")))
                .find(|candidate| !taken.contains(candidate))
                .expect("numbers run out after the names do");
            taken.insert(free.clone());
            free
        })
        .collect()
}

/// A result's content: small ones in memory, collected files on disk.
pub(super) enum Body<'a> {
    Bytes(Vec<u8>),
    File(&'a Path, u64),
}

impl Attempt<'_> {
    /// Copies the files matching `results` (relative to `root`: the workspace of a git run, the
    /// working directory of a freestyle one) out of the stopped job container into S3 and records
    /// them.
    pub(super) async fn collect_results(&mut self, container: &str, root: &str, results: &Results) {
        let (junit, artifacts) = match (archive::globs(&results.junit), archive::globs(&results.artifacts)) {
            (Ok(junit), Ok(artifacts)) => (junit, artifacts),
            (Err(err), _) | (_, Err(err)) => return self.console.note(&err).await,
        };
        let claim = self.claim;
        let dir = self.executor.work_dir.join(format!("{}-{}-results", claim.run, claim.attempt));
        if let Err(err) = tokio::fs::create_dir_all(&dir).await {
            return self.console.note(&format!("cannot collect results: {err}")).await;
        }
        let reader = tokio_util::io::StreamReader::new(self.executor.docker.download(container, root));
        let selected = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                let mut skipped = Vec::new();
                let bridge = tokio_util::io::SyncIoBridge::new(reader);
                archive::select_results(bridge, &junit, &artifacts, &dir, &mut skipped).map(|found| (found, skipped))
            })
            .await
        };
        match selected {
            Ok(Ok((found, skipped))) => self.store_results(found, skipped).await,
            Ok(Err(message)) => self.console.note(&format!("cannot collect results: {}", self.masked(&message))).await,
            Err(err) => self.console.note(&format!("cannot collect results: {err}")).await,
        }
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }

    async fn store_results(&mut self, mut found: Vec<Found>, skipped: Vec<String>) {
        for why in skipped {
            self.console.note(&format!("result skipped: {}", self.masked(&why))).await;
        }
        let names = masked_names(&self.masker, &found.iter().map(|file| file.name.as_str()).collect::<Vec<_>>());
        for (file, name) in found.iter_mut().zip(names) {
            file.name = name;
        }
        let mut stored = Vec::new();
        // What the attempt's reports list together is bounded, not only each report's.
        let mut listing = ListingBudget::default();
        for file in found {
            let summary = if file.kind == KIND_JUNIT { self.junit_summary(&file, &mut listing).await } else { None };
            let content_type = archive::content_type(&file.name);
            let body = Body::File(&file.path, file.size);
            stored.extend(self.put_result(file.kind, &file.name, content_type, body, summary).await);
        }
        let names: Vec<String> = stored.iter().map(|r| format!("{} ({})", r.name, r.kind)).collect();
        self.console
            .note(&if names.is_empty() {
                "no result files matched the `results` patterns".to_owned()
            } else {
                format!("collected results: {}", names.join(", "))
            })
            .await;
        let executor = self.executor;
        if let Err(err) = results::record_results(&executor.pool, self.claim, &executor.agent, &stored).await {
            tracing::error!(error = %err, "cannot record the run's results");
        }
    }

    /// `text` (which may quote a file's path) with the job's secrets masked.
    fn masked(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.masker.mask(text.as_bytes())).into_owned()
    }

    /// The report's summary, read as a stream, with the job's secrets masked in what it quotes and
    /// only the failed cases listed that `listing` still allows.
    async fn junit_summary(&self, file: &Found, listing: &mut ListingBudget) -> Option<serde_json::Value> {
        if file.size > MAX_SUMMARISED {
            let note = format!("{} is kept but not summarised: it is over {} MiB", file.name, MAX_SUMMARISED >> 20);
            self.console.note(&note).await;
            return None;
        }
        let path = file.path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(path).map_err(|err| err.to_string())?;
            JunitSummary::read(std::io::BufReader::new(file))
        })
        .await
        .unwrap_or_else(|err| Err(err.to_string()));
        match read {
            Ok(mut summary) => {
                mask_summary(&mut summary, &self.masker);
                let dropped = listing.spend(&mut summary);
                if dropped > 0 {
                    let note = format!(
                        "{}: {dropped} failed cases are counted but not listed: a run's reports list at most \
                         {MAX_LISTED_FAILURES_IN_ALL} (and 1 MiB of them) together",
                        file.name
                    );
                    self.console.note(&note).await;
                }
                serde_json::to_value(summary).ok()
            }
            Err(why) => {
                self.console.note(&format!("{} is not a readable JUnit report: {why}", file.name)).await;
                None
            }
        }
    }

    /// Stores a result in S3 and returns it for recording. One that S3 cannot take now waits in the
    /// attempt's parcel (see `pending`) and is recorded once stored.
    pub(super) async fn put_result(
        &mut self,
        kind: &str,
        name: &str,
        content_type: &str,
        body: Body<'_>,
        summary: Option<serde_json::Value>,
    ) -> Option<StoredResult> {
        let (s3, bucket) = (&self.executor.s3, &self.executor.bucket);
        let key = result_key(self.claim.run, self.claim.attempt, kind, name);
        let (bytes, uploaded) = match &body {
            Body::Bytes(data) => (data.len() as i64, storage::put(s3, bucket, &key, data.clone(), content_type).await),
            Body::File(path, size) => (*size as i64, storage::upload(s3, bucket, &key, path, content_type).await),
        };
        let result = StoredResult {
            kind: kind.to_owned(),
            name: name.to_owned(),
            bytes,
            content_type: content_type.to_owned(),
            key,
            summary,
        };
        let Err(err) = uploaded else { return Some(result) };
        tracing::warn!(error = format!("{err:#}"), result = name, "cannot store a result in S3 now; it waits on disk");
        let parked = match body {
            Body::Bytes(data) => self.parcel.result_bytes(result, &data).await,
            Body::File(path, _) => self.parcel.result(result, path).await,
        };
        match parked {
            Ok(()) => self.console.note(&format!("{name} waits for S3 ({err}); it is stored when S3 is back")).await,
            Err(disk) => self.console.note(&format!("cannot store result {name}: {err}; nor keep it: {disk}")).await,
        }
        None
    }
}

impl Executor {
    /// Uploads the console log; `None` leaves it readable from Postgres.
    pub(super) async fn store_console(&self, claim: &Claim, path: &Path, bytes: u64) -> Option<StoredConsole> {
        let key = console_key(claim.run, claim.attempt);
        let (s3, bucket) = (&self.s3, &self.bucket);
        match storage::upload(s3, bucket, &key, path, "text/plain; charset=utf-8").await {
            Ok(()) => Some(StoredConsole { key, bytes: bytes as i64 }),
            Err(err) => {
                tracing::warn!(error = format!("{err:#}"), "cannot upload the console log now");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cimaster_common::results::FailedCase;

    #[test]
    fn a_summary_quotes_no_secret_whole_or_cut() {
        let secret = "hunter2-very-secret";
        let masker = Masker::new([secret]);
        let case = |message: String| FailedCase {
            suite: format!("suite-{secret}"),
            classname: "c".into(),
            name: "t".into(),
            kind: "failure".into(),
            message,
            text: format!("assertion failed: token == {secret}"),
            system_out: format!("…{}printed", &secret[9..]),
            system_err: format!("{secret}\n"),
            time_seconds: None,
            file: None,
            line: None,
        };
        let mut summary = JunitSummary {
            failed: vec![
                case(format!("expected {secret}, got nothing")),
                case(format!("{}{}…", "x".repeat(100), &secret[..9])),
            ],
            ..JunitSummary::default()
        };
        mask_summary(&mut summary, &masker);
        let text = serde_json::to_string(&summary).unwrap();
        assert!(text.contains("expected ***, got nothing") && text.contains("suite-***"), "{text}");
        assert!(!text.contains("hunter2"), "a secret's start survived the cut: {text}");
        assert!(!text.contains(&secret[9..]), "a secret's end survived the cut: {text}");
        assert!(summary.failed[0].text.ends_with("token == ***"), "{text}");
        assert!(summary.failed[1].message.ends_with('…'));
    }

    #[test]
    fn result_names_hide_secrets_and_stay_distinct() {
        let masker = Masker::new(["hunter2-very-secret", "other-secret-value"]);
        let names = [
            "out/token-hunter2-very-secret.txt",
            "out/token-***.txt",
            "out/token-other-secret-value.txt",
            "out/hunter2-very-secret",
            "report.xml",
            "dir.v2/eGh1bnRlcjItdmVyeS1zZWNyZXQh",
            "dir.v2/hunter2-very-secret",
            "dir.v2/other-secret-value",
        ];
        let masked = masked_names(&masker, &names);
        assert_eq!(
            masked,
            [
                "out/token-***-2.txt",
                "out/token-***.txt",
                "out/token-***-3.txt",
                "out/***",
                "report.xml",
                "dir.v2/eG***Qh",
                "dir.v2/***",
                "dir.v2/***-2"
            ]
        );
    }
}
