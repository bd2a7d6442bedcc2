//! What submitters share with a driver: its mailbox, and each of its workers' room.
//!
//! A submitted job goes into the mailbox of its worker's driver, with the worker's place among
//! that driver's workers; the driver moves what its mailbox holds into the workers' own queues,
//! which only it touches. So a job costs the submitter no lock of the worker's queue and no
//! wake-up of the worker: one lock of the mailbox per hand-over, and one wake-up of the driver
//! when the mailbox was empty. [`KeyedPool::submit_all`](crate::KeyedPool::submit_all) hands a
//! driver its share of many jobs in one hand-over.
//!
//! Each worker's room counts its jobs submitted and not yet taken (the mailbox's and those in
//! its queue): a submitter reserves a place before it posts a job, and waits while there is none.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Poll, Waker};

/// Jobs posted to one driver and not yet taken by it, in posting order, each with the index of
/// its worker among the driver's.
pub(crate) struct Mailbox<T> {
    state: Mutex<Posted<T>>,
    /// Closed by the driver (it stopped, or is gone): nothing posted is taken any more. Read
    /// without the lock before a submitter waits for room.
    closed: AtomicBool,
}

struct Posted<T> {
    jobs: Vec<(usize, T)>,
    /// The pool takes no more jobs: the driver ends once it has run what was posted.
    sealed: bool,
}

/// Why a post did not go in: the driver closed its mailbox. The jobs are handed back.
pub(crate) struct PostClosed<T>(pub(crate) Vec<(usize, T)>);

