//! What every handler of a row feeds (the `Sink`: latency, its stages, the order check), the
//! clock payloads are stamped with, and the sampler of tasks and threads behind the progress bar.

use super::*;
use std::time::SystemTime;

/// The clock every timestamp in a payload is relative to.
pub(crate) fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the Unix epoch: the clock payloads are stamped with, the same in every
/// process of a row (members of a group are other processes).
pub(crate) fn wall_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(crate) fn stamped_payload(size: usize) -> Vec<u8> {
    let mut payload = vec![0xA5u8; size.max(8)];
    payload[..8].copy_from_slice(&wall_nanos().to_le_bytes());
    payload
}

pub(crate) fn latency_micros(payload: &[u8]) -> u64 {
    let sent = u64::from_le_bytes(payload[..8].try_into().unwrap());
    wall_nanos().saturating_sub(sent) / 1_000
}

/// `stored` and `received` in nanoseconds since the Unix epoch. Every event of a record batch
/// was stored and received at the same two times: the last pair converted on this thread is
/// kept, and compared rather than converted again (two conversions cost about 110
/// instructions, callgrind `--quick --row default`).
fn arrival_nanos(stored: SystemTime, received: SystemTime) -> (u64, u64) {
    use std::cell::Cell;
    type Converted = Option<(SystemTime, SystemTime, u64, u64)>;
    thread_local! {
        static LAST: Cell<Converted> = const { Cell::new(None) };
    }
    LAST.with(|last| match last.get() {
        Some((s, r, stored_nanos, received_nanos)) if s == stored && r == received => {
            (stored_nanos, received_nanos)
        }
        _ => {
            let nanos = |t: SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            };
            let converted = (nanos(stored), nanos(received));
            last.set(Some((stored, received, converted.0, converted.1)));
            converted
        }
    })
}

/// What every handler of a row feeds.
pub(crate) struct Sink {
    pub(crate) verifier: SequenceVerifier,
    pub(crate) latency: Histogram,
    /// Publish to stored, stored to received, received to handler start (see `report::Stages`).
    pub(crate) stages: [Histogram; 3],
    pub(crate) handled: AtomicU64,
    /// For group rows, what the member processes saw.
    pub(crate) group_violations: AtomicU64,
    pub(crate) group_duplicates: AtomicU64,
    pub(crate) group_unique: AtomicU64,
    pub(crate) expected: u64,
    pub(crate) done: Notify,
    pub(crate) delay: Option<Duration>,
    /// The row's broker process, if it is one server.
    broker: Option<u32>,
    /// CPU use from when the row's runner starts its clock ([`Sink::clock_started`]).
    cpu: std::sync::Mutex<Option<crate::stats::CpuUse>>,
}

impl Sink {
    pub(crate) fn new(expected: u64, delay: Option<Duration>, broker: Option<u32>) -> Arc<Self> {
        Arc::new(Self {
            verifier: SequenceVerifier::new(),
            latency: Histogram::new(),
            stages: [Histogram::new(), Histogram::new(), Histogram::new()],
            handled: AtomicU64::new(0),
            group_violations: AtomicU64::new(0),
            group_duplicates: AtomicU64::new(0),
            group_unique: AtomicU64::new(0),
            expected,
            done: Notify::new(),
            delay,
            broker,
            cpu: std::sync::Mutex::new(None),
        })
    }

    /// The row's runner starts its clock: CPU use is measured from here (setup left out).
    pub(crate) fn clock_started(&self) {
        *self.cpu.lock().unwrap() = Some(crate::stats::CpuUse::start(self.broker));
    }

    /// Cores kept busy since [`Sink::clock_started`]: (this process, the broker).
    pub(crate) fn cores(&self) -> (Option<f64>, Option<f64>) {
        self.cpu
            .lock()
            .unwrap()
            .as_ref()
            .map_or((None, None), crate::stats::CpuUse::cores)
    }

    pub(crate) fn record(&self, topic: &str, aggregate: &str, version: u64, payload: &[u8]) {
        self.record_sent_at(
            topic,
            aggregate,
            version,
            u64::from_le_bytes(payload[..8].try_into().unwrap()),
        );
    }

    /// Records an event sent at `sent_nanos` (wall clock).
    pub(crate) fn record_sent_at(
        &self,
        topic: &str,
        aggregate: &str,
        version: u64,
        sent_nanos: u64,
    ) {
        let now = wall_nanos();
        self.latency.record(now.saturating_sub(sent_nanos) / 1_000);
        // Read in place: a copy of the whole delivery is not needed for two times.
        if let Some((Some(stored), Some(received))) =
            bus_core::with_current_delivery(|d| (d.stored_at, d.received_at))
        {
            let (stored, received) = arrival_nanos(stored, received);
            self.stages[0].record(stored.saturating_sub(sent_nanos) / 1_000);
            self.stages[1].record(received.saturating_sub(stored) / 1_000);
            self.stages[2].record(now.saturating_sub(received) / 1_000);
        }
        self.verifier.record(topic, aggregate, version);
        if self.handled.fetch_add(1, Ordering::AcqRel) + 1 == self.expected {
            self.done.notify_one();
        }
    }

    pub(crate) async fn wait(&self, timeout: Duration) -> Result<()> {
        let finished = tokio::time::timeout(timeout, async {
            loop {
                let notified = self.done.notified();
                if self.handled.load(Ordering::Acquire) >= self.expected {
                    return;
                }
                notified.await;
            }
        })
        .await;
        if finished.is_err() {
            bail!(
                "only {} of {} messages were handled within {timeout:?}",
                self.handled.load(Ordering::Acquire),
                self.expected
            );
        }
        Ok(())
    }
}

/// Samples tasks and threads while a row runs, and drives its progress bar.
pub(crate) fn start_sampler(
    sink: Arc<Sink>,
    bar: ProgressBar,
) -> (tokio::task::JoinHandle<(u64, u64)>, Arc<Notify>) {
    let stop = Arc::new(Notify::new());
    let stopped = stop.clone();
    let handle = tokio::spawn(async move {
        let (mut tasks, mut threads) = (0u64, 0u64);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = stopped.notified() => break,
                _ = tick.tick() => {
                    let metrics = tokio::runtime::Handle::current().metrics();
                    tasks = tasks.max(metrics.num_alive_tasks() as u64);
                    threads = threads.max(stats::threads());
                    bar.set_position(sink.handled.load(Ordering::Relaxed));
                }
            }
        }
        bar.set_position(sink.handled.load(Ordering::Relaxed));
        (tasks, threads)
    });
    (handle, stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_times_converted_again_only_when_they_change() {
        let at = |nanos: u64| std::time::UNIX_EPOCH + Duration::from_nanos(nanos);
        assert_eq!(arrival_nanos(at(10), at(25)), (10, 25));
        // The same pair, from the kept conversion.
        assert_eq!(arrival_nanos(at(10), at(25)), (10, 25));
        // Either time changed: converted again, not taken from the kept pair.
        assert_eq!(arrival_nanos(at(10), at(40)), (10, 40));
        assert_eq!(arrival_nanos(at(30), at(40)), (30, 40));
    }
}
