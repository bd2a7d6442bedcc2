//! Misconfiguration and odd input, as a new user would try them: each ends in a clear, typed
//! error at once, nothing is lost, nothing secret is printed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{
    handler_fn, Envelope, PublishErrorKind, Publisher, SubscribeErrorKind, Subscriber, Topic,
};
use bus_nats::{message_size, NatsBus, NatsConfig, NatsErrorKind};
use bus_testkit::conformance::{subscribe_recording, Recorder};
use bus_testkit::NatsServer;
use common::test_config;

fn envelope(aggregate: &str, version: u64, payload: Vec<u8>) -> Envelope {
    Envelope::builder(aggregate, "Misused", version)
        .payload(payload)
        .build()
        .unwrap()
}

/// The server counts the whole header block against `max_payload` (`NATS/1.0\r\n`, the lines,
/// the final `\r\n`). A message of exactly `max_payload` bytes is stored; one byte more fails
/// at once as `PayloadTooLarge`, not as a retryable error half a minute later, and the
/// aggregate's next event is not aborted by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_one_byte_over_max_payload_fails_at_once_and_harms_nothing() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topic = Topic::new("sized").unwrap();
    let max_payload = bus.client(&topic).await.unwrap().server_info().max_payload;
    let base = message_size(&envelope("s", 1, Vec::new()));
    let fits = envelope("s", 1, vec![b'x'; max_payload - base]);
    assert_eq!(message_size(&fits), max_payload);
    bus.publish(&topic, fits).await.unwrap().await.unwrap();

    let over = envelope("s", 2, vec![b'x'; max_payload - base + 1]);
    let started = Instant::now();
    let error = bus.publish(&topic, over).await.unwrap_err();
    assert_eq!(error.kind(), PublishErrorKind::PayloadTooLarge, "{error}");
    assert!(!error.is_retryable(), "{error}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // The aggregate goes on: its next event is stored and handled after the first.
    bus.publish(&topic, envelope("s", 2, b"small".to_vec()))
        .await
        .unwrap()
        .await
        .unwrap();
    let recorder = Recorder::new();
    let subscription = subscribe_recording(&bus, &topic, &recorder).await;
    recorder.wait_unique(2).await;
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(2);
}

/// After `NatsBus::close`, every operation fails at once with `Closed`: publishing through the
/// bus, through a publisher taken before or after the close, and subscribing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_after_close_fails_at_once_with_closed() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topic = Topic::new("closing").unwrap();
    let before = bus.publisher();
    bus.publish(&topic, envelope("c", 1, Vec::new()))
        .await
        .unwrap()
        .await
        .unwrap();
    bus.close().await.unwrap();
    let started = Instant::now();
    let after = bus.publisher();
    for publisher in [&before, &after] {
        let error = publisher
            .publish(&topic, envelope("c", 2, Vec::new()))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), PublishErrorKind::Closed, "{error}");
    }
    let error = bus
        .publish(&topic, envelope("c", 2, Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), PublishErrorKind::Closed, "{error}");
    let error = common::subscribe_ignoring(&bus, &topic).await.unwrap_err();
    assert_eq!(error.kind(), SubscribeErrorKind::Closed, "{error}");
    let error = bus
        .stream_name(&Topic::new("other").unwrap())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), NatsErrorKind::Closed, "{error}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// `coll.orders`, `coll-orders` and `Coll_Orders` all map to the default stream
/// `BUS_COLL_ORDERS`. The first topic gets it; the others are refused with an error naming the
/// stream and both topics, and the first topic's stream keeps its subject: its events are all
/// handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_whose_default_streams_collide_are_refused_and_lose_nothing() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let first = Topic::new("coll.orders").unwrap();
    for version in 1..=5 {
        bus.publish(&first, envelope("o", version, Vec::new()))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for other in ["coll-orders", "Coll_Orders"] {
        let other = Topic::new(other).unwrap();
        let error = bus
            .publish(&other, envelope("o", 1, Vec::new()))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), PublishErrorKind::Invalid, "{error}");
        let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
        for part in [
            "BUS_COLL_ORDERS",
            "coll.orders",
            other.as_str(),
            "NatsConfig::streams",
        ] {
            assert!(text.contains(part), "`{part}` missing from: {text}");
        }
        let error = common::subscribe_ignoring(&bus, &other).await.unwrap_err();
        assert_eq!(error.kind(), SubscribeErrorKind::Configuration, "{error}");
    }
    let recorder = Recorder::new();
    let subscription = subscribe_recording(&bus, &first, &recorder).await;
    recorder.wait_unique(5).await;
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(5);
}

