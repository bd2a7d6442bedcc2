//! Keyed-pool throughput by number of distinct keys, and the cost of one slow key.
//!
//! `cargo bench -p keyed-pool`. Results and their reading are in `docs/performance.md`.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keyed_pool::{KeyedPool, PoolConfig};

const JOBS: u64 = 100_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

fn distinct_keys(c: &mut Criterion) {
    jobs_per_second(c, "jobs_per_second", None);
}

/// The same jobs handed over with `submit_all` in runs of 128 (a record batch's events), each
/// driver taking its share of a run at once.
fn distinct_keys_in_runs(c: &mut Criterion) {
    jobs_per_second(c, "jobs_per_second_in_runs_of_128", Some(128));
}

/// `JOBS` jobs over 1, 1 000 and 1 000 000 keys, each submitted alone or, with `run`, in runs
/// of that many with `submit_all`.
fn jobs_per_second(c: &mut Criterion, name: &str, run: Option<u64>) {
    let rt = runtime();
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(JOBS));
    group.sample_size(10);
    for keys in [1u64, 1_000, 1_000_000] {
        group.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, &keys| {
            b.to_async(&rt).iter(|| async move {
                let pool = KeyedPool::new(PoolConfig::default(), |n: u64| async move {
                    std::hint::black_box(n);
                    Ok::<(), std::convert::Infallible>(())
                });
                match run {
                    None => {
                        for i in 0..JOBS {
                            pool.submit(&(i % keys), i).await.unwrap();
                        }
                    }
                    Some(run) => {
                        let mut keyed = Vec::with_capacity(run as usize);
                        for start in (0..JOBS).step_by(run as usize) {
                            keyed.clear();
                            keyed.extend((start..(start + run).min(JOBS)).map(|i| i % keys));
                            pool.submit_all(keyed.iter().zip(start..)).await.unwrap();
                        }
                    }
                }
                pool.shutdown().await;
            });
        });
    }
    group.finish();
}

/// One key in a hundred sleeps 1 ms per job; every other key is instant. With W workers the
/// slow key's worker also serves about 1/W of the other keys, which wait behind it, and once its
/// queue is full the producer waits too. Two measures, both from the first submit: when 99 % of
/// the fast keys' jobs have finished (`one_slow_key`), and when the last one has
/// (`one_slow_key_last`). The slow key's own 200 jobs take at least 200 ms whatever the pool
/// does.
fn head_of_line(c: &mut Criterion) {
    let rt = runtime();
    for (name, measure) in [
        ("one_slow_key", Measure::NinetyNinePercent),
        ("one_slow_key_last", Measure::Last),
    ] {
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        for workers in [16usize, 256, 1024] {
            group.bench_with_input(
                BenchmarkId::from_parameter(workers),
                &workers,
                |b, &workers| {
                    b.to_async(&rt).iter_custom(|iterations| async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iterations {
                            total += fast_keys_done(workers, measure).await;
                        }
                        total
                    });
                },
            );
        }
        group.finish();
    }
}

#[derive(Clone, Copy)]
enum Measure {
    NinetyNinePercent,
    Last,
}

const SLOW_ROUND_JOBS: u64 = 20_000;

/// Runs one round of [`head_of_line`] and returns when the measured share of fast jobs had
/// finished, counted from the first submit.
async fn fast_keys_done(workers: usize, measure: Measure) -> Duration {
    let config = PoolConfig {
        workers,
        ..PoolConfig::default()
    };
    let fast_jobs = SLOW_ROUND_JOBS - SLOW_ROUND_JOBS / 100;
    let target = match measure {
        Measure::NinetyNinePercent => fast_jobs * 99 / 100,
        Measure::Last => fast_jobs,
    };
    let start = Instant::now();
    let finished = Arc::new(AtomicU64::new(0));
    // Nanoseconds after `start` at which the target count of fast jobs was reached.
    let reached = Arc::new(AtomicU64::new(0));
    let pool = {
        let (finished, reached) = (finished.clone(), reached.clone());
        KeyedPool::new(config, move |slow: bool| {
            let (finished, reached) = (finished.clone(), reached.clone());
            async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                } else if finished.fetch_add(1, Ordering::Relaxed) + 1 == target {
                    reached.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                Ok::<(), std::convert::Infallible>(())
            }
        })
    };
    for i in 0..SLOW_ROUND_JOBS {
        let slow = i % 100 == 0;
        let key = if slow { u64::MAX } else { i };
        pool.submit(&key, slow).await.unwrap();
    }
    pool.shutdown().await;
    assert_eq!(
        finished.load(Ordering::Relaxed),
        fast_jobs,
        "every fast job ran"
    );
    Duration::from_nanos(reached.load(Ordering::Relaxed))
}

criterion_group!(benches, distinct_keys, distinct_keys_in_runs, head_of_line);
criterion_main!(benches);
