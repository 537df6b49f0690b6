//! Admission of sessions, owned by their map entry: a [`Slot`] is the right to run one session and is given back by
//! being dropped, so no path adjusts the count by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts admitted sessions against a maximum. Cloned into load probes, which read it from other threads.
#[derive(Clone, Debug)]
pub struct Admission {
    active: Arc<AtomicUsize>,
    max: usize,
}

impl Admission {
    pub fn new(max: usize) -> Self {
        Self { active: Arc::new(AtomicUsize::new(0)), max }
    }

    /// A slot, or `None` when `max` sessions hold one.
    pub fn try_admit(&self) -> Option<Slot> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Slot { active: self.active.clone() })
    }

    /// Sessions holding a slot now (including ones whose compute has not come back yet).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// One admitted session's place; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    active: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_returned_on_drop() {
        let a = Admission::new(2);
        let s1 = a.try_admit().unwrap();
        let s2 = a.try_admit().unwrap();
        assert!(a.try_admit().is_none());
        assert_eq!(a.active(), 2);
        drop(s1);
        assert_eq!(a.active(), 1);
        let _s3 = a.try_admit().unwrap();
        drop(s2);
        assert_eq!(a.active(), 1);
    }
}
