//! The halt-aggregate failure policy and its operator API (list, resume, skip), and the
//! dead-letter API (list, replay), against a real nats-server.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::{
    handler_fn, AggregateControl, Envelope, FailurePolicy, HandlerError, Publisher,
    SubscribeErrorKind, Subscriber, Topic,
};
use bus_nats::NatsBus;
use bus_testkit::conformance::Recorder;
use bus_testkit::NatsServer;
use common::{consumer_info, test_config, unbatched_config, wait_for};

fn envelope(aggregate: &str, version: u64) -> Envelope {
    Envelope::builder(aggregate, "Tested", version)
        .payload(format!("{aggregate}:{version}").into_bytes())
        .build()
        .unwrap()
}

async fn publish_all(bus: &NatsBus, topic: &Topic, events: impl IntoIterator<Item = Envelope>) {
    let publisher = bus.publisher();
    for event in events {
        let _receipt = publisher.publish(topic, event).await.unwrap();
    }
    publisher.flush().await.unwrap();
}

/// Polls `condition` every 10 ms until it holds, failing after `timeout`.
async fn redeliveries(server: &NatsServer, bus: &NatsBus, topic: &Topic) -> u64 {
    consumer_info(server, bus, topic).await.num_redelivered as u64
}

/// A permanent failure halts its aggregate: its later events wait (kept alive at the broker
/// past several AckWaits, never redelivered), other aggregates flow, the operator sees it in
/// `halted()`, a resume that fails again halts again, and a resume after the fault is fixed
/// hands the failed event and everything behind it to the handler in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halted_aggregate_waits_for_the_operator_and_resumes_in_order() {
    let server = NatsServer::start();
    let mut config = unbatched_config(&server.url());
    config.on_failure = FailurePolicy::HaltAggregate;
    config.retry.max_attempts = 2;
    config.consumer.ack_wait = Duration::from_secs(1);
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("halting").unwrap();
    let recorder = Recorder::new();
    let broken = Arc::new(AtomicBool::new(true));
    let failed_attempts = Arc::new(AtomicU64::new(0));
    let subscription = {
        let (recorder, t, broken, failed_attempts) = (
            recorder.clone(),
            topic.clone(),
            broken.clone(),
            failed_attempts.clone(),
        );
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t, broken, failed_attempts) = (
                    recorder.clone(),
                    t.clone(),
                    broken.clone(),
                    failed_attempts.clone(),
                );
                async move {
                    if e.aggregate_id().as_str() == "bad"
                        && e.event_version() == 3
                        && broken.load(Ordering::SeqCst)
                    {
                        failed_attempts.fetch_add(1, Ordering::SeqCst);
                        return Err(HandlerError::retryable("downstream unavailable"));
                    }
                    recorder.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    let control: Arc<dyn AggregateControl> = subscription.control().expect("NATS has control");

    let mut events = Vec::new();
    for version in 1..=20 {
        events.push(envelope("bad", version));
        for a in 0..10 {
            events.push(envelope(&format!("good-{a}"), version));
        }
    }
    publish_all(&bus, &topic, events).await;

    // Every other aggregate completes; "bad" stops at version 2 with 3..20 waiting.
    recorder.wait_unique(200 + 2).await;
    wait_for(
        "bad to hold all 18 waiting events",
        Duration::from_secs(10),
        || {
            control
                .halted()
                .iter()
                .any(|h| h.key == "bad" && h.waiting == 18)
        },
    )
    .await;
    let halted = control.halted();
    assert_eq!(halted.len(), 1, "{halted:?}");
    let halt = &halted[0];
    assert_eq!(halt.event_version, Some(3));
    assert_eq!(halt.reason, "retries-exhausted");
    assert_eq!(halt.attempts, 2);
    assert!(halt.error.contains("downstream unavailable"), "{halt:?}");
    // The handler records before the worker counts and acknowledges, and an event is counted
    // handled a moment before it leaves the in-flight count: wait for both.
    wait_for("202 handled, 18 in flight", Duration::from_secs(10), || {
        let m = control.metrics();
        m.handled == 202 && m.in_flight == 18
    })
    .await;
    let metrics = control.metrics();
    assert_eq!(metrics.halted_aggregates, 1, "{metrics:?}");
    assert_eq!(metrics.halted_events, 18, "{metrics:?}");
    assert_eq!(
        metrics.in_flight, 18,
        "held events stay in flight: {metrics:?}"
    );

    // Held well past AckWait: the keep-alive stops the broker from redelivering any of them.
    // (This waits on purpose: what is tested is that time passing changes nothing.)
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(redeliveries(&server, &bus, &topic).await, 0);
    assert_eq!(recorder.verifier.report().unique, 202);

    // Operator calls on an aggregate that is not halted are refused.
    let error = control.resume("good-1").await.unwrap_err();
    assert_eq!(error.kind(), SubscribeErrorKind::NotHalted);
    // The same through the control subject, as an operator in another process would ask.
    let members = bus
        .remote_halted(&topic, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0].halted.len(), 1, "{members:?}");
    assert_eq!(members[0].halted[0].key, "bad", "{members:?}");
    match bus
        .remote_resume(&topic, "good-1", Duration::from_secs(2))
        .await
        .unwrap_err()
    {
        bus_nats::NatsError::Refused { refusals, .. } => {
            assert_eq!(refusals.len(), 1, "{refusals:?}");
            assert_eq!(refusals[0].member, members[0].member, "{refusals:?}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }

    // A resume while the fault persists: two more attempts, then halted again.
    control.resume("bad").await.unwrap();
    wait_for(
        "the resumed event to be tried twice more",
        Duration::from_secs(10),
        || failed_attempts.load(Ordering::SeqCst) >= 4,
    )
    .await;
    wait_for("bad to halt again", Duration::from_secs(10), || {
        control
            .halted()
            .iter()
            .any(|h| h.key == "bad" && h.waiting == 18)
    })
    .await;
    assert_eq!(recorder.verifier.report().unique, 202);

    // Fixed: a resume hands 3..20 over in order.
    broken.store(false, Ordering::SeqCst);
    control.resume("bad").await.unwrap();
    recorder.wait_unique(220).await;
    assert!(control.halted().is_empty());
    wait_for("the last acknowledgement", Duration::from_secs(10), || {
        control.metrics().handled == 220
    })
    .await;
    let metrics = control.metrics();
    assert_eq!(
        (
            metrics.halted_aggregates,
            metrics.halted_events,
            metrics.dead_lettered
        ),
        (0, 0, 0),
        "{metrics:?}"
    );
    subscription.close().await.unwrap();
    let report = recorder.verifier.report();
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    assert_eq!(report.duplicates, 0, "{report:?}");
    assert_eq!(report.lost(220), 0, "{report:?}");
    assert!(
        bus.dead_letters(&topic, 100).await.unwrap().is_empty(),
        "halting dead-letters nothing"
    );
}

/// Skipping a halted aggregate dead-letters the failed event (reason `skipped`) and hands the
/// rest over in order; the dead letter can be listed and replayed, and a second replay of the
/// same dead letter is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_dead_letters_the_failed_event_and_replay_brings_it_back() {
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    config.on_failure = FailurePolicy::HaltAggregate;
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("skipping").unwrap();
    let recorder = Recorder::new();
    let poisoned = Arc::new(AtomicBool::new(true));
    let subscription = {
        let (recorder, t, poisoned) = (recorder.clone(), topic.clone(), poisoned.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t, poisoned) = (recorder.clone(), t.clone(), poisoned.clone());
                async move {
                    if e.aggregate_id().as_str() == "acc" && e.event_version() == 2 {
                        if poisoned.load(Ordering::SeqCst) {
                            return Err(HandlerError::permanent("overdraft not allowed"));
                        }
                        // The replay: handled after its successors, as documented.
                        recorder.record(&Topic::new("skipping.replayed").unwrap(), &e);
                        return Ok(());
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
    publish_all(&bus, &topic, (1..=10).map(|v| envelope("acc", v))).await;
    wait_for(
        "acc to halt with 9 waiting",
        Duration::from_secs(10),
        || {
            control
                .halted()
                .iter()
                .any(|h| h.key == "acc" && h.waiting == 9)
        },
    )
    .await;
    assert_eq!(control.halted()[0].reason, "permanent");

    control.skip("acc").await.unwrap();
    recorder.wait_unique(9).await; // 1 and 3..=10
    assert!(control.halted().is_empty());
    wait_for(
        "the skipped event's dead letter to be counted",
        Duration::from_secs(10),
        || control.metrics().dead_lettered == 1,
    )
    .await;
    let report = recorder.verifier.report();
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.duplicates, 0, "{report:?}");

    let letters = bus.dead_letters(&topic, 100).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.reason, "skipped");
    assert_eq!(letter.topic, topic);
    assert!(letter.error.contains("overdraft not allowed"), "{letter:?}");
    let original = letter.envelope().unwrap();
    assert_eq!(original.aggregate_id().as_str(), "acc");
    assert_eq!(original.event_version(), 2);
    assert_eq!(original.payload().as_ref(), b"acc:2");

    poisoned.store(false, Ordering::SeqCst);
    let first = bus.replay_dead_letter(letter).await.unwrap();
    assert!(!first.duplicate);
    let again = bus.replay_dead_letter(letter).await.unwrap();
    assert!(
        again.duplicate,
        "a second replay of the same dead letter is stored once"
    );
    recorder.wait_unique(10).await;
    assert!(bus.dead_letters(&topic, 100).await.unwrap().is_empty());
    subscription.close().await.unwrap();
    let report = recorder.verifier.report();
    assert_eq!(report.duplicates, 0, "{report:?}");
    assert_eq!(report.unique, 10, "{report:?}");
}

/// Closing a subscription with a halted aggregate returns the held events unacknowledged; the
/// next subscription receives them again in order, starting with the failed one, without
/// waiting for AckWait (delivery restarts at the ack floor). With work-queue retention (the
/// default) the acknowledged events of other aggregates are gone from the stream, so nothing
/// else is handed over twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_events_survive_a_close_and_come_back_in_order() {
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    config.on_failure = FailurePolicy::HaltAggregate;
    config.retry.max_attempts = 1;
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("held").unwrap();
    let recorder = Recorder::new();
    let broken = Arc::new(AtomicBool::new(true));
    let handler = {
        let (recorder, t, broken) = (recorder.clone(), topic.clone(), broken.clone());
        Arc::new(handler_fn(move |e: Envelope| {
            let (recorder, t, broken) = (recorder.clone(), t.clone(), broken.clone());
            async move {
                if e.aggregate_id().as_str() == "stuck"
                    && e.event_version() == 2
                    && broken.load(Ordering::SeqCst)
                {
                    return Err(HandlerError::permanent("not yet"));
                }
                recorder.record(&t, &e);
                Ok(())
            }
        }))
    };
    let mut events = Vec::new();
    for version in 1..=10 {
        events.push(envelope("stuck", version));
        events.push(envelope("free", version));
    }
    publish_all(&bus, &topic, events).await;

    let subscription = bus.subscribe(&topic, handler.clone()).await.unwrap();
    let control = subscription.control().unwrap();
    recorder.wait_unique(11).await; // stuck v1 and free v1..10
    wait_for("stuck to hold 9 events", Duration::from_secs(10), || {
        control.metrics().halted_events == 9
    })
    .await;
    let report = subscription.close().await.unwrap();
    assert_eq!(report.returned, 9, "{report:?}");
    let error = control.resume("stuck").await.unwrap_err();
    assert_eq!(error.kind(), SubscribeErrorKind::Closed, "{error}");

    broken.store(false, Ordering::SeqCst);
    let subscription = bus.subscribe(&topic, handler).await.unwrap();
    recorder.wait_unique(20).await;
    subscription.close().await.unwrap();
    let report = recorder.verifier.report();
    eprintln!("after reopening: {report:?}");
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    assert_eq!(report.lost(20), 0, "{report:?}");
    assert_eq!(report.duplicates, 0, "{report:?}");
}

/// The group's lag, as the broker sees it: an error before the group ever subscribed (and for a
/// topic no stream stores: nothing is created to answer), unacknowledged events while the
/// handler is stuck (with the age of the oldest), none once handled; for a partitioned topic
/// too, summed over its partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_what_the_group_has_not_handled_and_how_old_it_is() {
    for partitions in [1u32, 4] {
        let server = NatsServer::start();
        let topic = Topic::new("lagging").unwrap();
        let mut config = unbatched_config(&server.url());
        let mut spec = bus_nats::StreamSpec::new("LAGGING", [topic.clone()]);
        spec.partitions = partitions;
        config.streams.push(spec);
        let bus = NatsBus::connect(config).await.unwrap();
        publish_all(
            &bus,
            &topic,
            (1..=30).map(|v| envelope("l", v)).collect::<Vec<_>>(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await; // so the oldest has an age
        let never = bus.lag(&topic).await.unwrap_err();
        assert_eq!(never.kind(), bus_nats::NatsErrorKind::NotFound, "{never}");
        assert!(never.to_string().contains("never subscribed"), "{never}");
        let nowhere = Topic::new("lagging.nowhere").unwrap();
        let missing = bus.lag(&nowhere).await.unwrap_err();
        assert_eq!(
            missing.kind(),
            bus_nats::NatsErrorKind::NotFound,
            "{missing}"
        );
        let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
        assert!(
            js.get_stream(bus_nats::default_stream_name(&nowhere))
                .await
                .is_err(),
            "asking created a stream"
        );

        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let subscription = bus
            .subscribe(
                &topic,
                Arc::new(handler_fn(move |_e: Envelope| {
                    let mut gate = gate_rx.clone();
                    async move {
                        gate.wait_for(|open| *open).await.unwrap();
                        Ok(())
                    }
                })),
            )
            .await
            .unwrap();
        let control = subscription.control().unwrap();
        wait_for(
            "delivery to the stuck handler",
            Duration::from_secs(10),
            || control.metrics().in_flight == 30,
        )
        .await;
        let lag = bus.lag(&topic).await.unwrap();
        assert_eq!((lag.undelivered, lag.unacknowledged), (0, 30), "{lag:?}");
        assert!(
            lag.oldest_unhandled_age.unwrap() >= Duration::from_millis(20),
            "{lag:?}"
        );
        gate_tx.send(true).unwrap();
        wait_for("everything handled", Duration::from_secs(10), || {
            control.metrics().handled == 30
        })
        .await;
        subscription.close().await.unwrap();
        let lag = bus.lag(&topic).await.unwrap();
        assert_eq!((lag.undelivered, lag.unacknowledged), (0, 0), "{lag:?}");
        assert_eq!(lag.oldest_unhandled_age, None, "{lag:?}");
    }
}
