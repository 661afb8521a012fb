//! The agent's private directory: job logs while they are written, result parcels and uploads
//! still pending (kept across restarts, so its path is stable). Nobody else may read it or plant
//! files in it: it is made 0700, and a path that is a symlink or belongs to another user is refused.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WorkDirError {
    #[error("work directory {0} is not a directory (a symlink or a file); it must be the agent's own")]
    NotADirectory(PathBuf),
    #[error("work directory {path} belongs to uid {owner}, not to this agent's uid {me}")]
    Foreign { path: PathBuf, owner: u32, me: u32 },
    #[error("work directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Makes `path` (its parent must exist) or checks the one there, and leaves it 0700.
pub fn prepare(path: &Path) -> Result<PathBuf, WorkDirError> {
    let io = |source| WorkDirError::Io { path: path.to_owned(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_dir() {
                return Err(WorkDirError::NotADirectory(path.to_owned()));
            }
            let me = effective_uid().map_err(io)?;
            if meta.uid() != me {
                return Err(WorkDirError::Foreign { path: path.to_owned(), owner: meta.uid(), me });
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().mode(0o700).create(path).map_err(io)?;
        }
        Err(err) => return Err(io(err)),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    Ok(path.to_owned())
}

/// This process's effective uid: the owner Linux gives `/proc/self`.
fn effective_uid() -> std::io::Result<u32> {
    Ok(std::fs::metadata("/proc/self")?.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_or_existing_directory_ends_up_private() {
        let parent = tempfile::tempdir().unwrap();
        let fresh = parent.path().join("agent-1");
        prepare(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700, "an existing directory is made private again");
    }

    #[test]
    fn a_planted_symlink_or_file_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let elsewhere = parent.path().join("attacker");
        std::fs::create_dir(&elsewhere).unwrap();
        let link = parent.path().join("agent-1");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        assert!(matches!(prepare(&link), Err(WorkDirError::NotADirectory(_))));
        assert_eq!(mode(&elsewhere) & 0o077, 0o755 & 0o077, "the link's target is left alone");
        let file = parent.path().join("agent-2");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(prepare(&file), Err(WorkDirError::NotADirectory(_))));
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let theirs = parent.path().join("agent-1");
        std::fs::create_dir(&theirs).unwrap();
        let me = effective_uid().unwrap();
        let other = if me == 65534 { 65533 } else { 65534 };
        match std::os::unix::fs::chown(&theirs, Some(other), None) {
            Ok(()) => assert!(matches!(prepare(&theirs), Err(WorkDirError::Foreign { owner, .. }) if owner == other)),
            // Only root can give a directory away; then nobody else can have planted one either.
            Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}"),
        }
    }
}
