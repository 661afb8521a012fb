//! The JUnit XML reader behind [`JunitSummary::read`]: a streaming state machine over the report's
//! elements that counts `<testcase>`s and keeps each failed one, bounded.

use super::{FailedCase, JunitSummary, MAX_CASE_OUTPUT, MAX_FAILURE_MESSAGE, MAX_FAILURE_TEXT, MAX_LISTED_FAILURES};

/// Reads a JUnit XML report from a stream, never holding it whole.
pub(super) fn read(xml: impl std::io::BufRead) -> Result<JunitSummary, String> {
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
            Event::Text(text) => report.text(|| text.unescape().map(|t| t.into_owned()).unwrap_or_default()),
            Event::CData(text) => report.text(|| String::from_utf8_lossy(&text).into_owned()),
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

/// What [`JunitSummary::parse`] knows at one point of the report.
#[derive(Default)]
struct JunitReader {
    summary: JunitSummary,
    /// The open <testsuite> names, innermost last.
    suites: Vec<String>,
    /// The open <testcase>.
    case: Option<OpenCase>,
    seen_root: bool,
}

/// A <testcase> being read: what it is, how it failed (if it did) and what it printed.
#[derive(Default)]
struct OpenCase {
    classname: String,
    name: String,
    time: Option<f64>,
    file: Option<String>,
    line: Option<u32>,
    failed: Option<FailedCase>,
    /// Which child element's text is being read.
    reading: Option<CaseText>,
    system_out: String,
    system_err: String,
}

#[derive(Clone, Copy)]
enum CaseText {
    Failure,
    Out,
    Err,
}

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
                let time = attr(element, b"time").parse::<f64>().ok();
                self.summary.time_seconds += time.unwrap_or(0.0);
                if !empty {
                    self.case = Some(OpenCase {
                        classname: attr(element, b"classname"),
                        name: attr(element, b"name"),
                        time,
                        file: Some(attr(element, b"file")).filter(|file| !file.is_empty()),
                        line: attr(element, b"line").parse().ok(),
                        ..OpenCase::default()
                    });
                }
            }
            b"skipped" if self.case.is_some() => self.summary.skipped += 1,
            kind @ (b"failure" | b"error") => self.fail(element, kind, empty),
            b"system-out" | b"system-err" if !empty => {
                if let Some(case) = self.case.as_mut() {
                    case.reading = Some(if name == b"system-out" { CaseText::Out } else { CaseText::Err });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A <failure> or <error> of the open case; the first one is kept (a case counts once).
    fn fail(&mut self, element: &quick_xml::events::BytesStart<'_>, kind: &[u8], empty: bool) {
        let Some(case) = self.case.as_mut() else { return };
        if case.failed.is_some() {
            return;
        }
        let kind = String::from_utf8_lossy(kind).into_owned();
        if kind == "failure" {
            self.summary.failures += 1;
        } else {
            self.summary.errors += 1;
        }
        case.failed = Some(FailedCase {
            suite: self.suites.last().cloned().unwrap_or_default(),
            classname: case.classname.clone(),
            name: case.name.clone(),
            kind,
            message: bounded(attr(element, b"message"), MAX_FAILURE_MESSAGE),
            text: String::new(),
            system_out: String::new(),
            system_err: String::new(),
            time_seconds: case.time,
            file: None,
            line: None,
        });
        if !empty {
            case.reading = Some(CaseText::Failure);
        }
    }

    /// Text inside the open case's <failure>/<error>, <system-out> or <system-err>.
    fn text(&mut self, text: impl FnOnce() -> String) {
        let Some(case) = self.case.as_mut() else { return };
        match (case.reading, case.failed.as_mut()) {
            (Some(CaseText::Failure), Some(failed)) if failed.text.len() < MAX_FAILURE_TEXT => {
                failed.text.push_str(&text());
            }
            (Some(CaseText::Out), _) => keep_tail(&mut case.system_out, &text()),
            (Some(CaseText::Err), _) => keep_tail(&mut case.system_err, &text()),
            _ => {}
        }
    }

    fn close(&mut self, name: &[u8]) {
        match name {
            b"testsuite" => {
                self.suites.pop();
            }
            b"testcase" => {
                if let Some(case) = self.case.take() {
                    self.finish(case);
                }
            }
            b"failure" | b"error" | b"system-out" | b"system-err" => {
                if let Some(case) = self.case.as_mut() {
                    case.reading = None;
                }
            }
            _ => {}
        }
    }

    /// Lists the case if it failed, with its text, output and place.
    fn finish(&mut self, case: OpenCase) {
        let Some(mut failed) = case.failed else { return };
        if self.summary.failed.len() >= MAX_LISTED_FAILURES {
            self.summary.failed_not_listed += 1;
            return;
        }
        failed.text = bounded(failed.text.trim().to_owned(), MAX_FAILURE_TEXT);
        if failed.message.is_empty() {
            let first = failed.text.lines().next().unwrap_or_default().to_owned();
            failed.message = bounded(first, MAX_FAILURE_MESSAGE);
        }
        failed.system_out = tail(case.system_out.trim_end());
        failed.system_err = tail(case.system_err.trim_end());
        (failed.file, failed.line) = match case.file {
            Some(file) => (Some(file), case.line),
            None => {
                place(&failed.message).or_else(|| place(&failed.text)).map_or((None, None), |(f, l)| (Some(f), Some(l)))
            }
        };
        self.summary.failed.push(failed);
    }
}

/// Appends `text`, keeping about the last [`MAX_CASE_OUTPUT`] bytes (cut once at the end).
fn keep_tail(kept: &mut String, text: &str) {
    kept.push_str(text);
    if kept.len() > 4 * MAX_CASE_OUTPUT {
        *kept = tail(kept);
    }
}

/// The last [`MAX_CASE_OUTPUT`] bytes of `text`, on a character boundary, marked `…` when cut.
fn tail(text: &str) -> String {
    if text.len() <= MAX_CASE_OUTPUT {
        return text.to_owned();
    }
    let mut cut = text.len() - MAX_CASE_OUTPUT;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    format!("…{}", &text[cut..])
}

/// The first `path:line` a message names, as panics (`panicked at src/lib.rs:7:5`) and
/// tracebacks (`tests/test_calc.py:12: AssertionError`) write it.
fn place(text: &str) -> Option<(String, u32)> {
    text.split(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '(' || c == ')' || c == ',').find_map(
        |word| {
            let mut parts = word.splitn(3, ':');
            let (file, line) = (parts.next()?, parts.next()?);
            let line: u32 = line.parse().ok()?;
            let looks_like_file = file.contains('.')
                && file
                    .rsplit('.')
                    .next()
                    .is_some_and(|ext| (1..=5).contains(&ext.len()) && ext.chars().all(|c| c.is_ascii_alphanumeric()))
                && !file.contains("//");
            looks_like_file.then(|| (file.to_owned(), line))
        },
    )
}

/// A text cut to `max` bytes, on a character boundary, marked `…` when cut.
fn bounded(mut message: String, max: usize) -> String {
    if message.len() > max {
        let mut cut = max;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

fn attr(element: &quick_xml::events::BytesStart<'_>, name: &[u8]) -> String {
    element
        .attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::place;

    #[test]
    fn places_are_read_from_panics_and_tracebacks() {
        assert_eq!(place("thread 't' panicked at src/lib.rs:7:9:"), Some(("src/lib.rs".into(), 7)));
        assert_eq!(place("tests/test_calc.py:12: AssertionError"), Some(("tests/test_calc.py".into(), 12)));
        assert_eq!(place("see http://example.com:80/x"), None);
        assert_eq!(place("expected 2, got 3"), None);
    }
}
