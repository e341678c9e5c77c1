//! A services directory → the desired set of services.
//!
//! Every scan reads the whole directory and is compared by content, so it does
//! not matter which file-system event (or none: a ConfigMap `..data` swap, a
//! periodic resync, SIGHUP) caused it. A file that stops parsing keeps its last
//! good version; its errors (all of them) are reported until it is fixed.

use super::agent::Defaults;
use super::error::{ConfigError, ConfigErrors};
use super::service::{self, ServiceSpec};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The result of one scan.
#[derive(Debug, Default)]
pub struct Scan {
    /// Desired services by id.
    pub services: BTreeMap<String, ServiceSpec>,
    /// Every problem found, each on its own (a file may have several), by file.
    pub errors: Vec<ConfigError>,
    /// Some service may be missing from `services`: the directory could not
    /// be read, or a file failed with no good version to keep (at start, or
    /// a new file).
    pub incomplete: bool,
}

/// What the services directory asks for, as the reconciler gets it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceSet {
    pub services: BTreeMap<String, ServiceSpec>,
    /// Every file was read: a registration of this node that no service
    /// describes is an orphan. While not, such records are kept as they are
    /// (a file that fails to parse must not deregister its service).
    pub complete: bool,
}

impl ServiceSet {
    /// Every file read.
    #[cfg(test)]
    pub fn complete(services: BTreeMap<String, ServiceSpec>) -> Self {
        ServiceSet { services, complete: true }
    }
}

/// Whether a directory entry is a service file: `*.toml`, not a dotfile.
pub fn is_service_file(name: &str) -> bool {
    name.ends_with(".toml") && !name.starts_with('.') && name.len() > ".toml".len()
}

/// The service files in `dir`, sorted; an error if the directory cannot be read.
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        ConfigError::new(dir, format!("cannot read services directory: {e}"), "create it, or fix services_dir in the agent config")
    })?;
    let mut files: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).filter(|e| e.file_name().to_str().is_some_and(is_service_file)).map(|e| e.path()).collect();
    files.sort();
    Ok(files)
}

/// Parse every file, then resolve duplicate ids (first file in name order wins).
/// Stateless: what `tether validate` uses.
pub fn scan_files(files: &[PathBuf], defaults: &Defaults) -> Scan {
    let parsed = files.iter().map(|f| (f.clone(), service::load(f, defaults))).collect();
    resolve(parsed, &HashMap::new())
}

/// Resolves a list of per-file results into a [`Scan`]; `keep` holds last good
/// versions to fall back to for files that failed.
fn resolve(parsed: Vec<(PathBuf, Result<ServiceSpec, ConfigErrors>)>, keep: &HashMap<PathBuf, ServiceSpec>) -> Scan {
    let mut scan = Scan::default();
    let mut owner: BTreeMap<String, PathBuf> = BTreeMap::new();
    // Files whose last good version is still running claim their id first, so
    // a new file cannot steal an id from a running service.
    let mut order: Vec<&(PathBuf, Result<ServiceSpec, ConfigErrors>)> = parsed.iter().collect();
    order.sort_by_key(|(path, r)| {
        let incumbent = matches!(r, Ok(s) if keep.get(path).is_some_and(|k| k.id == s.id));
        (!incumbent, path.clone())
    });
    for (path, result) in order {
        let spec = match result {
            Ok(spec) => spec.clone(),
            Err(e) => {
                scan.errors.extend(e.iter().cloned());
                match keep.get(path) {
                    Some(good) => good.clone(),
                    None => {
                        scan.incomplete = true;
                        continue;
                    }
                }
            }
        };
        if let Some(first) = owner.get(&spec.id) {
            scan.errors.push(ConfigError::new(
                path,
                format!("duplicate service id {:?}: {} already defines it", spec.id, first.display()),
                "give one of the two files another id (or name/port)",
            ));
            continue;
        }
        owner.insert(spec.id.clone(), path.clone());
        scan.services.insert(spec.id.clone(), spec);
    }
    scan.errors.sort_by(|a, b| a.file.cmp(&b.file));
    scan
}

/// Scans a directory again and again, keeping each file's last good version.
#[derive(Debug)]
pub struct Loader {
    dir: PathBuf,
    defaults: Defaults,
    last_good: HashMap<PathBuf, ServiceSpec>,
}

impl Loader {
    pub fn new(dir: PathBuf, defaults: Defaults) -> Self {
        Loader { dir, defaults, last_good: HashMap::new() }
    }

