//! The Consul backend's own unit tests.

use super::alias_leak;

#[test]
fn consul_versions_before_the_alias_check_fix_leak() {
    for v in ["1.8.7", "1.10.12", "1.11.10", "1.12.5", "1.13.2", "1.13.2+ent", "v1.9.0", "1.8.7-dev", "0.9.3"] {
        assert!(alias_leak(v), "{v}");
    }
    for v in ["1.11.11", "1.12.6", "1.13.3", "1.14.0", "1.14", "1.21.4", "2.0.0", "1.15.0-rc1"] {
        assert!(!alias_leak(v), "{v}");
    }
    for v in ["", "unknown", "1"] {
        assert!(!alias_leak(v), "{v}: no warning on a version we cannot read");
    }
}
