//! JUnit reports written by real tools, read back: pytest's `--junitxml` (a `<testsuites>` root
//! whose errors and skips are apart from its failures, tracebacks in the element's text) and
//! cargo-nextest's JUnit output (the panic in the text, the test's output beside it).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use cimaster_common::results::JunitSummary;

fn run(command: &mut Command) -> std::process::Output {
    let output =
        command.output().unwrap_or_else(|err| panic!("cannot run {command:?}: {err} (scripts/dev installs it)"));
    assert!(output.status.code().is_some(), "{command:?} was killed");
    output
}

#[test]
fn a_pytest_report_keeps_failures_errors_and_skips_apart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("test_calc.py"),
        r#"import pytest

def test_adds():
    assert 1 + 1 == 2

def test_carries():
    print("computing 9+1")
    assert 9 + 1 == 11, "carry lost"

@pytest.fixture
def broken():
    raise RuntimeError("fixture exploded")

def test_uses_broken(broken):
    pass

@pytest.mark.skip(reason="later")
def test_later():
    pass
"#,
    )
    .unwrap();
    // Debian's pytest (scripts/dev installs python3-pytest), whatever `python3` is first on PATH.
    let output = run(Command::new("pytest-3").current_dir(dir.path()).args([
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_logging=all",
        "--junitxml=report.xml",
        "test_calc.py",
    ]));
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stdout));
    let report = std::fs::read(dir.path().join("report.xml")).unwrap();
    let summary = JunitSummary::parse(&report).unwrap();
    assert_eq!((summary.tests, summary.failures, summary.errors, summary.skipped), (4, 1, 1, 1), "{summary:?}");

    let failed = summary.failed.iter().find(|case| case.kind == "failure").unwrap();
    assert_eq!((failed.classname.as_str(), failed.name.as_str()), ("test_calc", "test_carries"));
    assert!(failed.message.contains("carry lost"), "{failed:?}");
    assert!(failed.text.contains("assert (9 + 1) == 11"), "the traceback is kept: {failed:?}");
    assert!(failed.system_out.contains("computing 9+1"), "{failed:?}");
    assert_eq!(failed.file.as_deref(), Some("test_calc.py"), "{failed:?}");
    assert_eq!(failed.line, Some(8), "{failed:?}");
    assert!(failed.time_seconds.is_some());

    let errored = summary.failed.iter().find(|case| case.kind == "error").unwrap();
    assert_eq!(errored.name, "test_uses_broken");
    assert!(errored.text.contains("fixture exploded"), "{errored:?}");
}

#[test]
fn a_nextest_report_keeps_the_panic_and_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let write = |path: &str, text: &str| {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("Cargo.toml", "[package]\nname = \"calc\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n");
    write(
        "src/lib.rs",
        r#"#[cfg(test)]
mod tests {
    #[test]
    fn adds() {
        assert_eq!(1 + 1, 2);
    }

    #[test]
    fn carries() {
        println!("computing 9+1");
        assert_eq!(9 + 1, 11, "carry lost");
    }
}
"#,
    );
    write(".config/nextest.toml", "[profile.default.junit]\npath = \"junit.xml\"\n");
    let target = dir.path().join("target");
    let output = run(Command::new("cargo")
        .current_dir(dir.path())
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .args(["nextest", "run", "--offline", "--no-fail-fast"]));
    assert_eq!(output.status.code(), Some(100), "{}", String::from_utf8_lossy(&output.stderr));
    let report = std::fs::read(Path::new(&target).join("nextest/default/junit.xml")).unwrap();
    let summary = JunitSummary::parse(&report).unwrap();
    assert_eq!((summary.tests, summary.failures, summary.errors, summary.skipped), (2, 1, 0, 0), "{summary:?}");
    let failed = &summary.failed[0];
    assert_eq!(failed.name, "tests::carries");
    assert!(
        failed.text.contains("carry lost") && failed.text.contains("left: 10"),
        "the assertion is kept: {failed:?}"
    );
    assert_eq!((failed.file.as_deref(), failed.line), (Some("src/lib.rs"), Some(11)), "{failed:?}");
    let output = format!("{}{}", failed.system_out, failed.system_err);
    assert!(output.contains("computing 9+1"), "{failed:?}");
}