/// Credentials written into the server URL authenticate (the client library alone would ignore
/// them), and never appear in errors or in the configuration's `Debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url_authenticate_and_are_never_printed() {
    let server = NatsServer::try_start(&["--user", "alice", "--pass", "s3cret-pw"]).unwrap();
    let with = |password: &str| {
        let url = server
            .url()
            .replace("nats://", &format!("nats://alice:{password}@"));
        test_config(&url)
    };
    let config = with("s3cret-pw");
    assert!(!format!("{config:?}").contains("s3cret-pw"));
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("authed").unwrap();
    bus.publish(&topic, envelope("a", 1, Vec::new()))
        .await
        .unwrap()
        .await
        .unwrap();
    bus.close().await.unwrap();

    let mut wrong = with("wrong-pw");
    wrong.connection.connect_timeout = Duration::from_secs(2);
    let error = NatsBus::connect(wrong).await.unwrap_err();
    assert_eq!(error.kind(), NatsErrorKind::Connect, "{error}");
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains("wrong-pw"), "{shown}");
    assert!(
        shown.contains("***@127.0.0.1") || shown.contains("127.0.0.1"),
        "{shown}"
    );

    // Without the URL's credentials there is no way in: the test server does ask for them.
    let mut anonymous = NatsConfig::new(&server.url()).with_group("test");
    anonymous.connection.connect_timeout = Duration::from_secs(2);
    assert!(NatsBus::connect(anonymous).await.is_err());
}

