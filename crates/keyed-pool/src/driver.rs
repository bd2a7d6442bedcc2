//! The driver tasks: each runs its share of the workers, one job at a time per worker.
//!
//! A worker is a queue, which only its driver touches, and one pinned slot for the job it runs,
//! reused from job to job (no allocation per job). Jobs reach the driver through its mailbox
//! ([`crate::mailbox`]); the driver moves them into their workers' queues and runs the workers
//! that were idle. A worker has a waker of its own: its job waiting on I/O wakes it alone, and the
//! driver polls only the workers woken since it last looked. A job that completes on its first
//! poll, the usual case for fast handlers, costs no task wake-up: the driver takes the next job
//! of each worker in one turn.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use tokio::sync::{oneshot, watch};

use crate::mailbox::{Mailbox, Room};
use crate::{panic_message, Counters, JobOutcome, Slot};

/// How many times a driver takes the list of woken workers in one poll before it yields to
/// the runtime's other tasks.
const ROUNDS_PER_POLL: usize = 16;

/// Which of a driver's workers were woken since it last looked, each listed once, and whether
/// the driver was called since.
pub(crate) struct Wakeups {
    woken: Mutex<Vec<usize>>,
    /// Per worker: listed in `woken` and not looked at yet.
    listed: Vec<AtomicBool>,
    /// Set by the first caller since the driver last took its mailbox and list (a post to an
    /// empty mailbox, a worker listed), which alone wakes the driver: the others find it set and
    /// know the driver will look again. The wake-up of a task through `AtomicWaker` costs
    /// several more atomic operations on lines the driver's thread touches.
    called: AtomicBool,
    driver: AtomicWaker,
}

impl Wakeups {
    /// Wakes the driver unless it was called since it last looked. After the caller's post or
    /// listing: a driver that cleared `called` before it looked either saw it or is woken here.
    fn call(&self) {
        if !self.called.swap(true, Ordering::AcqRel) {
            self.driver.wake();
        }
    }
}

/// The waker of one worker: lists it with its driver and wakes the driver.
struct WorkerWaker {
    wakeups: Arc<Wakeups>,
    worker: usize,
}

impl Wake for WorkerWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.wakeups.listed[self.worker].swap(true, Ordering::AcqRel) {
            self.wakeups.woken.lock().unwrap().push(self.worker);
            self.wakeups.call();
        }
    }
}

/// One worker: its queue (filled by its driver from the mailbox), the job it runs and whom to
/// tell how that ended.
struct Worker<J, Fut> {
    queue: VecDeque<Slot<J>>,
    /// Set from job to job (`Pin::set`): allocated once.
    job: Pin<Box<Option<Fut>>>,
    done: Option<oneshot::Sender<JobOutcome>>,
    waker: Waker,
    /// Its jobs submitted and not yet taken, shared with the submitters.
    room: Arc<Room>,
}

impl<J, Fut, E> Worker<J, Fut>
where
    Fut: Future<Output = Result<(), E>>,
    E: fmt::Display,
{
    /// Whether it has nothing to do: no job, none queued.
    fn idle(&self) -> bool {
        self.job.is_none() && self.queue.is_empty()
    }

    /// Runs the worker until it waits: on its job, on an empty queue, or on the task's budget
    /// (then it has woken itself to go on later).
    fn turn<F: Fn(J) -> Fut>(
        &mut self,
        run: &F,
        counters: &Counters,
        stop: &watch::Receiver<bool>,
        capacity: usize,
    ) {
        let mut cx = Context::from_waker(&self.waker);
        loop {
            if let Some(job) = self.job.as_mut().as_pin_mut() {
                let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| job.poll(&mut cx)))
                {
                    Ok(Poll::Pending) => return,
                    Ok(Poll::Ready(Ok(()))) => JobOutcome::Succeeded,
                    Ok(Poll::Ready(Err(e))) => {
                        counters.failures.fetch_add(1, Ordering::Relaxed);
                        JobOutcome::Failed(e.to_string())
                    }
                    Err(panic) => {
                        counters.panics.fetch_add(1, Ordering::Relaxed);
                        let message = panic_message(&*panic);
                        tracing::error!(panic = %message, "keyed pool job panicked");
                        JobOutcome::Panicked(message)
                    }
                };
                self.job.set(None);
                finish_job(&mut self.done, outcome, counters);
            }
            // No job starts once stop is signalled (one atomic load): the driver hands the
            // queue back.
            if !matches!(stop.has_changed(), Ok(false)) || self.queue.is_empty() {
                return;
            }
            // A unit of the task's tokio budget per job, as a tokio channel spends: a driver
            // with much queued work lets the runtime's other tasks run. When it is spent tokio
            // wakes this worker, to go on at the driver's next turn.
            let Poll::Ready(coop) = tokio::task::coop::poll_proceed(&mut cx) else {
                return;
            };
            coop.made_progress();
            let slot = self.queue.pop_front().expect("not empty");
            self.room.release(capacity);
            self.done = slot.done;
            let job = slot.job;
            match std::panic::catch_unwind(AssertUnwindSafe(|| run(job))) {
                Ok(future) => self.job.set(Some(future)),
                Err(panic) => {
                    counters.panics.fetch_add(1, Ordering::Relaxed);
                    let message = panic_message(&*panic);
                    tracing::error!(panic = %message, "keyed pool job panicked");
                    finish_job(&mut self.done, JobOutcome::Panicked(message), counters);
                }
            }
        }
    }
}

/// A job ended: counted, and its completion told how.
fn finish_job(
    done: &mut Option<oneshot::Sender<JobOutcome>>,
    outcome: JobOutcome,
    counters: &Counters,
) {
    counters.jobs_run.fetch_add(1, Ordering::Relaxed);
    if let Some(done) = done.take() {
        let _ = done.send(outcome);
    }
}

