//! The metrics the bus records through the `metrics` facade, read back with a debugging
//! recorder, against a real nats-server: publish outcomes and latency, handling outcomes,
//! latency and retries, dead letters by reason, halts, and the sampled gauges (in flight,
//! queued, halted, owner, and the group's lag from the broker).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bus_core::{handler_fn, Envelope, FailurePolicy, HandlerError, Publisher, Subscriber, Topic};
use bus_nats::telemetry::*;
use bus_nats::NatsBus;
use bus_testkit::NatsServer;
use common::{test_config, wait_for};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// A metric's name and its sorted labels.
type Series = (String, Vec<(String, String)>);

/// The process's one recorder, and what its (destructive) snapshots added up to.
struct Recorded {
    snapshotter: Snapshotter,
    /// Counters summed over snapshots, histograms' sample counts summed, gauges' last value.
    seen: Mutex<HashMap<Series, f64>>,
}

fn recorded() -> &'static Recorded {
    static RECORDED: OnceLock<Recorded> = OnceLock::new();
    RECORDED.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the test's recorder is the only one");
        Recorded {
            snapshotter,
            seen: Mutex::new(HashMap::new()),
        }
    })
}

/// Takes one snapshot and adds it to what was recorded: counters summed, histograms' sample
/// counts summed, gauges as in this snapshot (0 when not set since the last one).
fn take_snapshot() {
    let recorded = recorded();
    let mut seen = recorded.seen.lock().unwrap();
    for (key, _, _, value) in recorded.snapshotter.snapshot().into_vec() {
        let mut key_labels: Vec<(String, String)> = key
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        key_labels.sort();
        let entry = seen
            .entry((key.key().name().to_owned(), key_labels))
            .or_insert(0.0);
        match value {
            DebugValue::Counter(n) => *entry += n as f64,
            DebugValue::Histogram(samples) => *entry += samples.len() as f64,
            DebugValue::Gauge(g) => *entry = g.into_inner(),
        }
    }
}

/// The value of `name` with labels including `labels` as of the last snapshot.
fn read(name: &str, labels: &[(&str, &str)]) -> f64 {
    recorded()
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, v)| *v)
        .sum()
}

/// A fresh snapshot's value of `name`: for counters and histograms. Gauges are read from one
/// snapshot together with [`take_snapshot`] and [`read`]: a snapshot resets them.
fn value(name: &str, labels: &[(&str, &str)]) -> f64 {
    take_snapshot();
    read(name, labels)
}

