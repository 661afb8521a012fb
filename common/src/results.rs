//! Result files a run keeps besides its console log (what a job asks for under `results:`), and the
//! JUnit summary the agent computes when it collects a report.

use serde::{de, Deserialize, Deserializer, Serialize};

#[cfg(feature = "junit")]
mod junit;

/// `results:` — globs relative to the workspace, collected after the script ends whatever its exit
/// code.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Results {
    /// JUnit XML reports, summarised by `GET …/results/junit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "globs")]
    pub junit: Vec<String>,
    /// Any other files, downloadable one by one.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "globs")]
    pub artifacts: Vec<String>,
}

impl Results {
    pub fn is_empty(&self) -> bool {
        self.junit.is_empty() && self.artifacts.is_empty()
    }
}

/// Result patterns: relative to the workspace, without `..`.
fn globs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let values = Vec::<String>::deserialize(d)?;
    for value in &values {
        if value.is_empty() || value.starts_with('/') || value.split('/').any(|part| part == "..") {
            return Err(de::Error::custom(format!(
                "result pattern `{value}` must be relative to the workspace, without `..`"
            )));
        }
    }
    Ok(values)
}

/// What kind of result file a run has.
pub const KIND_JUNIT: &str = "junit";
pub const KIND_ARTIFACT: &str = "artifact";
pub const KIND_SERVICE_LOG: &str = "service-log";

/// Totals and failed cases of one or more JUnit reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct JunitSummary {
    pub tests: u64,
    pub failures: u64,
    pub errors: u64,
    pub skipped: u64,
    /// Sum of the cases' `time` attributes, in seconds.
    pub time_seconds: f64,
    /// Cases that failed or errored, in report order: the first 500 of each report, and over all of
    /// a run's reports together at most [`MAX_LISTED_FAILURES_IN_ALL`] of about
    /// [`MAX_LISTED_BYTES_IN_ALL`] bytes.
    pub failed: Vec<FailedCase>,
    /// Failed cases beyond those listed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_not_listed: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// Failed cases listed per report; the rest are only counted.
pub const MAX_LISTED_FAILURES: usize = 500;
/// Failed cases listed over all of a run's reports together.
pub const MAX_LISTED_FAILURES_IN_ALL: usize = 500;
/// Bytes of the failed cases listed over all of a run's reports together (the cases' texts, about
/// their size as JSON). A report's listed cases can be some MiB each; a run can have many reports.
pub const MAX_LISTED_BYTES_IN_ALL: usize = 1 << 20;
/// A failure message is cut at this many bytes.
pub const MAX_FAILURE_MESSAGE: usize = 4096;

/// A failed case's text (the `<failure>`/`<error>` element's body) is cut at this many bytes.
pub const MAX_FAILURE_TEXT: usize = 8192;
/// Of a failed case's `<system-out>` and `<system-err>`, this many last bytes are kept.
pub const MAX_CASE_OUTPUT: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct FailedCase {
    pub suite: String,
    pub classname: String,
    pub name: String,
    /// `failure` or `error`.
    pub kind: String,
    /// The `message` attribute, or the text's first line when the report has none.
    pub message: String,
    /// The element's text: the assertion, the traceback or the panic (its first
    /// [`MAX_FAILURE_TEXT`] bytes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// The last [`MAX_CASE_OUTPUT`] bytes of the case's `<system-out>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system_out: String,
    /// The last [`MAX_CASE_OUTPUT`] bytes of the case's `<system-err>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system_err: String,
    /// The case's `time` attribute, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_seconds: Option<f64>,
    /// Where it failed: the case's `file` attribute, or the `path:line` a panic or traceback names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
}

impl FailedCase {
    /// About the bytes the case takes when listed: its texts.
    pub fn listed_bytes(&self) -> usize {
        let texts = [&self.suite, &self.classname, &self.name, &self.kind, &self.message, &self.text];
        let outputs = [&self.system_out, &self.system_err];
        texts.iter().chain(&outputs).map(|text| text.len()).sum::<usize>() + self.file.as_ref().map_or(0, String::len)
    }
}

/// What a run's reports may still list together: failed cases and their bytes, spent report by
/// report in order. Once a case does not fit, none after it is listed either (they are counted).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListingBudget {
    cases: usize,
    bytes: usize,
}

impl Default for ListingBudget {
    fn default() -> Self {
        ListingBudget { cases: MAX_LISTED_FAILURES_IN_ALL, bytes: MAX_LISTED_BYTES_IN_ALL }
    }
}

impl ListingBudget {
    /// Whether `case` is listed; the budget is spent by it, or for good when it does not fit.
    pub fn take(&mut self, case: &FailedCase) -> bool {
        let bytes = case.listed_bytes();
        if self.cases == 0 || bytes > self.bytes {
            *self = ListingBudget { cases: 0, bytes: 0 };
            return false;
        }
        self.cases -= 1;
        self.bytes -= bytes;
        true
    }

