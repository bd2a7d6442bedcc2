//! Latency histogram and process sampling.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-buckets per power of two: about 1.5 % resolution.
const SUB: usize = 64;
const BUCKETS: usize = 40 * SUB;

/// A lock-free log-linear histogram of microseconds.
pub(crate) struct Histogram {
    counts: Vec<AtomicU64>,
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
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(crate) fn record(&self, micros: u64) {
        self.counts[index(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts of every bucket, to carry a histogram to another process.
    /// Values recorded.
    pub(crate) fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub(crate) fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Adds the counts of another histogram (from [`counts`](Self::counts)).
    pub(crate) fn add(&self, counts: &[u64]) {
        for (mine, theirs) in self.counts.iter().zip(counts) {
            mine.fetch_add(*theirs, Ordering::Relaxed);
        }
    }

    /// The value at quantile `q` (0..1), in milliseconds.
    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        let total: u64 = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        if total == 0 {
            return 0.0;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
