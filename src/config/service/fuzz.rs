//! Property tests: the parsers never panic, whatever the text.

use super::*;
use proptest::prelude::*;

fn defaults() -> Defaults {
    Defaults { node: "n".into(), address: "10.0.0.1".into(), backend: BackendKind::Etcd, damping: Default::default() }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary text never panics the service-file parser.
    #[test]
    fn service_parser_never_panics(text in "\\PC{0,400}") {
        let _ = parse(Path::new("f.toml"), &text, &defaults());
    }

    /// TOML-shaped input with real keys and random values never panics,
    /// and every error it gives names the file.
    #[test]
    fn service_parser_toml_shaped(
        name in "[a-z/ ]{0,6}", port in any::<i64>(), ttl in "[-0-9a-z]{0,5}",
        mode in "[a-z]{0,6}", rise in any::<i64>(), extra in "[a-z_]{0,8}"
    ) {
        let text = format!("name = \"{name}\"\nport = {port}\nttl = \"{ttl}\"\n{extra} = 1\n[check]\nmode = \"{mode}\"\nrise = {rise}\n");
        if let Err(e) = parse(Path::new("f.toml"), &text, &defaults()) {
            for line in e.to_string().lines() {
                prop_assert!(line.starts_with("f.toml"), "{}", line);
            }
        }
    }

    /// Arbitrary text never panics the agent-config parser.
    #[test]
    fn agent_parser_never_panics(text in "\\PC{0,400}") {
        let _ = crate::config::agent::parse(Path::new("t.toml"), &text);
    }
}
