//! Pending registry writes: at most one per service, the latest wins.
//!
//! A newer desired state for a service replaces its queued write in place (a
//! flip and a flip back before the write goes out cost nothing, or one
//! write), or removes it when nothing needs writing any more. Writes caused by
//! health and configuration changes are *urgent* and go before the fixes of
//! anti-entropy (*background*).

use crate::registry::Write;
use std::collections::{HashMap, VecDeque};

#[derive(Default)]
pub struct Queue {
    /// The write per service id and whether it is urgent.
    writes: HashMap<String, (Write, bool)>,
    /// Arrival order per lane; may hold ids no longer queued (skipped on pop).
    urgent: VecDeque<String>,
    background: VecDeque<String>,
    /// How many queued writes are urgent.
    urgent_count: usize,
}

impl Queue {
    /// Queue `w` for its service, replacing any queued write of that service.
    pub fn put(&mut self, w: Write, urgent: bool) {
        let id = w.id().to_string();
        match self.writes.get_mut(&id) {
            Some((old, was_urgent)) => {
                *old = w;
                if urgent && !*was_urgent {
                    *was_urgent = true;
                    self.urgent_count += 1;
                    self.urgent.push_back(id);
                }
            }
            None => {
                if urgent {
                    self.urgent_count += 1;
                    self.urgent.push_back(id.clone());
                } else {
                    self.background.push_back(id.clone());
                }
                self.writes.insert(id, (w, urgent));
            }
        }
    }

    /// Drop the queued write of a service, if any.
    /// Whether a write of this service is queued.
    pub fn contains(&self, id: &str) -> bool {
        self.writes.contains_key(id)
    }

    pub fn remove(&mut self, id: &str) {
        if let Some((_, true)) = self.writes.remove(id) {
            self.urgent_count -= 1;
        }
    }

    pub fn clear(&mut self) {
        self.writes.clear();
        self.urgent.clear();
        self.background.clear();
        self.urgent_count = 0;
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub fn has_urgent(&self) -> bool {
        self.urgent_count > 0
    }

    /// Up to `max` writes, urgent ones first, oldest first.
    pub fn take(&mut self, max: usize) -> Vec<Write> {
        let mut out = Vec::new();
        for urgent in [true, false] {
            while out.len() < max {
                let lane = if urgent { &mut self.urgent } else { &mut self.background };
                let Some(id) = lane.pop_front() else { break };
                // Skip stale order entries: removed, or moved to the urgent lane.
                if self.writes.get(&id).is_some_and(|(_, u)| *u == urgent) {
                    out.push(self.writes.remove(&id).expect("present").0);
                    if urgent {
                        self.urgent_count -= 1;
                    }
                }
            }
        }
        if self.writes.is_empty() {
            self.urgent.clear();
            self.background.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dereg(id: &str) -> Write {
        Write::Deregister { id: id.into(), name: id.into() }
    }

    #[test]
    fn latest_wins_and_urgent_goes_first() {
        let mut q = Queue::default();
        q.put(dereg("a"), false);
        q.put(dereg("b"), false);
        q.put(dereg("c"), true);
        q.put(dereg("a"), true); // promoted
        q.remove("b");
        let ids: Vec<String> = q.take(10).iter().map(|w| w.id().to_string()).collect();
        assert_eq!(ids, ["c", "a"]);
        assert!(!q.has_urgent());
        assert!(q.is_empty());
    }

    #[test]
    fn take_respects_the_batch_size() {
        let mut q = Queue::default();
        for i in 0..5 {
            q.put(dereg(&format!("s{i}")), true);
        }
        assert_eq!(q.take(2).len(), 2);
        assert_eq!(q.len(), 3);
        assert_eq!(q.take(10).len(), 3);
    }
}
