//! Rise/fall: consecutive observations needed to change state. Pure.

use super::Status;

#[derive(Debug, Clone)]
pub struct Threshold {
    rise: u32,
    fall: u32,
    state: Option<Status>,
    passes: u32,
    fails: u32,
}

impl Threshold {
    pub fn new(rise: u32, fall: u32) -> Self {
        Threshold { rise: rise.max(1), fall: fall.max(1), state: None, passes: 0, fails: 0 }
    }

    /// Take `status` as already decided (reported by other means), so that
    /// only a change from it is reported.
    pub fn assume(&mut self, status: Status) {
        self.state = Some(status);
    }

    /// The decided state, if any.
    pub fn state(&self) -> Option<Status> {
        self.state
    }

    /// Feed one observation; returns the new state when it changes.
    pub fn observe(&mut self, ok: bool) -> Option<Status> {
        let next = if ok {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            (self.passes >= self.rise).then_some(Status::Passing)
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            (self.fails >= self.fall).then_some(Status::Critical)
        };
        match next {
            Some(s) if self.state != Some(s) => {
                self.state = Some(s);
                Some(s)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_count_consecutive_results() {
        let mut t = Threshold::new(2, 3);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(Status::Passing));
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None, "a pass resets the failure count");
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(Status::Critical));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(Status::Passing));
    }

    #[test]
    fn defaults_of_one_follow_every_change() {
        let mut t = Threshold::new(1, 1);
        assert_eq!(t.observe(false), Some(Status::Critical));
        assert_eq!(t.observe(true), Some(Status::Passing));
        assert_eq!(t.observe(false), Some(Status::Critical));
    }

    #[test]
    fn flapping_never_changes_faster_than_thresholds() {
        let mut t = Threshold::new(3, 3);
        let mut changes = 0;
        for i in 0..100 {
            if t.observe(i % 2 == 0).is_some() {
                changes += 1;
            }
        }
        assert_eq!(changes, 0);
    }
}