/// An event of exactly `max_payload` bytes fails for good: its dead letter would not fit with
/// the dead-letter headers added, so its body is stored apart and the letter points at it. It
/// is dead-lettered once (not redelivered for ever), listed with its whole body, and replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_its_headers_is_stored_with_its_body_apart() {
    use bus_core::HandlerError;
    use std::sync::atomic::{AtomicU64, Ordering};

    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    config.retry.max_attempts = 1;
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("huge").unwrap();
    let max_payload = bus.client(&topic).await.unwrap().server_info().max_payload;
    let base = message_size(&envelope("h", 1, Vec::new()));
    let body = vec![b'h'; max_payload - base];
    bus.publish(&topic, envelope("h", 1, body.clone()))
        .await
        .unwrap()
        .await
        .unwrap();
    bus.publish(&topic, envelope("h", 2, b"next".to_vec()))
        .await
        .unwrap()
        .await
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let handled = Recorder::new();
    let subscription = {
        let (calls, handled, t) = (calls.clone(), handled.clone(), topic.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (calls, handled, t) = (calls.clone(), handled.clone(), t.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    if e.event_version() == 1 && e.payload().len() > 100 {
                        return Err(HandlerError::permanent("too big to handle"));
                    }
                    handled.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    handled.wait_unique(1).await; // v2, after v1 was dead-lettered
    let metrics = subscription.control().unwrap().metrics();
    assert_eq!(metrics.dead_lettered, 1, "{metrics:?}");
    let letters = bus.dead_letters(&topic, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert!(letter.body_sequence.is_some(), "the body was stored apart");
    assert_eq!(letter.payload.len(), body.len());
    assert_eq!(letter.envelope().unwrap().payload(), &body[..]);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "dead-lettered once, not redelivered"
    );
    subscription.close().await.unwrap();
    // The replay brings the whole event back to the topic.
    bus.replay_dead_letter(letter).await.unwrap();
    assert!(bus.dead_letters(&topic, 10).await.unwrap().is_empty());
}

/// A CA file that is missing, or is not PEM, fails the connection at once with an error naming
/// the file, instead of being skipped and failing later in a handshake that names nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_that_cannot_be_used_are_named() {
    let server = NatsServer::start();
    let dir = std::env::temp_dir().join(format!("bus-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("ca.txt");
    std::fs::write(&not_pem, "this is no certificate").unwrap();
    let missing = dir.join("missing-ca.pem");
    for (file, says) in [(&missing, "could not be read"), (&not_pem, "is not PEM")] {
        let mut config = test_config(&server.url());
        config.connection.tls = Some(bus_nats::TlsConfig {
            ca_files: vec![file.clone()],
            ..Default::default()
        });
        let error = NatsBus::connect(config).await.unwrap_err();
        assert_eq!(error.kind(), NatsErrorKind::Configuration, "{error}");
        let text = error.to_string();
        assert!(
            text.contains(&file.display().to_string()) && text.contains(says),
            "{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stream or consumer that exists with other settings than the configuration's is refused by
/// `Create` and `ValidateOnly`, naming every field that differs with both values; nothing is
/// changed on the broker. `CreateOrUpdate` (the default) brings it in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_or_consumer_that_differs_is_refused_naming_each_field() {
    use bus_nats::{Provisioning, StreamSpec};
    let server = NatsServer::start();
    let topic = Topic::new("validated").unwrap();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let subscription = common::subscribe_ignoring(&bus, &topic).await.unwrap();
    subscription.close().await.unwrap();
    let stream = bus.stream_name(&topic).await.unwrap();
    let consumer = bus.config().consumer_name(&topic);
    bus.close().await.unwrap();

    for strategy in [Provisioning::Create, Provisioning::ValidateOnly] {
        let mut config = test_config(&server.url());
        config.provisioning = strategy;
        let mut spec = StreamSpec::new(stream.clone(), [topic.clone()]);
        spec.max_msgs = 1_000;
        spec.max_bytes = 1 << 20;
        config.streams.push(spec);
        let bus = NatsBus::connect(config).await.unwrap();
        let error = bus
            .publish(&topic, envelope("v", 1, Vec::new()))
            .await
            .unwrap_err();
        let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
        for part in [
            format!("stream `{stream}` differs from the configuration"),
            "max_msgs: wanted 1000, found".to_owned(),
            "max_bytes: wanted 1048576, found".to_owned(),
        ] {
            assert!(
                text.contains(&part),
                "{strategy:?}: `{part}` missing from: {text}"
            );
        }
        assert!(
            !text.contains("retention"),
            "{strategy:?}: only what differs: {text}"
        );
        bus.close().await.unwrap();

        let mut config = test_config(&server.url());
        config.provisioning = strategy;
        config.consumer.max_ack_pending = 7;
        config.consumer.ack_wait = Duration::from_secs(11);
        let bus = NatsBus::connect(config).await.unwrap();
        let error = common::subscribe_ignoring(&bus, &topic).await.unwrap_err();
        assert_eq!(error.kind(), SubscribeErrorKind::Configuration, "{error}");
        let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
        for part in [
            format!("consumer `{consumer}` of stream `{stream}` differs from the configuration"),
            "max_ack_pending: wanted 7, found".to_owned(),
            "ack_wait: wanted 11s, found".to_owned(),
        ] {
            assert!(
                text.contains(&part),
                "{strategy:?}: `{part}` missing from: {text}"
            );
        }
        bus.close().await.unwrap();
    }

    // Nothing was changed: the stream still has its first limits.
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let info = js
        .get_stream(&stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_ne!(info.config.max_messages, 1_000);
    let mut config = test_config(&server.url());
    config.consumer.max_ack_pending = 7;
    let bus = NatsBus::connect(config).await.unwrap();
    let subscription = common::subscribe_ignoring(&bus, &topic).await.unwrap();
    let info = js
        .get_stream(&stream)
        .await
        .unwrap()
        .consumer_info(&consumer)
        .await
        .unwrap()
        .clone();
    assert_eq!(
        info.config.max_ack_pending, 7,
        "CreateOrUpdate brings it in line"
    );
    subscription.close().await.unwrap();
}

/// Members of one group set to hold its consumer differently (`consumer.ownership`) would not
/// exclude each other: one set otherwise than the group's consumer is refused with an error that
/// names the setting, under either ownership and every provisioning that checks the consumer
/// (the default updates a consumer that differs in other fields; `Create` and `ValidateOnly`
/// refuse any difference), and the consumer keeps its ownership. (One process subscribes once per consumer, so
/// the first member has closed here; a running one is no different to the check.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_set_to_own_a_consumer_differently_are_refused() {
    use async_nats::jetstream::consumer::PriorityPolicy;
    use bus_nats::Ownership;
    let server = NatsServer::start();
    for (first, second, held) in [
        (
            Ownership::Auto,
            Ownership::Lease,
            PriorityPolicy::PinnedClient,
        ),
        (Ownership::Lease, Ownership::Auto, PriorityPolicy::None),
    ] {
        let topic = Topic::new(format!("owned-{first:?}").to_lowercase()).unwrap();
        let mut config = test_config(&server.url());
        config.consumer.ownership = first;
        let owner_bus = NatsBus::connect(config).await.unwrap();
        let owner = common::subscribe_ignoring(&owner_bus, &topic)
            .await
            .unwrap();
        let consumer = owner_bus.config().consumer_name(&topic);
        owner.close().await.unwrap();
        owner_bus.close().await.unwrap();

        for provisioning in [
            bus_nats::Provisioning::CreateOrUpdate,
            bus_nats::Provisioning::Create,
            bus_nats::Provisioning::ValidateOnly,
        ] {
            let mut config = test_config(&server.url());
            config.consumer.ownership = second;
            config.provisioning = provisioning;
            let bus = NatsBus::connect(config).await.unwrap();
            let error = common::subscribe_ignoring(&bus, &topic).await.unwrap_err();
            assert_eq!(
                error.kind(),
                SubscribeErrorKind::Configuration,
                "{provisioning:?}: {error}"
            );
            let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
            assert!(
                text.contains("`consumer.ownership`") && text.contains(&consumer),
                "{first:?} then {second:?}, {provisioning:?}: {text}"
            );
            let info = common::consumer_info(&server, &bus, &topic).await;
            assert_eq!(
                info.config.priority_policy, held,
                "{first:?} then {second:?}, {provisioning:?}"
            );
            bus.close().await.unwrap();
        }
    }
}