/// What a driver shares with the pool: its mailbox, and the list of its workers woken since it
/// last looked.
pub(crate) struct Port<J> {
    pub(crate) mailbox: Arc<Mailbox<Slot<J>>>,
    pub(crate) wakeups: Arc<Wakeups>,
}

impl<J> Port<J> {
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            mailbox: Arc::new(Mailbox::new()),
            wakeups: Arc::new(Wakeups {
                woken: Mutex::new(Vec::new()),
                listed: (0..workers).map(|_| AtomicBool::new(false)).collect(),
                // Until the driver first looks: nobody else needs to wake it.
                called: AtomicBool::new(true),
                driver: AtomicWaker::new(),
            }),
        }
    }

    /// Wakes the driver to take its mailbox, unless someone already did since it last looked.
    pub(crate) fn call(&self) {
        self.wakeups.call();
    }
}

impl<J> Clone for Port<J> {
    fn clone(&self) -> Self {
        Self {
            mailbox: self.mailbox.clone(),
            wakeups: self.wakeups.clone(),
        }
    }
}

/// Closes the mailbox when the driver ends, however it ends (its task dropped with the runtime,
/// even before it first ran, included: it is an argument of the driver's future): submitters
/// waiting for room are turned away, and jobs posted meanwhile are dropped (their completions
/// say they did not run) rather than left waiting.
pub(crate) struct CloseOnEnd<J> {
    mailbox: Arc<Mailbox<Slot<J>>>,
    rooms: Vec<Arc<Room>>,
}

impl<J> Drop for CloseOnEnd<J> {
    fn drop(&mut self) {
        drop(self.mailbox.close());
        for room in &self.rooms {
            room.wake_waiting();
        }
    }
}

impl<J> CloseOnEnd<J> {
    pub(crate) fn new(port: &Port<J>, rooms: Vec<Arc<Room>>) -> Self {
        Self {
            mailbox: port.mailbox.clone(),
            rooms,
        }
    }
}

/// Drives the workers whose rooms `close` holds until the pool seals the mailbox and every job
/// posted has run, or stop is signalled: then the jobs running are dropped (counted as
/// interrupted) and those queued are handed back, per worker in submission order.
pub(crate) async fn drive<J, F, Fut, E>(
    port: Port<J>,
    close: CloseOnEnd<J>,
    capacity: usize,
    run: Arc<F>,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
) -> (Vec<J>, u64)
where
    F: Fn(J) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display + 'static,
{
    let Port { mailbox, wakeups } = port;
    let mut workers: Vec<Worker<J, Fut>> = close
        .rooms
        .iter()
        .cloned()
        .enumerate()
        .map(|(index, room)| Worker {
            queue: VecDeque::new(),
            job: Box::pin(None),
            done: None,
            waker: Waker::from(Arc::new(WorkerWaker {
                wakeups: wakeups.clone(),
                worker: index,
            })),
            room,
        })
        .collect();
    let flag = stop.clone();
    // One wait for the stop signal for the driver's whole life.
    let stopped = async move {
        let mut stop = stop;
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    let (mut posted, mut woken) = (Vec::new(), Vec::new());
    // The workers to run this round, each listed once.
    let (mut due, mut is_due) = (Vec::new(), vec![false; workers.len()]);
    let interrupted_by_stop = std::future::poll_fn(|cx| {
        let mut rounds = 0;
        wakeups.driver.register(cx.waker());
        if stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(true);
        }
        loop {
            // Cleared before the mailbox and the list are taken: a post or a wake-up after
            // this calls the driver again.
            wakeups.called.store(false, Ordering::Release);
            let sealed = mailbox.take(&mut posted);
            for (index, slot) in posted.drain(..) {
                let worker = &mut workers[index];
                // A worker whose job waits goes on with its queue once the job is done.
                if worker.job.is_none() && !is_due[index] {
                    is_due[index] = true;
                    due.push(index);
                }
                worker.queue.push_back(slot);
            }
            std::mem::swap(&mut woken, &mut *wakeups.woken.lock().unwrap());
            for index in woken.drain(..) {
                // Cleared before the worker runs: a wake-up during its turn lists it again.
                wakeups.listed[index].store(false, Ordering::Release);
                if !is_due[index] {
                    is_due[index] = true;
                    due.push(index);
                }
            }
            if due.is_empty() {
                if sealed && workers.iter().all(Worker::idle) {
                    return Poll::Ready(false);
                }
                return Poll::Pending;
            }
            for index in due.drain(..) {
                is_due[index] = false;
                workers[index].turn(&*run, &counters, &flag, capacity);
            }
            rounds += 1;
            if rounds == ROUNDS_PER_POLL || !tokio::task::coop::has_budget_remaining() {
                // Go on after the runtime's other tasks: the workers that spent the budget have
                // woken themselves, and a job that wakes itself at once (a yield without
                // tokio's help) must not keep the driver from returning.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    })
    .await;
    let mut not_run = Vec::new();
    let mut interrupted = 0;
    if interrupted_by_stop {
        // What was posted and not taken yet goes behind each worker's queue, in order.
        for (index, slot) in mailbox.close() {
            workers[index].queue.push_back(slot);
        }
        for worker in &mut workers {
            if worker.job.is_some() {
                // Dropping the job's future stops it; its completion says it did not run.
                worker.job.set(None);
                worker.done = None;
                interrupted += 1;
            }
            not_run.extend(worker.queue.drain(..).map(|slot| slot.job));
        }
    }
    drop(close);
    (not_run, interrupted)
}
