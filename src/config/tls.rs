//! TLS settings shared by the Consul, etcd and gRPC health clients.

use super::error::ConfigError;
use super::file::FileStamp;
use std::path::{Path, PathBuf};

/// PEM files for a TLS client. An empty value means plaintext (unless the
/// URL says https, then the system's roots are used).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsConfig {
    /// CA bundle that verifies the server (default: built-in web roots).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for mTLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name to verify the server's certificate against, if not the host.
    pub server_name: Option<String>,
}

/// The TLS keys as they appear in TOML sections.
#[derive(Debug, Default, Clone)]
pub struct RawTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub tls_server_name: Option<String>,
}

/// Loaded PEM bytes.
pub struct TlsPem {
    pub ca: Option<Vec<u8>>,
    /// (certificate chain, private key)
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsConfig {
    /// Validate raw keys; relative paths are relative to `base`.
    pub fn from_raw(file: &Path, raw: RawTls, base: &Path, section: &str) -> Result<Self, ConfigError> {
        if raw.cert_file.is_some() != raw.key_file.is_some() {
            return Err(ConfigError::new(
                file,
                format!("[{section}] cert_file and key_file go together"),
                "set both (for mTLS) or neither",
            ));
        }
        Ok(TlsConfig {
            ca_file: raw.ca_file.map(|p| base.join(p)),
            cert_file: raw.cert_file.map(|p| base.join(p)),
            key_file: raw.key_file.map(|p| base.join(p)),
            server_name: raw.tls_server_name,
        })
    }

    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.server_name.is_some()
    }

    /// Read the PEM files.
    pub fn load(&self) -> Result<TlsPem, String> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: cannot read: {e}", p.display()));
        let ca = self.ca_file.as_ref().map(read).transpose()?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Ok(TlsPem { ca, identity })
    }

    /// The files as they are now, to notice rotation.
    pub fn stamp(&self) -> Stamp {
        [&self.ca_file, &self.cert_file, &self.key_file].iter().map(|p| p.as_deref().and_then(FileStamp::of)).collect()
    }
}

impl TlsConfig {
    /// The gRPC (tonic) client TLS settings from the files, read now: the CA
    /// that verifies the server (default: the web PKI roots), the client
    /// identity for mTLS, the name to verify. Shared by the health probes and
    /// etcd (whose `TlsOptions` is this type).
    pub fn grpc_client(&self) -> Result<tonic::transport::ClientTlsConfig, String> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let pem = self.load()?;
        let mut cfg = match pem.ca {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        if let Some((cert, key)) = pem.identity {
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            cfg = cfg.domain_name(name.clone());
        }
        Ok(cfg)
    }
}

/// A [`TlsConfig`]'s files as they were ([`FileStamp`] each).
pub type Stamp = Vec<Option<FileStamp>>;

/// The one place that notices rotated TLS files: remembers the files'
/// stamps when a client was built from them.
#[derive(Debug, Clone)]
pub struct Rotation {
    stamp: Stamp,
}

impl Rotation {
    /// Remember `tls`'s files as they are now (call when building a client).
    pub fn new(tls: &TlsConfig) -> Self {
        Rotation { stamp: tls.stamp() }
    }

    /// Whether any file changed since the client was built. Does not update:
    /// call [`Rotation::new`] again once a client is rebuilt from them.
    pub fn changed(&self, tls: &TlsConfig) -> bool {
        tls.stamp() != self.stamp
    }
}
