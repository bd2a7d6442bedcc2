//! Record batches against a real nats-server: they form, they keep each aggregate's order, a
//! failing event is dead-lettered alone, and a batch released with events already handled does
//! not hand them to the handler again.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{handler_fn, Envelope, FailurePolicy, HandlerError, Publisher, Subscriber, Topic};
use bus_nats::{BatchConfig, NatsBus, NatsConfig};
use bus_testkit::conformance::Recorder;
use bus_testkit::NatsServer;
use common::{consumer_info, test_config};

/// An event's version, stream sequence and index in its batch, as its handler saw them.
type Position = (u64, Option<u64>, Option<u32>);

fn envelope(aggregate: &str, version: u64) -> Envelope {
    Envelope::builder(aggregate, "Tested", version)
        .payload(vec![7u8; 24])
        .build()
        .unwrap()
}

fn batched(url: &str, adjust: impl FnOnce(&mut NatsConfig)) -> NatsConfig {
    let mut config = test_config(url);
    config.batching = BatchConfig::on();
    adjust(&mut config);
    config
}

async fn stream(
    server: &NatsServer,
    bus: &NatsBus,
    topic: &Topic,
) -> async_nats::jetstream::stream::Stream {
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    js.get_stream(bus.stream_name(topic).await.unwrap())
        .await
        .unwrap()
}

async fn stored_messages(server: &NatsServer, bus: &NatsBus, topic: &Topic) -> u64 {
    stream(server, bus, topic)
        .await
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// Publishes `events` (aggregate, version) within the linger, and checks that they were stored
/// as one batch at stream position 1.
async fn publish_one_batch(bus: &NatsBus, topic: &Topic, events: &[(&str, u64)]) {
    publish_stored_at(bus, topic, events, 1).await;
}

/// Publishes `events` within the linger, and checks that they were stored as one message (a
/// batch, or an event alone) at stream position `sequence`.
async fn publish_stored_at(bus: &NatsBus, topic: &Topic, events: &[(&str, u64)], sequence: u64) {
    let publisher = bus.publisher();
    let mut receipts = Vec::new();
    for (aggregate, version) in events {
        receipts.push(
            publisher
                .publish(topic, envelope(aggregate, *version))
                .await
                .unwrap(),
        );
    }
    for receipt in receipts {
        assert_eq!(
            receipt.await.unwrap().sequence,
            Some(sequence),
            "one message"
        );
    }
}

/// Publishes `versions` events of each of `aggregates` aggregates named `<prefix>-<a>`, version
/// by version, without waiting for receipts, then flushes.
async fn publish_many(bus: &NatsBus, topic: &Topic, prefix: &str, aggregates: u64, versions: u64) {
    let publisher = bus.publisher();
    for version in 1..=versions {
        for a in 0..aggregates {
            let _receipt = publisher
                .publish(topic, envelope(&format!("{prefix}-{a}"), version))
                .await
                .unwrap();
        }
    }
    publisher.flush().await.unwrap();
}

async fn wait_acknowledged(server: &NatsServer, bus: &NatsBus, topic: &Topic) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = consumer_info(server, bus, topic).await;
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages still unacknowledged: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Many events of few aggregates, published without waiting: they are stored in far fewer
/// messages than events, some of them batches of more than 8, and handled exactly once each, in
/// order per aggregate; every batch is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_form_and_every_aggregate_keeps_its_order() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(batched(&server.url(), |c| {
        c.batching.max_events = 64;
        c.batching.max_in_flight = 2;
    }))
    .await
    .unwrap();
    let topic = Topic::new("batched").unwrap();
    let (aggregates, versions) = (40u64, 50u64);
    publish_many(&bus, &topic, "acc", aggregates, versions).await;
    let events = aggregates * versions;
    let stored = stored_messages(&server, &bus, &topic).await;
    assert!(
        stored * 4 < events,
        "{events} events were stored in {stored} messages: batches did not form"
    );
    let s = stream(&server, &bus, &topic).await;
    let mut largest = 1;
    for seq in 1..=stored {
        let message = s.get_raw_message(seq).await.unwrap();
        if let Some(n) = message.headers.get(bus_core::wire::BATCH) {
            largest = largest.max(n.to_string().parse::<u64>().unwrap());
        }
    }
    assert!(largest > 8, "the largest batch held {largest} events");

    let recorder = Recorder::new();
    let subscription = bus_testkit::conformance::subscribe_recording(&bus, &topic, &recorder).await;
    recorder.wait_unique(events).await;
    wait_acknowledged(&server, &bus, &topic).await;
    let report = recorder.verifier.report();
    assert_eq!(report.handled, events, "{report:?}");
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.duplicates, 0, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    let info = consumer_info(&server, &bus, &topic).await;
    assert_eq!(info.delivered.stream_sequence, stored, "{info:?}");
    subscription.close().await.unwrap();
}

