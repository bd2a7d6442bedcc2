//! What production does to a consumer first, in one process: its connection drops in the
//! middle of a batch, another client publishes bytes no client can read, a second subscription
//! of the same group is started by mistake.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::{handler_fn, Envelope, Publisher, SubscribeErrorKind, Subscriber, Topic};
use bus_nats::NatsBus;
use bus_testkit::conformance::{subscribe_recording, Recorder};
use bus_testkit::{NatsServer, TcpProxy};
use common::{test_config, unbatched_config};

fn envelope(aggregate: &str, version: u64) -> Envelope {
    Envelope::builder(aggregate, "Deployed", version)
        .payload(format!("{aggregate}:{version}").into_bytes())
        .build()
        .unwrap()
}

/// The consumer reaches the server through a proxy that cuts its connection five times while a
/// backlog of 10 000 events over 50 aggregates is being handled. Every cut loses whatever the
/// broker had written to the dead socket; JetStream would redeliver those only after AckWait
/// (30 s), after newer events of the same aggregates. The subscription restarts delivery at
/// the ack floor after each re-connection instead: nothing overtaken, nothing lost, nothing
/// handled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_connection_cut_mid_batch_keeps_order_and_loses_nothing() {
    const AGGREGATES: u64 = 50;
    const VERSIONS: u64 = 200;
    const CUTS: u64 = 5;
    let server = NatsServer::start();
    let target = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    let proxy = TcpProxy::start(target).await.unwrap();
    let topic = Topic::new("cut-consumer").unwrap();

    // One event per message: each cut must find deliveries still to come and be seen as its
    // own discontinuity. With record batches the consumer holds nearly everything after the
    // first pulls, the events dispatched before a cut satisfy the "delivery after the cut"
    // wait at once, and the next cut can land while the previous restart is under way, where
    // that restart absorbs it (correctly, without a restart of its own). Batched consumption
    // across reconnections is covered by `server_killed_and_restarted_under_load`.
    let publisher = NatsBus::connect(unbatched_config(&server.url()))
        .await
        .unwrap();
    for version in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let _receipt = publisher
                .publish(&topic, envelope(&format!("c-{a}"), version))
                .await
                .unwrap();
        }
    }
    publisher.flush().await.unwrap();
    let expected = AGGREGATES * VERSIONS;

    let consumer = NatsBus::connect(test_config(&proxy.url())).await.unwrap();
    let recorder = Recorder::new();
    let handled = Arc::new(AtomicU64::new(0));
    let subscription = {
        let (recorder, handled, t) = (recorder.clone(), handled.clone(), topic.clone());
        consumer
            .subscribe(
                &topic,
                Arc::new(handler_fn(move |e: Envelope| {
                    let (recorder, handled, t) = (recorder.clone(), handled.clone(), t.clone());
                    async move {
                        // Slow enough that every cut finds batches half handled.
                        tokio::time::sleep(Duration::from_micros(300)).await;
                        recorder.record(&t, &e);
                        handled.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                })),
            )
            .await
            .unwrap()
    };
    let control = subscription.control().unwrap();
    for cut in 1..=CUTS {
        recorder
            .wait_until(
                &format!("{} handled before cut {cut}", cut * expected / (CUTS + 2)),
                Duration::from_secs(60),
                |r| r.unique >= cut * expected / (CUTS + 2),
            )
            .await;
        let restarts = control.metrics().delivery_restarts;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.restore();
        // The next cut only once this one was noticed and delivery runs again (the restart
        // is counted once it is done, so the next cut cannot land in the middle of it).
        common::wait_for(
            &format!("delivery restart after cut {cut}"),
            Duration::from_secs(30),
            || control.metrics().delivery_restarts > restarts,
        )
        .await;
        // (Unless fewer than 100 are left: what was dispatched before the cut kept running.)
        let resumed = (recorder.verifier.report().unique + 100).min(expected);
        recorder
            .wait_until(
                &format!("delivery after cut {cut}"),
                Duration::from_secs(30),
                |r| r.unique >= resumed,
            )
            .await;
    }
    recorder
        .wait_until("every event", Duration::from_secs(60), |r| {
            r.unique >= expected
        })
        .await;
    let metrics = control.metrics();
    subscription.close().await.unwrap();
    let report = recorder.verifier.report();
    eprintln!(
        "{CUTS} cuts: {report:?}; restarts {}, copies skipped {}",
        metrics.delivery_restarts, metrics.copies_skipped
    );
    assert_eq!(proxy.cuts(), CUTS);
    // Each cut was repaired by a restart of delivery, not by AckWait.
    assert!(metrics.delivery_restarts >= CUTS, "{metrics:?}");
    report.assert_exact(expected);
}

