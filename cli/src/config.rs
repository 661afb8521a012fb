//! Named contexts in `~/.config/cimaster/config.toml` (or `$CIMASTER_CONFIG`): where the master is
//! and the token to use. The file holds tokens, so it is written readable by its owner only.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{failed, Result};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ConfigFile {
    /// The context used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Context {
    pub url: String,
    pub token: String,
}

pub fn path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CIMASTER_CONFIG") {
        return Ok(PathBuf::from(path));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").ok_or_else(|| failed("HOME is not set: set CIMASTER_CONFIG"))?)
            .join(".config"),
    };
    Ok(base.join("cimaster").join("config.toml"))
}

impl ConfigFile {
    /// The file, or an empty one when there is none yet.
    pub fn load() -> Result<Self> {
        let path = path()?;
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|err| failed(format!("{}: {err}", path.display()))),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(err) => Err(failed(format!("{}: {err}", path.display()))),
        }
    }

    /// Writes the file with mode 0600 (created so; an existing file is tightened first).
    pub fn save(&self) -> Result<()> {
        let path = path()?;
        let text = toml::to_string_pretty(self).map_err(|err| failed(err.to_string()))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|err| failed(format!("{}: {err}", dir.display())))?;
        }
        let write = || -> std::io::Result<()> {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
                options.mode(0o600);
                if path.exists() {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                }
            }
            options.open(&path)?.write_all(text.as_bytes())
        };
        write().map_err(|err| failed(format!("{}: {err}", path.display())))
    }

    /// The named context, or the current one.
    pub fn context(&self, name: Option<&str>) -> Option<(&str, &Context)> {
        let name = name.or(self.current.as_deref())?;
        self.contexts.get_key_value(name).map(|(name, context)| (name.as_str(), context))
    }
}
