//! Latency histogram and process sampling.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// Sub-buckets per power of two: about 1.5 % resolution.
const SUB: usize = 64;
const BUCKETS: usize = 40 * SUB;

/// Copies of the counts a histogram keeps (see [`Histogram`]).
const STRIPES: usize = 8;

/// A lock-free log-linear histogram of microseconds.
///
/// Threads record into their own copy of the counts (one of [`STRIPES`], picked once per
/// thread), summed when read: handlers on several runtime threads recording into one set of
/// counts would pass the same few cache lines back and forth on every event, a cost of the
/// measurement that a row handled on one thread (the raw clients) does not pay.
pub(crate) struct Histogram {
    counts: Vec<AtomicU64>,
}

/// This thread's stripe: threads take them in turn.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

fn index(micros: u64) -> usize {
    if micros < SUB as u64 {
        return micros as usize;
    }
    let power = 63 - micros.leading_zeros() as usize; // >= 6
    let shift = power - 6;
    let sub = ((micros >> shift) as usize) - SUB;
    ((power - 5) * SUB + sub).min(BUCKETS - 1)
}

fn lower_bound(index: usize) -> u64 {
    if index < SUB {
        return index as u64;
    }
    let power = index / SUB + 5;
    let sub = index % SUB;
    ((SUB + sub) as u64) << (power - 6)
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Self {
            counts: (0..STRIPES * BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(crate) fn record(&self, micros: u64) {
        self.counts[stripe() * BUCKETS + index(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// Values recorded.
    pub(crate) fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The counts of every bucket (every thread's together), to carry a histogram to another
    /// process.
    pub(crate) fn counts(&self) -> Vec<u64> {
        let mut counts = vec![0; BUCKETS];
        for stripe in self.counts.chunks(BUCKETS) {
            for (sum, c) in counts.iter_mut().zip(stripe) {
                *sum += c.load(Ordering::Relaxed);
            }
        }
        counts
    }

    /// Adds the counts of another histogram (from [`counts`](Self::counts)).
    pub(crate) fn add(&self, counts: &[u64]) {
        for (mine, theirs) in self.counts[stripe() * BUCKETS..].iter().zip(counts) {
            mine.fetch_add(*theirs, Ordering::Relaxed);
        }
    }

    /// The value at quantile `q` (0..1), in milliseconds.
    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return lower_bound(i) as f64 / 1000.0;
            }
        }
        lower_bound(BUCKETS - 1) as f64 / 1000.0
    }
}

/// Reads a field such as `VmHWM` or `Threads` from /proc/self/status.
fn status_field(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resets the kernel's peak-RSS counter of this process, so each row reports its own peak.
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory since the last reset, in MiB.
pub(crate) fn peak_rss_mib() -> f64 {
    status_field("VmHWM").unwrap_or(0) as f64 / 1024.0
}

/// OS threads of this process.
pub(crate) fn threads() -> u64 {
    status_field("Threads").unwrap_or(0)
}

/// CPU time (user and system, every thread) that process `pid` has used so far, in seconds;
/// this process for `None`. `None` when it cannot be read (not Linux, the process is gone).
pub(crate) fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let ticks = cpu_ticks(&std::fs::read_to_string(path).ok()?)?;
    // /proc counts in USER_HZ, which Linux fixes at 100 a second for user space.
    Some(ticks as f64 / 100.0)
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2,
/// in parentheses) may hold spaces and parentheses itself, so fields are counted from after
/// its last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    // Field 3 (the state) is the first after the name.
    let mut fields = after_name.split_ascii_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Measures the cores a row keeps busy: CPU time used by this process (the bus, its publishing
/// loop and the checking sink) and by the broker, each over the wall time between
/// [`CpuUse::start`] and [`CpuUse::cores`]. On a machine the two share, what they leave idle
/// says whether a row's rate or tail is bound by CPU.
pub(crate) struct CpuUse {
    started: Instant,
    bus: Option<f64>,
    broker: Option<(u32, f64)>,
}

impl CpuUse {
    pub(crate) fn start(broker: Option<u32>) -> Self {
        Self {
            started: Instant::now(),
            bus: cpu_seconds(None),
            broker: broker.and_then(|pid| Some((pid, cpu_seconds(Some(pid))?))),
        }
    }

    /// Average cores busy since the start: (this process, the broker).
    pub(crate) fn cores(&self) -> (Option<f64>, Option<f64>) {
        let wall = self.started.elapsed().as_secs_f64();
        let used = |before: f64, now: Option<f64>| now.map(|now| (now - before) / wall);
        (
            self.bus.and_then(|before| used(before, cpu_seconds(None))),
            self.broker
                .and_then(|(pid, before)| used(before, cpu_seconds(Some(pid)))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime ...
        let stat = "4242 (tokio rt) (x)) S 1 4242 4242 0 -1 4194304 120 0 0 0 731 69 5 7 20 0";
        assert_eq!(cpu_ticks(stat), Some(731 + 69));
        assert_eq!(cpu_ticks("4242 (cut short) S 1 2"), None);
        assert_eq!(cpu_ticks("no name at all"), None);
    }

    #[test]
    fn this_process_reads_its_own_cpu_time() {
        let before = cpu_seconds(None).expect("/proc/self/stat is readable on Linux");
        // Spin until the kernel has charged at least one more tick (10 ms) to this process;
        // a reading that never moves fails after 10 s of wall time.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut spins = 0u64;
        while cpu_seconds(None).unwrap() <= before && Instant::now() < deadline {
            spins = std::hint::black_box(spins + 1);
        }
        assert!(
            cpu_seconds(None).unwrap() > before,
            "no CPU time counted after {spins} spins"
        );
    }

    #[test]
    fn buckets_are_monotone_and_close() {
        let mut last = 0;
        for v in [
            0u64, 1, 63, 64, 65, 100, 1_000, 12_345, 1_000_000, 50_000_000,
        ] {
            let i = index(v);
            assert!(i >= last);
            last = i;
            let lb = lower_bound(i);
            assert!(
                lb <= v && (v - lb) as f64 <= v as f64 * 0.02 + 1.0,
                "{v} -> {lb}"
            );
        }
    }

    #[test]
    fn values_recorded_on_many_threads_are_read_together() {
        let h = std::sync::Arc::new(Histogram::new());
        // More threads than stripes: some share one.
        let threads: Vec<_> = (0..STRIPES as u64 + 3)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        h.record(1_000 * (t + 1));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(h.count(), 100 * (STRIPES as u64 + 3));
        let counts = h.counts();
        assert_eq!(counts.len(), BUCKETS);
        assert_eq!(counts[index(1_000)], 100);
        assert_eq!(counts[index(11_000)], 100);
        assert_eq!(
            h.quantile_ms(0.0),
            lower_bound(index(1_000)) as f64 / 1000.0
        );
        assert_eq!(
            h.quantile_ms(1.0),
            lower_bound(index(11_000)) as f64 / 1000.0
        );
        let copy = Histogram::new();
        copy.add(&counts);
        assert_eq!(copy.counts(), counts);
    }
}
