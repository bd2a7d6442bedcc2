//! A keyed executor: every job carries a key, the key's hash picks one of a fixed number of
//! workers, and each worker runs its bounded FIFO queue one job at a time.
//!
//! So jobs of one key complete strictly in submission order, and jobs of different keys run in
//! parallel up to the number of workers. The workers are driven by a few tokio tasks (the
//! drivers, [`PoolConfig::drivers`]): a worker whose job waits (on I/O, a timer) lets every
//! other worker run, and a job that completes at once costs no task wake-up of its own. Their
//! numbers are fixed at construction and do not grow with the number of keys.
//!
//! * Back-pressure, never loss: [`KeyedPool::submit`] waits while the key's queue is full;
//!   [`KeyedPool::try_submit`] hands the job back when it is full or closed.
//! * [`KeyedPool::submit_all`] queues many jobs as `submit` would one after another, handing
//!   each driver its share at once.
//! * [`KeyedPool::submit_tracked`] returns a [`Completion`] that says how the job ended, so the
//!   caller can act (acknowledge a message, say) only after success.
//! * A panicking job is caught and reported as that job's failure; its worker lives on.
//! * [`KeyedPool::shutdown`] runs every queued job; [`KeyedPool::shutdown_within`] stops at a
//!   deadline and hands back the jobs it did not start.
//!
//! ```
//! use keyed_pool::{KeyedPool, PoolConfig};
//! use std::sync::{Arc, Mutex};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let sink = seen.clone();
//! let pool = KeyedPool::new(PoolConfig::default(), move |(key, n): (&'static str, u32)| {
//!     let sink = sink.clone();
//!     async move {
//!         sink.lock().unwrap().push((key, n));
//!         Ok::<(), std::convert::Infallible>(())
//!     }
//! });
//! for n in 0..3 {
//!     pool.submit(&"a", ("a", n)).await.unwrap();
//!     pool.submit(&"b", ("b", n)).await.unwrap();
//! }
//! let report = pool.shutdown().await;
//! assert!(report.not_run.is_empty());
//! let seen = seen.lock().unwrap();
//! let a: Vec<_> = seen.iter().filter(|(k, _)| *k == "a").map(|(_, n)| *n).collect();
//! assert_eq!(a, [0, 1, 2]);
//! # }
//! ```
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![forbid(unsafe_code)]

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Default number of workers.
///
/// A worker is one tokio task (a few hundred bytes when idle), so the cost of many workers is
/// small, while the benefit is large: a slow key delays only the keys that share its worker,
/// about `1 / workers` of all keys, and handlers that wait on I/O overlap up to `workers` at a
/// time. 1 024 matches the design this project starts from; `docs/performance.md` shows the
/// measured effect.
pub const DEFAULT_WORKERS: usize = 1024;

/// Default number of driver tasks ([`PoolConfig::drivers`]).
///
/// Each runs its share of the workers. More drivers spread the workers over more tasks: a job
/// that blocks its thread (synchronous I/O, a long computation) holds up only the workers of its
/// driver, about `1 / drivers` of the keys. Fewer drivers wake fewer tasks: with one task per
/// worker, almost every event of a batch woke a task of its own, and that cost as much as a
/// sixth of the bus's work per event (`docs/performance.md`).
pub const DEFAULT_DRIVERS: usize = 16;

/// Default queue capacity per worker.
///
/// Large enough that a burst for one key does not stop the submitter, small enough that the
/// total (`workers × capacity`) stays bounded; a transport usually bounds the jobs in flight
/// further by its own window (JetStream's MaxAckPending).
pub const DEFAULT_QUEUE_CAPACITY: usize = 1000;

/// Seeds of the key hash. Fixed, so a key lands on the same worker in every run, which keeps
/// benchmarks and failures reproducible; keys come from the application, not an adversary.
const HASH_SEEDS: (u64, u64, u64, u64) = (
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
);

