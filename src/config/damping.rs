//! Flap damping settings: `[damping]` in `tether.toml` (every service's
//! defaults) and in a service file (that service's own, over the agent's).

use super::error::doc::Section;
use super::error::Errors;
use std::time::Duration;

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

/// The keys of `[damping]`.
pub(super) const KEYS: &[&str] = &["enabled", "transitions", "window", "hold", "hold_max", "writes_per_minute", "write_burst"];

const MAX_PERIOD: Duration = Duration::from_secs(3600);

/// `[damping]` as written (`None`: not written) over `base`, validated; every
/// problem goes to `errs` and leaves that setting as `base` has it.
pub(super) fn read(section: Option<Section>, base: &Damping, errs: &mut Errors) -> Damping {
    let Some(s) = section else { return *base };
    let count = |key: &str, range: std::ops::RangeInclusive<i64>, default: u32, hint: &str, errs: &mut Errors| match s.integer(key, errs) {
        None => default,
        Some(v) if range.contains(&v.value) => v.value as u32,
        Some(v) => {
            errs.at(v.span, format!("damping {key} = {} is out of range", v.value), hint);
            default
        }
    };
    let transitions = count(
        "transitions",
        3..=10_000,
        base.transitions,
        "use a count from 3 to 10000 (an ordinary restart is 2 transitions and must not count as flapping)",
        errs,
    );
    let writes_per_minute = count("writes_per_minute", 0..=60_000, base.writes_per_minute, "use 0 (no cap) to 60000", errs);
    let write_burst = count("write_burst", 1..=10_000, base.write_burst, "use a count from 1 to 10000", errs);
    let mut spans = Vec::new();
    let mut period = |key: &str, default: Duration, errs: &mut Errors| match s.duration(key, errs) {
        None => default,
        Some(v) if v.value.0 <= MAX_PERIOD => {
            spans.push((key.to_string(), v.span));
            v.value.0
        }
        Some(v) => {
            errs.at(v.span, format!("damping {key} is longer than 1h"), "use \"1h\" or less");
            default
        }
    };
    let window = period("window", base.window, errs);
    let hold = period("hold", base.hold, errs);
    let hold_max = period("hold_max", base.hold_max, errs);
    let d = Damping {
        enabled: s.boolean("enabled", errs).map_or(base.enabled, |b| b.value),
        transitions,
        window,
        hold,
        hold_max,
        writes_per_minute,
        write_burst,
    };
    if d.hold > d.hold_max {
        let span_of = |key: &str| spans.iter().find(|(k, _)| k == key).and_then(|(_, span)| span.clone());
        errs.at(
            span_of("hold_max").or_else(|| span_of("hold")).or_else(|| s.span()),
            format!("damping hold ({}) is longer than hold_max ({})", super::duration::go(d.hold), super::duration::go(d.hold_max)),
            "make hold_max at least hold",
        );
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::doc;
    use crate::config::error::suggest::Schema;
    use crate::config::error::ConfigErrors;
    use std::path::Path;

    const SCHEMA: &Schema = &[("", &["damping"]), ("damping", KEYS)];

    fn over(base: &Damping, text: &str) -> Result<Damping, ConfigErrors> {
        let path = Path::new("/etc/tether/s.toml");
        let top = doc::parse(path, text).expect("toml");
        let mut errs = Errors::new(path, text);
        let s = Section::top(&top, SCHEMA, &mut errs);
        let d = read(s.table("damping", &mut errs), base, &mut errs);
        errs.finish(d)
    }

    #[test]
    fn keys_override_the_base_and_the_rest_is_kept() {
        let base = Damping { hold: Duration::from_secs(4), ..Damping::default() };
        let d = over(&base, "[damping]\ntransitions = 5\nwindow = \"10s\"\n").expect("valid");
        assert_eq!(d, Damping { transitions: 5, window: Duration::from_secs(10), ..base });
        let off = over(&base, "[damping]\nenabled = false\n").expect("valid");
        assert!(!off.enabled);
        assert_eq!(over(&base, "").expect("valid"), base);
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

    #[test]
    fn every_problem_is_reported() {
        let text = "[damping]\ntransitions = 2\nwindow = \"2h\"\nhold = 5\nwrite_brust = 3\nenabled = \"yes\"\n";
        let e = over(&Damping::default(), text).expect_err("five problems");
        let places: Vec<_> = e.iter().map(|e| e.place).collect();
        assert_eq!(places, [Some((2, 15)), Some((3, 10)), Some((4, 8)), Some((5, 1)), Some((6, 11))], "{e}");
        assert!(e[3].to_string().contains("unknown field `write_brust` in [damping]; did you mean `write_burst`?"), "{e}");
    }
}
