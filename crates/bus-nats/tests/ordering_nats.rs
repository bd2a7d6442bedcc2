//! Ordering at scale, topic isolation inside one stream, and bad input, against nats-server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bus_core::{handler_fn, Envelope, PublishErrorKind, Publisher, Subscriber, Topic};
use bus_nats::{NatsBus, StreamSpec};
use bus_testkit::conformance::{subscribe_recording, Recorder};
use bus_testkit::NatsServer;
use common::test_config;

fn envelope(aggregate: &str, version: u64) -> Envelope {
    Envelope::builder(aggregate, "Tested", version)
        .payload(vec![7u8; 64])
        .build()
        .unwrap()
}

/// The design note's own test: 1 000 envelopes of one aggregate, handled in exact order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_aggregate_thousand_events_in_exact_order() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topic = Topic::new("seed.single").unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let subscription = bus
        .subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let tx = tx.clone();
                async move {
                    tx.send(e.event_version()).unwrap();
                    Ok(())
                }
            })),
        )
        .await
        .unwrap();
    for version in 1..=1000 {
        let _receipt = bus
            .publish(&topic, envelope("the-one", version))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    let mut previous = 0;
    for _ in 0..1000 {
        let version = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            version,
            previous + 1,
            "event {version} arrived after {previous}"
        );
        previous = version;
    }
    subscription.close().await.unwrap();
    assert!(rx.try_recv().is_err(), "nothing beyond the 1 000 events");
}