/// A dropped connection loses the pin keep-alive the broker was holding for the owner (it is
/// never answered); the owner keeps its topic all the same, because the keep-alives after it
/// still confirm the pin. Events published for three `takeover_after` after the cut are all
/// handled by the one subscription, which restarted delivery after the cut and never lost the
/// topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_does_not_cost_the_owner_its_topic() {
    const TAKEOVER_AFTER: Duration = Duration::from_secs(1);
    const EVENTS: u64 = 30;
    let server = NatsServer::start();
    let target = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    let proxy = TcpProxy::start(target).await.unwrap();
    let topic = Topic::new("cut-owner").unwrap();
    let mut config = test_config(&proxy.url());
    config.consumer.takeover_after = TAKEOVER_AFTER;
    let consumer = NatsBus::connect(config).await.unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let subscription = {
        let handled = handled.clone();
        consumer
            .subscribe(
                &topic,
                Arc::new(handler_fn(move |_e: Envelope| {
                    let handled = handled.clone();
                    async move {
                        handled.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                })),
            )
            .await
            .unwrap()
    };
    let control = subscription.control().unwrap();
    let publisher = NatsBus::connect(unbatched_config(&server.url()))
        .await
        .unwrap();
    let _receipt = publisher.publish(&topic, envelope("o-0", 1)).await.unwrap();
    common::wait_for("the first event", Duration::from_secs(20), || {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.restore();
    // The workload: events spread over three takeover_after.
    for version in 2..=EVENTS {
        let _receipt = publisher
            .publish(&topic, envelope("o-0", version))
            .await
            .unwrap();
        tokio::time::sleep(TAKEOVER_AFTER * 3 / EVENTS as u32).await;
    }
    common::wait_for("every event", Duration::from_secs(20), || {
        handled.load(Ordering::SeqCst) == EVENTS
    })
    .await;
    let metrics = control.metrics();
    assert_eq!(proxy.cuts(), 1);
    assert!(
        metrics.delivery_restarts >= 1,
        "the cut went unnoticed: {metrics:?}"
    );
    assert_eq!(
        (metrics.ownership_lost, metrics.ownership_gained),
        (0, 1),
        "{metrics:?}"
    );
    subscription.close().await.unwrap();
}

/// Writes one message to `subject` over a raw connection, with `header_block` exactly as given
/// (the client library would refuse to build it), and waits until the server has read it.
fn publish_raw_header_block(url: &str, subject: &str, header_block: &[u8], payload: &[u8]) {
    let address = url.trim_start_matches("nats://");
    let mut socket = std::net::TcpStream::connect(address).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut info = [0u8; 4096];
    let _ = socket.read(&mut info).unwrap();
    let mut frame = Vec::new();
    frame.extend_from_slice(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\n",
    );
    frame.extend_from_slice(
        format!(
            "HPUB {subject} {} {}\r\n",
            header_block.len(),
            header_block.len() + payload.len()
        )
        .as_bytes(),
    );
    frame.extend_from_slice(header_block);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\r\nPING\r\n");
    socket.write_all(&frame).unwrap();
    let mut reply = Vec::new();
    let mut buffer = [0u8; 256];
    while !String::from_utf8_lossy(&reply).contains("PONG") {
        let n = socket.read(&mut buffer).unwrap();
        assert!(n > 0, "the server closed the raw connection: {reply:?}");
        reply.extend_from_slice(&buffer[..n]);
    }
    assert!(
        !String::from_utf8_lossy(&reply).contains("-ERR"),
        "the server refused the raw publish: {}",
        String::from_utf8_lossy(&reply)
    );
}

/// Another client publishes two messages whose header blocks the client library cannot parse
/// (a line without `:`, bytes that are not UTF-8) amid valid events; nats-server stores them.
/// Delivered, each would make the client drop its connection, again and again. The
/// subscription finds each one after the re-connection, dead-letters it with its raw header
/// block, removes it from the stream, and every valid event is handled in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_messages_are_dead_lettered_and_the_topic_flows_in_order() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(unbatched_config(&server.url()))
        .await
        .unwrap();
    let topic = Topic::new("hostile").unwrap();
    let stream_name = bus.stream_name(&topic).await.unwrap();
    let publish = |aggregate: &'static str, versions: std::ops::RangeInclusive<u64>| {
        let bus = bus.clone();
        let topic = topic.clone();
        async move {
            for version in versions {
                let _receipt = bus
                    .publish(&topic, envelope(aggregate, version))
                    .await
                    .unwrap();
            }
            bus.flush().await.unwrap();
        }
    };
    let no_colon: &[u8] = b"NATS/1.0\r\nBus-Event: a 11 Deployed\r\nthis line has no colon\r\n\r\n";
    let not_utf8: &[u8] = b"NATS/1.0\r\nX-Bytes: \xff\xfe\xfd\r\n\r\n";
    publish("a", 1..=10).await;
    publish("b", 1..=10).await;
    publish_raw_header_block(&server.url(), topic.as_str(), no_colon, b"first");
    publish("a", 11..=20).await;
    publish_raw_header_block(&server.url(), topic.as_str(), not_utf8, b"second");
    publish("b", 11..=20).await;

    let plain = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(plain);
    let mut stream = js.get_stream(&stream_name).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        42,
        "the server stored both unreadable messages"
    );

    let recorder = Recorder::new();
    let subscription = subscribe_recording(&bus, &topic, &recorder).await;
    let control = subscription.control().unwrap();
    recorder
        .wait_until("every valid event", Duration::from_secs(60), |r| {
            r.unique >= 40
        })
        .await;
    common::wait_for("both removals", Duration::from_secs(10), || {
        control.metrics().unreadable == 2
    })
    .await;
    let metrics = control.metrics();
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(40);
    assert!(metrics.delivery_restarts >= 1, "{metrics:?}");

    let letters = bus.dead_letters(&topic, 10).await.unwrap();
    let unreadable: Vec<_> = letters
        .iter()
        .filter(|l| l.reason == "unreadable")
        .collect();
    assert_eq!(unreadable.len(), 2, "{letters:?}");
    use base64::Engine;
    let raw: Vec<Vec<u8>> = unreadable
        .iter()
        .map(|l| {
            base64::engine::general_purpose::STANDARD
                .decode(l.raw_headers.as_deref().expect("raw header block kept"))
                .unwrap()
        })
        .collect();
    assert!(raw.contains(&no_colon.to_vec()), "{letters:?}");
    assert!(raw.contains(&not_utf8.to_vec()), "{letters:?}");
    let payloads: Vec<&[u8]> = unreadable.iter().map(|l| &l.payload[..]).collect();
    assert!(payloads.contains(&&b"first"[..]) && payloads.contains(&&b"second"[..]));
    assert!(
        unreadable[0].error.contains("no `:`") || unreadable[1].error.contains("no `:`"),
        "{letters:?}"
    );
    // Removed from the topic's stream: nothing of the topic is left.
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
}

