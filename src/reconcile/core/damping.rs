//! Flap damping of one service, and its write budget. Pure: every call is
//! given `now`.
//!
//! - **Detection**: `transitions` passing/critical changes within `window`
//!   make the service *flapping* (an episode starts). Until then every
//!   transition goes to the registry as fast as without damping.
//! - **Hold**: while flapping the service is critical in the registry with a
//!   fixed reason (a fixed reason, so the episode itself writes once); it
//!   comes back only after SERVING without a break for the hold.
//! - **Repeats**: an episode that starts within `hold_max` of the last one's
//!   end doubles the hold (up to `hold_max`); otherwise each full `hold_max`
//!   of quiet since then halves it again.
//! - **Budget**: a token bucket per service (`write_burst` at once,
//!   `writes_per_minute` sustained). A write it holds back is not dropped: the
//!   service is reconciled again when the next token comes, and then writes
//!   whatever is latest.

use crate::config::damping::Damping;
use crate::health::Status;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Default)]
pub(super) struct Flap {
    /// Times of the latest transitions, at most `transitions` of them.
    recent: VecDeque<Instant>,
    pub(super) episode: Option<Episode>,
    /// The last episode's doubling exponent and end, for repeats.
    level: u32,
    last_end: Option<Instant>,
}

#[derive(Debug, Clone)]
pub(super) struct Episode {
    pub(super) started: Instant,
    /// Transitions in the window when it started, and how long they took.
    pub(super) transitions: u32,
    pub(super) over: Duration,
    pub(super) hold: Duration,
    /// SERVING without a break since, if SERVING now.
    pub(super) serving_since: Option<Instant>,
    /// Transitions since it started (none reached the registry).
    pub(super) suppressed: u64,
}

impl Episode {
    /// The reason the registry shows while it lasts (fixed for the episode).
    pub(super) fn reason(&self) -> String {
        format!(
            "flapping: {} transitions in {}; held until SERVING for {}",
            self.transitions,
            round(self.over),
            humantime::format_duration(self.hold)
        )
    }

    /// When it ends if the service stays SERVING.
    pub(super) fn ends_at(&self) -> Option<Instant> {
        self.serving_since.map(|t| t + self.hold)
    }
}

impl Flap {
    /// A passing/critical transition of the probe's health. Returns whether it
    /// started an episode.
    pub(super) fn transition(&mut self, to: Status, s: &Damping, now: Instant) -> bool {
        if let Some(ep) = &mut self.episode {
            ep.suppressed += 1;
            ep.serving_since = (to == Status::Passing).then_some(now);
            return false;
        }
        if !s.enabled {
            return false;
        }
        let n = s.transitions as usize;
        self.recent.push_back(now);
        while self.recent.len() > n {
            self.recent.pop_front();
        }
        let first = *self.recent.front().expect("just pushed");
        if self.recent.len() < n || now.duration_since(first) > s.window {
            return false;
        }
        self.recent.clear();
        // Doubling stops at the first level that reaches hold_max.
        let mut top = 0;
        while top < 20 && s.hold.saturating_mul(1 << top) < s.hold_max {
            top += 1;
        }
        self.level = match self.last_end {
            None => 0,
            Some(end) => match (now.duration_since(end).as_millis() / s.hold_max.as_millis().max(1)) as u32 {
                0 => (self.level + 1).min(top),
                quiet => self.level.saturating_sub(quiet),
            },
        };
        let hold = s.hold.saturating_mul(1 << self.level).min(s.hold_max.max(s.hold));
        self.episode = Some(Episode {
            started: now,
            transitions: s.transitions,
            over: now.duration_since(first),
            hold,
            serving_since: (to == Status::Passing).then_some(now),
            suppressed: 0,
        });
        true
    }

    /// Whether the service is held out of the healthy set at `now`.
    pub(super) fn held(&self, now: Instant) -> Option<&Episode> {
        self.episode.as_ref().filter(|ep| ep.ends_at().is_none_or(|t| now < t))
    }

    /// End the episode if its hold has passed (or damping was turned off); returns it.
    pub(super) fn settle(&mut self, s: &Damping, now: Instant) -> Option<Episode> {
        let over = self.episode.as_ref().is_some_and(|ep| !s.enabled || ep.ends_at().is_some_and(|t| now >= t));
        if !over {
            return None;
        }
        self.last_end = Some(now);
        self.episode.take()
    }
}

/// Round to what a person reads: milliseconds under 10 s, else seconds.
pub(super) fn round(d: Duration) -> humantime::FormattedDuration {
    let d = if d < Duration::from_secs(10) { Duration::from_millis(d.as_millis() as u64) } else { Duration::from_secs(d.as_secs()) };
    humantime::format_duration(d)
}

/// A token bucket of registry writes.
#[derive(Debug)]
pub(super) struct Budget {
    tokens: f64,
    at: Instant,
}

impl Budget {
    pub(super) fn full(s: &Damping, now: Instant) -> Self {
        Budget { tokens: f64::from(s.write_burst), at: now }
    }