fn envelope(aggregate: &str, version: u64) -> Envelope {
    Envelope::builder(aggregate, "Counted", version)
        .payload(b"x".to_vec())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_handling_failures_and_lag_are_measured() {
    recorded();
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    config.metrics_interval = Duration::from_millis(50);
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("metrics.flow").unwrap();
    let t = topic.as_str();

    // Handlers wait at a gate, so that work is in flight, queued and lagging while it is shut.
    let open = Arc::new(AtomicBool::new(false));
    let failed_once = Arc::new(AtomicBool::new(false));
    let subscription = {
        let (open, failed_once) = (open.clone(), failed_once.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (open, failed_once) = (open.clone(), failed_once.clone());
                async move {
                    while !open.load(Ordering::Acquire) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    match (e.aggregate_id().as_str(), e.event_version()) {
                        ("a-1", 2) if !failed_once.swap(true, Ordering::AcqRel) => {
                            Err(HandlerError::retryable("once"))
                        }
                        ("a-2", 3) => Err(HandlerError::permanent("never")),
                        _ => Ok(()),
                    }
                }
            })),
        )
        .await
        .unwrap()
    };
    for version in 1..=5 {
        for a in 0..4 {
            let _receipt = bus
                .publish(&topic, envelope(&format!("a-{a}"), version))
                .await
                .unwrap();
        }
    }
    bus.flush().await.unwrap();
    assert_eq!(
        value(METRIC_PUBLISHED, &[("topic", t), ("outcome", "stored")]),
        20.0
    );
    assert_eq!(
        value(METRIC_PUBLISHED, &[("topic", t), ("outcome", "failed")]),
        0.0
    );
    assert_eq!(value(METRIC_PUBLISH_SECONDS, &[("topic", t)]), 20.0);
    // One sample per message sent: at least one, at most one per event.
    let messages = value(METRIC_PUBLISH_BATCH_EVENTS, &[("topic", t)]);
    assert!((1.0..=20.0).contains(&messages), "{messages} batch samples");

    // While the gate is shut: events in flight and queued behind their aggregates' first,
    // unacknowledged at the broker, and the oldest of them ageing.
    let mut saw = (false, false, false, false, false);
    wait_for(
        "the gauges of a stalled subscription",
        Duration::from_secs(10),
        || {
            take_snapshot();
            saw.0 |= read(METRIC_IN_FLIGHT, &[("topic", t), ("group", "test")]) > 0.0;
            saw.1 |= read(METRIC_QUEUED, &[("topic", t)]) > 0.0;
            saw.2 |= read(METRIC_LAG_UNACKNOWLEDGED, &[("topic", t)]) > 0.0;
            saw.3 |= read(METRIC_LAG_SECONDS, &[("topic", t)]) > 0.0;
            saw.4 |= read(METRIC_OWNER, &[("topic", t)]) == 1.0;
            saw == (true, true, true, true, true)
        },
    )
    .await;

    open.store(true, Ordering::Release);
    wait_for("everything settled", Duration::from_secs(10), || {
        value(METRIC_HANDLED, &[("topic", t), ("outcome", "handled")]) == 19.0
            && value(
                METRIC_HANDLED,
                &[("topic", t), ("outcome", "dead_lettered")],
            ) == 1.0
    })
    .await;
    assert_eq!(value(METRIC_HANDLE_RETRIES, &[("topic", t)]), 1.0);
    assert_eq!(value(METRIC_HANDLE_SECONDS, &[("topic", t)]), 20.0);
    assert_eq!(
        value(
            METRIC_DEAD_LETTERS,
            &[("topic", t), ("reason", "permanent")]
        ),
        1.0
    );
    // The lag drains: several samples in a row read nothing unacknowledged or undelivered.
    let mut quiet = 0;
    wait_for("the lag drained", Duration::from_secs(10), || {
        take_snapshot();
        let lagging = read(METRIC_LAG_UNACKNOWLEDGED, &[("topic", t)])
            + read(METRIC_LAG_UNDELIVERED, &[("topic", t)])
            + read(METRIC_IN_FLIGHT, &[("topic", t)]);
        quiet = if lagging == 0.0 { quiet + 1 } else { 0 };
        quiet >= 10
    })
    .await;
    subscription.close().await.unwrap();
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halts_are_counted_and_sampled() {
    recorded();
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    config.metrics_interval = Duration::from_millis(50);
    config.on_failure = FailurePolicy::HaltAggregate;
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("metrics.halts").unwrap();
    let t = topic.as_str();
    let subscription = bus
        .subscribe(
            &topic,
            Arc::new(handler_fn(|e: Envelope| async move {
                if e.event_version() == 2 {
                    Err(HandlerError::permanent("stuck"))
                } else {
                    Ok(())
                }
            })),
        )
        .await
        .unwrap();
    for version in 1..=3 {
        let _receipt = bus.publish(&topic, envelope("h-1", version)).await.unwrap();
    }
    bus.flush().await.unwrap();
    let mut saw = (false, false);
    wait_for("the halt measured", Duration::from_secs(10), || {
        take_snapshot();
        saw.0 |= read(METRIC_HALTED_AGGREGATES, &[("topic", t)]) == 1.0;
        saw.1 |= read(METRIC_HALTED_EVENTS, &[("topic", t)]) == 2.0;
        saw == (true, true)
    })
    .await;
    assert_eq!(
        value(METRIC_HANDLED, &[("topic", t), ("outcome", "halted")]),
        1.0
    );
    assert_eq!(
        value(METRIC_HANDLED, &[("topic", t), ("outcome", "handled")]),
        1.0
    );
    assert_eq!(value(METRIC_DEAD_LETTERS, &[("topic", t)]), 0.0);
    subscription.close().await.unwrap();
    bus.close().await.unwrap();
}