/// A second subscription of one topic and group in one process is refused, through the same
/// bus or another one; once the first is closed, it is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_subscription_in_one_process_is_refused_through_any_bus() {
    let server = NatsServer::start();
    let topic = Topic::new("twice").unwrap();
    let first_bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let second_bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let recorder = Recorder::new();
    let first = subscribe_recording(&first_bus, &topic, &recorder).await;
    for bus in [&first_bus, &second_bus] {
        let error = common::subscribe_ignoring(bus, &topic).await.unwrap_err();
        assert_eq!(
            error.kind(),
            SubscribeErrorKind::AlreadySubscribed,
            "{error}"
        );
        assert!(error.to_string().contains("twice"), "{error}");
    }
    first.close().await.unwrap();
    let again = subscribe_recording(&second_bus, &topic, &recorder).await;
    let _receipt = first_bus.publish(&topic, envelope("t", 1)).await.unwrap();
    recorder.wait_unique(1).await;
    again.close().await.unwrap();
}

/// An owner dies holding every message of a quiet topic, unacknowledged: JetStream would make
/// them deliverable again only after AckWait (30 s), and the broker pins a standby only when it
/// has a message to deliver. The standby sees that nobody is pinned while messages await
/// acknowledgement, restarts delivery at the ack floor, takes the pin with the first of them,
/// and handles them all in order, long before AckWait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_frees_what_a_dead_owner_held_on_a_quiet_topic() {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;

    let server = NatsServer::start();
    let topic = Topic::new("orphans").unwrap();
    let mut config = unbatched_config(&server.url());
    config.consumer.takeover_after = Duration::from_secs(2);
    let bus = NatsBus::connect(config.clone()).await.unwrap();
    for version in 1..=5 {
        let _receipt = bus.publish(&topic, envelope("o", version)).await.unwrap();
    }
    bus.flush().await.unwrap();
    let stream = bus.stream_name(&topic).await.unwrap();
    let name = config.consumer_name(&topic);

    // The owner that dies: pulls every message as the pinned client, acknowledges none.
    let owner = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(owner.clone());
    js.get_stream(&stream)
        .await
        .unwrap()
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            name: Some(name.clone()),
            filter_subject: topic.to_string(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.consumer.ack_wait,
            max_ack_pending: config.consumer.max_ack_pending,
            max_waiting: config.consumer.max_waiting,
            max_deliver: -1,
            priority_policy: consumer::PriorityPolicy::PinnedClient,
            priority_groups: vec!["bus".into()],
            priority_timeout: config.consumer.takeover_after,
            ..Default::default()
        })
        .await
        .unwrap();
    let inbox = owner.new_inbox();
    let mut replies = owner.subscribe(inbox.clone()).await.unwrap();
    owner
        .publish_with_reply(
            format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"),
            inbox,
            r#"{"batch":5,"expires":1000000000,"group":"bus"}"#.into(),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        let message = replies.next().await.unwrap();
        assert!(message.headers.unwrap().get("Nats-Pin-Id").is_some());
    }
    drop(replies);
    drop(owner); // dies: no acks, no unpin

    let recorder = Recorder::new();
    let subscription = subscribe_recording(&bus, &topic, &recorder).await;
    recorder
        .wait_until("the dead owner's events", Duration::from_secs(10), |r| {
            r.unique >= 5
        })
        .await;
    let metrics = subscription.control().unwrap().metrics();
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(5);
    assert_eq!(metrics.ownership_gained, 1, "{metrics:?}");
}

/// Without a consumer group, two unrelated services would share one and one of them would wait
/// behind the other for ever; subscribing without one fails at once and says what to set.
/// Publishing needs no group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_without_a_group_fails_and_says_what_to_set() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(bus_nats::NatsConfig::new(&server.url()))
        .await
        .unwrap();
    let topic = Topic::new("nameless").unwrap();
    bus.publish(&topic, envelope("n", 1))
        .await
        .unwrap()
        .await
        .unwrap();
    let error = common::subscribe_ignoring(&bus, &topic).await.unwrap_err();
    assert_eq!(error.kind(), SubscribeErrorKind::Configuration, "{error}");
    assert!(error.to_string().contains("consumer.group"), "{error}");
}
