//! The driver tasks: each runs its share of the workers, one job at a time per worker.
//!
//! A worker is a queue and one pinned slot for the job it runs, reused from job to job (no
//! allocation per job). It has a waker of its own: its job waiting on I/O, or its empty queue
//! waiting for a job, wakes it alone, and the driver polls only the workers woken since it last
//! looked. A job that completes on its first poll, the usual case for fast handlers, costs no
//! task wake-up: the driver takes the next job of each woken worker in one turn.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use tokio::sync::{oneshot, watch};

use crate::{panic_message, queue, Counters, JobOutcome, Slot};

/// How many times a driver takes the list of woken workers in one poll before it yields to
/// the runtime's other tasks.
const ROUNDS_PER_POLL: usize = 16;

/// Which of a driver's workers were woken since it last looked, each listed once.
struct Wakeups {
    woken: Mutex<Vec<usize>>,
    /// Per worker: listed in `woken` and not looked at yet.
    listed: Vec<AtomicBool>,
    /// Set by the first worker listed since the driver last took the list, which alone wakes
    /// the driver: the others find it set and know the driver will take the list again. Most
    /// events of a batch find their worker idle, and the wake-up of a task through
    /// `AtomicWaker` costs several more atomic operations on lines the driver's thread touches.
    called: AtomicBool,
    driver: AtomicWaker,
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
            // After the push: a driver that cleared `called` before it took the list either
            // took this worker with it or is woken here.
            if !self.wakeups.called.swap(true, Ordering::AcqRel) {
                self.wakeups.driver.wake();
            }
        }
    }
}

/// One worker: its queue, the job it runs and whom to tell how that ended.
struct Worker<J, Fut> {
    queue: queue::Receiver<Slot<J>>,
    /// Set from job to job (`Pin::set`): allocated once.
    job: Pin<Box<Option<Fut>>>,
    done: Option<oneshot::Sender<JobOutcome>>,
    waker: Waker,
    /// Its queue is closed and empty, and no job runs.
    finished: bool,
}

impl<J, Fut, E> Worker<J, Fut>
where
    Fut: Future<Output = Result<(), E>>,
    E: fmt::Display,
{
    /// Runs the worker until it waits: on its job, on an empty queue, or on the task's budget
    /// (then it has woken itself to go on later). Returns whether it just finished.
    fn turn<F: Fn(J) -> Fut>(
        &mut self,
        run: &F,
        counters: &Counters,
        stop: &watch::Receiver<bool>,
    ) -> bool {
        if self.finished {
            return false;
        }
        let mut cx = Context::from_waker(&self.waker);
        loop {
            if let Some(job) = self.job.as_mut().as_pin_mut() {
                let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| job.poll(&mut cx)))
                {
                    Ok(Poll::Pending) => return false,
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
            if !matches!(stop.has_changed(), Ok(false)) {
                return false;
            }
            match self.queue.poll_recv(&mut cx) {
                Poll::Ready(Some(slot)) => {
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
                Poll::Ready(None) => {
                    self.finished = true;
                    return true;
                }
                // An empty queue (its sender wakes this worker), or the task's budget is spent
                // (tokio woke this worker to go on at the driver's next turn).
                Poll::Pending => return false,
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

/// Drives `queues` until every one is closed and drained, or stop is signalled: then the jobs
/// running are dropped (counted as interrupted) and those queued are handed back, per worker in
/// submission order.
pub(crate) async fn drive<J, F, Fut, E>(
    queues: Vec<queue::Receiver<Slot<J>>>,
    run: Arc<F>,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
) -> (Vec<J>, u64)
where
    F: Fn(J) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display + 'static,
{
    let count = queues.len();
    let wakeups = Arc::new(Wakeups {
        // Every worker is looked at once first, to start waiting on its queue.
        woken: Mutex::new((0..count).collect()),
        listed: (0..count).map(|_| AtomicBool::new(true)).collect(),
        called: AtomicBool::new(true),
        driver: AtomicWaker::new(),
    });
    let mut workers: Vec<Worker<J, Fut>> = queues
        .into_iter()
        .enumerate()
        .map(|(index, queue)| Worker {
            queue,
            job: Box::pin(None),
            done: None,
            waker: Waker::from(Arc::new(WorkerWaker {
                wakeups: wakeups.clone(),
                worker: index,
            })),
            finished: false,
        })
        .collect();
    let mut open = count;
    let flag = stop.clone();
    // One wait for the stop signal for the driver's whole life.
    let stopped = async move {
        let mut stop = stop;
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    let mut taken = Vec::new();
    let interrupted_by_stop = std::future::poll_fn(|cx| {
        let mut rounds = 0;
        wakeups.driver.register(cx.waker());
        if stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(true);
        }
        loop {
            // Cleared before the list is taken: a worker listed after this wakes the driver.
            wakeups.called.store(false, Ordering::Release);
            std::mem::swap(&mut taken, &mut *wakeups.woken.lock().unwrap());
            if taken.is_empty() {
                return Poll::Pending;
            }
            for index in taken.drain(..) {
                // Cleared before the worker runs: a wake-up during its turn lists it again.
                wakeups.listed[index].store(false, Ordering::Release);
                if workers[index].turn(&*run, &counters, &flag) {
                    open -= 1;
                    if open == 0 {
                        return Poll::Ready(false);
                    }
                }
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
        for worker in &mut workers {
            if worker.job.is_some() {
                // Dropping the job's future stops it; its completion says it did not run.
                worker.job.set(None);
                worker.done = None;
                interrupted += 1;
            }
            worker.queue.close();
            while let Some(slot) = worker.queue.try_recv() {
                not_run.push(slot.job);
            }
        }
    }
    (not_run, interrupted)
}