/// Events published within the linger go as one batch; the one whose handler fails for good is
/// dead-lettered alone, as a single-event message saying which record it was, and the batch is
/// acknowledged once the others are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_event_of_a_batch_is_dead_lettered_alone() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(batched(&server.url(), |c| {
        c.batching.linger = Duration::from_millis(300);
    }))
    .await
    .unwrap();
    let topic = Topic::new("batch-dlq").unwrap();
    publish_one_batch(&bus, &topic, &[("ok", 1), ("bad", 1), ("ok", 2)]).await;
    assert_eq!(stored_messages(&server, &bus, &topic).await, 1);

    let recorder = Recorder::new();
    let positions: Arc<Mutex<Vec<Position>>> = Arc::default();
    let subscription = {
        let (recorder, t, positions) = (recorder.clone(), topic.clone(), positions.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t, positions) = (recorder.clone(), t.clone(), positions.clone());
                async move {
                    if e.aggregate_id().as_str() == "bad" {
                        return Err(HandlerError::permanent("refused"));
                    }
                    let d = bus_core::current_delivery().unwrap();
                    positions.lock().unwrap().push((
                        e.event_version(),
                        d.stream_sequence,
                        d.batch_index,
                    ));
                    recorder.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    recorder.wait_unique(2).await;
    wait_acknowledged(&server, &bus, &topic).await;
    let letters = bus.dead_letters(&topic, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.reason, "permanent");
    assert_eq!(letter.batch_index, Some(1));
    assert_eq!(letter.stream_sequence, Some(1));
    let dead = letter.envelope().unwrap();
    assert_eq!(
        (dead.aggregate_id().as_str(), dead.event_version()),
        ("bad", 1)
    );
    assert_eq!(subscription.control().unwrap().metrics().dead_lettered, 1);
    // Both `ok` events share the batch's position; their indexes tell them apart.
    assert_eq!(
        *positions.lock().unwrap(),
        [(1, Some(1), Some(0)), (2, Some(1), Some(2))]
    );
    let report = recorder.verifier.report();
    assert_eq!(
        (report.unique, report.order_violations),
        (2, 0),
        "{report:?}"
    );
    subscription.close().await.unwrap();
}

/// A batch whose first event halts its aggregate is returned unacknowledged at close, with its
/// other events handled. The subscription opened again gets the batch again: only the halted
/// event reaches the handler; the others are recognised as settled and skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_batch_does_not_hand_its_handled_events_again() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(batched(&server.url(), |c| {
        c.batching.linger = Duration::from_millis(300);
        c.on_failure = FailurePolicy::HaltAggregate;
    }))
    .await
    .unwrap();
    let topic = Topic::new("batch-replay").unwrap();
    publish_one_batch(&bus, &topic, &[("a", 1), ("b", 1), ("c", 1)]).await;

    let calls: Arc<Mutex<HashMap<(String, u32), u32>>> = Arc::default();
    let handler = |round: u32| {
        let calls = calls.clone();
        Arc::new(handler_fn(move |e: Envelope| {
            let calls = calls.clone();
            async move {
                *calls
                    .lock()
                    .unwrap()
                    .entry((e.aggregate_id().to_string(), round))
                    .or_default() += 1;
                if round == 1 && e.aggregate_id().as_str() == "a" {
                    return Err(HandlerError::permanent("not yet"));
                }
                Ok(())
            }
        }))
    };
    let first = bus.subscribe(&topic, handler(1)).await.unwrap();
    let control = first.control().unwrap();
    common::wait_for(
        "a halted with b and c handled",
        Duration::from_secs(10),
        || {
            let calls = calls.lock().unwrap();
            control.halted().len() == 1
                && calls.get(&("b".into(), 1)) == Some(&1)
                && calls.get(&("c".into(), 1)) == Some(&1)
        },
    )
    .await;
    let report = first.close().await.unwrap();
    assert_eq!(report.returned, 1, "{report:?}");
    let info = consumer_info(&server, &bus, &topic).await;
    assert_eq!(
        info.ack_floor.stream_sequence, 0,
        "the batch was acknowledged: {info:?}"
    );

    let second = bus.subscribe(&topic, handler(2)).await.unwrap();
    common::wait_for("a handled again", Duration::from_secs(10), || {
        calls.lock().unwrap().get(&("a".into(), 2)) == Some(&1)
    })
    .await;
    wait_acknowledged(&server, &bus, &topic).await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls.get(&("b".into(), 2)),
        None,
        "b handed again: {calls:?}"
    );
    assert_eq!(
        calls.get(&("c".into(), 2)),
        None,
        "c handed again: {calls:?}"
    );
    assert_eq!(second.control().unwrap().metrics().copies_skipped, 2);
    second.close().await.unwrap();
}