impl<T> Mailbox<T> {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(Posted {
                jobs: Vec::new(),
                sealed: false,
            }),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Posted<T>> {
        // The lock is never held across a call that can panic with the state half changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `jobs` (emptying it), in order. Returns whether the mailbox was empty, in which
    /// case the driver is to be called: otherwise whoever posted first has called it, and it
    /// has not taken the mailbox since.
    pub(crate) fn post(&self, jobs: &mut Vec<(usize, T)>) -> Result<bool, PostClosed<T>> {
        let mut posted = self.lock();
        if self.closed.load(Ordering::Acquire) {
            drop(posted);
            return Err(PostClosed(std::mem::take(jobs)));
        }
        let was_empty = posted.jobs.is_empty();
        if was_empty {
            // The caller's vector goes in whole, and the mailbox's empty one comes back to it.
            std::mem::swap(&mut posted.jobs, jobs);
        } else {
            posted.jobs.append(jobs);
        }
        Ok(was_empty)
    }

    /// [`Mailbox::post`] for one job, into the mailbox's own vector.
    pub(crate) fn post_one(&self, worker: usize, job: T) -> Result<bool, T> {
        let mut posted = self.lock();
        if self.closed.load(Ordering::Acquire) {
            return Err(job);
        }
        posted.jobs.push((worker, job));
        Ok(posted.jobs.len() == 1)
    }

    /// Takes what was posted into `into` (an empty vector, swapped in so that neither side
    /// grows one from nothing each time). Returns whether the pool has sealed the mailbox.
    pub(crate) fn take(&self, into: &mut Vec<(usize, T)>) -> bool {
        let mut posted = self.lock();
        std::mem::swap(&mut posted.jobs, into);
        posted.sealed
    }

    /// No more jobs come: the driver ends once it has run those posted.
    pub(crate) fn seal(&self) {
        self.lock().sealed = true;
    }

    /// The driver takes nothing more: later posts are handed back. Returns what was posted and
    /// not taken.
    pub(crate) fn close(&self) -> Vec<(usize, T)> {
        let mut posted = self.lock();
        self.closed.store(true, Ordering::Release);
        std::mem::take(&mut posted.jobs)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// One worker's room: its jobs submitted and not yet taken by the worker, and the submitters
/// waiting for a place.
#[derive(Default)]
pub(crate) struct Room {
    queued: AtomicUsize,
    waiting: Mutex<Vec<Waker>>,
}

impl Room {
    /// Jobs submitted and not yet taken.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Takes a place if fewer than `capacity` are taken.
    pub(crate) fn try_reserve(&self, capacity: usize) -> bool {
        let mut queued = self.queued.load(Ordering::Acquire);
        loop {
            if queued >= capacity {
                return false;
            }
            match self.queued.compare_exchange_weak(
                queued,
                queued + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => queued = now,
            }
        }
    }

    /// Takes a place, waiting while there is none; `false` once `mailbox` is closed.
    pub(crate) async fn reserve<T>(&self, capacity: usize, mailbox: &Mailbox<T>) -> bool {
        poll_fn(|cx| {
            if mailbox.is_closed() {
                return Poll::Ready(false);
            }
            if self.try_reserve(capacity) {
                return Poll::Ready(true);
            }
            {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                    waiting.push(cx.waker().clone());
                }
            }
            // A place given back before the waker was listed is not missed: the worker lists
            // its waiters only after it gave the place back (see `release`).
            if mailbox.is_closed() {
                return Poll::Ready(false);
            }
            if self.try_reserve(capacity) {
                return Poll::Ready(true);
            }
            Poll::Pending
        })
        .await
    }

    /// Gives a place back (a job was taken, or was not posted after all), waking the
    /// submitters waiting for one if all were taken.
    pub(crate) fn release(&self, capacity: usize) {
        if self.queued.fetch_sub(1, Ordering::AcqRel) >= capacity {
            self.wake_waiting();
        }
    }

    /// Wakes every submitter waiting for a place (they look again, and find room or the
    /// mailbox closed).
    pub(crate) fn wake_waiting(&self) {
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        for waker in waiting {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_room_holds_no_more_than_its_capacity() {
        let room = Room::default();
        assert!(room.try_reserve(2));
        assert!(room.try_reserve(2));
        assert!(!room.try_reserve(2), "both places are taken");
        assert_eq!(room.queued(), 2);
        room.release(2);
        assert!(room.try_reserve(2), "a place given back is taken again");
    }

    /// A room of one place, taken, and a submitter waiting for it.
    async fn a_submitter_waiting() -> (Arc<Room>, Arc<Mailbox<u32>>, tokio::task::JoinHandle<bool>)
    {
        let room = Arc::new(Room::default());
        let mailbox = Arc::new(Mailbox::<u32>::new());
        assert!(room.try_reserve(1));
        let waiting = {
            let (room, mailbox) = (room.clone(), mailbox.clone());
            tokio::spawn(async move { room.reserve(1, &mailbox).await })
        };
        tokio::task::yield_now().await;
        (room, mailbox, waiting)
    }

    #[tokio::test]
    async fn a_submitter_waiting_for_room_is_let_in_when_a_place_is_given_back() {
        let (room, _mailbox, waiting) = a_submitter_waiting().await;
        assert!(!waiting.is_finished());
        assert_eq!(room.waiting.lock().unwrap().len(), 1, "the submitter waits");
        room.release(1);
        let let_in = tokio::time::timeout(std::time::Duration::from_secs(10), waiting);
        assert!(let_in.await.expect("giving a place back wakes it").unwrap());
        assert_eq!(room.queued(), 1, "it holds the place given back");
    }

    #[tokio::test]
    async fn closing_the_mailbox_turns_a_waiting_submitter_away() {
        let (room, mailbox, waiting) = a_submitter_waiting().await;
        assert!(!waiting.is_finished());
        let left = mailbox.close();
        assert!(left.is_empty());
        room.wake_waiting();
        assert!(!waiting.await.unwrap(), "no place in a closed mailbox");
        assert!(matches!(
            mailbox.post(&mut vec![(0, 7)]),
            Err(PostClosed(jobs)) if jobs == vec![(0, 7)]
        ));
        assert!(matches!(mailbox.post_one(1, 8), Err(8)));
    }

    #[test]
    fn posts_keep_their_order_and_only_the_first_calls_the_driver() {
        let mailbox = Mailbox::new();
        let mut first = vec![(0, 1), (1, 2)];
        assert!(matches!(mailbox.post(&mut first), Ok(true)));
        assert!(first.is_empty());
        assert!(matches!(mailbox.post_one(0, 3), Ok(false)));
        let mut taken = Vec::new();
        assert!(!mailbox.take(&mut taken), "not sealed");
        assert_eq!(taken, vec![(0, 1), (1, 2), (0, 3)]);
        assert!(matches!(mailbox.post(&mut vec![(1, 4)]), Ok(true)));
        mailbox.seal();
        let mut taken = Vec::new();
        assert!(mailbox.take(&mut taken));
        assert_eq!(taken, vec![(1, 4)]);
    }
}
