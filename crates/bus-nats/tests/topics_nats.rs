//! Topic management against a real nats-server: per-stream MaxAge and discard policy reach the
//! broker, and `NatsBus::topics` lists every topic with its stream and consumers' state.

mod common;

use std::time::Duration;

use bus_core::{Envelope, Publisher, Topic};
use bus_nats::{Discard, NatsBus, Retention, StreamSpec};
use bus_testkit::NatsServer;
use common::{subscribe_ignoring, test_config, wait_for};

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

    let counts = [(&orders, 5), (&refunds, 2), (&parts, 6), (&solo, 1)];
    for (topic, n) in counts {
        for v in 1..=n {
            let e = Envelope::builder(format!("a-{v}"), "Listed", 1)
                .build()
                .unwrap();
            let _receipt = bus.publish(topic, e).await.unwrap();
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
