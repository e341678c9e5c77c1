//! Flap damping settings: `[damping]` in `tether.toml` (every service's
//! defaults) and in a service file (that service's own, over the agent's).

use super::duration::GoDuration;
use super::error::ConfigError;
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

/// How a service's transitions are damped (see `reconcile/core/damping.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Damping {
    /// Flap detection and the hold; `false` turns both off (the write budget stays).
    pub enabled: bool,
    /// This many passing/critical transitions ...
    pub transitions: u32,
    /// ... within this long make a service flapping.
    pub window: Duration,
    /// A flapping service is held critical until SERVING without a break this long.
    pub hold: Duration,
    /// A repeat episode doubles the hold, up to this; each quiet `hold_max` halves it again.
    pub hold_max: Duration,
    /// Sustained cap on one service's registry writes; 0 = no cap.
    pub writes_per_minute: u32,
    /// Writes a service may make at once before the cap applies.
    pub write_burst: u32,
}

impl Default for Damping {
    fn default() -> Self {
        Damping {
            enabled: true,
            transitions: 8,
            window: Duration::from_secs(30),
            hold: Duration::from_secs(10),
            hold_max: Duration::from_secs(5 * 60),
            writes_per_minute: 30,
            write_burst: 10,
        }
    }
}

/// `[damping]` as written: every key optional, each over a base.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDamping {
    enabled: Option<bool>,
    transitions: Option<Spanned<i64>>,
    window: Option<Spanned<GoDuration>>,
    hold: Option<Spanned<GoDuration>>,
    hold_max: Option<Spanned<GoDuration>>,
    writes_per_minute: Option<Spanned<i64>>,
    write_burst: Option<Spanned<i64>>,
}

const MAX_PERIOD: Duration = Duration::from_secs(3600);

impl RawDamping {
    /// These settings over `base`, validated. Errors name `path:line:col` in `text`.
    pub(super) fn over(self, base: &Damping, path: &Path, text: &str) -> Result<Damping, ConfigError> {
        let err = |span: std::ops::Range<usize>, msg: String, hint: &str| ConfigError::new(path, msg, hint).at(text, Some(span));
        let count = |v: &Option<Spanned<i64>>, key: &str, range: std::ops::RangeInclusive<i64>, default: u32, hint: &str| match v {
            None => Ok(default),
            Some(v) if range.contains(v.get_ref()) => Ok(*v.get_ref() as u32),
            Some(v) => Err(err(v.span(), format!("damping {key} = {} is out of range", v.get_ref()), hint)),
        };
        let period = |v: &Option<Spanned<GoDuration>>, key: &str, default: Duration| match v {
            None => Ok(default),
            Some(v) if v.get_ref().0 <= MAX_PERIOD => Ok(v.get_ref().0),
            Some(v) => Err(err(v.span(), format!("damping {key} is longer than 1h"), "use \"1h\" or less")),
        };
        let d = Damping {
            enabled: self.enabled.unwrap_or(base.enabled),
            transitions: count(
                &self.transitions,
                "transitions",
                3..=10_000,
                base.transitions,
                "use a count from 3 to 10000 (an ordinary restart is 2 transitions and must not count as flapping)",
            )?,
            window: period(&self.window, "window", base.window)?,
            hold: period(&self.hold, "hold", base.hold)?,
            hold_max: period(&self.hold_max, "hold_max", base.hold_max)?,
            writes_per_minute: count(
                &self.writes_per_minute,
                "writes_per_minute",
                0..=60_000,
                base.writes_per_minute,
                "use 0 (no cap) to 60000",
            )?,
            write_burst: count(&self.write_burst, "write_burst", 1..=10_000, base.write_burst, "use a count from 1 to 10000")?,
        };
        if d.hold > d.hold_max {
            let span = self.hold_max.as_ref().or(self.hold.as_ref()).map(Spanned::span).unwrap_or(0..0);
            return Err(err(
                span,
                format!("damping hold ({}) is longer than hold_max ({})", super::duration::go(d.hold), super::duration::go(d.hold_max)),
                "make hold_max at least hold",
            ));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        damping: RawDamping,
    }

    fn over(base: &Damping, text: &str) -> Result<Damping, ConfigError> {
        let f: File = toml::from_str(text).expect("toml");
        f.damping.over(base, Path::new("/etc/tether/s.toml"), text)
    }

    #[test]
    fn keys_override_the_base_and_the_rest_is_kept() {
        let base = Damping { hold: Duration::from_secs(4), ..Damping::default() };
        let d = over(&base, "[damping]\ntransitions = 5\nwindow = \"10s\"\n").expect("valid");
        assert_eq!(d, Damping { transitions: 5, window: Duration::from_secs(10), ..base });
        let off = over(&base, "[damping]\nenabled = false\n").expect("valid");
        assert!(!off.enabled);
    }

    #[test]
    fn errors_name_the_place_and_what_to_do() {
        let e = over(&Damping::default(), "[damping]\ntransitions = 2\n").expect_err("2 is a restart").to_string();
        assert!(e.contains("s.toml:2:15") && e.contains("out of range") && e.contains("restart"), "{e}");
        let e = over(&Damping::default(), "[damping]\nhold = \"10m\"\nhold_max = \"1m\"\n").expect_err("hold > max").to_string();
        assert!(e.contains("s.toml:3:12") && e.contains("hold_max"), "{e}");
        let e = over(&Damping::default(), "[damping]\nwindow = \"2h\"\n").expect_err("too long").to_string();
        assert!(e.contains("s.toml:2:10"), "{e}");
    }
}
