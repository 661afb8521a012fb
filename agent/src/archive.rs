//! Reading the tar archives the engine gives of a container's workspace (`docker cp` form: every
//! entry under `workspace/`): the build context of a repository's Dockerfile, and the result files a
//! run keeps.

use std::collections::BTreeMap;
use std::io::Read;

use globset::{GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};

/// Largest build context sent to the engine.
pub const MAX_CONTEXT_BYTES: u64 = 512 << 20;
/// Most bytes of result files one run keeps (they pass through the agent's disk on their way to S3).
pub const MAX_RESULT_BYTES: u64 = 4 << 30;

/// The path of an entry inside the workspace, without the archive's leading `workspace/`.
fn relative(entry: &tar::Entry<'_, impl Read>) -> Option<String> {
    let path = entry.path().ok()?;
    let mut parts = path.components();
    parts.next()?;
    let rest = parts.as_path().to_str()?.trim_end_matches('/').to_owned();
    (!rest.is_empty()).then_some(rest)
}

/// A build context ready for the engine, and a digest of what it holds (paths, modes, contents —
/// not times, which differ on every checkout): the same digest means the same image.
pub struct BuildContext {
    pub tar: Vec<u8>,
    pub digest: String,
    /// The Dockerfile's path inside the context.
    pub dockerfile: String,
}

pub fn build_context(archive: impl Read, context: &str, dockerfile: &str) -> Result<BuildContext, String> {
    let context = context.trim_start_matches("./").trim_end_matches('/');
    let prefix = if context == "." || context.is_empty() { String::new() } else { format!("{context}/") };
    let inner_dockerfile = dockerfile
        .trim_start_matches("./")
        .strip_prefix(prefix.as_str())
        .ok_or_else(|| format!("build.dockerfile `{dockerfile}` must be inside build.context `{context}`"))?
        .to_owned();

    let mut files: BTreeMap<String, (u32, tar::EntryType, Vec<u8>)> = BTreeMap::new();
    let mut total = 0u64;
    let mut archive = tar::Archive::new(archive);
    for entry in archive.entries().map_err(|err| format!("cannot read the workspace: {err}"))? {
        let mut entry = entry.map_err(|err| format!("cannot read the workspace: {err}"))?;
        let Some(path) = relative(&entry) else { continue };
        let Some(inside) = path.strip_prefix(prefix.as_str()).or((prefix.is_empty()).then_some(path.as_str())) else {
            continue;
        };
        if inside.is_empty() || inside == ".git" || inside.starts_with(".git/") {
            continue;
        }
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644);
        let mut data = Vec::new();
        if kind.is_symlink() {
            let target = entry.link_name().ok().flatten().map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
            data = target.into_bytes();
        } else if kind.is_file() {
            entry.read_to_end(&mut data).map_err(|err| format!("cannot read `{path}`: {err}"))?;
        } else if !kind.is_dir() {
            continue;
        }
        total += data.len() as u64;
        if total > MAX_CONTEXT_BYTES {
            return Err(format!("the build context is larger than {} MiB", MAX_CONTEXT_BYTES >> 20));
        }
        files.insert(inside.to_owned(), (mode, kind, data));
    }
    if !files.get(&inner_dockerfile).is_some_and(|(_, kind, _)| kind.is_file()) {
        return Err(format!("build.dockerfile `{dockerfile}` does not exist in the repository"));
    }

    let mut digest = Sha256::new();
    digest.update(inner_dockerfile.as_bytes());
    let mut builder = tar::Builder::new(Vec::new());
    for (path, (mode, kind, data)) in &files {
        digest.update([0]);
        digest.update(path.as_bytes());
        digest.update(mode.to_be_bytes());
        digest.update([kind.as_byte()]);
        digest.update((data.len() as u64).to_be_bytes());
        digest.update(data);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(*kind);
        header.set_mode(*mode);
        header.set_mtime(0);
        let added = if kind.is_symlink() {
            header.set_size(0);
            builder.append_link(&mut header, path, String::from_utf8_lossy(data).as_ref())
        } else {
            header.set_size(data.len() as u64);
            builder.append_data(&mut header, path, data.as_slice())
        };
        added.map_err(|err| format!("cannot pack `{path}`: {err}"))?;
    }
    let tar = builder.into_inner().map_err(|err| format!("cannot pack the build context: {err}"))?;
    Ok(BuildContext { tar, digest: hex::encode(digest.finalize()), dockerfile: inner_dockerfile })
}

/// A result file found in the workspace, copied to `path`.
pub struct Found {
    pub kind: &'static str,
    pub name: String,
    pub path: std::path::PathBuf,
    pub size: u64,
}

pub fn globs(patterns: &[String]) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = globset::GlobBuilder::new(pattern.trim_start_matches("./"))
            .literal_separator(true)
            .build()
            .map_err(|err| format!("result pattern `{pattern}`: {err}"))?;
        set.add(glob);
    }
    set.build().map_err(|err| err.to_string())
}