/// On a partitioned topic each partition has its own lane: every record of a batch stored on
/// `<topic>.<p>` belongs to partition `p`, and the one member of the group handles every event
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_a_partitioned_topic_hold_only_their_partition() {
    let server = NatsServer::start();
    let topic = Topic::new("batched-parts").unwrap();
    let bus = NatsBus::connect(batched(&server.url(), |c| {
        let mut spec = bus_nats::StreamSpec::new("BATCHED_PARTS", [topic.clone()]);
        spec.partitions = 4;
        c.streams.push(spec);
    }))
    .await
    .unwrap();
    let (aggregates, versions) = (30u64, 20u64);
    publish_many(&bus, &topic, "p", aggregates, versions).await;
    let events = aggregates * versions;
    let mut s = stream(&server, &bus, &topic).await;
    let stored = s.info().await.unwrap().state.last_sequence;
    assert!(stored * 2 < events, "{events} events in {stored} messages");
    let mut records = 0;
    for seq in 1..=stored {
        let message = s.get_raw_message(seq).await.unwrap();
        let partition: u32 = message.subject.rsplit('.').next().unwrap().parse().unwrap();
        let envelopes: Vec<Envelope> = match message.headers.get(bus_core::wire::BATCH) {
            Some(count) => bus_core::wire::decode_batch(count.as_ref(), &message.payload)
                .unwrap()
                .iter()
                .map(|r| r.decode().unwrap())
                .collect(),
            None => vec![bus_core::wire::decode(
                message
                    .headers
                    .iter()
                    .flat_map(|(n, vs)| vs.iter().map(move |v| (n.as_ref(), v.as_str()))),
                message.payload.clone(),
            )
            .unwrap()],
        };
        for e in envelopes {
            assert_eq!(
                bus_core::wire::partition_of(e.aggregate_id().as_str(), 4),
                partition,
                "{} stored on partition {partition}",
                e.aggregate_id()
            );
            records += 1;
        }
    }
    assert_eq!(records, events);

    let recorder = Recorder::new();
    let subscription = bus_testkit::conformance::subscribe_recording(&bus, &topic, &recorder).await;
    recorder.wait_unique(events).await;
    let report = recorder.verifier.report();
    assert_eq!(
        (report.order_violations, report.duplicates, report.gaps),
        (0, 0, 0),
        "{report:?}"
    );
    subscription.close().await.unwrap();
}