    /// Keeps of the summary's listed cases those the budget allows; the rest are counted as not
    /// listed. How many were dropped.
    pub fn spend(&mut self, summary: &mut JunitSummary) -> usize {
        let before = summary.failed.len();
        summary.failed.retain(|case| self.take(case));
        let dropped = before - summary.failed.len();
        summary.failed_not_listed += dropped as u64;
        dropped
    }
}

impl JunitSummary {
    /// Adds another report's totals, and of its failed cases those the run's listing budget (the
    /// cases already listed here spent part of it) still allows.
    pub fn add(&mut self, other: &JunitSummary) {
        self.tests += other.tests;
        self.failures += other.failures;
        self.errors += other.errors;
        self.skipped += other.skipped;
        self.time_seconds += other.time_seconds;
        let mut budget = ListingBudget::default();
        let fits = self.failed.iter().all(|case| budget.take(case));
        for case in &other.failed {
            if fits && budget.take(case) {
                self.failed.push(case.clone());
            } else {
                self.failed_not_listed += 1;
            }
        }
        self.failed_not_listed += other.failed_not_listed;
    }

    /// Reads a JUnit XML report (`<testsuites>` or a single `<testsuite>`), counting `<testcase>`s.
    #[cfg(feature = "junit")]
    pub fn parse(xml: &[u8]) -> Result<Self, String> {
        Self::read(xml)
    }

    /// Like [`parse`](Self::parse), from a reader: the report is streamed, never held whole.
    #[cfg(feature = "junit")]
    pub fn read(xml: impl std::io::BufRead) -> Result<Self, String> {
        junit::read(xml)
    }
}

#[cfg(all(test, feature = "junit"))]
mod tests {
    use super::*;

    #[test]
    fn counts_cases_and_keeps_failure_messages() {
        let xml = br#"<?xml version="1.0"?>
<testsuites>
  <testsuite name="math" tests="4">
    <testcase classname="math.Add" name="adds" time="0.5"/>
    <testcase classname="math.Add" name="overflows" time="0.25">
      <failure message="expected 2, got 3" type="AssertionError">trace</failure>
    </testcase>
    <testcase classname="math.Div" name="by zero"><error>panicked &amp; died</error></testcase>
    <testcase classname="math.Div" name="later"><skipped/></testcase>
  </testsuite>
</testsuites>"#;
        let summary = JunitSummary::parse(xml).unwrap();
        assert_eq!((summary.tests, summary.failures, summary.errors, summary.skipped), (4, 1, 1, 1));
        assert!((summary.time_seconds - 0.75).abs() < 1e-9);
        assert_eq!(summary.failed.len(), 2);
        assert_eq!(summary.failed[0].name, "overflows");
        assert_eq!(summary.failed[0].message, "expected 2, got 3");
        assert_eq!(summary.failed[0].suite, "math");
        assert_eq!(summary.failed[1].kind, "error");
        assert_eq!(summary.failed[1].message, "panicked & died");
    }

    #[test]
    fn many_or_long_failures_are_bounded() {
        let long = "é".repeat(5000);
        let mut xml = String::from("<testsuite name=\"s\">");
        for i in 0..(MAX_LISTED_FAILURES + 20) {
            xml.push_str(&format!("<testcase classname=\"c\" name=\"t{i}\"><failure message=\"{long}\"/></testcase>"));
        }
        xml.push_str("</testsuite>");
        let summary = JunitSummary::read(std::io::BufReader::new(xml.as_bytes())).unwrap();
        assert_eq!(summary.failures, (MAX_LISTED_FAILURES + 20) as u64, "every failure is counted");
        assert_eq!(summary.failed.len(), MAX_LISTED_FAILURES);
        assert_eq!(summary.failed_not_listed, 20);
        assert!(summary.failed.iter().all(|case| case.message.len() <= MAX_FAILURE_MESSAGE + 3));
    }

    fn failed(name: &str, message_bytes: usize) -> FailedCase {
        FailedCase {
            name: name.into(),
            kind: "failure".into(),
            message: "m".repeat(message_bytes),
            ..FailedCase::default()
        }
    }