/// Sizes of a [`KeyedPool`]. With the `serde` feature it deserialises, every field optional.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct PoolConfig {
    /// Number of workers (default [`DEFAULT_WORKERS`]); at least 1. Each runs the jobs of its
    /// keys one at a time; up to this many jobs wait (on I/O, say) at once.
    pub workers: usize,
    /// Capacity of each worker's queue (default [`DEFAULT_QUEUE_CAPACITY`]); at least 1.
    pub queue_capacity: usize,
    /// Number of tokio tasks that drive the workers (default [`DEFAULT_DRIVERS`]; at least 1,
    /// at most `workers`). A job that blocks its thread holds up the workers of its driver.
    pub drivers: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            workers: DEFAULT_WORKERS,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            drivers: DEFAULT_DRIVERS,
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// The job returned `Ok`.
    Succeeded,
    /// The job returned an error; its text.
    Failed(String),
    /// The job panicked; the panic message.
    Panicked(String),
    /// The job was not run to completion: the pool stopped at its shutdown deadline before
    /// starting it, or while it was running.
    NotRun,
}

/// Resolves to the [`JobOutcome`] of one job submitted with [`KeyedPool::submit_tracked`].
#[derive(Debug)]
pub struct Completion(oneshot::Receiver<JobOutcome>);

impl Future for Completion {
    type Output = JobOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<JobOutcome> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(JobOutcome::NotRun))
    }
}

/// [`KeyedPool::submit`] failed because the pool is shutting down; the job is handed back.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed<J>(pub J);

impl<J> fmt::Display for Closed<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("keyed pool is shut down")
    }
}

impl<J: fmt::Debug> std::error::Error for Closed<J> {}

/// [`KeyedPool::try_submit`] failed; the job is handed back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySubmitError<J> {
    /// The key's worker queue is full.
    Full(J),
    /// The pool is shutting down.
    Closed(J),
}

impl<J> TrySubmitError<J> {
    /// The job that was not submitted.
    pub fn into_inner(self) -> J {
        match self {
            TrySubmitError::Full(j) | TrySubmitError::Closed(j) => j,
        }
    }
}

impl<J> fmt::Display for TrySubmitError<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySubmitError::Full(_) => f.write_str("keyed pool worker queue is full"),
            TrySubmitError::Closed(_) => f.write_str("keyed pool is shut down"),
        }
    }
}

impl<J: fmt::Debug> std::error::Error for TrySubmitError<J> {}

/// A snapshot of a pool's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolMetrics {
    /// Jobs waiting in each worker's queue (not counting the one it is running).
    pub queue_depths: Vec<usize>,
    /// Jobs that finished (successfully or not).
    pub jobs_run: u64,
    /// Jobs that returned an error.
    pub failures: u64,
    /// Jobs that panicked.
    pub panics: u64,
}

impl PoolMetrics {
    /// Jobs waiting in all queues.
    pub fn queued(&self) -> usize {
        self.queue_depths.iter().sum()
    }
}

/// Reads a pool's queue depths; see [`KeyedPool::probe`].
pub struct PoolProbe<J> {
    rooms: Vec<Arc<Room>>,
    open: Arc<AtomicBool>,
    _jobs: std::marker::PhantomData<fn() -> J>,
}

impl<J> PoolProbe<J> {
    /// Jobs waiting in all queues now (not counting those running); 0 once the pool is shut
    /// down.
    pub fn queued(&self) -> usize {
        if self.open.load(Ordering::Acquire) {
            self.rooms.iter().map(|room| room.queued()).sum()
        } else {
            0
        }
    }
}

impl<J> Clone for PoolProbe<J> {
    fn clone(&self) -> Self {
        Self {
            rooms: self.rooms.clone(),
            open: self.open.clone(),
            _jobs: std::marker::PhantomData,
        }
    }
}

impl<J> fmt::Debug for PoolProbe<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolProbe")
            .field("queued", &self.queued())
            .finish()
    }
}

/// What [`KeyedPool::shutdown_within`] left undone.
#[derive(Debug)]
pub struct ShutdownReport<J> {
    /// Queued jobs that were never started, handed back in per-worker submission order.
    pub not_run: Vec<J>,
    /// Jobs that were running at the deadline and were stopped (their futures dropped).
    pub interrupted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    jobs_run: AtomicU64,
    failures: AtomicU64,
    panics: AtomicU64,
}

struct Slot<J> {
    job: J,
    done: Option<oneshot::Sender<JobOutcome>>,
}

/// The keyed executor; see the [crate documentation](crate).
pub struct KeyedPool<J> {
    /// Per driver: where jobs are posted to it. Worker `w` is driver `w % drivers`'s worker
    /// `w / drivers`.
    ports: Vec<Port<J>>,
    /// Per worker: its jobs not yet taken, and who waits for a place.
    rooms: Vec<Arc<Room>>,
    capacity: usize,
    /// Cleared once the pool takes no more jobs: probes then read 0.
    open: Arc<AtomicBool>,
    hasher: ahash::RandomState,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    /// The driver tasks.
    workers: Vec<JoinHandle<(Vec<J>, u64)>>,
}

