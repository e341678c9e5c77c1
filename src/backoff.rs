//! The one jitter and backoff helper: every retry in tether is capped and
//! jittered so that many tasks never act in lockstep.

use rand::Rng;
use std::time::Duration;

/// `d` ± 20 %.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// Capped exponential backoff: `first`, then doubling up to `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    current: Option<Duration>,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff { first, cap: cap.max(first), current: None }
    }

    /// The next delay (unjittered): `first`, `2·first`, … up to `cap`.
    pub fn next_delay(&mut self) -> Duration {
        let d = match self.current {
            None => self.first,
            Some(d) => (d * 2).min(self.cap),
        };
        self.current = Some(d);
        d
    }

    /// Whether the last attempt failed (a delay was handed out since the last reset).
    pub fn is_retrying(&self) -> bool {
        self.current.is_some()
    }

    pub fn reset(&mut self) {
        self.current = None;
    }
}

/// Lock a mutex even if a panicking thread poisoned it: the data behind
/// tether's locks (status snapshots, shared lease ids) stays valid after any
/// single update, so poisoning must never take the agent down.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let seq: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seq, [200, 400, 800, 1000, 1000]);
        assert!(b.is_retrying());
        b.reset();
        assert!(!b.is_retrying());
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(10));
            assert!(d >= Duration::from_secs(8) && d <= Duration::from_secs(12), "{d:?}");
        }
    }
}
