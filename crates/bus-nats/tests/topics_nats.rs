//! Topic management against a real nats-server: per-stream MaxAge and discard policy reach the
//! broker, and `NatsBus::topics` lists every topic with its stream and consumers' state.

mod common;

use std::time::Duration;

use bus_core::{Envelope, Publisher, Subscriber, Topic};
use bus_nats::{Discard, NatsBus, Retention, StreamSpec};
use bus_testkit::NatsServer;
use common::{stream_last_sequence, subscribe_ignoring, test_config, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_listed_with_their_streams_and_consumers() {
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    let (orders, refunds) = (
        Topic::new("shop.orders").unwrap(),
        Topic::new("shop.refunds").unwrap(),
    );
    let parts = Topic::new("parts").unwrap();
    let solo = Topic::new("solo").unwrap();
    let mut shop = StreamSpec::new("SHOP", [orders.clone(), refunds.clone()]);
    shop.retention = Retention::Limits;
    shop.max_age = Duration::from_secs(3600);
    shop.discard = Some(Discard::New);
    config.streams.push(shop);
    let mut partitioned = StreamSpec::new("PARTS", [parts.clone()]);
    partitioned.partitions = 3;
    config.streams.push(partitioned);
    let bus = NatsBus::connect(config).await.unwrap();

    // Each stored before the next is sent, so each is a message of its own (events published
    // while a batch is in flight would share the next one) and the counts below are messages.
    let counts = [(&orders, 5), (&refunds, 2), (&parts, 6), (&solo, 1)];
    for (topic, n) in counts {
        for v in 1..=n {
            let e = Envelope::builder(format!("a-{v}"), "Listed", 1)
                .build()
                .unwrap();
            bus.publish(topic, e).await.unwrap().await.unwrap();
        }
    }
    bus.flush().await.unwrap();

    // The broker has the limits asked for.
    let jetstream = async_nats::jetstream::new(bus.client(&orders).await.unwrap());
    let info = jetstream
        .get_stream("SHOP")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(info.max_age, Duration::from_secs(3600));
    assert_eq!(
        info.discard,
        async_nats::jetstream::stream::DiscardPolicy::New
    );

    // One group handles the orders.
    let subscription = subscribe_ignoring(&bus, &orders).await.unwrap();
    wait_for("the orders handled", Duration::from_secs(10), || {
        subscription.control().unwrap().metrics().handled == 5
    })
    .await;
    let listed = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let listed = bus.topics().await.unwrap();
            let floor = listed
                .iter()
                .find(|t| t.topic == orders)
                .and_then(|t| t.consumers.first())
                .map(|c| c.ack_floor);
            if floor == Some(5) || tokio::time::Instant::now() > deadline {
                break listed;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let summary: Vec<(String, &str, u32, u64, usize)> = listed
        .iter()
        .map(|t| {
            (
                t.topic.to_string(),
                t.retention,
                t.partitions,
                t.messages,
                t.consumers.len(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("parts".to_owned(), "work-queue", 3, 6, 0),
            ("shop.orders".to_owned(), "limits", 1, 5, 1),
            ("shop.refunds".to_owned(), "limits", 1, 2, 0),
            ("solo".to_owned(), "work-queue", 1, 1, 0),
        ],
        "{listed:#?}"
    );
    let reader = &listed[1].consumers[0];
    assert_eq!(listed[1].stream, "SHOP");
    assert_eq!(reader.name, bus.config().consumer_name(&orders));
    assert_eq!((reader.ack_floor, reader.delivered), (5, 5), "{reader:?}");
    assert_eq!(
        (reader.undelivered, reader.unacknowledged),
        (0, 0),
        "{reader:?}"
    );
    assert!(
        reader.waiting > 0,
        "a live subscription keeps pulls waiting: {reader:?}"
    );
    subscription.close().await.unwrap();
    bus.close().await.unwrap();
}

/// The server's `/connz` (its monitoring port): each client connection's name and the bytes the
/// server read from it.
fn connections_read(monitor: u16) -> Vec<(String, u64)> {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", monitor)).unwrap();
    socket
        .write_all(b"GET /connz?limit=1024 HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).unwrap();
    let body = &response[response.find("\r\n\r\n").expect("an HTTP response") + 4..];
    let connz: serde_json::Value = serde_json::from_str(body).unwrap();
    connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_owned(),
                c["in_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A bus that publishes and consumes a topic: its publishes go out on a connection of their
/// own (`<client>:<topic>:publish`), carrying every byte published, and the topic's connection
/// carries the subscription's pulls and acks; with `separate_publish_connection` off, one
/// connection carries both. A bus that only publishes has one connection, its publishing one,
/// which provisioned the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_go_out_on_their_own_connection() {
    let monitor = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = NatsServer::try_start(&["-m", &monitor.to_string()]).unwrap();
    let topic = Topic::new("apart").unwrap();
    let payload = bytes::Bytes::from(vec![7u8; 1_000]);
    for separate in [true, false] {
        let mut config = test_config(&server.url());
        config.connection.client_name = format!("apart-{separate}");
        config.separate_publish_connection = separate;
        let bus = NatsBus::connect(config).await.unwrap();
        let handled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = handled.clone();
        let _subscription = bus
            .subscribe(
                &topic,
                std::sync::Arc::new(bus_core::handler_fn(move |_e: Envelope| {
                    let counter = counter.clone();
                    async move {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Ok(())
                    }
                })),
            )
            .await
            .unwrap();
        for v in 1..=200 {
            let e = Envelope::builder(format!("a-{}", v % 10), "Apart", v)
                .payload(payload.clone())
                .build()
                .unwrap();
            let _receipt = bus.publish(&topic, e).await.unwrap();
        }
        bus.flush().await.unwrap();
        wait_for("all 200 events handled", Duration::from_secs(10), || {
            handled.load(std::sync::atomic::Ordering::Relaxed) == 200
        })
        .await;

        let prefix = format!("apart-{separate}:apart");
        let ours: Vec<(String, u64)> = connections_read(monitor)
            .into_iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .collect();
        let read = |name: &str| ours.iter().find(|(n, _)| n == name).map(|(_, b)| *b);
        let published = 200 * 1_000;
        if separate {
            assert_eq!(ours.len(), 2, "{ours:?}");
            let publishing = read(&format!("{prefix}:publish")).expect("a publishing connection");
            let topic_connection = read(&prefix).expect("the topic's connection");
            assert!(publishing >= published, "{ours:?}");
            assert!(topic_connection < published / 10, "{ours:?}");
        } else {
            assert_eq!(ours.len(), 1, "{ours:?}");
            assert!(read(&prefix).unwrap() >= published, "{ours:?}");
        }
        bus.close().await.unwrap();
    }

    let mut config = test_config(&server.url());
    config.connection.client_name = "publish-only".into();
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("only-published").unwrap();
    for v in 1..=20 {
        let e = Envelope::builder("a", "Apart", v).build().unwrap();
        let _receipt = bus.publish(&topic, e).await.unwrap();
    }
    bus.flush().await.unwrap();
    let ours: Vec<String> = connections_read(monitor)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("publish-only:"))
        .collect();
    assert_eq!(
        ours,
        vec!["publish-only:only-published:publish".to_string()]
    );
    // The publishing connection provisioned the stream, and it holds what was published.
    assert!(stream_last_sequence(&server, &bus, &topic).await > 0);
    bus.close().await.unwrap();
}
