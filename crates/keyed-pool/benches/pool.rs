//! Keyed-pool throughput by number of distinct keys, and the cost of one slow key.
//!
//! `cargo bench -p keyed-pool`. Results and their reading are in `docs/performance.md`.
#![allow(missing_docs)]

use std::time::Duration;

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
    let rt = runtime();
    let mut group = c.benchmark_group("jobs_per_second");
    group.throughput(Throughput::Elements(JOBS));
    group.sample_size(10);
    for keys in [1u64, 1_000, 1_000_000] {
        group.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, &keys| {
            b.to_async(&rt).iter(|| async move {
                let pool = KeyedPool::new(PoolConfig::default(), |n: u64| async move {
                    std::hint::black_box(n);
                    Ok::<(), std::convert::Infallible>(())
                });
                for i in 0..JOBS {
                    pool.submit(&(i % keys), i).await.unwrap();
                }
                pool.shutdown().await;
            });
        });
    }
    group.finish();
}

/// One key in a hundred sleeps 1 ms per job; every other key is instant. With W workers the
/// slow key's worker also serves about 1/W of the other keys, which wait behind it.
fn head_of_line(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("one_slow_key");
    group.sample_size(10);
    for workers in [16usize, 256, 1024] {
        group.bench_with_input(
            BenchmarkId::from_parameter(workers),
            &workers,
            |b, &workers| {
                b.to_async(&rt).iter(|| async move {
                    let config = PoolConfig {
                        workers,
                        ..PoolConfig::default()
                    };
                    let pool = KeyedPool::new(config, |slow: bool| async move {
                        if slow {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Ok::<(), std::convert::Infallible>(())
                    });
                    for i in 0..20_000u64 {
                        let slow = i % 100 == 0;
                        let key = if slow { u64::MAX } else { i };
                        pool.submit(&key, slow).await.unwrap();
                    }
                    pool.shutdown().await;
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, distinct_keys, head_of_line);
criterion_main!(benches);