/// Copies the regular files matching the JUnit or artifact patterns (a file matching both is a JUnit
/// report) into `dir`, streaming. Files beyond the run's size limit are skipped and reported in
/// `skipped`.
pub fn select_results(
    archive: impl Read,
    junit: &GlobSet,
    artifacts: &GlobSet,
    dir: &std::path::Path,
    skipped: &mut Vec<String>,
) -> Result<Vec<Found>, String> {
    let mut found = Vec::new();
    let mut total = 0u64;
    let mut archive = tar::Archive::new(archive);
    for entry in archive.entries().map_err(|err| format!("cannot read the workspace: {err}"))? {
        let mut entry = entry.map_err(|err| format!("cannot read the workspace: {err}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let Some(path) = relative(&entry) else { continue };
        let kind = if junit.is_match(&path) {
            cimaster_common::results::KIND_JUNIT
        } else if artifacts.is_match(&path) {
            cimaster_common::results::KIND_ARTIFACT
        } else {
            continue;
        };
        let size = entry.header().size().unwrap_or(0);
        if total + size > MAX_RESULT_BYTES {
            skipped
                .push(format!("{path} ({size} bytes) is beyond the run's {} GiB of results", MAX_RESULT_BYTES >> 30));
            continue;
        }
        total += size;
        // Flat names in `dir`: nothing in the archive decides where a file lands.
        let copy = dir.join(found.len().to_string());
        let mut file = std::fs::File::create(&copy).map_err(|err| format!("cannot keep `{path}`: {err}"))?;
        std::io::copy(&mut entry, &mut file).map_err(|err| format!("cannot keep `{path}`: {err}"))?;
        found.push(Found { kind, name: path, path: copy, size });
    }
    Ok(found)
}

pub fn content_type(name: &str) -> &'static str {
    let extension = name.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase()).unwrap_or_default();
    match extension.as_str() {
        "xml" => "application/xml",
        "json" => "application/json",
        "html" | "htm" => "text/html; charset=utf-8",
        "txt" | "log" | "out" => "text/plain; charset=utf-8",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace(files: &[(&str, &str, u32)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        builder.append_data(&mut dir, "workspace/", std::io::empty()).unwrap();
        for (path, text, mtime) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(u64::from(*mtime));
            builder.append_data(&mut header, format!("workspace/{path}"), text.as_bytes()).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn context_digest_ignores_times_and_git_but_not_contents() {
        let one = workspace(&[("Dockerfile", "FROM busybox", 1), ("src/a", "a", 1), (".git/HEAD", "x", 1)]);
        let later = workspace(&[("Dockerfile", "FROM busybox", 9), ("src/a", "a", 9), (".git/HEAD", "y", 9)]);
        let changed = workspace(&[("Dockerfile", "FROM busybox", 1), ("src/a", "b", 1)]);
        let a = build_context(one.as_slice(), ".", "Dockerfile").unwrap();
        let b = build_context(later.as_slice(), ".", "Dockerfile").unwrap();
        let c = build_context(changed.as_slice(), ".", "Dockerfile").unwrap();
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        let names: Vec<String> = tar::Archive::new(a.tar.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["Dockerfile", "src/a"]);
    }

    #[test]
    fn context_in_a_subdirectory() {
        let ws = workspace(&[("app/Dockerfile", "FROM busybox", 1), ("app/x", "x", 1), ("other", "o", 1)]);
        let ctx = build_context(ws.as_slice(), "app", "app/Dockerfile").unwrap();
        assert_eq!(ctx.dockerfile, "Dockerfile");
        let err = build_context(ws.as_slice(), "app", "Dockerfile").err().unwrap();
        assert!(err.contains("inside build.context"), "{err}");
        let err = build_context(ws.as_slice(), ".", "Missing.Dockerfile").err().unwrap();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn results_by_glob() {
        let ws = workspace(&[
            ("reports/junit.xml", "<testsuite/>", 1),
            ("reports/deep/other.xml", "<testsuite/>", 1),
            ("dist/app.tar.gz", "bin", 1),
            ("src/main.rs", "fn main() {}", 1),
        ]);
        let junit = globs(&["reports/*.xml".into()]).unwrap();
        let artifacts = globs(&["dist/**".into(), "reports/**".into()]).unwrap();
        let mut skipped = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        let found = select_results(ws.as_slice(), &junit, &artifacts, dir.path(), &mut skipped).unwrap();
        let got: Vec<(&str, &str)> = found.iter().map(|f| (f.kind, f.name.as_str())).collect();
        assert_eq!(std::fs::read_to_string(&found[2].path).unwrap(), "bin");
        assert_eq!(found[2].size, 3);
        assert_eq!(
            got,
            [("junit", "reports/junit.xml"), ("artifact", "reports/deep/other.xml"), ("artifact", "dist/app.tar.gz")]
        );
        assert!(skipped.is_empty());
        assert_eq!(content_type("dist/app.tar.gz"), "application/gzip");
    }
}
