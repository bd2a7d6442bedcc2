//! Where a subscription runs (`NatsConfig::subscription_runtime`), against a real nats-server:
//! its handlers on the caller's runtime, or on a thread of its own that ends with it; and the
//! bus's connections on the runtime the bus was connected on, whichever runtime first used
//! them, so that none ends with a subscription's thread.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{handler_fn, Envelope, Publisher, Subscriber, Topic};
use bus_nats::{NatsBus, SubscriptionRuntime};
use bus_testkit::conformance::{subscribe_recording, Recorder};
use bus_testkit::NatsServer;
use common::test_config;

fn envelope(aggregate: &str, version: u64) -> Envelope {
    Envelope::builder(aggregate, "Placed", version)
        .payload(b"{}".to_vec())
        .build()
        .unwrap()
}

/// Where a handler ran: its thread's name and ID, and its runtime.
#[derive(Clone)]
struct Seen {
    thread: Option<String>,
    id: std::thread::ThreadId,
    runtime: tokio::runtime::Handle,
}

/// A handler of `topic` that records each event in `recorder` and where each call ran, and
/// those places as they are recorded.
fn recording_where(
    topic: &Topic,
    recorder: &Arc<Recorder>,
) -> (Arc<dyn bus_core::Handler>, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let handler = {
        let (seen, recorder, topic) = (seen.clone(), recorder.clone(), topic.clone());
        handler_fn(move |e: Envelope| {
            seen.lock().unwrap().push(Seen {
                thread: std::thread::current().name().map(str::to_owned),
                id: std::thread::current().id(),
                runtime: tokio::runtime::Handle::current(),
            });
            recorder.record(&topic, &e);
            async { Ok(()) }
        })
    };
    (Arc::new(handler), seen)
}

/// Subscribes to `topic` with a handler that records where each call ran, publishes
/// `events` events of one aggregate, and waits until all are handled.
async fn handled_where(
    bus: &NatsBus,
    topic: &Topic,
    events: u64,
) -> (bus_core::Subscription, Vec<Seen>) {
    let recorder = Recorder::new();
    let (handler, seen) = recording_where(topic, &recorder);
    let subscription = bus.subscribe(topic, handler).await.unwrap();
    for version in 1..=events {
        let _receipt = bus
            .publish(topic, envelope("where", version))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    recorder.wait_unique(events).await;
    recorder.verifier.report().assert_exact(events);
    let seen = seen.lock().unwrap().clone();
    (subscription, seen)
}

/// Whether `runtime` has shut down: a task spawned on it then never runs, and its handle says
/// it was cancelled.
async fn has_shut_down(runtime: &tokio::runtime::Handle) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), runtime.spawn(async {})).await {
        Ok(Ok(())) => false,
        Ok(Err(join)) => join.is_cancelled(),
        Err(_) => panic!("a task spawned on the runtime neither ran nor was cancelled within 5 s"),
    }
}

