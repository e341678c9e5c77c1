//! Deadlines that cost the idle agent one wake-up each.
//!
//! tokio's timer wheel (1.x) counts whole milliseconds from the moment the
//! runtime was built and files a timer by how far off it is: a level of 1 ms
//! slots for the next 64 ms, then a level of 64 ms slots (up to 4.096 s),
//! then of 4.096 s slots, and so on. A level is processed at the start of its
//! next occupied slot; its timers due later are moved down a level. So a 1 s
//! timer wakes the thread at the start of its 64 ms slot and again when due,
//! and one that crosses a 4.096 s boundary a third time. A deadline *on* the
//! 64 ms grid is due when its 64 ms slot starts and fires there: one wake-up
//! instead of two, two instead of three (waits past a 4.096 s boundary,
//! which all waits of 5 s or more are, still stop once at the 4.096 s level).
//!
//! The periodic timers of an idle agent (a connection's liveness check, a
//! poll-mode check, the heartbeat, the reconciler's tick unless it paces
//! systemd's watchdog, anti-entropy, the rescan) take
//! their deadlines from [`after`] and [`at`]: moved to the nearest point of
//! that grid, at most 32 ms away, for waits of half a second or more. The grid's
//! origin is the runtime's start, noted by [`runtime_built`] just after the
//! build, within microseconds of tokio's own (up to a millisecond would do). Without it (tests, other
//! runtimes) deadlines are left as they are; if tokio changes its wheel, this
//! only stops saving wake-ups. Measured in ARCHITECTURE.md, "One thread".

use std::sync::OnceLock;
use std::time::Duration;
use tokio::time::Instant;

/// A slot of the wheel's second level.
const SLOT: Duration = Duration::from_millis(64);
/// Shorter waits are left as they are: half a slot would be too much of them.
const MIN_WAIT: Duration = Duration::from_millis(500);

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Notes the runtime's start. Call right after building the runtime.
pub fn runtime_built() {
    let _ = ORIGIN.set(Instant::now());
}

/// A deadline `wait` from now, on the wheel's grid when that is known.
pub fn after(wait: Duration) -> Instant {
    let now = Instant::now();
    place(ORIGIN.get().copied(), now, now + wait)
}

/// `deadline`, on the wheel's grid when that is known and it is half a
/// second or more away.
pub fn at(deadline: Instant) -> Instant {
    place(ORIGIN.get().copied(), Instant::now(), deadline)
}

fn place(origin: Option<Instant>, now: Instant, deadline: Instant) -> Instant {
    match origin {
        Some(origin) if deadline.saturating_duration_since(now) >= MIN_WAIT => on_grid(origin, deadline),
        _ => deadline,
    }
}

/// `deadline` moved to the nearest `origin + k × 64 ms`, less a millisecond
/// (1 ns short of it): tokio rounds a deadline up to a whole millisecond since
/// its own origin, which `origin` trails by less than that.
fn on_grid(origin: Instant, deadline: Instant) -> Instant {
    let slot = SLOT.as_nanos();
    let k = (deadline.saturating_duration_since(origin).as_nanos() + slot / 2) / slot;
    u32::try_from(k).ok().and_then(|k| (origin + SLOT * k).checked_sub(Duration::from_nanos(999_999))).unwrap_or(deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tick tokio gives a deadline: whole milliseconds since its origin, rounded up.
    fn tokio_tick(tokio_origin: Instant, deadline: Instant) -> u128 {
        (deadline + Duration::from_nanos(999_999)).saturating_duration_since(tokio_origin).as_millis()
    }

    #[test]
    fn deadlines_land_on_a_64_ms_tick_of_an_origin_noted_up_to_a_millisecond_late() {
        let tokio_origin = Instant::now();
        for late_us in [0, 1, 120, 499, 999] {
            let noted = tokio_origin + Duration::from_micros(late_us);
            for wait_ms in [1_000, 1_031, 1_033, 5_000, 4_100, 10_000, 30_000] {
                let wanted = noted + Duration::from_millis(wait_ms) + Duration::from_micros(370);
                let got = on_grid(noted, wanted);
                assert_eq!(tokio_tick(tokio_origin, got) % 64, 0, "late {late_us} µs, wait {wait_ms} ms");
                let off = if got > wanted { got - wanted } else { wanted - got };
                assert!(off <= Duration::from_millis(33), "moved by {off:?} (late {late_us} µs, wait {wait_ms} ms)");
            }
        }
    }

    /// How many times the thread parks (each a wake-up of the real agent)
    /// while one sleep until `deadline(origin, now)` runs, on a paused clock.
    fn parks_for(deadline: impl Fn(Instant, Instant) -> Instant + Send + 'static) -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let parks = Arc::new(AtomicUsize::new(0));
        let counter = parks.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .on_thread_park(move || {
                counter.fetch_add(1, Ordering::Relaxed);
            })
            .build()
            .unwrap();
        runtime.block_on(async move {
            let origin = Instant::now();
            // Not at the origin: a later moment, off the grid.
            tokio::time::sleep(Duration::from_millis(5_003)).await;
            let before = parks.load(Ordering::Relaxed);
            tokio::time::sleep_until(deadline(origin, Instant::now())).await;
            parks.load(Ordering::Relaxed) - before
        })
    }

    #[test]
    fn tokios_wheel_wakes_once_less_for_a_deadline_on_the_grid() {
        // 1 s: the 64 ms level, then the 1 ms level; on the grid, the first
        // only. 5 s: the 4.096 s level too.
        for wait_ms in [1_000, 5_000] {
            let wait = Duration::from_millis(wait_ms);
            let plain = parks_for(move |_, now| now + wait);
            let gridded = parks_for(move |origin, now| on_grid(origin, now + wait));
            assert_eq!(gridded + 1, plain, "wait {wait_ms} ms: parks on the grid {gridded}, off it {plain}");
        }
    }

    #[test]
    fn without_an_origin_or_for_short_waits_deadlines_are_left_alone() {
        let now = Instant::now();
        let origin = now - Duration::from_millis(7_777);
        let far = now + Duration::from_millis(1_234);
        assert_eq!(place(None, now, far), far);
        assert_ne!(place(Some(origin), now, far), far);
        let soon = now + Duration::from_millis(499);
        assert_eq!(place(Some(origin), now, soon), soon);
        let half = now + Duration::from_millis(500);
        assert_ne!(place(Some(origin), now, half), half);
    }
}