impl<J> fmt::Debug for KeyedPool<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedPool")
            .field("workers", &self.rooms.len())
            .finish_non_exhaustive()
    }
}

/// Dropped without [`KeyedPool::shutdown`], the pool still runs what was submitted: its drivers
/// end once they have.
impl<J> Drop for KeyedPool<J> {
    fn drop(&mut self) {
        self.seal();
    }
}

impl<J> KeyedPool<J> {
    /// No more jobs: each driver runs what was posted to it, then ends.
    fn seal(&self) {
        self.open.store(false, Ordering::Release);
        for port in &self.ports {
            port.mailbox.seal();
            port.call();
        }
    }
}

/// The message of a caught panic: its payload when that is a string (what `panic!` with a
/// message gives), or a placeholder saying it was not.
///
/// ```
/// let payload = std::panic::catch_unwind(|| panic!("worker {} failed", 3)).unwrap_err();
/// assert_eq!(keyed_pool::panic_message(&*payload), "worker 3 failed");
/// ```
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

impl<J: Send + 'static> KeyedPool<J> {
    /// Starts `config.workers` workers, driven by `config.drivers` tasks on the current tokio
    /// runtime, each worker running `run` on the jobs of its queue one at a time.
    ///
    /// # Panics
    /// If called outside a tokio runtime, or if a size in `config` is 0.
    pub fn new<F, Fut, E>(config: PoolConfig, run: F) -> Self
    where
        F: Fn(J) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display + 'static,
    {
        assert!(config.workers > 0, "keyed pool needs at least one worker");
        assert!(
            config.queue_capacity > 0,
            "keyed pool queues need a capacity of at least 1"
        );
        assert!(config.drivers > 0, "keyed pool needs at least one driver");
        let run = Arc::new(run);
        let counters = Arc::new(Counters::default());
        let (stop, stop_rx) = watch::channel(false);
        let drivers = config.drivers.min(config.workers);
        let rooms: Vec<Arc<Room>> = (0..config.workers).map(|_| Arc::default()).collect();
        // Worker `w` is driven by driver `w % drivers`: neighbours apart.
        let ports: Vec<Port<J>> = (0..drivers)
            .map(|d| Port::new((d..config.workers).step_by(drivers).count()))
            .collect();
        let workers = ports
            .iter()
            .enumerate()
            .map(|(d, port)| {
                let rooms = rooms.iter().skip(d).step_by(drivers).cloned().collect();
                tokio::spawn(driver::drive(
                    port.clone(),
                    driver::CloseOnEnd::new(port, rooms),
                    config.queue_capacity,
                    run.clone(),
                    counters.clone(),
                    stop_rx.clone(),
                ))
            })
            .collect();
        Self {
            ports,
            rooms,
            capacity: config.queue_capacity,
            open: Arc::new(AtomicBool::new(true)),
            hasher: ahash::RandomState::with_seeds(
                HASH_SEEDS.0,
                HASH_SEEDS.1,
                HASH_SEEDS.2,
                HASH_SEEDS.3,
            ),
            counters,
            stop,
            workers,
        }
    }

    /// The number of workers.
    pub fn workers(&self) -> usize {
        self.rooms.len()
    }

    /// The worker that runs the jobs of `key`.
    pub fn worker_for<K: Hash + ?Sized>(&self, key: &K) -> usize {
        // Multiply-shift reduction: uniform for a uniform hash, and cheaper than `%`.
        ((u128::from(self.hasher.hash_one(key)) * self.rooms.len() as u128) >> 64) as usize
    }

    /// Queues `job` behind the earlier jobs of `key`, waiting while that queue is full.
    pub async fn submit<K: Hash + ?Sized>(&self, key: &K, job: J) -> Result<(), Closed<J>> {
        self.put(key, Slot { job, done: None }).await
    }

    async fn put<K: Hash + ?Sized>(&self, key: &K, slot: Slot<J>) -> Result<(), Closed<J>> {
        let worker = self.worker_for(key);
        let port = self.port_of(worker);
        // Room in the queue is the usual case: taken without making a waiting future.
        if !self.rooms[worker].try_reserve(self.capacity)
            && !self.rooms[worker]
                .reserve(self.capacity, &port.mailbox)
                .await
        {
            return Err(Closed(slot.job));
        }
        self.post_one(worker, slot).map_err(|slot| Closed(slot.job))
    }

    /// Queues each of `jobs` behind the earlier jobs of its key, as [`submit`](Self::submit)
    /// would one after another, but hands each driver its share of them at once: one lock and
    /// at most one wake-up per driver, where jobs submitted one by one take one each. Waits
    /// while a job's queue is full; the jobs of its driver gathered before it are queued
    /// meanwhile, and no later job is.
    ///
    /// If the pool stops taking jobs, the ones not queued are handed back, in submission order.
    pub async fn submit_all<'k, K, I>(&self, jobs: I) -> Result<(), Closed<Vec<J>>>
    where
        K: Hash + ?Sized + 'k,
        I: IntoIterator<Item = (&'k K, J)>,
    {
        let drivers = self.ports.len();
        // Each job with its worker and driver, then their places grouped by driver (a counting
        // sort), in submission order within each, so each key's jobs keep theirs. What is
        // handed back is put back in its place first.
        let mut jobs: Vec<(usize, usize, Option<J>)> = jobs
            .into_iter()
            .map(|(key, job)| {
                let worker = self.worker_for(key);
                (worker, worker % drivers, Some(job))
            })
            .collect();
        let mut starts = vec![0u32; drivers + 1];
        for (_, driver, _) in &jobs {
            starts[driver + 1] += 1;
        }
        for driver in 0..drivers {
            starts[driver + 1] += starts[driver];
        }
        let mut order = vec![0u32; jobs.len()];
        let mut next = starts.clone();
        for (at, (_, driver, _)) in jobs.iter().enumerate() {
            order[next[*driver] as usize] = at as u32;
            next[*driver] += 1;
        }
        let mut share: Vec<(usize, Slot<J>)> = Vec::new();
        // Where in `jobs` each job of `share` was.
        let mut places: Vec<usize> = Vec::new();
        for driver in 0..drivers {
            for &at in &order[starts[driver] as usize..starts[driver + 1] as usize] {
                let at = at as usize;
                let worker = jobs[at].0;
                let room = &self.rooms[worker];
                if !room.try_reserve(self.capacity) {
                    // The jobs gathered so far go now; then this one waits for a place.
                    if let Err(not_posted) = self.post(driver, &mut share) {
                        return Err(hand_back(jobs, places, not_posted));
                    }
                    places.clear();
                    if !room
                        .reserve(self.capacity, &self.ports[driver].mailbox)
                        .await
                    {
                        return Err(hand_back(jobs, places, Vec::new()));
                    }
                }
                let job = jobs[at].2.take().expect("each job is taken once");
                share.push((worker / drivers, Slot { job, done: None }));
                places.push(at);
            }
            if let Err(not_posted) = self.post(driver, &mut share) {
                return Err(hand_back(jobs, places, not_posted));
            }
            places.clear();
        }
        Ok(())
    }

    /// Posts `share` (jobs of `driver`'s workers, their places reserved) to `driver`, and
    /// calls it if its mailbox was empty. If the mailbox is closed their places are given back
    /// and the jobs handed back, in order.
    fn post(&self, driver: usize, share: &mut Vec<(usize, Slot<J>)>) -> Result<(), Vec<Slot<J>>> {
        if share.is_empty() {
            return Ok(());
        }
        let port = &self.ports[driver];
        match port.mailbox.post(share) {
            Ok(true) => {
                port.call();
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(PostClosed(jobs)) => {
                let drivers = self.ports.len();
                Err(jobs
                    .into_iter()
                    .map(|(index, slot)| {
                        self.rooms[index * drivers + driver].release(self.capacity);
                        slot
                    })
                    .collect())
            }
        }
    }

    /// [`post`](Self::post) for one job of `worker`, its place reserved.
    fn post_one(&self, worker: usize, slot: Slot<J>) -> Result<(), Slot<J>> {
        let port = self.port_of(worker);
        match port.mailbox.post_one(self.index_of(worker), slot) {
            Ok(true) => {
                port.call();
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(slot) => {
                self.rooms[worker].release(self.capacity);
                Err(slot)
            }
        }
    }

    /// The port of `worker`'s driver.
    fn port_of(&self, worker: usize) -> &Port<J> {
        &self.ports[self.driver_of(worker)]
    }

    /// The driver of `worker`.
    fn driver_of(&self, worker: usize) -> usize {
        worker % self.ports.len()
    }

    /// `worker`'s index among its driver's workers.
    fn index_of(&self, worker: usize) -> usize {
        worker / self.ports.len()
    }

    /// Like [`submit`](Self::submit), and returns a [`Completion`] for the job.
    pub async fn submit_tracked<K: Hash + ?Sized>(
        &self,
        key: &K,
        job: J,
    ) -> Result<Completion, Closed<J>> {
        let (tx, rx) = oneshot::channel();
        let slot = Slot {
            job,
            done: Some(tx),
        };
        self.put(key, slot).await?;
        Ok(Completion(rx))
    }

    /// Queues `job` if the key's queue has room; hands it back otherwise.
    pub fn try_submit<K: Hash + ?Sized>(&self, key: &K, job: J) -> Result<(), TrySubmitError<J>> {
        let worker = self.worker_for(key);
        if self.port_of(worker).mailbox.is_closed() {
            return Err(TrySubmitError::Closed(job));
        }
        if !self.rooms[worker].try_reserve(self.capacity) {
            return Err(TrySubmitError::Full(job));
        }
        let slot = Slot { job, done: None };
        self.post_one(worker, slot)
            .map_err(|slot| TrySubmitError::Closed(slot.job))
    }

    /// A snapshot of the pool's counters.
    pub fn metrics(&self) -> PoolMetrics {
        PoolMetrics {
            queue_depths: self.rooms.iter().map(|room| room.queued()).collect(),
            jobs_run: self.counters.jobs_run.load(Ordering::Relaxed),
            failures: self.counters.failures.load(Ordering::Relaxed),
            panics: self.counters.panics.load(Ordering::Relaxed),
        }
    }

    /// A handle that reads the queue depths from elsewhere (a metrics sampler) without
    /// keeping the pool's queues open.
    pub fn probe(&self) -> PoolProbe<J> {
        PoolProbe {
            rooms: self.rooms.clone(),
            open: self.open.clone(),
            _jobs: std::marker::PhantomData,
        }
    }

    /// Stops accepting jobs, runs every queued job, and waits for the workers to finish.
    pub async fn shutdown(self) -> ShutdownReport<J> {
        self.finish(None).await
    }

    /// Stops accepting jobs and runs queued jobs until `deadline`; then stops running jobs and
    /// hands back the ones not started.
    pub async fn shutdown_within(self, deadline: Duration) -> ShutdownReport<J> {
        self.finish(Some(deadline)).await
    }

    async fn finish(mut self, deadline: Option<Duration>) -> ShutdownReport<J> {
        self.seal();
        let stop = self.stop.clone();
        let mut joined = futures::future::join_all(std::mem::take(&mut self.workers));
        let results = match deadline {
            None => (&mut joined).await,
            Some(deadline) => match tokio::time::timeout(deadline, &mut joined).await {
                Ok(results) => results,
                Err(_) => {
                    let _ = stop.send(true);
                    joined.await
                }
            },
        };
        let mut report = ShutdownReport {
            not_run: Vec::new(),
            interrupted: 0,
        };
        for result in results {
            match result {
                Ok((not_run, interrupted)) => {
                    report.not_run.extend(not_run);
                    report.interrupted += interrupted;
                }
                Err(e) => tracing::error!(error = %e, "keyed pool driver ended abnormally"),
            }
        }
        report
    }
}

/// What [`KeyedPool::submit_all`] hands back when the pool stopped, in submission order: the
/// jobs gathered for a driver and not posted (taken from `places` of `jobs`) put back, and every
/// job not taken.
fn hand_back<J>(
    mut jobs: Vec<(usize, usize, Option<J>)>,
    places: Vec<usize>,
    not_posted: Vec<Slot<J>>,
) -> Closed<Vec<J>> {
    for (at, slot) in places.into_iter().zip(not_posted) {
        jobs[at].2 = Some(slot.job);
    }
    Closed(jobs.into_iter().filter_map(|(_, _, job)| job).collect())
}

mod driver;
mod mailbox;

use driver::Port;
use mailbox::{PostClosed, Room};

#[cfg(test)]
mod tests;
