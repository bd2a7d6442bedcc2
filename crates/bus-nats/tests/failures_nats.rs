//! Order and no loss when things fail: redelivered copies, slow handlers, panics, and a
//! server killed and restarted under load. Each runs against a real nats-server.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{handler_fn, Envelope, HandlerError, Publisher, Subscriber, Topic};
use bus_nats::NatsBus;
use bus_testkit::conformance::Recorder;
use bus_testkit::NatsServer;
use common::{consumer_info, test_config, unbatched_config, wait_for};

fn envelope(aggregate: &str, version: u64) -> Envelope {
    Envelope::builder(aggregate, "Tested", version)
        .payload(vec![1u8; 32])
        .build()
        .unwrap()
}

/// The broker hands out every unacknowledged message again (here by a consumer reset, as a
/// reconnect or AckWait expiry would) while the first copies are still queued or running:
/// none reaches the handler twice and order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_copies_are_not_handled_twice() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(unbatched_config(&server.url()))
        .await
        .unwrap();
    let topic = Topic::new("copies").unwrap();
    let recorder = Recorder::new();
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let subscription = {
        let (recorder, t) = (recorder.clone(), topic.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t, mut gate, started) = (
                    recorder.clone(),
                    t.clone(),
                    gate_rx.clone(),
                    started_tx.clone(),
                );
                async move {
                    if e.aggregate_id().as_str() == "held" && e.event_version() == 1 {
                        let _ = started.send(());
                        gate.wait_for(|open| *open).await.unwrap();
                    }
                    recorder.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    for version in 1..=50 {
        let _receipt = bus
            .publish(&topic, envelope("held", version))
            .await
            .unwrap();
        let _receipt = bus
            .publish(&topic, envelope("free", version))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), started_rx.recv())
        .await
        .unwrap();
    recorder.wait_unique(50).await; // every "free" event is through; "held" waits at v1

    // Make the broker deliver every unacknowledged message again, from the ack floor.
    let client = async_nats::connect(server.url()).await.unwrap();
    let subject = format!(
        "$JS.API.CONSUMER.RESET.{}.{}",
        bus.stream_name(&topic).await.unwrap(),
        bus.config().consumer_name(&topic)
    );
    let reply = client.request(subject, "".into()).await.unwrap();
    assert!(
        !String::from_utf8_lossy(&reply.payload).contains("\"error\""),
        "reset refused"
    );
    // The 50 "held" events (v1 running, v2..v50 queued behind it) come back while in flight;
    // each copy must be recognised and dropped.
    let control = subscription.control().unwrap();
    wait_for("the redelivered copies", Duration::from_secs(20), || {
        control.metrics().copies_skipped >= 50
    })
    .await;
    gate_tx.send(true).unwrap();
    recorder.wait_unique(100).await;
    let metrics = control.metrics();
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(100);
    assert!(metrics.copies_skipped >= 50, "{metrics:?}");
}

/// A handler that takes three times AckWait finishes without the broker redelivering its
/// message, or the events queued behind it, behind the worker's back: in-progress acks keep
/// them alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_slower_than_ack_wait_is_not_redelivered() {
    let server = NatsServer::start();
    let mut config = unbatched_config(&server.url());
    config.consumer.ack_wait = Duration::from_secs(1);
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("slow").unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let recorder = Recorder::new();
    let subscription = {
        let (recorder, t, calls) = (recorder.clone(), topic.clone(), calls.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t, calls) = (recorder.clone(), t.clone(), calls.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    if e.event_version() == 1 {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    recorder.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    for version in 1..=3 {
        let _receipt = bus
            .publish(&topic, envelope("slow", version))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    recorder.wait_unique(3).await;
    let info = consumer_info(&server, &bus, &topic).await;
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(3);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "each event handled exactly once"
    );
    // Three deliveries in all: no copy was sent, not even one the bus would have recognised.
    assert_eq!(
        info.delivered.consumer_sequence, 3,
        "the broker redelivered: {info:?}"
    );
}

/// A handler that panics, and one that fails permanently, dead-letter their event with the
/// reason; the aggregate goes on with its next event and other aggregates never wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_permanent_errors_are_dead_lettered_and_the_aggregate_moves_on() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topic = Topic::new("poison").unwrap();
    let recorder = Recorder::new();
    let subscription = {
        let (recorder, t) = (recorder.clone(), topic.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t) = (recorder.clone(), t.clone());
                async move {
                    match (e.aggregate_id().as_str(), e.event_version()) {
                        ("a", 2) => panic!("bug on a v2"),
                        ("b", 3) => Err(HandlerError::permanent("b v3 can never apply")),
                        _ => {
                            recorder.record(&t, &e);
                            Ok(())
                        }
                    }
                }
            })),
        )
        .await
        .unwrap()
    };
    for version in 1..=5 {
        for aggregate in ["a", "b", "c"] {
            let _receipt = bus
                .publish(&topic, envelope(aggregate, version))
                .await
                .unwrap();
        }
    }
    bus.flush().await.unwrap();
    recorder.wait_unique(13).await;
    subscription.close().await.unwrap();
    let report = recorder.verifier.report();
    assert_eq!(
        (report.handled, report.order_violations, report.duplicates),
        (13, 0, 0)
    );
    // The two failed events are the gaps, and they are in the dead-letter stream.
    assert_eq!(report.gaps, 2);
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let dlq = js.get_stream("BUS_DEAD_LETTERS").await.unwrap();
    let mut reasons = Vec::new();
    for seq in 1..=2 {
        let message = dlq.get_raw_message(seq).await.unwrap();
        let h = &message.headers;
        reasons.push((
            h.get("Bus-Event")
                .unwrap()
                .as_str()
                .split(' ')
                .next()
                .unwrap()
                .to_owned(),
            h.get("Bus-Dlq-Reason").unwrap().as_str().to_owned(),
        ));
    }
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("a".to_owned(), "panic".to_owned()),
            ("b".to_owned(), "permanent".to_owned())
        ]
    );
}

