//! Flap damping and the write budget in the core, for both registry shapes.

use super::*;

/// Toggle a service every `every`, `n` times (the writer keeps up); the
/// registry's health of it after each transition.
fn toggle(sim: &mut Sim, id: &str, every: Duration, n: u32) -> Vec<Option<Status>> {
    (0..n)
        .map(|i| {
            sim.advance(every);
            sim.health(id, i % 2 == 1);
            sim.settle();
            sim.registry.get(id).map(|r| r.health.status)
        })
        .collect()
}

#[test]
fn a_flapping_service_is_held_out_with_few_writes_and_back_after_the_hold() {
    for keeps_critical in [true, false] {
        let mut sim = Sim::new(keeps_critical);
        sim.set(&[("flappy", 1), ("steady", 2)]);
        sim.health("flappy", true);
        sim.health("steady", true);
        sim.settle();
        // Every 25 ms for 20 s: 800 transitions, the last one to SERVING.
        let seen = toggle(&mut sim, "flappy", Duration::from_millis(25), 800);
        let passing_at: Vec<usize> = seen.iter().enumerate().filter(|(_, s)| **s == Some(Status::Passing)).map(|(i, _)| i).collect();
        assert!(passing_at.iter().all(|&i| i < 8), "never passing once the 8th transition made it flapping: {passing_at:?}");
        assert!(sim.writes_of("flappy") <= 10, "{} writes for 800 transitions", sim.writes_of("flappy"));
        let status = sim.core.status("flappy", sim.now, std::time::SystemTime::now()).expect("known");
        let flapping = status.flapping.expect("flapping");
        assert_eq!((flapping.transitions, flapping.suppressed, flapping.hold.as_str()), (8, 792, "10s"));
        assert!(flapping.until.is_some(), "SERVING now: it ends in 10 s");
        assert!(status.output.starts_with("flapping: 8 transitions in 175ms; held until SERVING for 10s"), "{}", status.output);
        if keeps_critical {
            assert!(sim.registry["flappy"].health.output.starts_with("flapping:"));
        }
        // The neighbour still flips at once.
        sim.health("steady", false);
        assert!(sim.step());
        assert_eq!(sim.registry.get("steady").map(|r| r.health.status == Status::Passing), keeps_critical.then_some(false));
        // Held until SERVING for the hold, then passing.
        sim.advance(Duration::from_millis(9_990));
        sim.settle();
        assert_ne!(sim.registry.get("flappy").map(|r| r.health.status), Some(Status::Passing));
        sim.advance(Duration::from_millis(10));
        sim.settle();
        assert_eq!(sim.registry["flappy"].health, passing());
        assert!(sim.core.status("flappy", sim.now, std::time::SystemTime::now()).unwrap().flapping.is_none());
    }
}

#[test]
fn an_ordinary_restart_is_written_at_once_every_time() {
    for keeps_critical in [true, false] {
        let mut sim = Sim::new(keeps_critical);
        sim.set(&[("a", 1)]);
        sim.health("a", true);
        sim.settle();
        // Three restarts a few seconds apart: 6 transitions in 30 s.
        for _ in 0..3 {
            sim.advance(Duration::from_secs(3));
            sim.health("a", false);
            assert!(sim.step(), "NOT_SERVING is written at once");
            assert_ne!(sim.registry.get("a").map(|r| r.health.status), Some(Status::Passing));
            sim.advance(Duration::from_secs(2));
            sim.health("a", true);
            assert!(sim.step(), "SERVING is written at once");
            assert_eq!(sim.registry["a"].health, passing());
        }
        assert!(sim.core.status("a", sim.now, std::time::SystemTime::now()).unwrap().flapping.is_none());
    }
}

#[test]
fn with_damping_off_the_write_budget_holds_writes_back_and_writes_the_latest() {
    let mut sim = Sim::new(true);
    let mut s = spec("a", 1);
    s.damping.enabled = false;
    sim.core.desired_set(BTreeMap::from([("a".to_string(), s)]), sim.now);
    sim.outbox();
    sim.health("a", true);
    sim.settle();
    // 10 s of toggling every 25 ms: 400 transitions.
    toggle(&mut sim, "a", Duration::from_millis(25), 400);
    // A burst of 10, then 30 a minute: about 10 + 5 in 10 s.
    let writes = sim.writes_of("a");
    assert!((10..=17).contains(&writes), "{writes} writes");
    // The last transition (to SERVING) is not dropped: written when a token comes.
    sim.advance(Duration::from_secs(2));
    sim.settle();
    assert_eq!(sim.registry["a"].health, passing());
    assert!(sim.core.status("a", sim.now, std::time::SystemTime::now()).unwrap().flapping.is_none());
}

#[test]
fn turning_damping_off_in_the_file_ends_an_episode_at_once() {
    let mut sim = Sim::new(false);
    sim.set(&[("a", 1)]);
    sim.health("a", true);
    sim.settle();
    toggle(&mut sim, "a", Duration::from_millis(25), 20);
    assert!(!sim.registry.contains_key("a"), "held out");
    let mut s = spec("a", 1);
    s.damping.enabled = false;
    sim.core.desired_set(BTreeMap::from([("a".to_string(), s)]), sim.now);
    sim.outbox();
    sim.settle();
    assert_eq!(sim.registry["a"].health, passing(), "SERVING and no longer held");
}