/// 100 000 envelopes over 1 000 aggregates and 4 topics from 8 concurrent publishing tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_events_four_topics_eight_publishers() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topics: Vec<Topic> = (0..4)
        .map(|i| Topic::new(format!("scaled.t{i}")).unwrap())
        .collect();
    let recorder = Recorder::new();
    let mut subscriptions = Vec::new();
    for topic in &topics {
        subscriptions.push(subscribe_recording(&bus, topic, &recorder).await);
    }
    // 1 000 aggregates in all (250 per topic), 100 versions each: 100 000 events.
    const AGGREGATES_PER_TOPIC: usize = 250;
    const VERSIONS: u64 = 100;
    const PUBLISHERS: usize = 8;
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let publisher = bus.publisher();
        let topics = topics.clone();
        tasks.push(tokio::spawn(async move {
            for version in 1..=VERSIONS {
                for (t, topic) in topics.iter().enumerate() {
                    for a in (p..AGGREGATES_PER_TOPIC).step_by(PUBLISHERS) {
                        let _receipt = publisher
                            .publish(topic, envelope(&format!("t{t}-a{a}"), version))
                            .await
                            .unwrap();
                    }
                }
            }
            publisher.flush().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let expected = (topics.len() * AGGREGATES_PER_TOPIC) as u64 * VERSIONS;
    assert_eq!(expected, 100_000);
    recorder.wait_unique(expected).await;
    for subscription in subscriptions {
        subscription.close().await.unwrap();
    }
    let report = recorder.verifier.report();
    report.assert_exact(expected);
    assert_eq!(report.aggregates, 1_000);
}

/// Several topics in one stream: each consumer filters on its topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_sharing_a_stream_stay_isolated() {
    let server = NatsServer::start();
    let a = Topic::new("shared.a").unwrap();
    let b = Topic::new("shared.b").unwrap();
    let mut config = test_config(&server.url());
    config
        .streams
        .push(StreamSpec::new("SHARED", [a.clone(), b.clone()]));
    let bus = NatsBus::connect(config).await.unwrap();
    assert_eq!(bus.stream_name(&a).await.unwrap(), "SHARED");
    assert_eq!(bus.stream_name(&b).await.unwrap(), "SHARED");
    // Publish first, so both topics' messages sit interleaved in the one stream.
    for version in 1..=200 {
        let _receipt = bus.publish(&a, envelope("x", version)).await.unwrap();
        let _receipt = bus.publish(&b, envelope("x", version)).await.unwrap();
    }
    bus.flush().await.unwrap();
    let recorder = Recorder::new();
    let sub_a = subscribe_recording(&bus, &a, &recorder).await;
    recorder.wait_unique(200).await;
    // Only topic a is subscribed: had its consumer no filter, it would have seen b's events
    // as duplicates of aggregate x.
    let report = recorder.verifier.report();
    report.assert_exact(200);
    let sub_b = subscribe_recording(&bus, &b, &recorder).await;
    recorder.wait_unique(400).await;
    sub_a.close().await.unwrap();
    sub_b.close().await.unwrap();
    let report = recorder.verifier.report();
    report.assert_exact(400);
    assert_eq!(report.aggregates, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payload_fails_before_sending() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topic = Topic::new("big").unwrap();
    let payload = vec![0u8; 2 * 1024 * 1024];
    let envelope = Envelope::builder("a", "Big", 1)
        .payload(payload)
        .build()
        .unwrap();
    let error = bus.publish(&topic, envelope).await.unwrap_err();
    assert_eq!(error.kind(), PublishErrorKind::PayloadTooLarge);
    assert!(
        error
            .to_string()
            .contains("over the server's max_payload of 1048576 bytes"),
        "{error}"
    );
    assert_eq!(bus.publisher().outstanding(), 0);
    bus.flush().await.unwrap();
}

#[test]
fn invalid_topics_and_stream_names_are_refused_at_configuration() {
    let err = Topic::new("orders v1").unwrap_err();
    assert_eq!(err.field(), "topic");
    assert!(err.to_string().contains("`orders v1`"), "{err}");
    let err = Topic::new("orders.*").unwrap_err();
    assert!(err.to_string().contains("'*'"), "{err}");
    let mut config = bus_nats::NatsConfig::default();
    config
        .streams
        .push(StreamSpec::new("bad.name", [Topic::new("t").unwrap()]));
    let err = config.validate().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("stream name `bad.name` is invalid"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refuses_invalid_configuration_with_the_field() {
    let mut config = bus_nats::NatsConfig::new("nats://127.0.0.1:1");
    config.fetch.batch = 0;
    let err = NatsBus::connect(config).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: fetch.batch `0` is invalid: must be at least 1"
    );
}

/// Bytes that are not an envelope, published by a plain NATS client, are dead-lettered with
/// their reason; the topic keeps flowing and nothing is redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_a_plain_client_is_dead_lettered_and_the_topic_flows() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topic = Topic::new("garbage").unwrap();
    let stream = bus.stream_name(&topic).await.unwrap();
    // A plain client, knowing nothing of envelopes.
    let plain = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(plain.clone());
    js.publish(topic.to_string(), "not an envelope".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut half = async_nats::HeaderMap::new();
    half.insert("Bus-Event", "a 1 Tested");
    js.publish_with_headers(topic.to_string(), half, "missing fields".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for version in 1..=20 {
        let _receipt = bus
            .publish(&topic, envelope("fine", version))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    let recorder = Recorder::new();
    let subscription = subscribe_recording(&bus, &topic, &recorder).await;
    recorder.wait_unique(20).await;
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(20);

    // Both bad messages are in the dead-letter stream with their reason.
    let dlq = js.get_stream("BUS_DEAD_LETTERS").await.unwrap();
    let first = dlq
        .get_last_raw_message_by_subject(&format!("bus-dlq.{topic}"))
        .await
        .unwrap();
    let headers = first.headers;
    assert_eq!(
        headers.get("Bus-Dlq-Reason").map(|v| v.as_str()),
        Some("undecodable")
    );
    assert_eq!(
        headers.get("Bus-Dlq-Topic").map(|v| v.as_str()),
        Some(topic.as_str())
    );
    assert!(
        headers
            .get("Bus-Dlq-Error")
            .unwrap()
            .as_str()
            .contains("header `Bus-Event` value `a 1 Tested` is invalid"),
        "{headers:?}"
    );
    let mut info = dlq.clone();
    assert_eq!(info.info().await.unwrap().state.messages, 2);
    // The originals were terminated, not left for redelivery: the work queue is empty.
    let mut work = js.get_stream(&stream).await.unwrap();
    assert_eq!(work.info().await.unwrap().state.messages, 0);
}

/// A publisher made on a runtime of its own (a current-thread runtime on a thread that
/// publishes in bulk), with connections of its own: its events arrive in order, and once that
/// runtime has ended (and every task it ran with it) the bus's other publishers still publish
/// to the topic. A publisher sharing the bus's connections would have made the topic's
/// publishing connection on that runtime, and left the bus one whose task is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_on_a_runtime_of_its_own_keeps_order_and_leaves_the_bus_working() {
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    // A dead connection fails a publish within this, rather than the default 30 s.
    config.publish_retry_for = Duration::from_secs(3);
    config.publish_ack_timeout = Duration::from_millis(500);
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("threads.own").unwrap();
    let recorder = Recorder::new();
    let subscription = subscribe_recording(&bus, &topic, &recorder).await;
    const AGGREGATES: u64 = 50;
    const VERSIONS: u64 = 40;
    let publish = |publisher: bus_nats::NatsPublisher, topic: Topic, versions| async move {
        for version in versions {
            for a in 0..AGGREGATES {
                let _receipt = publisher
                    .publish(&topic, envelope(&format!("a{a}"), version))
                    .await
                    .unwrap();
            }
        }
        publisher.flush().await
    };
    let (own_bus, own_topic) = (bus.clone(), topic.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let publisher = own_bus.publisher_on_own_connections();
            publish(publisher, own_topic, 1..=VERSIONS / 2).await
        })
    })
    .join()
    .unwrap()
    .expect("the first half stored, from the runtime of its own");
    recorder.wait_unique(AGGREGATES * VERSIONS / 2).await;
    publish(bus.publisher(), topic.clone(), VERSIONS / 2 + 1..=VERSIONS)
        .await
        .expect("the second half stored, from the bus's runtime, after the other one ended");
    recorder.wait_unique(AGGREGATES * VERSIONS).await;
    subscription.close().await.unwrap();
    recorder
        .verifier
        .report()
        .assert_exact(AGGREGATES * VERSIONS);
}

/// A publisher's own connections close once its handles are dropped and its publishes are
/// settled, and no other connection of the bus closes with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishers_own_connection_closes_with_it() {
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
    config.connection.on_event = Some(Arc::new(move |event| {
        let _ = events.send(event);
    }));
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("threads.closing").unwrap();
    let recorder = Recorder::new();
    let subscription = subscribe_recording(&bus, &topic, &recorder).await;
    let publisher = bus.publisher_on_own_connections();
    for version in 1..=100 {
        let _receipt = publisher
            .publish(&topic, envelope("closing", version))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    recorder.wait_unique(100).await;
    let closed = |event: &bus_nats::ConnectionEvent| matches!(event, bus_nats::ConnectionEvent::Closed { topic: t } if *t == topic);
    while let Ok(event) = seen.try_recv() {
        assert!(!closed(&event), "closed before the publisher was dropped");
    }
    drop(publisher);
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = seen.recv().await.expect("the bus keeps the callback");
            if matches!(event, bus_nats::ConnectionEvent::Closed { .. }) {
                return event;
            }
        }
    })
    .await
    .expect("a connection closed after the publisher was dropped");
    assert!(closed(&event), "{event:?}");
    // The subscription's connection is still there: more events arrive on the bus's own
    // publisher.
    for version in 101..=150 {
        let _receipt = bus
            .publish(&topic, envelope("closing", version))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    recorder.wait_unique(150).await;
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(150);
    while let Ok(event) = seen.try_recv() {
        assert!(!closed(&event), "a second connection closed: {event:?}");
    }
}
