//! Reading a configuration file (the agent's, or a service's) as text.

use super::error::ConfigError;
use std::path::Path;

/// Largest service file tether reads; anything bigger is a mistake.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Read a configuration file as text, with errors that say what to do.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => {
                if std::fs::symlink_metadata(path).is_ok() {
                    "it is a dangling symlink: point it at an existing file or remove it"
                } else {
                    "check the path"
                }
            }
            std::io::ErrorKind::PermissionDenied => "make it readable by the user tether runs as",
            _ => "check the file",
        };
        ConfigError::new(path, format!("cannot read file: {e}"), hint)
    })?;
    if meta.is_dir() {
        return Err(ConfigError::new(path, "is a directory, not a file", "rename or remove it"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ConfigError::new(
            path,
            format!("file is {} bytes, more than the {} bytes a service file may have", meta.len(), MAX_FILE_BYTES),
            "is this the right file? service files are a few lines of TOML",
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| {
        let hint =
            if e.kind() == std::io::ErrorKind::PermissionDenied { "make it readable by the user tether runs as" } else { "check the file" };
        ConfigError::new(path, format!("cannot read file: {e}"), hint)
    })?;
    String::from_utf8(bytes).map_err(|e| {
        ConfigError::new(
            path,
            format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
            "write the file as UTF-8 TOML",
        )
    })
}
