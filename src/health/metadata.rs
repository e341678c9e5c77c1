//! The gRPC metadata a check sends on every `Check` and `Watch` (an
//! `authorization` token for a server's auth interceptor, say): values
//! written in the service file, and values read from files, re-read when
//! the file changes, so a rotated token needs no restart. A file's content
//! is never logged, nor shown in status, metrics or the registry.

use crate::config::file::FileStamp;
use crate::config::MetadataSource;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};

#[derive(Clone, Default)]
pub struct Metadata {
    entries: Arc<Vec<(AsciiMetadataKey, Source)>>,
}

enum Source {
    Value(AsciiMetadataValue),
    File { path: PathBuf, cache: Mutex<Option<(FileStamp, AsciiMetadataValue)>> },
}

impl Metadata {
    /// From a check's `[check.metadata]` and `[check.metadata_files]`. Warns
    /// (once, here) about a file readable by group or others.
    pub fn new(spec: &BTreeMap<String, MetadataSource>) -> Result<Self, String> {
        let mut entries = Vec::with_capacity(spec.len());
        for (key, source) in spec {
            let k = AsciiMetadataKey::from_bytes(key.as_bytes()).map_err(|_| format!("metadata key {key:?} is not valid"))?;
            let s = match source {
                MetadataSource::Value(v) => {
                    Source::Value(AsciiMetadataValue::try_from(v.as_str()).map_err(|_| format!("metadata value for {key:?} is not valid"))?)
                }
                MetadataSource::File(path) => {
                    warn_if_open(path);
                    Source::File { path: path.clone(), cache: Mutex::new(None) }
                }
            };
            entries.push((k, s));
        }
        Ok(Metadata { entries: Arc::new(entries) })
    }

    /// Put the metadata on a request. A file that cannot be read, or whose
    /// content is not a valid value, is an error naming the file and the key
    /// (never the content).
    pub fn apply<T>(&self, req: &mut tonic::Request<T>) -> Result<(), String> {
        for (key, source) in self.entries.iter() {
            let value = match source {
                Source::Value(v) => v.clone(),
                Source::File { path, cache } => {
                    read(path, cache).map_err(|e| format!("metadata file {} for {key}: {e}", path.display()))?
                }
            };
            req.metadata_mut().insert(key.clone(), value);
        }
        Ok(())
    }
}

/// A file's value, read again only when the file changed.
fn read(path: &Path, cache: &Mutex<Option<(FileStamp, AsciiMetadataValue)>>) -> Result<AsciiMetadataValue, String> {
    let now = FileStamp::read(path).map_err(|e| format!("cannot read it ({e})"))?;
    let mut cached = crate::backoff::lock(cache);
    if let Some((s, v)) = cached.as_ref() {
        if *s == now {
            return Ok(v.clone());
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it ({e})"))?;
    let value = AsciiMetadataValue::try_from(text.trim())
        .map_err(|_| "its content is not a valid gRPC metadata value (printable ASCII on one line)".to_string())?;
    if cached.is_some() {
        tracing::info!(file = %path.display(), "metadata file changed; sending its new content");
    }
    *cached = Some((now, value.clone()));
    Ok(value)
}

fn warn_if_open(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "metadata file is readable by group or others; chmod 600 it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(md: &Metadata) -> Result<Vec<(String, String)>, String> {
        let mut req = tonic::Request::new(());
        md.apply(&mut req)?;
        let mut v: Vec<(String, String)> =
            req.metadata().clone().into_headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string())).collect();
        v.sort();
        Ok(v)
    }

    #[test]
    fn values_and_files_are_sent_and_a_rotated_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "Bearer one\n").unwrap();
        let spec = BTreeMap::from([
            ("authorization".to_string(), MetadataSource::File(token.clone())),
            ("x-env".to_string(), MetadataSource::Value("prod".into())),
        ]);
        let md = Metadata::new(&spec).unwrap();
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(values(&md).unwrap(), vec![pair("authorization", "Bearer one"), pair("x-env", "prod")]);
        // Rotated by rename, as tools that write secrets do.
        let next = dir.path().join("token.new");
        std::fs::write(&next, "Bearer two-longer").unwrap();
        std::fs::rename(&next, &token).unwrap();
        assert_eq!(values(&md).unwrap()[0], pair("authorization", "Bearer two-longer"));
    }

    #[test]
    fn a_missing_or_bad_file_is_an_error_that_never_shows_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let md = Metadata::new(&BTreeMap::from([("authorization".to_string(), MetadataSource::File(token.clone()))])).unwrap();
        let e = values(&md).unwrap_err();
        assert!(e.contains("token for authorization: cannot read it"), "{e}");
        std::fs::write(&token, "secret\nsecond line").unwrap();
        let e = values(&md).unwrap_err();
        assert!(e.contains("not a valid gRPC metadata value") && !e.contains("secret"), "{e}");
    }
}