/// nats-server is killed with SIGKILL while a publisher and a consumer run, and restarted on
/// the same port and store 500 ms later. Publishes in flight are retried by the publisher (the
/// broker de-duplicates by event ID); the consumer restarts delivery at the ack floor when its
/// connection comes back, instead of waiting for pull requests the new server never saw; it
/// sees every aggregate in version order and loses nothing. Reports how long after the restart
/// the handler runs again and the slowest publish receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_under_load() {
    let mut server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topic = Topic::new("restart").unwrap();
    let recorder = Recorder::new();
    // When the broker was restarted, and the first handler call after that (the handler is
    // instant, so what was in flight at the kill is done long before).
    let restarted: Arc<Mutex<Option<Instant>>> = Arc::default();
    let first_after: Arc<Mutex<Option<Instant>>> = Arc::default();
    let subscription = {
        let (recorder, t) = (recorder.clone(), topic.clone());
        let (restarted, first_after) = (restarted.clone(), first_after.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t) = (recorder.clone(), t.clone());
                let (restarted, first_after) = (restarted.clone(), first_after.clone());
                async move {
                    recorder.record(&t, &e);
                    if restarted.lock().unwrap().is_some() {
                        first_after.lock().unwrap().get_or_insert_with(Instant::now);
                    }
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    let control = subscription.control().unwrap();
    const AGGREGATES: usize = 50;
    const VERSIONS: u64 = 200;
    let slowest_receipt = Arc::new(Mutex::new(Duration::ZERO));
    let mut publishers = Vec::new();
    for a in 0..AGGREGATES {
        let publisher = bus.publisher();
        let topic = topic.clone();
        let slowest_receipt = slowest_receipt.clone();
        publishers.push(tokio::spawn(async move {
            // Each aggregate's events go out one after another; the publisher retries what
            // fails for a transient reason with the same event ID.
            for version in 1..=VERSIONS {
                let event = envelope(&format!("r-{a}"), version);
                let sent = Instant::now();
                let receipt = publisher.publish(&topic, event).await.unwrap();
                if let Err(e) = receipt.await {
                    panic!("publish of r-{a} v{version} failed: {e}");
                }
                let took = sent.elapsed();
                let mut slowest = slowest_receipt.lock().unwrap();
                *slowest = (*slowest).max(took);
            }
        }));
    }
    let expected = (AGGREGATES as u64) * VERSIONS;
    recorder
        .wait_until("a quarter of the events", Duration::from_secs(60), |r| {
            r.unique >= expected / 4
        })
        .await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await; // the outage
    server.restart().unwrap();
    let restart_at = Instant::now();
    *restarted.lock().unwrap() = Some(restart_at);
    for p in publishers {
        p.await.unwrap();
    }
    recorder.wait_unique(expected).await;
    let metrics = control.metrics();
    subscription.close().await.unwrap();
    let report = recorder.verifier.report();
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.lost(expected), 0, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    assert!(
        metrics.delivery_restarts >= 1,
        "the consumer never restarted delivery after the broker came back: {metrics:?}"
    );
    eprintln!(
        "server restart: {report:?}; delivery restarts {}; slowest publish receipt {:?}; \
         first handler call {:?} after the server was ready again",
        metrics.delivery_restarts,
        slowest_receipt.lock().unwrap(),
        first_after
            .lock()
            .unwrap()
            .map(|t| t.saturating_duration_since(restart_at)),
    );
}

/// Every handler stalls while a flood is published: the broker stops delivering at
/// MaxAckPending, so what the process holds stays bounded; nothing is dropped; once the handler
/// recovers, everything is handled in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handler_under_a_flood_keeps_memory_bounded_and_drops_nothing() {
    let server = NatsServer::start();
    let mut config = unbatched_config(&server.url());
    config.consumer.max_ack_pending = 1_000;
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("flood").unwrap();
    let recorder = Recorder::new();
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    // The version of every handler call that started.
    let entered = Arc::new(Mutex::new(Vec::<u64>::new()));
    let subscription = {
        let (recorder, t, entered) = (recorder.clone(), topic.clone(), entered.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t, mut gate, entered) = (
                    recorder.clone(),
                    t.clone(),
                    gate_rx.clone(),
                    entered.clone(),
                );
                async move {
                    entered.lock().unwrap().push(e.event_version());
                    gate.wait_for(|open| *open).await.unwrap();
                    recorder.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    const AGGREGATES: u64 = 500;
    const VERSIONS: u64 = 40;
    for version in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let _receipt = bus
                .publish(&topic, envelope(&format!("f-{a}"), version))
                .await
                .unwrap();
        }
    }
    bus.flush().await.unwrap();
    let expected = AGGREGATES * VERSIONS;
    // Let the fetcher run into the limit: wait until the broker reports nothing more it may
    // deliver (delivered but unacknowledged = MaxAckPending).
    let mut info = consumer_info(&server, &bus, &topic).await;
    for _ in 0..200 {
        if info.num_ack_pending >= 1_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        info = consumer_info(&server, &bus, &topic).await;
    }
    assert_eq!(info.num_ack_pending, 1_000, "{info:?}");
    assert_eq!(
        info.num_pending,
        expected - 1_000,
        "the rest waits in the stream: {info:?}"
    );
    // The first 1 000 deliveries are v1 and v2 of each aggregate. Handlers started, at most one
    // per worker (aggregates share the 1 024 workers), and only for v1: no aggregate's v2 ran
    // while its v1 was stuck.
    let started = entered.lock().unwrap().clone();
    assert!(!started.is_empty());
    assert!(started.len() as u64 <= AGGREGATES.min(bus.config().pool.workers as u64));
    assert!(started.iter().all(|&v| v == 1), "{started:?}");
    assert_eq!(recorder.verifier.handled(), 0);

    gate_tx.send(true).unwrap();
    recorder.wait_unique(expected).await;
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(expected);
}

