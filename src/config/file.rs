//! Reading a configuration file (the agent's, or a service's) as text.

use super::error::ConfigError;
use std::path::Path;
use std::time::SystemTime;

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

/// What tells that a file tether re-reads changed (a credential, a TLS file,
/// a token rotated in place or replaced by a rename): its modification time,
/// size and inode. The one way every re-read file is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    /// The file as it is now.
    pub fn read(path: &Path) -> std::io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileStamp { modified: m.modified().ok(), len: m.len(), inode: m.ino() })
    }

    /// The file as it is now; `None` when it cannot be looked at.
    pub fn of(path: &Path) -> Option<FileStamp> {
        Self::read(path).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::FileStamp;

    #[test]
    fn a_file_stamp_changes_with_the_content_and_with_a_rename_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert_eq!(FileStamp::of(&path), None, "no file");
        std::fs::write(&path, "one").unwrap();
        let first = FileStamp::of(&path).unwrap();
        assert_eq!(FileStamp::of(&path), Some(first), "unchanged");
        std::fs::write(&path, "longer").unwrap();
        let second = FileStamp::of(&path).unwrap();
        assert_ne!(second, first, "new content of another size");
        // Same size, written elsewhere and renamed over it (within the same
        // mtime tick, possibly): the inode tells.
        let tmp = dir.path().join("token.new");
        std::fs::write(&tmp, "LONGER").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_ne!(FileStamp::of(&path).unwrap(), second, "replaced by a rename");
    }
}
