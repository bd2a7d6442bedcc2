//! Partitioned topics: where events go, and that other clients can put them there too.

mod common;

use bus_core::{wire::partition_of, Envelope, Publisher, Topic};
use bus_nats::{NatsBus, StreamSpec};
use bus_testkit::NatsServer;

/// The bus's partition function is nats-server's: a stream transform
/// `{{partition(8,1)}}` puts a subject whose token 1 is the aggregate ID in the same partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_function_is_the_brokers() {
    use async_nats::jetstream::stream;
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js
        .create_stream(stream::Config {
            name: "TRANSFORMED".into(),
            subjects: vec!["tx.*".into()],
            subject_transform: Some(stream::SubjectTransform {
                source: "tx.*".into(),
                destination: "tx.{{partition(8,1)}}.{{wildcard(1)}}".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<String> = (0..200)
        .map(|i| format!("account-{i}"))
        .chain(["a".into(), "order:7/x".into(), "ÜTF-8".into()])
        .collect();
    for id in &ids {
        js.publish(format!("tx.{id}"), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        let stored = stream.get_raw_message(i as u64 + 1).await.unwrap();
        assert_eq!(
            stored.subject.as_str(),
            format!("tx.{}.{id}", partition_of(id, 8)),
            "aggregate `{id}`"
        );
    }
}

/// Events of a partitioned topic are stored on `<topic>.<partition of their aggregate>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_stored_on_their_aggregates_partition() {
    let server = NatsServer::start();
    let topic = Topic::new("parted").unwrap();
    let mut config = common::test_config(&server.url());
    let mut spec = StreamSpec::new("PARTED", [topic.clone()]);
    spec.partitions = 4;
    config.streams.push(spec);
    let bus = NatsBus::connect(config).await.unwrap();
    for a in 0..20 {
        let e = Envelope::builder(format!("p-{a}"), "Parted", 1)
            .build()
            .unwrap();
        bus.publish(&topic, e).await.unwrap().await.unwrap();
    }
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let stream = js.get_stream("PARTED").await.unwrap();
    for seq in 1..=20u64 {
        let stored = stream.get_raw_message(seq).await.unwrap();
        let headers: Vec<(String, String)> = stored
            .headers
            .iter()
            .flat_map(|(n, vs)| vs.iter().map(move |v| (n.to_string(), v.to_string())))
            .collect();
        let e = bus_core::wire::decode(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            stored.payload.clone(),
        )
        .unwrap();
        assert_eq!(
            stored.subject.as_str(),
            format!("parted.{}", partition_of(e.aggregate_id().as_str(), 4))
        );
    }
    // A raw message has no aggregate to pick a partition by.
    let error = bus
        .publish_raw(&topic, Vec::new(), "raw".into())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), bus_core::PublishErrorKind::Invalid, "{error}");
}

/// The partition count of a topic changes only explicitly. A process configured with another
/// count is refused, whether the topic holds events (aggregates would move and lose their
/// order) or is drained (a rolling deploy with old and new publishers alternating would flip
/// it back and forth). `NatsBus::repartition` changes it once the topic is drained and nobody
/// reads it, and is refused before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_count_changes_only_explicitly() {
    let server = NatsServer::start();
    let topic = Topic::new("recount").unwrap();
    let with = |partitions: u32| {
        let mut config = common::test_config(&server.url());
        let mut spec = StreamSpec::new("RECOUNT", [topic.clone()]);
        spec.partitions = partitions;
        spec.retention = bus_nats::Retention::Limits;
        config.streams.push(spec);
        config
    };
    let publish = |bus: NatsBus, version: u64| {
        let topic = topic.clone();
        async move {
            bus.publish(
                &topic,
                Envelope::builder("r", "Counted", version).build().unwrap(),
            )
            .await
        }
    };
    let refused = |error: bus_core::PublishError| {
        let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
        assert!(
            text.contains("4 partition(s)")
                && text.contains("2 in this configuration")
                && text.contains("repartition"),
            "{text}"
        );
    };
    let four = NatsBus::connect(with(4)).await.unwrap();
    publish(four.clone(), 1).await.unwrap().await.unwrap();
    refused(
        publish(NatsBus::connect(with(2)).await.unwrap(), 2)
            .await
            .unwrap_err(),
    );
    let error = four.repartition(&topic, 2).await.unwrap_err();
    assert!(
        error.to_string().contains("stores 1 of its events"),
        "{error}"
    );

    // Drained: still refused by configuration, and refused explicitly while read.
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    js.get_stream("RECOUNT")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    refused(
        publish(NatsBus::connect(with(2)).await.unwrap(), 2)
            .await
            .unwrap_err(),
    );
    let subscription = common::subscribe_ignoring(&four, &topic).await.unwrap();
    let operator = NatsBus::connect(common::test_config(&server.url()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let error = loop {
        match operator.repartition(&topic, 2).await {
            Err(error)
                if error.to_string().contains("alive")
                    || error.to_string().contains("being read") =>
            {
                break error
            }
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "not refused while read: {other:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    println!("refused while read: {error}");
    subscription.close().await.unwrap();
    four.close().await.unwrap();

    // Drained and unread: changed, by an operator without the topic's configuration.
    assert_eq!(operator.repartition(&topic, 2).await.unwrap(), 4);
    let mut stream = js.get_stream("RECOUNT").await.unwrap();
    let subjects = stream.info().await.unwrap().config.subjects.clone();
    assert_eq!(
        subjects,
        vec!["recount.0".to_owned(), "recount.1".to_owned()]
    );
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 0);
    let two = NatsBus::connect(with(2)).await.unwrap();
    publish(two.clone(), 2).await.unwrap().await.unwrap();
    let error = publish(NatsBus::connect(with(4)).await.unwrap(), 3)
        .await
        .unwrap_err();
    let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    assert!(
        text.contains("2 partition(s)") && text.contains("4 in this configuration"),
        "{text}"
    );
    // Its groups' consumers are created again, for the new partitions.
    let subscription = common::subscribe_ignoring(&two, &topic).await.unwrap();
    subscription.close().await.unwrap();
}

/// A process whose configuration lacks the `StreamSpec` of a topic partitioned in a named
/// stream (an old deployment, a typo) would create a default stream for the unpartitioned
/// subject beside it, and the topic's events would be split over two streams. It is refused,
/// publisher and subscriber alike, with the stream to configure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_without_the_topics_stream_spec_is_refused() {
    let server = NatsServer::start();
    let topic = Topic::new("split").unwrap();
    let mut config = common::test_config(&server.url());
    let mut spec = StreamSpec::new("SPLIT_NAMED", [topic.clone()]);
    spec.partitions = 8;
    config.streams.push(spec);
    let right = NatsBus::connect(config).await.unwrap();
    right
        .publish(&topic, Envelope::builder("s", "Split", 1).build().unwrap())
        .await
        .unwrap()
        .await
        .unwrap();

    let wrong = NatsBus::connect(common::test_config(&server.url()))
        .await
        .unwrap();
    let error = wrong
        .publish(&topic, Envelope::builder("s", "Split", 2).build().unwrap())
        .await
        .unwrap_err();
    let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    assert!(
        text.contains("already stored in stream `SPLIT_NAMED`") && text.contains("partitions = 8"),
        "{text}"
    );
    let error = common::subscribe_ignoring(&wrong, &topic)
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        bus_core::SubscribeErrorKind::Configuration,
        "{error}"
    );
    // Nothing was created beside it.
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    assert!(js
        .get_stream(bus_nats::default_stream_name(&topic))
        .await
        .is_err());
    // And the other way round: a partitioned configuration beside a default stream.
    let plain = Topic::new("plain").unwrap();
    let default = NatsBus::connect(common::test_config(&server.url()))
        .await
        .unwrap();
    default
        .publish(&plain, Envelope::builder("p", "Plain", 1).build().unwrap())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut config = common::test_config(&server.url());
    let mut spec = StreamSpec::new("PLAIN_PARTS", [plain.clone()]);
    spec.partitions = 4;
    config.streams.push(spec);
    let parted = NatsBus::connect(config).await.unwrap();
    let error = parted
        .publish(&plain, Envelope::builder("p", "Plain", 2).build().unwrap())
        .await
        .unwrap_err();
    let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    assert!(text.contains("already stored in stream"), "{text}");
}

/// One member alone consumes every partition, in order per aggregate, and tells the handler
/// which partition each event came from; a second member in the same process is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_member_consumes_every_partition_in_order() {
    use bus_core::{handler_fn, SubscribeErrorKind, Subscriber};
    use std::sync::{Arc, Mutex};

    let server = NatsServer::start();
    let topic = Topic::new("alone").unwrap();
    let mut config = common::test_config(&server.url());
    let mut spec = StreamSpec::new("ALONE", [topic.clone()]);
    spec.partitions = 4;
    config.streams.push(spec);
    let bus = NatsBus::connect(config).await.unwrap();
    let recorder = bus_testkit::conformance::Recorder::new();
    let wrong_partition = Arc::new(Mutex::new(Vec::new()));
    let subscription = {
        let (recorder, t, wrong) = (recorder.clone(), topic.clone(), wrong_partition.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (recorder, t, wrong) = (recorder.clone(), t.clone(), wrong.clone());
                async move {
                    let delivery = bus_nats::current_delivery().expect("inside a handler");
                    if delivery.partition != Some(partition_of(e.aggregate_id().as_str(), 4)) {
                        wrong.lock().unwrap().push(e.aggregate_id().to_string());
                    }
                    recorder.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    let again = common::subscribe_ignoring(&bus, &topic).await.unwrap_err();
    assert_eq!(
        again.kind(),
        SubscribeErrorKind::AlreadySubscribed,
        "{again}"
    );
    for version in 1..=10 {
        for a in 0..20 {
            let e = Envelope::builder(format!("m-{a}"), "Alone", version)
                .build()
                .unwrap();
            let _receipt = bus.publish(&topic, e).await.unwrap();
        }
    }
    bus.flush().await.unwrap();
    recorder.wait_unique(200).await;
    let metrics = subscription.control().unwrap().metrics();
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(200);
    assert_eq!(metrics.partitions, 4, "{metrics:?}");
    assert!(wrong_partition.lock().unwrap().is_empty());
    assert!(bus_nats::current_delivery().is_none(), "outside a handler");
}
