use super::*;
use proptest::prelude::*;
use std::sync::Mutex;

type Log = Arc<Mutex<Vec<(u32, u32)>>>;

fn recording_pool(workers: usize, capacity: usize, log: Log) -> KeyedPool<(u32, u32, u64)> {
    recording_pool_with(workers, capacity, DEFAULT_DRIVERS, log)
}

fn recording_pool_with(
    workers: usize,
    capacity: usize,
    drivers: usize,
    log: Log,
) -> KeyedPool<(u32, u32, u64)> {
    KeyedPool::new(
        PoolConfig {
            workers,
            queue_capacity: capacity,
            drivers,
        },
        move |(key, seq, delay_us): (u32, u32, u64)| {
            let log = log.clone();
            async move {
                if delay_us > 0 {
                    tokio::time::sleep(Duration::from_micros(delay_us)).await;
                } else {
                    tokio::task::yield_now().await;
                }
                log.lock().unwrap().push((key, seq));
                Ok::<(), String>(())
            }
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_job_is_reported_and_worker_lives_on() {
    let pool = KeyedPool::new(
        PoolConfig {
            workers: 1,
            queue_capacity: 4,
            ..PoolConfig::default()
        },
        |n: u32| async move {
            if n == 1 {
                panic!("job {n} exploded");
            }
            if n == 2 {
                return Err(format!("job {n} failed"));
            }
            Ok(())
        },
    );
    let first = pool.submit_tracked(&0u8, 1).await.unwrap();
    let second = pool.submit_tracked(&0u8, 2).await.unwrap();
    let third = pool.submit_tracked(&0u8, 3).await.unwrap();
    assert_eq!(first.await, JobOutcome::Panicked("job 1 exploded".into()));
    assert_eq!(second.await, JobOutcome::Failed("job 2 failed".into()));
    assert_eq!(third.await, JobOutcome::Succeeded);
    let metrics = pool.metrics();
    assert_eq!(
        (metrics.jobs_run, metrics.failures, metrics.panics),
        (3, 1, 1)
    );
    pool.shutdown().await;
}

/// Bursts of jobs for many keys, each burst submitted from a task of its own while the pool's
/// drivers are idle, on two threads: every job runs. A driver is woken only by the first of its
/// workers listed since it last took the list; a wake-up lost between a driver clearing that mark
/// and the submitter setting it would leave a job queued and its completion waiting, which the
/// timeout turns into a failure. Jobs that yield before they finish wake their own workers while
/// their driver runs, the other path into the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_after_idle_drivers_all_run() {
    let pool = Arc::new(KeyedPool::new(
        PoolConfig {
            workers: 64,
            drivers: 2,
            ..PoolConfig::default()
        },
        |n: u64| async move {
            if n.is_multiple_of(3) {
                tokio::task::yield_now().await;
            }
            Ok::<(), String>(())
        },
    ));
    let mut submitted = 0u64;
    for round in 0..2000u64 {
        let burst = 1 + round % 97;
        let submitter = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut completions = Vec::new();
                for key in 0..burst {
                    completions.push(pool.submit_tracked(&(round, key), key).await.unwrap());
                }
                completions
            })
        };
        let completions = submitter.await.unwrap();
        let outcomes = tokio::time::timeout(
            Duration::from_secs(10),
            futures::future::join_all(completions),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: a job of the burst never ran"));
        assert!(outcomes.iter().all(|o| *o == JobOutcome::Succeeded));
        submitted += burst;
    }
    assert_eq!(pool.metrics().jobs_run, submitted);
}

