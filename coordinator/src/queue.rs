//! `NodeQueue`: admission control for one node. A node admits up to `capacity` sessions at once (from its
//! announcement); further sessions wait, at most `max_waiting` of them and each at most its own timeout, and anything
//! beyond gets a clear "busy" error rather than piling up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("node is busy: {in_flight} sessions running, {waiting} waiting (limit {max_waiting})")]
    Busy { in_flight: u32, waiting: u32, max_waiting: u32 },
    #[error("no slot freed within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug)]
struct State {
    in_flight: u32,
    waiting: u32,
    capacity: u32,
    max_waiting: u32,
}

/// In-flight and waiting sessions of one node.
#[derive(Debug)]
pub struct NodeQueue {
    state: Mutex<State>,
    freed: Notify,
    admitted: AtomicU64,
}

/// A running session's slot on a node; dropping it frees the slot and wakes one waiter.
#[derive(Debug)]
pub struct QueuePermit {
    queue: Arc<NodeQueue>,
}

impl Drop for QueuePermit {
    fn drop(&mut self) {
        {
            let mut s = self.queue.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        self.queue.freed.notify_one();
    }
}

impl NodeQueue {
    pub fn new(capacity: u32, max_waiting: u32) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State { in_flight: 0, waiting: 0, capacity: capacity.max(1), max_waiting }),
            freed: Notify::new(),
            admitted: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Updates the capacity from a fresh announcement; waiters are woken in case it grew.
    pub fn set_capacity(&self, capacity: u32) {
        self.lock().capacity = capacity.max(1);
        self.freed.notify_waiters();
    }

    /// `(in_flight, waiting, capacity)`.
    pub fn depth(&self) -> (u32, u32, u32) {
        let s = self.lock();
        (s.in_flight, s.waiting, s.capacity)
    }

    /// Sessions admitted over the queue's life.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Admits now or fails with `Busy` (no waiting).
    pub fn try_admit(self: &Arc<Self>) -> Result<QueuePermit, QueueError> {
        let mut s = self.lock();
        if s.in_flight < s.capacity {
            s.in_flight += 1;
            drop(s);
            self.admitted.fetch_add(1, Ordering::Relaxed);
            return Ok(QueuePermit { queue: self.clone() });
        }
        Err(QueueError::Busy { in_flight: s.in_flight, waiting: s.waiting, max_waiting: s.max_waiting })
    }

    /// Admits now, or waits in line (if the line is not full) for up to `wait`.
    pub async fn admit(self: &Arc<Self>, wait: Duration) -> Result<QueuePermit, QueueError> {
        {
            let mut s = self.lock();
            if s.in_flight < s.capacity {
                s.in_flight += 1;
                drop(s);
                self.admitted.fetch_add(1, Ordering::Relaxed);
                return Ok(QueuePermit { queue: self.clone() });
            }
            if s.waiting >= s.max_waiting || wait.is_zero() {
                return Err(QueueError::Busy {
                    in_flight: s.in_flight,
                    waiting: s.waiting,
                    max_waiting: s.max_waiting,
                });
            }
            s.waiting += 1;
        }
        let deadline = tokio::time::Instant::now() + wait;
        let result = loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if s.in_flight < s.capacity {
                    s.in_flight += 1;
                    break Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break Err(QueueError::Timeout(wait));
            }
        };
        self.lock().waiting -= 1;
        result?;
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(QueuePermit { queue: self.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_up_to_capacity_then_queues_then_refuses() {
        let q = NodeQueue::new(2, 1);
        let a = q.admit(Duration::ZERO).await.unwrap();
        let _b = q.try_admit().unwrap();
        assert!(matches!(q.try_admit(), Err(QueueError::Busy { in_flight: 2, .. })));
        // One may wait; it gets the slot when `a` is dropped.
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.admit(Duration::from_secs(5)).await.map(|_p| ()) });
        while q.depth().1 == 0 {
            tokio::task::yield_now().await;
        }
        // The line is full now: a second waiter is refused at once.
        assert!(matches!(q.admit(Duration::from_secs(5)).await, Err(QueueError::Busy { waiting: 1, .. })));
        drop(a);
        waiter.await.unwrap().unwrap();
        assert_eq!(q.admitted(), 3);
        assert_eq!(q.depth(), (1, 0, 2));
    }

    #[tokio::test]
    async fn a_waiter_times_out() {
        let q = NodeQueue::new(1, 4);
        let _p = q.try_admit().unwrap();
        let err = q.admit(Duration::from_millis(30)).await.unwrap_err();
        assert_eq!(err, QueueError::Timeout(Duration::from_millis(30)));
        assert_eq!(q.depth(), (1, 0, 1));
    }
}