/// Waits until `runtime`, a closed subscription's own, has shut down; fails after 10 s.
async fn shuts_down_after_close(runtime: &tokio::runtime::Handle) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !has_shut_down(runtime).await {
        assert!(
            Instant::now() < deadline,
            "the subscription's runtime still runs 10 s after its close"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With `SubscriptionRuntime::OwnThread` each subscription's handlers run on a thread of its
/// own, named after its topic, not on any thread of the caller's runtime; closing the
/// subscription ends that thread's runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_thread_handlers_run_on_the_subscriptions_thread_which_ends_with_it() {
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    config.subscription_runtime = SubscriptionRuntime::OwnThread;
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("runtime.own").unwrap();
    // The caller's runtime's worker threads: the handler must run on none of them.
    let callers: std::collections::HashSet<_> = {
        let ids = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let ids = ids.clone();
                tokio::spawn(async move {
                    ids.lock().unwrap().insert(std::thread::current().id());
                    tokio::task::yield_now().await;
                    ids.lock().unwrap().insert(std::thread::current().id());
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let ids = ids.lock().unwrap().clone();
        ids
    };
    let (subscription, seen) = handled_where(&bus, &topic, 200).await;
    let first = seen.first().expect("handled").clone();
    for call in &seen {
        assert_eq!(call.thread.as_deref(), Some("bus:runtime.own"));
        assert_eq!(call.id, first.id, "every call on the one thread");
        assert!(
            !callers.contains(&call.id),
            "a handler ran on the caller's runtime"
        );
    }
    assert!(
        !has_shut_down(&first.runtime).await,
        "the thread runs while the subscription is open"
    );
    subscription.close().await.unwrap();
    shuts_down_after_close(&first.runtime).await;
}

/// By default (`SubscriptionRuntime::Caller`) the handlers run on the runtime `subscribe` was
/// called on, which closing the subscription leaves running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_handlers_run_on_the_callers_runtime() {
    let server = NatsServer::start();
    let config = test_config(&server.url());
    assert_eq!(config.subscription_runtime, SubscriptionRuntime::Caller);
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("runtime.caller").unwrap();
    let (subscription, seen) = handled_where(&bus, &topic, 200).await;
    subscription.close().await.unwrap();
    for call in &seen {
        let thread = call.thread.as_deref().unwrap_or_default();
        assert!(!thread.starts_with("bus:"), "ran on the thread `{thread}`");
        // The runtime it ran on outlives the subscription: the test's.
        assert!(
            !has_shut_down(&call.runtime).await,
            "the caller's runtime runs on"
        );
    }
}

/// The bus's connections run on the runtime the bus was connected on. A subscription made on
/// its own thread connects its topic there, and a handler on that thread is the first to
/// publish to another topic; once the subscription is closed and its thread has ended, both
/// connections still work: the topic is subscribed again, the other topic published to and
/// consumed, every event once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_first_used_on_a_subscriptions_thread_outlive_it() {
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    config.subscription_runtime = SubscriptionRuntime::OwnThread;
    // A dead connection fails a publish within this, rather than the default 30 s.
    config.publish_retry_for = Duration::from_secs(3);
    config.publish_ack_timeout = Duration::from_millis(500);
    let bus = NatsBus::connect(config).await.unwrap();
    let orders = Topic::new("runtime.orders").unwrap();
    let invoices = Topic::new("runtime.invoices").unwrap();
    // Nothing of the bus has touched either topic yet.
    let recorder = Recorder::new();
    let runtimes: Arc<Mutex<Vec<tokio::runtime::Handle>>> = Arc::default();
    let handler = {
        let (bus, invoices, recorder, orders, runtimes) = (
            bus.clone(),
            invoices.clone(),
            recorder.clone(),
            orders.clone(),
            runtimes.clone(),
        );
        handler_fn(move |e: Envelope| {
            recorder.record(&orders, &e);
            runtimes
                .lock()
                .unwrap()
                .push(tokio::runtime::Handle::current());
            let (bus, invoices) = (bus.clone(), invoices.clone());
            async move {
                // An order's invoice: the first publish to `invoices` happens here.
                let invoice = envelope(e.aggregate_id().as_str(), e.event_version());
                bus.publish(&invoices, invoice)
                    .await
                    .map_err(|error| bus_core::HandlerError::retryable(error.to_string()))?
                    .await
                    .map_err(|error| bus_core::HandlerError::retryable(error.to_string()))?;
                Ok(())
            }
        })
    };
    let subscription = bus.subscribe(&orders, Arc::new(handler)).await.unwrap();
    for version in 1..=20 {
        let _receipt = bus.publish(&orders, envelope("o", version)).await.unwrap();
    }
    bus.flush().await.unwrap();
    recorder.wait_unique(20).await;
    subscription.close().await.unwrap();
    let thread_runtime = runtimes.lock().unwrap()[0].clone();
    shuts_down_after_close(&thread_runtime).await;

    // The topic connection the subscription made, and the publishing connection the handler
    // made, after the thread they were first used on has ended.
    for version in 21..=40 {
        let _receipt = bus.publish(&orders, envelope("o", version)).await.unwrap();
    }
    for version in 21..=40 {
        let _receipt = bus
            .publish(&invoices, envelope("o", version))
            .await
            .unwrap();
    }
    bus.flush()
        .await
        .expect("the connections still work after the thread ended");
    let orders_again = subscribe_recording(&bus, &orders, &recorder).await;
    let invoices_seen = Recorder::new();
    let invoices_subscription = subscribe_recording(&bus, &invoices, &invoices_seen).await;
    // The group resumes after version 20, which the first subscription handled.
    recorder.wait_unique(40).await;
    invoices_seen.wait_unique(40).await;
    orders_again.close().await.unwrap();
    invoices_subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(40);
    invoices_seen.verifier.report().assert_exact(40);
}

/// A partitioned topic's subscription (its group membership, heartbeat, and one fetcher per
/// partition it is assigned) on a thread of its own: every event once and in order, handled on
/// that thread, and the thread ends with the subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_topic_on_its_own_thread_keeps_order_and_ends_with_it() {
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    config.subscription_runtime = SubscriptionRuntime::OwnThread;
    let topic = Topic::new("runtime.parted").unwrap();
    let mut spec = bus_nats::StreamSpec::new("RUNTIME_PARTED", [topic.clone()]);
    spec.partitions = 4;
    config.streams.push(spec);
    let bus = NatsBus::connect(config).await.unwrap();
    let recorder = Recorder::new();
    let (handler, threads) = recording_where(&topic, &recorder);
    let subscription = bus.subscribe(&topic, handler).await.unwrap();
    const AGGREGATES: u64 = 40;
    const VERSIONS: u64 = 25;
    for version in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let _receipt = bus
                .publish(&topic, envelope(&format!("p{a}"), version))
                .await
                .unwrap();
        }
    }
    bus.flush().await.unwrap();
    recorder.wait_unique(AGGREGATES * VERSIONS).await;
    subscription.close().await.unwrap();
    recorder
        .verifier
        .report()
        .assert_exact(AGGREGATES * VERSIONS);
    let seen = threads.lock().unwrap().clone();
    let first = seen.first().expect("handled").clone();
    for call in &seen {
        assert_eq!(call.thread.as_deref(), Some("bus:runtime.parted"));
        assert_eq!(
            call.id, first.id,
            "every partition's handlers on the one thread"
        );
    }
    shuts_down_after_close(&first.runtime).await;
}