#[tokio::test(flavor = "current_thread")]
async fn try_submit_hands_back_on_full() {
    let (gate_tx, gate_rx) = watch::channel(false);
    let pool = KeyedPool::new(
        PoolConfig {
            workers: 1,
            queue_capacity: 1,
            ..PoolConfig::default()
        },
        move |n: u32| {
            let mut gate = gate_rx.clone();
            async move {
                gate.wait_for(|open| *open)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = n;
                Ok::<(), String>(())
            }
        },
    );
    let running = pool.submit_tracked(&0u8, 1).await.unwrap();
    // Let the worker take job 1 off the queue, so the queue is empty but the worker is busy.
    while pool.metrics().queued() != 0 {
        tokio::task::yield_now().await;
    }
    let probe = pool.probe();
    assert_eq!(probe.queued(), 0);
    pool.try_submit(&0u8, 2).unwrap();
    assert_eq!(pool.metrics().queue_depths, vec![1]);
    assert_eq!(probe.queued(), 1, "the probe sees the queued job");
    assert_eq!(pool.try_submit(&0u8, 3), Err(TrySubmitError::Full(3)));
    gate_tx.send(true).unwrap();
    assert_eq!(running.await, JobOutcome::Succeeded);
    // The probe does not keep the queues open: shutdown completes.
    let report = pool.shutdown().await;
    assert!(report.not_run.is_empty());
    assert_eq!(probe.queued(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_drains_every_queued_job() {
    let log: Log = Default::default();
    let pool = recording_pool(3, 100, log.clone());
    for seq in 0..50 {
        pool.submit(&seq, (seq % 5, seq, 0)).await.unwrap();
    }
    let report = pool.shutdown().await;
    assert!(report.not_run.is_empty());
    assert_eq!(report.interrupted, 0);
    assert_eq!(log.lock().unwrap().len(), 50);
}

/// Workers of one driver take turns: a job waiting on something another worker's job does
/// lets that job run, and its completion wakes the waiting worker alone.
#[tokio::test(flavor = "current_thread")]
async fn a_waiting_job_lets_the_other_workers_of_its_driver_run() {
    let (release, released) = tokio::sync::watch::channel(false);
    let pool = KeyedPool::new(
        PoolConfig {
            workers: 8,
            drivers: 1,
            ..PoolConfig::default()
        },
        move |key: u32| {
            let (release, mut released) = (release.clone(), released.clone());
            async move {
                if key == 0 {
                    released.wait_for(|r| *r).await.map_err(|e| e.to_string())?;
                } else {
                    release.send_replace(true);
                }
                Ok::<(), String>(())
            }
        },
    );
    let (mut waiting, mut waiting_key) = (None, 0);
    // Key 0 waits until a job of another key runs; find one on another worker.
    for key in 0..64u32 {
        if key == 0 {
            waiting = Some(pool.submit_tracked(&key, key).await.unwrap());
        } else if pool.worker_for(&key) != pool.worker_for(&0u32) {
            waiting_key = key;
            break;
        }
    }
    assert_ne!(waiting_key, 0, "no key found on another worker");
    let other = pool
        .submit_tracked(&waiting_key, waiting_key)
        .await
        .unwrap();
    assert_eq!(other.await, JobOutcome::Succeeded);
    assert_eq!(waiting.unwrap().await, JobOutcome::Succeeded);
    let report = pool.shutdown().await;
    assert!(report.not_run.is_empty());
    assert_eq!(report.interrupted, 0);
}

/// A job that yields by waking itself (as runtime-agnostic code does) while it waits for
/// another task: its driver returns to the runtime now and then, so that task runs.
#[tokio::test(flavor = "current_thread")]
async fn a_job_that_wakes_itself_lets_the_runtime_run_other_tasks() {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = flag.clone();
    let pool = KeyedPool::new(
        PoolConfig {
            workers: 2,
            drivers: 1,
            ..PoolConfig::default()
        },
        move |_: u32| {
            let seen = seen.clone();
            async move {
                let mut polls = 0u64;
                std::future::poll_fn(|cx| {
                    polls += 1;
                    if seen.load(Ordering::Acquire) {
                        Poll::Ready(Ok(()))
                    } else if polls > 1_000_000 {
                        // What a driver that never returns to the runtime comes to.
                        Poll::Ready(Err(format!("still waiting after {polls} polls")))
                    } else {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                })
                .await
            }
        },
    );
    let done = pool.submit_tracked(&0u32, 0).await.unwrap();
    tokio::spawn(async move { flag.store(true, Ordering::Release) });
    assert_eq!(done.await, JobOutcome::Succeeded);
    pool.shutdown().await;
}

/// At the deadline every driver drops the jobs it runs and hands back every queue.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn shutdown_deadline_interrupts_every_waiting_worker_of_a_driver() {
    let pool = KeyedPool::new(
        PoolConfig {
            workers: 4,
            drivers: 2,
            queue_capacity: 10,
        },
        |_n: (u32, u32)| async {
            std::future::pending::<()>().await;
            Ok::<(), String>(())
        },
    );
    let workers: std::collections::BTreeSet<usize> =
        (0..4u32).map(|key| pool.worker_for(&key)).collect();
    for key in 0..4u32 {
        for n in 0..3 {
            pool.submit(&key, (key, n)).await.unwrap();
        }
    }
    let report = pool.shutdown_within(Duration::from_millis(50)).await;
    // One job running per worker holding a key; the rest handed back in order per key.
    assert_eq!(report.interrupted, workers.len() as u64);
    assert_eq!(report.not_run.len(), 12 - workers.len());
    for key in 0..4u32 {
        let handed: Vec<u32> = report
            .not_run
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, n)| *n)
            .collect();
        assert!(handed.windows(2).all(|w| w[0] < w[1]), "{key}: {handed:?}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn shutdown_deadline_hands_back_jobs_not_started() {
    let pool = KeyedPool::new(
        PoolConfig {
            workers: 1,
            queue_capacity: 10,
            ..PoolConfig::default()
        },
        |_n: u32| async {
            // A job that never finishes on its own.
            std::future::pending::<()>().await;
            Ok::<(), String>(())
        },
    );
    let stuck = pool.submit_tracked(&0u8, 0).await.unwrap();
    for n in 1..5 {
        pool.submit(&0u8, n).await.unwrap();
    }
    let report = pool.shutdown_within(Duration::from_millis(50)).await;
    assert_eq!(report.interrupted, 1);
    assert_eq!(report.not_run, vec![1, 2, 3, 4]);
    assert_eq!(stuck.await, JobOutcome::NotRun);
}

/// `submit_all` into a full queue: the jobs of the same driver before the full one are queued
/// at once, the submitter waits until the worker takes a job, and every job then runs, in order
/// per key.
#[tokio::test(flavor = "current_thread")]
async fn submit_all_waits_for_room_and_keeps_each_keys_order() {
    let (gate_tx, gate_rx) = watch::channel(false);
    let log: Arc<Mutex<Vec<(u32, u32)>>> = Default::default();
    let pool = {
        let log = log.clone();
        KeyedPool::new(
            PoolConfig {
                workers: 2,
                queue_capacity: 1,
                drivers: 1,
            },
            move |(key, n): (u32, u32)| {
                let (mut gate, log) = (gate_rx.clone(), log.clone());
                async move {
                    if n == 0 {
                        gate.wait_for(|open| *open)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    log.lock().unwrap().push((key, n));
                    Ok::<(), String>(())
                }
            },
        )
    };
    let (a, b) = (
        0u32,
        (1..64u32)
            .find(|k| pool.worker_for(k) != pool.worker_for(&0u32))
            .unwrap(),
    );
    // Key `a`'s first job holds its worker; its second fills the queue.
    let holding = pool.submit_tracked(&a, (a, 0)).await.unwrap();
    while pool.metrics().queued() != 0 {
        tokio::task::yield_now().await;
    }
    pool.submit(&a, (a, 1)).await.unwrap();
    let jobs = [(b, 1), (a, 2), (b, 2), (a, 3)];
    let keys: Vec<u32> = jobs.iter().map(|(k, _)| *k).collect();
    {
        let submitting = pool.submit_all(keys.iter().zip(jobs));
        tokio::pin!(submitting);
        for _ in 0..10 {
            assert!(
                futures::poll!(submitting.as_mut()).is_pending(),
                "key {a}'s queue is full: the submitter waits"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(
            pool.metrics().queue_depths[pool.worker_for(&a)],
            1,
            "nothing more of key {a} is queued while the submitter waits"
        );
        assert!(
            log.lock().unwrap().contains(&(b, 1)),
            "key {b}'s job before the full queue ran meanwhile"
        );
        gate_tx.send(true).unwrap();
        submitting.await.unwrap();
    }
    assert_eq!(holding.await, JobOutcome::Succeeded);
    let report = pool.shutdown().await;
    assert!(report.not_run.is_empty());
    let log = log.lock().unwrap();
    let of = |key: u32| -> Vec<u32> {
        log.iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, n)| *n)
            .collect()
    };
    assert_eq!(of(a), [0, 1, 2, 3]);
    assert_eq!(of(b), [1, 2]);
}

/// A pool whose drivers are gone (their runtime dropped, here before they ever ran) takes no
/// job: each way of submitting hands the jobs back, `submit_all` in submission order.
#[test]
fn a_pool_whose_drivers_are_gone_hands_every_job_back() {
    let first = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let pool = {
        let _inside = first.enter();
        KeyedPool::new(
            PoolConfig {
                workers: 8,
                queue_capacity: 4,
                drivers: 3,
            },
            |_n: u32| async { Ok::<(), String>(()) },
        )
    };
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    second.block_on(async {
        let keys: Vec<u32> = (0..20).collect();
        let jobs: Vec<u32> = (100..120).collect();
        match pool.submit_all(keys.iter().zip(jobs.clone())).await {
            Err(Closed(back)) => assert_eq!(back, jobs, "handed back in submission order"),
            Ok(()) => panic!("a pool without drivers took jobs"),
        }
        assert_eq!(pool.submit(&1u32, 7).await, Err(Closed(7)));
        assert_eq!(pool.try_submit(&1u32, 8), Err(TrySubmitError::Closed(8)));
        assert_eq!(pool.metrics().queued(), 0, "places given back");
    });
}

/// A submitter of `submit_all` waiting for room when the pool's drivers go is turned away with
/// the jobs it had not queued, in submission order.
#[test]
fn submit_all_waiting_for_room_when_the_drivers_go_hands_the_rest_back() {
    let drivers_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let pool = Arc::new({
        let _inside = drivers_runtime.enter();
        KeyedPool::new(
            PoolConfig {
                workers: 1,
                queue_capacity: 1,
                drivers: 1,
            },
            |_n: u32| async {
                std::future::pending::<()>().await;
                Ok::<(), String>(())
            },
        )
    });
    let submitter = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    submitter.block_on(async {
        pool.submit(&0u32, 1).await.unwrap();
        while pool.metrics().queued() != 0 {
            tokio::task::yield_now().await;
        }
        pool.submit(&0u32, 2).await.unwrap();
        let keys = [0u32; 3];
        let submitting = pool.submit_all(keys.iter().zip([3, 4, 5]));
        tokio::pin!(submitting);
        assert!(
            futures::poll!(submitting.as_mut()).is_pending(),
            "the queue is full"
        );
        drivers_runtime.shutdown_background();
        let outcome = tokio::time::timeout(Duration::from_secs(10), submitting)
            .await
            .expect("the drivers' end turns the waiting submitter away");
        assert_eq!(outcome, Err(Closed(vec![3, 4, 5])));
    });
}

#[test]
fn keys_spread_over_workers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let pool: KeyedPool<()> = KeyedPool::new(
        PoolConfig {
            workers: 16,
            queue_capacity: 1,
            ..PoolConfig::default()
        },
        |_| async { Ok::<(), String>(()) },
    );
    let mut counts = [0usize; 16];
    for key in 0..16_000u32 {
        counts[pool.worker_for(&key)] += 1;
    }
    // Each worker should get about 1 000 keys; a gross imbalance means a broken reduction.
    assert!(
        counts.iter().all(|&c| (800..1200).contains(&c)),
        "{counts:?}"
    );
    assert_eq!(pool.worker_for("same"), pool.worker_for("same"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random interleavings of (key, sequence) with random durations complete per key in
    /// submission order, each exactly once.
    #[test]
    fn per_key_order_holds(
        jobs in proptest::collection::vec((0u32..12, 0u64..300), 1..300),
        workers in 1usize..8,
        capacity in 1usize..6,
        drivers in 1usize..4,
        // 0: `submit`, 1: `submit_tracked`, 2: `submit_all` in runs of `run` jobs.
        how in 0u8..3,
        run in 1usize..40,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let log: Log = Default::default();
        let mut next_seq = [0u32; 12];
        let mut expected: Vec<Vec<u32>> = vec![Vec::new(); 12];
        let submitted: Vec<(u32, u32, u64)> = jobs
            .iter()
            .map(|&(key, delay)| {
                let seq = next_seq[key as usize];
                next_seq[key as usize] += 1;
                expected[key as usize].push(seq);
                (key, seq, delay)
            })
            .collect();
        let outcomes = rt.block_on(async {
            let pool = recording_pool_with(workers, capacity, drivers, log.clone());
            let mut completions = Vec::new();
            if how == 2 {
                for jobs in submitted.chunks(run) {
                    let keys: Vec<u32> = jobs.iter().map(|job| job.0).collect();
                    pool.submit_all(keys.iter().zip(jobs.iter().copied())).await.unwrap();
                }
            }
            for job in submitted.into_iter().filter(|_| how != 2) {
                if how == 1 {
                    completions.push(pool.submit_tracked(&job.0, job).await.unwrap());
                } else {
                    pool.submit(&job.0, job).await.unwrap();
                }
            }
            let outcomes = futures::future::join_all(completions).await;
            let report = pool.shutdown().await;
            assert!(report.not_run.is_empty());
            outcomes
        });
        prop_assert!(outcomes.iter().all(|o| *o == JobOutcome::Succeeded));
        let mut actual: Vec<Vec<u32>> = vec![Vec::new(); 12];
        for (key, seq) in log.lock().unwrap().iter() {
            actual[*key as usize].push(*seq);
        }
        prop_assert_eq!(actual, expected);
    }
}