/// A raw subscription to a topic whose envelopes travel in batches gets one raw message per
/// event, with that event's own headers and payload, keyed and ordered as if it had travelled
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_subscription_gets_each_event_of_a_batch() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(batched(&server.url(), |c| {
        c.batching.linger = Duration::from_millis(300);
    }))
    .await
    .unwrap();
    let topic = Topic::new("batch-raw").unwrap();
    publish_one_batch(&bus, &topic, &[("x", 1), ("y", 1), ("x", 2), ("y", 2)]).await;
    let seen: Arc<Mutex<Vec<(String, u64, usize)>>> = Arc::default();
    // Ordered by the aggregate ID, the first field of `Bus-Event`.
    let key = bus_core::RawKey::Extract(Arc::new(|m: &bus_core::RawMessage| {
        m.header(bus_core::wire::EVENT)
            .and_then(|v| v.split(' ').next())
            .map(str::to_owned)
    }));
    let subscription = {
        let seen = seen.clone();
        bus.subscribe_raw(
            &topic,
            key,
            Arc::new(bus_core::raw_handler_fn(move |m: bus_core::RawMessage| {
                let seen = seen.clone();
                async move {
                    let event = m.header(bus_core::wire::EVENT).unwrap().to_owned();
                    let fields: Vec<&str> = event.split(' ').collect();
                    seen.lock().unwrap().push((
                        fields[0].to_owned(),
                        fields[1].parse().unwrap(),
                        m.payload.len(),
                    ));
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    common::wait_for("four raw events", Duration::from_secs(10), || {
        seen.lock().unwrap().len() == 4
    })
    .await;
    wait_acknowledged(&server, &bus, &topic).await;
    let seen = seen.lock().unwrap().clone();
    for aggregate in ["x", "y"] {
        let versions: Vec<u64> = seen
            .iter()
            .filter(|s| s.0 == aggregate)
            .map(|s| s.1)
            .collect();
        assert_eq!(versions, [1, 2], "{aggregate}: {seen:?}");
    }
    assert!(
        seen.iter().all(|s| s.2 == 24),
        "each carries its own payload: {seen:?}"
    );
    subscription.close().await.unwrap();
}

/// A raw subscription made before anything else on a new bus provisions the topic's stream
/// and consumer itself, and then gets what is published, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_subscription_made_first_provisions_its_topic() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(batched(&server.url(), |_| {}))
        .await
        .unwrap();
    let topic = Topic::new("batch-raw-first").unwrap();
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let key = bus_core::RawKey::Extract(Arc::new(|m: &bus_core::RawMessage| {
        m.header(bus_core::wire::EVENT)
            .and_then(|v| v.split(' ').next())
            .map(str::to_owned)
    }));
    let subscription = {
        let seen = seen.clone();
        bus.subscribe_raw(
            &topic,
            key,
            Arc::new(bus_core::raw_handler_fn(move |m: bus_core::RawMessage| {
                let seen = seen.clone();
                async move {
                    let event = m.header(bus_core::wire::EVENT).unwrap().to_owned();
                    let version = event.split(' ').nth(1).unwrap().parse().unwrap();
                    seen.lock().unwrap().push(version);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    let info = stream(&server, &bus, &topic).await.cached_info().clone();
    assert_eq!(info.config.subjects, [topic.to_string()]);
    publish_many(&bus, &topic, "first", 1, 5).await;
    common::wait_for("five raw events", Duration::from_secs(10), || {
        seen.lock().unwrap().len() == 5
    })
    .await;
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3, 4, 5]);
    wait_acknowledged(&server, &bus, &topic).await;
    subscription.close().await.unwrap();
}

/// An aggregate halts on an event in the middle of a batch: its later event in the batch waits
/// with it, the other aggregate's event is handled, and the batch stays unacknowledged until an
/// operator resumes the aggregate; then both run, in order, and the batch is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_inside_a_batch_holds_only_its_aggregate_until_resumed() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(batched(&server.url(), |c| {
        c.batching.linger = Duration::from_millis(300);
        c.on_failure = FailurePolicy::HaltAggregate;
        c.retry.max_attempts = 1;
    }))
    .await
    .unwrap();
    let topic = Topic::new("batch-halt").unwrap();
    publish_one_batch(&bus, &topic, &[("a", 1), ("b", 1), ("a", 2)]).await;
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let recorder = Recorder::new();
    let subscription = {
        let (recorder, t, broken) = (recorder.clone(), topic.clone(), broken.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t, broken) = (recorder.clone(), t.clone(), broken.clone());
                async move {
                    if e.aggregate_id().as_str() == "a"
                        && broken.load(std::sync::atomic::Ordering::SeqCst)
                    {
                        return Err(HandlerError::permanent("not yet"));
                    }
                    recorder.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    let control = subscription.control().unwrap();
    common::wait_for(
        "a halted holding two events",
        Duration::from_secs(10),
        || {
            let m = control.metrics();
            m.halted_aggregates == 1 && m.halted_events == 2
        },
    )
    .await;
    recorder.wait_unique(1).await; // b 1
    let info = consumer_info(&server, &bus, &topic).await;
    assert_eq!(info.num_ack_pending, 1, "the batch waits for a: {info:?}");
    assert_eq!(recorder.verifier.report().unique, 1);

    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    control.resume("a").await.unwrap();
    recorder.wait_unique(3).await;
    wait_acknowledged(&server, &bus, &topic).await;
    let report = recorder.verifier.report();
    assert_eq!(
        (report.order_violations, report.duplicates, report.gaps),
        (0, 0, 0),
        "{report:?}"
    );
    assert_eq!(control.metrics().halted_aggregates, 0);
    subscription.close().await.unwrap();
}

/// A batch is acknowledged only once every earlier message holding one of its aggregates is:
/// batch 1 holds `a 1` (its handler waits) and `b 1`; batch 2 holds `b 2` and `c 1`; message 3
/// holds `d 1` alone. With everything but `a 1` handled, batch 2 waits for batch 1 (they share
/// `b`) while message 3, sharing nothing, is acknowledged. Were batch 2 acknowledged (and, on a
/// work-queue stream, removed), a successor after a crash would handle `b 1` again after `b 2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_acknowledged_only_after_earlier_messages_of_its_aggregates() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(batched(&server.url(), |c| {
        c.batching.linger = Duration::from_millis(300);
    }))
    .await
    .unwrap();
    let topic = Topic::new("batch-ack-order").unwrap();
    publish_stored_at(&bus, &topic, &[("a", 1), ("b", 1)], 1).await;
    publish_stored_at(&bus, &topic, &[("b", 2), ("c", 1)], 2).await;
    publish_stored_at(&bus, &topic, &[("d", 1)], 3).await;

    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let recorder = Recorder::new();
    let subscription = {
        let (recorder, t, gate) = (recorder.clone(), topic.clone(), gate.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t, gate) = (recorder.clone(), t.clone(), gate.clone());
                async move {
                    if e.aggregate_id().as_str() == "a" {
                        gate.acquire().await.unwrap().forget();
                    }
                    recorder.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    let control = subscription.control().unwrap();
    recorder.wait_unique(4).await; // b 1, b 2, c 1, d 1
    common::wait_for("message 3 acknowledged", Duration::from_secs(10), || {
        control.metrics().acks_waiting == 1
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = consumer_info(&server, &bus, &topic).await;
        if info.num_ack_pending <= 2 || tokio::time::Instant::now() > deadline {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (info.num_ack_pending, info.ack_floor.stream_sequence),
        (2, 0),
        "batch 2 must wait for batch 1, message 3 must not: {info:?}"
    );
    assert_eq!(
        stored_messages(&server, &bus, &topic).await,
        2,
        "the work-queue stream removed message 3 only"
    );
    gate.add_permits(1);
    recorder.wait_unique(5).await;
    wait_acknowledged(&server, &bus, &topic).await;
    assert_eq!(control.metrics().acks_waiting, 0);
    recorder.verifier.report().assert_exact(5);
    subscription.close().await.unwrap();
}

/// A handler is told when the broker stored its event and when the fetcher received it, for an
/// event of a batch and for one alone: the stages an event's latency splits into.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_knows_when_its_event_was_stored_and_received() {
    use std::time::SystemTime;
    let server = NatsServer::start();
    let bus = NatsBus::connect(batched(&server.url(), |c| {
        c.batching.linger = Duration::from_millis(300);
    }))
    .await
    .unwrap();
    let topic = Topic::new("batch-timing").unwrap();
    let before = SystemTime::now();
    // Two events of one batch, then one alone (one event in the linger is sent as it is).
    publish_stored_at(&bus, &topic, &[("a", 1), ("b", 1)], 1).await;
    publish_stored_at(&bus, &topic, &[("a", 2)], 2).await;
    let after_publish = SystemTime::now();

    type Seen = (u64, Option<SystemTime>, Option<SystemTime>, SystemTime);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let recorder = Recorder::new();
    let _subscription = {
        let (seen, recorder, t) = (seen.clone(), recorder.clone(), topic.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (seen, recorder, t) = (seen.clone(), recorder.clone(), t.clone());
                async move {
                    let d = bus_core::current_delivery().unwrap();
                    seen.lock().unwrap().push((
                        d.stream_sequence.unwrap(),
                        d.stored_at,
                        d.received_at,
                        SystemTime::now(),
                    ));
                    recorder.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    recorder.wait_unique(3).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (sequence, stored, received, started) in seen {
        let stored = stored.unwrap_or_else(|| panic!("no stored_at for sequence {sequence}"));
        let received = received.unwrap_or_else(|| panic!("no received_at for sequence {sequence}"));
        // One clock on one machine: published, stored, received, handled, in that order.
        assert!(
            before <= stored && stored <= after_publish,
            "{sequence}: stored {stored:?}"
        );
        assert!(
            stored <= received,
            "{sequence}: received {received:?} before stored {stored:?}"
        );
        assert!(received <= started, "{sequence}: started before received");
    }
}

/// A stream written by an earlier version holds batches whose records have text heads: they
/// are read, in order, before and between the compact ones this version writes. The test
/// checks that both forms are stored, and that every event is handled once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_text_heads_are_read_with_compact_ones() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(batched(&server.url(), |c| {
        c.batching.linger = Duration::from_millis(200);
    }))
    .await
    .unwrap();
    let topic = Topic::new("heads").unwrap();
    // The stream exists once the first event is stored: versions 1-2 of each aggregate.
    publish_stored_at(&bus, &topic, &[("a", 1), ("b", 1), ("a", 2), ("b", 2)], 1).await;
    // Versions 3-5 as an earlier version wrote them: one batch, text heads.
    let mut body = Vec::new();
    let mut first_id = None;
    for (aggregate, version) in [("a", 3), ("b", 3), ("a", 4), ("a", 5), ("b", 4), ("b", 5)] {
        let e = envelope(aggregate, version);
        first_id.get_or_insert_with(|| e.event_id().as_str().to_owned());
        bus_core::wire::encode_text_record(&e, &mut body);
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(bus_core::wire::BATCH, "6");
    headers.insert("Nats-Msg-Id", format!("{}+6", first_id.unwrap()).as_str());
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let ack = js
        .publish_with_headers(topic.as_str().to_owned(), headers, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, 2);
    publish_stored_at(&bus, &topic, &[("a", 6), ("b", 6), ("b", 7)], 3).await;

    // Stored as written: compact heads, text heads, compact heads.
    let s = stream(&server, &bus, &topic).await;
    let mut heads = Vec::new();
    for seq in 1..=3 {
        let message = s.get_raw_message(seq).await.unwrap();
        let count = message.headers.get(bus_core::wire::BATCH).unwrap();
        let (spans, _) =
            bus_core::wire::split_batch(count.as_ref(), &message.payload, |_| ()).unwrap();
        heads.push(spans[0].header_block(&message.payload).first() == Some(&0));
    }
    assert_eq!(heads, [true, false, true], "compact heads per stored batch");

    let recorder = Recorder::new();
    let subscription = bus_testkit::conformance::subscribe_recording(&bus, &topic, &recorder).await;
    recorder.wait_unique(13).await;
    wait_acknowledged(&server, &bus, &topic).await;
    let report = recorder.verifier.report();
    assert_eq!(report.handled, 13, "{report:?}");
    assert_eq!(
        (report.order_violations, report.duplicates, report.gaps),
        (0, 0, 0),
        "{report:?}"
    );
    subscription.close().await.unwrap();
}
