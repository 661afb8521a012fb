//! Result files a run keeps besides its console log, and the JUnit summary the agent computes when it
//! collects a report.

use serde::{Deserialize, Serialize};

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
    /// Cases that failed or errored, in report order: the first 500 of each report.
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
/// A failure message is cut at this many bytes.
pub const MAX_FAILURE_MESSAGE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct FailedCase {
    pub suite: String,
    pub classname: String,
    pub name: String,
    /// `failure` or `error`.
    pub kind: String,
    pub message: String,
}

impl JunitSummary {
    pub fn add(&mut self, other: &JunitSummary) {
        self.tests += other.tests;
        self.failures += other.failures;
        self.errors += other.errors;
        self.skipped += other.skipped;
        self.time_seconds += other.time_seconds;
        self.failed.extend(other.failed.iter().cloned());
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
        use quick_xml::events::Event;

        let mut reader = quick_xml::Reader::from_reader(xml);
        let mut report = JunitReader::default();
        let mut buf = Vec::new();
        loop {
            let event = reader
                .read_event_into(&mut buf)
                .map_err(|err| format!("not well-formed XML at byte {}: {err}", reader.buffer_position()))?;
            match event {
                Event::Start(ref e) => report.open(e, false)?,
                Event::Empty(ref e) => report.open(e, true)?,
                Event::Text(text) => report.text(|| text.unescape().map(|t| t.trim().to_owned()).unwrap_or_default()),
                Event::CData(text) => report.text(|| String::from_utf8_lossy(&text).trim().to_owned()),
                Event::End(e) => report.close(e.name().as_ref()),
                Event::Eof => break,
                _ => {}
            }
            buf.clear();
        }
        if !report.seen_root {
            return Err("not a JUnit report: the file is empty".into());
        }
        Ok(report.summary)
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

    #[test]
    fn refuses_what_is_not_a_report() {
        assert!(JunitSummary::parse(b"<html></html>").unwrap_err().contains("not a JUnit report"));
        assert!(JunitSummary::parse(b"").is_err());
        assert!(JunitSummary::parse(b"<testsuite><testcase></testsuite>").is_err());
    }
}

/// What [`JunitSummary::parse`] knows at one point of the report.
#[cfg(feature = "junit")]
#[derive(Default)]
struct JunitReader {
    summary: JunitSummary,
    /// The open <testsuite> names, innermost last.
    suites: Vec<String>,
    /// The open <testcase>: (classname, name).
    case: Option<(String, String)>,
    /// An open <failure>/<error> collecting its text.
    failing: Option<FailedCase>,
    seen_root: bool,
}

#[cfg(feature = "junit")]
impl JunitReader {
    fn open(&mut self, element: &quick_xml::events::BytesStart<'_>, empty: bool) -> Result<(), String> {
        let name = element.name().as_ref().to_vec();
        if !self.seen_root {
            self.seen_root = true;
            if name != b"testsuites" && name != b"testsuite" {
                return Err("not a JUnit report: the root element is neither testsuites nor testsuite".into());
            }
        }
        match name.as_slice() {
            b"testsuite" if !empty => self.suites.push(attr(element, b"name")),
            b"testcase" => {
                self.summary.tests += 1;
                self.summary.time_seconds += attr(element, b"time").parse::<f64>().unwrap_or(0.0);
                if !empty {
                    self.case = Some((attr(element, b"classname"), attr(element, b"name")));
                }
            }
            b"skipped" if self.case.is_some() => self.summary.skipped += 1,
            kind @ (b"failure" | b"error") if self.case.is_some() => self.fail(element, kind, empty),
            _ => {}
        }
        Ok(())
    }

    fn fail(&mut self, element: &quick_xml::events::BytesStart<'_>, kind: &[u8], empty: bool) {
        let (classname, name) = self.case.clone().unwrap_or_default();
        let kind = String::from_utf8_lossy(kind).into_owned();
        if kind == "failure" {
            self.summary.failures += 1;
        } else {
            self.summary.errors += 1;
        }
        if self.summary.failed.len() >= MAX_LISTED_FAILURES {
            self.summary.failed_not_listed += 1;
            return;
        }
        let suite = self.suites.last().cloned().unwrap_or_default();
        let failed = FailedCase { suite, classname, name, kind, message: bounded(attr(element, b"message")) };
        if empty {
            self.summary.failed.push(failed);
        } else {
            self.failing = Some(failed);
        }
    }

    /// Text inside an open <failure>/<error> without a `message` becomes its message.
    fn text(&mut self, text: impl FnOnce() -> String) {
        if let Some(failed) = self.failing.as_mut().filter(|f| f.message.is_empty()) {
            failed.message = bounded(text());
        }
    }

    fn close(&mut self, name: &[u8]) {
        match name {
            b"testsuite" => {
                self.suites.pop();
            }
            b"testcase" => self.case = None,
            b"failure" | b"error" => self.summary.failed.extend(self.failing.take()),
            _ => {}
        }
    }
}

/// A message cut to [`MAX_FAILURE_MESSAGE`] bytes, on a character boundary.
#[cfg(feature = "junit")]
fn bounded(mut message: String) -> String {
    if message.len() > MAX_FAILURE_MESSAGE {
        let mut cut = MAX_FAILURE_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

#[cfg(feature = "junit")]
fn attr(element: &quick_xml::events::BytesStart<'_>, name: &[u8]) -> String {
    element
        .attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
        .unwrap_or_default()
}
