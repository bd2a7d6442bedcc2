//! A worker's bounded queue: a `VecDeque` under a mutex, with the worker's waker and the
//! wakers of submitters waiting for room.
//!
//! What the pool needs of a channel and no more: one receiver (the worker, polled by its
//! driver), senders that wait while the queue is full, closing when the last sender goes or the
//! receiver closes it, and its length. A job costs one lock to queue and one to take; tokio's
//! bounded channel paid for a semaphore permit and a linked list of blocks on top (taking a
//! job cost 370 instructions with it, 230 with this; `docs/performance.md`, seventh cut).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

struct State<T> {
    items: VecDeque<T>,
    /// The worker, when it found the queue empty.
    receiver: Option<Waker>,
    /// Submitters that found the queue full. All are woken when a job is taken; each tries
    /// again (no order among them: submissions of one key come from one submitter in turn).
    senders: Vec<Waker>,
    /// Live senders; at 0 the queue is closed for sending.
    alive: usize,
    /// Closed by the receiver.
    closed: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // The lock is never held across a call that can panic with the state half changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A bounded queue of `capacity` (at least 1).
pub(crate) fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            receiver: None,
            senders: Vec::new(),
            alive: 1,
            closed: false,
        }),
        capacity: capacity.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// Why a job was not queued; the job is handed back.
pub(crate) enum TrySendError<T> {
    Full(T),
    Closed(T),
}

pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().alive += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let receiver = {
            let mut state = self.shared.lock();
            state.alive -= 1;
            if state.alive > 0 {
                return;
            }
            state.receiver.take()
        };
        // The last sender is gone: the worker drains what is queued and ends.
        if let Some(receiver) = receiver {
            receiver.wake();
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item` if there is room.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let receiver = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(TrySendError::Closed(item));
            }
            if state.items.len() >= self.shared.capacity {
                return Err(TrySendError::Full(item));
            }
            state.items.push_back(item);
            state.receiver.take()
        };
        if let Some(receiver) = receiver {
            receiver.wake();
        }
        Ok(())
    }

    /// Queues `item`, waiting while the queue is full; hands it back if the queue closes.
    pub(crate) async fn send(&self, item: T) -> Result<(), T> {
        let mut item = Some(item);
        poll_fn(|cx| {
            let job = item.take().expect("polled after it finished");
            match self.try_send(job) {
                Ok(()) => Poll::Ready(Ok(())),
                Err(TrySendError::Closed(job)) => Poll::Ready(Err(job)),
                Err(TrySendError::Full(job)) => {
                    let mut state = self.shared.lock();
                    // Room may have been made since the attempt: look again under the lock.
                    if state.items.len() < self.shared.capacity || state.closed {
                        drop(state);
                        cx.waker().wake_by_ref();
                    } else if !state.senders.iter().any(|w| w.will_wake(cx.waker())) {
                        state.senders.push(cx.waker().clone());
                    }
                    item = Some(job);
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Jobs queued now.
    pub(crate) fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// A handle that reads the length without keeping the queue open.
    pub(crate) fn probe(&self) -> Probe<T> {
        Probe {
            shared: self.shared.clone(),
        }
    }
}

/// Reads a queue's length; 0 once no sender is left.
pub(crate) struct Probe<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Probe<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Probe<T> {
    pub(crate) fn len(&self) -> usize {
        let state = self.shared.lock();
        if state.alive == 0 {
            0
        } else {
            state.items.len()
        }
    }
}

pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next job; `None` once the queue is empty and closed. Spends a unit of the task's
    /// tokio budget per job, as a tokio channel does, so a driver with much queued work lets
    /// the runtime's other tasks run.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let (item, senders) = {
            let mut state = self.shared.lock();
            match state.items.pop_front() {
                Some(item) => (item, std::mem::take(&mut state.senders)),
                None if state.closed || state.alive == 0 => return Poll::Ready(None),
                None => {
                    if !state
                        .receiver
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        state.receiver = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
            }
        };
        coop.made_progress();
        for sender in senders {
            sender.wake();
        }
        Poll::Ready(Some(item))
    }

    /// Closes the queue for sending: what is queued stays to be taken.
    pub(crate) fn close(&mut self) {
        let senders = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.senders)
        };
        for sender in senders {
            sender.wake();
        }
    }

    /// The next job if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        self.shared.lock().items.pop_front()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.close();
        // Jobs nobody will take go now, not when the last sender or probe goes (dropped
        // outside the lock: a job's drop may do anything).
        let left = std::mem::take(&mut self.shared.lock().items);
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_makes_the_sender_wait_until_a_job_is_taken() {
        let (tx, mut rx) = channel::<u32>(1);
        tx.try_send(1).ok().unwrap();
        assert!(matches!(tx.try_send(2), Err(TrySendError::Full(2))));
        let sender = tx.clone();
        let waiting = tokio::spawn(async move { sender.send(2).await.is_ok() });
        // The waiting sender registers, then is woken once the first job is taken.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(tx.shared.lock().senders.len(), 1, "the sender waits");
        assert_eq!(
            poll_fn(|cx| rx.poll_recv(cx)).await,
            Some(1),
            "the first job comes first"
        );
        let let_in = tokio::time::timeout(std::time::Duration::from_secs(10), waiting);
        assert!(
            let_in
                .await
                .expect("taking a job wakes the waiting sender")
                .unwrap(),
            "the waiting sender was let in"
        );
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(2));
        assert_eq!(tx.len(), 0);
    }

    #[tokio::test]
    async fn the_queue_ends_when_the_last_sender_goes_and_what_was_queued_is_taken_first() {
        let (tx, mut rx) = channel::<u32>(4);
        let probe = tx.probe();
        let second = tx.clone();
        tx.try_send(1).ok().unwrap();
        second.try_send(2).ok().unwrap();
        assert_eq!(probe.len(), 2);
        drop(tx);
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(1));
        drop(second);
        assert_eq!(probe.len(), 0, "no sender is left");
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(2));
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, None);
    }

    #[test]
    fn jobs_left_in_a_dropped_queue_go_with_its_receiver() {
        let (tx, rx) = channel::<Arc<()>>(2);
        let job = Arc::new(());
        tx.try_send(job.clone()).ok().unwrap();
        assert_eq!(Arc::strong_count(&job), 2);
        drop(rx);
        assert_eq!(Arc::strong_count(&job), 1, "the queued job was dropped");
        assert!(matches!(tx.try_send(job), Err(TrySendError::Closed(_))));
    }

    #[tokio::test]
    async fn closing_hands_a_waiting_sender_its_job_back() {
        let (tx, mut rx) = channel::<u32>(1);
        tx.try_send(1).ok().unwrap();
        let sender = tx.clone();
        let waiting = tokio::spawn(async move { sender.send(2).await });
        tokio::task::yield_now().await;
        rx.close();
        assert_eq!(waiting.await.unwrap(), Err(2));
        assert!(matches!(tx.try_send(3), Err(TrySendError::Closed(3))));
        assert_eq!(rx.try_recv(), Some(1), "what was queued is still there");
        assert_eq!(rx.try_recv(), None);
    }
}