    /// Read the directory. If it cannot be read at all, every running service
    /// is kept as it was (an unmounted volume must not deregister everything).
    pub fn scan(&mut self) -> Scan {
        let files = match list_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                let services = self.last_good.values().map(|s| (s.id.clone(), s.clone())).collect();
                return Scan { services, errors: vec![e], incomplete: true };
            }
        };
        let parsed: Vec<_> = files.iter().map(|f| (f.clone(), service::load(f, &self.defaults))).collect();
        let scan = resolve(parsed, &self.last_good);
        self.last_good = scan.services.values().map(|s| (s.file.clone(), s.clone())).collect();
        scan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendKind;

    fn defaults() -> Defaults {
        Defaults { node: "n".into(), address: "10.0.0.1".into(), backend: BackendKind::Consul, damping: Default::default() }
    }

    #[test]
    fn keeps_last_good_and_reports_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        std::fs::write(&a, "name = \"a\"\nport = 1\n").unwrap();
        std::fs::write(dir.path().join(".hidden.toml"), "garbage").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "garbage").unwrap();
        let mut loader = Loader::new(dir.path().to_path_buf(), defaults());
        let s = loader.scan();
        assert_eq!(s.services.keys().collect::<Vec<_>>(), ["a-n-1"]);
        assert!(s.errors.is_empty() && !s.incomplete);

        std::fs::write(&a, "name = \"a\"\nport = \n").unwrap();
        let s = loader.scan();
        assert_eq!(s.services.keys().collect::<Vec<_>>(), ["a-n-1"], "last good kept");
        assert!(!s.incomplete, "nothing missing: the last good version stands in");
        assert_eq!(s.errors.len(), 1);
        assert!(s.errors[0].to_string().starts_with(&format!("{}:2:", a.display())), "{}", s.errors[0]);

        // A new file with the same id loses to the running one.
        std::fs::write(&a, "name = \"a\"\nport = 1\n").unwrap();
        std::fs::write(dir.path().join("0.toml"), "name = \"a\"\nport = 1\n").unwrap();
        let s = loader.scan();
        assert_eq!(s.services["a-n-1"].file, a);
        assert!(s.errors[0].to_string().contains("duplicate service id"), "{}", s.errors[0]);
        assert!(s.errors[0].to_string().contains("a.toml"), "{}", s.errors[0]);

        std::fs::remove_file(&a).unwrap();
        let s = loader.scan();
        assert_eq!(s.services["a-n-1"].file, dir.path().join("0.toml"));
    }

    #[test]
    fn a_file_that_fails_with_no_good_version_makes_the_scan_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "name = \"a\"\nport = 1\n").unwrap();
        std::fs::write(dir.path().join("b.toml"), "name = \"b\"\nprot = 1\n").unwrap();
        let mut loader = Loader::new(dir.path().to_path_buf(), defaults());
        let s = loader.scan();
        assert_eq!(s.services.keys().collect::<Vec<_>>(), ["a-n-1"]);
        assert!(s.incomplete, "b's service may be registered: it is not known which");
        std::fs::write(dir.path().join("b.toml"), "name = \"b\"\nport = 1\n").unwrap();
        assert!(!loader.scan().incomplete);
    }

    #[test]
    fn every_error_of_a_file_is_reported_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        std::fs::write(&a, "name = \"a\"\nport = 1\n").unwrap();
        let mut loader = Loader::new(dir.path().to_path_buf(), defaults());
        assert!(loader.scan().errors.is_empty());
        std::fs::write(&a, "name = \"a\"\nport = 1\nprot = 2\n[check]\nintervall = \"1s\"\n").unwrap();
        let s = loader.scan();
        assert_eq!(s.services.keys().collect::<Vec<_>>(), ["a-n-1"], "last good kept");
        let errors: Vec<String> = s.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with(&format!("{}:3:1: unknown field `prot`", a.display())), "{errors:?}");
        assert!(errors[1].starts_with(&format!("{}:5:1: unknown field `intervall` in [check]", a.display())), "{errors:?}");
    }

    #[test]
    fn unreadable_directory_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("d");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("a.toml"), "name = \"a\"\nport = 1\n").unwrap();
        let mut loader = Loader::new(sub.clone(), defaults());
        assert_eq!(loader.scan().services.len(), 1);
        std::fs::remove_dir_all(&sub).unwrap();
        let s = loader.scan();
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.errors.len(), 1);
        assert!(s.incomplete);
    }
}