    /// Take a token if there is one; else say when the next one comes.
    pub(super) fn take(&mut self, s: &Damping, now: Instant) -> Result<(), Instant> {
        if s.writes_per_minute == 0 {
            return Ok(());
        }
        let per_sec = f64::from(s.writes_per_minute) / 60.0;
        let burst = f64::from(s.write_burst);
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * per_sec).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        // At least a millisecond: a token short by a rounding error would
        // otherwise come "now", and its timer fire, find no token, and be set
        // for "now" again, for ever.
        Err(now + Duration::from_secs_f64((1.0 - self.tokens) / per_sec).max(Duration::from_millis(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A bucket a rounding error short of a token waits a moment, never
    /// "until now" (a timer for now that finds no token is set again for now).
    #[test]
    fn the_next_token_is_always_later() {
        let s = Damping::default();
        let now = Instant::now();
        let mut b = Budget { tokens: 1.0 - 1e-12, at: now };
        let at = b.take(&s, now).unwrap_err();
        assert!(at > now);
        assert!(b.take(&s, at).is_ok(), "there by then");
    }

    /// Toggle every `every` from `start`, `n` times; returns when the last was.
    fn toggle(f: &mut Flap, s: &Damping, start: Instant, every: Duration, n: u32) -> (Instant, Vec<bool>) {
        let mut t = start;
        let mut started = vec![];
        for i in 0..n {
            t += every;
            let to = if i % 2 == 0 { Status::Critical } else { Status::Passing };
            started.push(f.transition(to, s, t));
        }
        (t, started)
    }

    #[test]
    fn an_ordinary_restart_is_not_flapping() {
        let s = Damping::default();
        let mut f = Flap::default();
        let t0 = Instant::now();
        // Down, then up a few seconds later; twice in the window.
        for (i, to) in [Status::Critical, Status::Passing, Status::Critical, Status::Passing].into_iter().enumerate() {
            assert!(!f.transition(to, &s, t0 + Duration::from_secs(3 * i as u64)));
        }
        assert!(f.held(t0 + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn the_threshold_starts_an_episode_held_until_serving_for_the_hold() {
        let s = Damping::default();
        let mut f = Flap::default();
        let t0 = Instant::now();
        let (t, started) = toggle(&mut f, &s, t0, ms(25), 20);
        // The first transitions are not damped; the 8th starts it.
        assert_eq!(started.iter().position(|&b| b), Some(7));
        let ep = f.held(t).expect("flapping");
        assert_eq!(ep.suppressed, 12);
        assert_eq!(ep.reason(), "flapping: 8 transitions in 175ms; held until SERVING for 10s");
        // The 20th transition was to passing: held until 10 s of SERVING.
        assert_eq!(ep.ends_at(), Some(t + s.hold));
        assert!(f.settle(&s, t + s.hold - ms(1)).is_none());
        f.transition(Status::Critical, &s, t + ms(5000));
        assert!(f.held(t + s.hold).is_some(), "a break restarts the hold");
        f.transition(Status::Passing, &s, t + ms(6000));
        assert!(f.held(t + ms(6000) + s.hold).is_none());
        assert_eq!(f.settle(&s, t + ms(6000) + s.hold).map(|e| e.suppressed), Some(14));
        assert!(f.episode.is_none());
    }

    #[test]
    fn a_repeat_episode_doubles_the_hold_and_quiet_halves_it() {
        let s = Damping::default();
        let mut f = Flap::default();
        let mut t = Instant::now();
        let mut holds = vec![];
        for quiet in [0, 1, 1, 1, 1, 1, 1, 2 * 300 + 1] {
            t += Duration::from_secs(quiet);
            // 8 transitions, the last to passing, then SERVING for the hold.
            let (end, _) = toggle(&mut f, &s, t, ms(25), 8);
            let hold = f.episode.as_ref().expect("flapping").hold;
            holds.push(hold.as_secs());
            t = end + hold;
            assert!(f.settle(&s, t).is_some());
        }
        assert_eq!(holds, [10, 20, 40, 80, 160, 300, 300, 80]);
    }

    #[test]
    fn turned_off_it_never_starts_and_ends_an_episode_at_once() {
        let off = Damping { enabled: false, ..Damping::default() };
        let mut f = Flap::default();
        let t0 = Instant::now();
        let (t, started) = toggle(&mut f, &off, t0, ms(25), 40);
        assert!(started.iter().all(|b| !b));
        let on = Damping::default();
        let (t, _) = toggle(&mut f, &on, t, ms(25), 9);
        assert!(f.held(t).is_some());
        assert!(f.settle(&off, t).is_some());
    }

    #[test]
    fn the_budget_allows_a_burst_then_the_sustained_rate() {
        let s = Damping { writes_per_minute: 60, write_burst: 3, ..Damping::default() };
        let t0 = Instant::now();
        let mut b = Budget::full(&s, t0);
        assert!((0..3).all(|_| b.take(&s, t0).is_ok()));
        assert_eq!(b.take(&s, t0), Err(t0 + Duration::from_secs(1)));
        assert!(b.take(&s, t0 + Duration::from_secs(1)).is_ok());
        let unlimited = Damping { writes_per_minute: 0, ..s };
        assert!((0..100).all(|_| b.take(&unlimited, t0).is_ok()));
    }
}