/// With the broker gone, closing a subscription and the bus returns within the close deadline
/// and a bounded margin (each broker round trip after the deadline is cut short), instead of
/// waiting for a reconnection that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_with_the_broker_gone_does_not_hang() {
    let mut server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topic = Topic::new("gone").unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let subscription = {
        let handled = handled.clone();
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |_e: Envelope| {
                let handled = handled.clone();
                async move {
                    handled.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    for v in 1..=10 {
        let e = Envelope::builder("g", "T", v).build().unwrap();
        let _receipt = bus.publish(&topic, e).await.unwrap();
    }
    bus.flush().await.unwrap();
    wait_for("ten handled", Duration::from_secs(10), || {
        handled.load(Ordering::Relaxed) == 10
    })
    .await;
    server.kill();
    let started = Instant::now();
    let deadline = Duration::from_secs(2);
    let closed = tokio::time::timeout(Duration::from_secs(30), subscription.close_within(deadline))
        .await
        .expect("close returns with the broker gone");
    let took = started.elapsed();
    // The handlers were done; what could not be confirmed is the broker's to redeliver.
    assert!(
        closed.is_ok()
            || closed.as_ref().unwrap_err().kind()
                == bus_core::SubscribeErrorKind::ShutdownTimedOut,
        "{closed:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), bus.close())
        .await
        .expect("the bus closes with the broker gone")
        .unwrap();
    println!(
        "closed in {took:?} (deadline {deadline:?}): {closed:?}; bus closed in {:?}",
        started.elapsed() - took
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
}