    #[test]
    fn many_reports_list_a_bounded_number_of_failures_in_all() {
        // 40 reports of 500 failures each: 500 listed in all, the rest counted.
        let report = JunitSummary {
            tests: 500,
            failures: 500,
            failed: (0..MAX_LISTED_FAILURES).map(|i| failed(&format!("t{i}"), 10)).collect(),
            failed_not_listed: 3,
            ..JunitSummary::default()
        };
        let mut total = JunitSummary::default();
        for _ in 0..40 {
            total.add(&report);
        }
        assert_eq!((total.tests, total.failures), (20_000, 20_000), "every case is counted");
        assert_eq!(total.failed.len(), MAX_LISTED_FAILURES_IN_ALL);
        assert_eq!(total.failed_not_listed, 20_000 - MAX_LISTED_FAILURES_IN_ALL as u64 + 40 * 3);

        // Long failures: about 1 MiB in all, whatever the count.
        let long = JunitSummary {
            failures: 100,
            failed: (0..100).map(|i| failed(&format!("t{i}"), 100 << 10)).collect(),
            ..JunitSummary::default()
        };
        let mut total = JunitSummary::default();
        total.add(&long);
        total.add(&long);
        let listed: usize = total.failed.iter().map(FailedCase::listed_bytes).sum();
        assert!(listed <= MAX_LISTED_BYTES_IN_ALL, "{listed} bytes listed");
        assert_eq!(total.failed.len(), 10, "ten cases of 100 KiB fit in 1 MiB");
        assert_eq!(total.failed_not_listed, 190);
    }

    #[test]
    fn a_budget_is_spent_report_by_report_and_stops_at_the_first_case_that_does_not_fit() {
        let mut budget = ListingBudget::default();
        let mut first = JunitSummary {
            failed: (0..400).map(|i| failed(&format!("a{i}"), 10)).collect(),
            ..JunitSummary::default()
        };
        assert_eq!(budget.spend(&mut first), 0);
        let mut second = JunitSummary {
            failed: [failed("huge", 2 << 20), failed("small", 1)].into_iter().collect(),
            failed_not_listed: 1,
            ..JunitSummary::default()
        };
        assert_eq!(budget.spend(&mut second), 2, "nothing after the case that did not fit");
        assert_eq!((second.failed.len(), second.failed_not_listed), (0, 3));
        let mut third = JunitSummary { failed: vec![failed("late", 1)], ..JunitSummary::default() };
        assert_eq!(budget.spend(&mut third), 1, "the budget is spent");
    }

    #[test]
    fn keeps_each_failures_text_output_and_place() {
        let xml = br#"<testsuites tests="3" failures="1" errors="1" skipped="1">
  <testsuite name="calc">
    <testcase classname="calc_test" name="TestAdd" time="0.01">
      <failure message="Failed" type="">calc_test.go:12: expected 4, got 5
more detail</failure>
    </testcase>
    <testcase classname="my-crate" name="tests::divides" time="0.02" file="src/lib.rs" line="40">
      <error message="thread 'tests::divides' panicked at src/div.rs:7:9"><![CDATA[assertion `left == right` failed
  left: 1
 right: 2]]></error>
      <system-out>printed &lt;one&gt;
printed two</system-out>
      <system-err>warning: x</system-err>
    </testcase>
    <testcase classname="t" name="skips"><skipped message="later"/></testcase>
  </testsuite>
</testsuites>"#;
        let summary = JunitSummary::parse(xml).unwrap();
        assert_eq!((summary.tests, summary.failures, summary.errors, summary.skipped), (3, 1, 1, 1));
        let go = &summary.failed[0];
        assert_eq!(go.message, "Failed");
        assert_eq!(go.text, "calc_test.go:12: expected 4, got 5\nmore detail");
        assert_eq!((go.file.as_deref(), go.line), (Some("calc_test.go"), Some(12)));
        assert_eq!(go.time_seconds, Some(0.01));
        let rust = &summary.failed[1];
        assert_eq!(rust.kind, "error");
        assert!(rust.text.starts_with("assertion `left == right` failed\n  left: 1"), "{}", rust.text);
        assert_eq!(rust.system_out, "printed <one>\nprinted two");
        assert_eq!(rust.system_err, "warning: x");
        // The case's own attributes win over what the message names.
        assert_eq!((rust.file.as_deref(), rust.line), (Some("src/lib.rs"), Some(40)));
    }

    #[test]
    fn long_texts_keep_their_head_and_long_output_its_tail() {
        let body = "a".repeat(3 * MAX_FAILURE_TEXT);
        let out = format!("{}END", "o".repeat(10 * MAX_CASE_OUTPUT));
        let xml = format!(
            "<testsuite><testcase name=\"t\"><failure>{body}</failure><system-out>{out}</system-out></testcase></testsuite>"
        );
        let case = &JunitSummary::parse(xml.as_bytes()).unwrap().failed[0];
        assert!(case.text.len() <= MAX_FAILURE_TEXT + 3 && case.text.ends_with('…'));
        assert!(case.system_out.len() <= MAX_CASE_OUTPUT + 3 && case.system_out.ends_with("END"));
        assert!(case.system_out.starts_with('…'));
    }

    #[test]
    fn refuses_what_is_not_a_report() {
        assert!(JunitSummary::parse(b"<html></html>").unwrap_err().contains("not a JUnit report"));
        assert!(JunitSummary::parse(b"").is_err());
        assert!(JunitSummary::parse(b"<testsuite><testcase></testsuite>").is_err());
    }
}
