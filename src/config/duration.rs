//! Go-style durations ("500ms", "15s", "1m"): parsed from TOML, sent to Consul
//! in a form Go's `time.ParseDuration` accepts.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A strictly positive duration written as a Go-style string in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(pub Duration);

/// Parse a Go-style duration; zero and negative values are rejected.
pub fn parse(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(format!("duration \"{text}\" is negative"));
    }
    let d = humantime::parse_duration(trimmed)
        .map_err(|e| format!("\"{text}\" is not a duration ({e}); write e.g. \"500ms\", \"15s\" or \"1m\""))?;
    if d.is_zero() {
        return Err(format!("duration \"{text}\" must be greater than zero"));
    }
    Ok(d)
}

/// Render a duration so that Go's `time.ParseDuration` reads it back exactly
/// ("90s", not "1m 30s"; sub-second values in milliseconds).
pub fn go(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let text = String::deserialize(de)?;
        parse(&text).map(GoDuration).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("2h").unwrap(), Duration::from_secs(7200));
    }

    #[test]
    fn rejects_zero_negative_and_garbage() {
        assert!(parse("0s").unwrap_err().contains("greater than zero"));
        assert!(parse("-1s").unwrap_err().contains("negative"));
        assert!(parse("soon").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn renders_for_go() {
        assert_eq!(go(Duration::from_secs(90)), "90s");
        assert_eq!(go(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go(Duration::from_nanos(5)), "5ns");
    }
}
