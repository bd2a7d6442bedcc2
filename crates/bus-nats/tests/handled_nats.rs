//! Handled once, with the versions in NATS KV, against a real nats-server: a group moved back
//! to its topic's start skips every version it handled (another connection reads the same
//! versions), and once they are forgotten the same reset rebuilds everything in order.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{
    handler_fn, AggregateId, Envelope, HandledOnce, HandledVersions, Publisher, Subscriber, Topic,
};
use bus_nats::{NatsBus, NatsHandledVersions, ResetTo, Retention, StreamSpec};
use bus_testkit::{wait_for, NatsServer};

const AGGREGATES: [&str; 3] = ["acc-1", "acc/2.eu", "acc:3@x"];

fn config(url: &str, topic: &Topic) -> bus_nats::NatsConfig {
    let mut config = common::test_config(url);
    let mut spec = StreamSpec::new("ONCE", [topic.clone()]);
    spec.retention = Retention::Limits;
    spec.max_bytes = 16 << 20;
    config.streams.push(spec);
    config
}

/// Each aggregate's versions in the order the handler saw them.
fn versions_of(calls: &[(String, u64)], aggregate: &str) -> Vec<u64> {
    calls
        .iter()
        .filter(|c| c.0 == aggregate)
        .map(|c| c.1)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_handled_versions_is_skipped_until_they_are_forgotten() {
    let server = NatsServer::start();
    let topic = Topic::new("once.kv").unwrap();
    let bus = NatsBus::connect(config(&server.url(), &topic))
        .await
        .unwrap();
    let store = NatsHandledVersions::open(&bus, &topic).await.unwrap();
    assert_eq!(store.bucket(), "BUS_HANDLED_test");
    let calls: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let handler = {
        let calls = calls.clone();
        Arc::new(handler_fn(move |e: Envelope| {
            let calls = calls.clone();
            async move {
                calls
                    .lock()
                    .unwrap()
                    .push((e.aggregate_id().to_string(), e.event_version()));
                Ok(())
            }
        }))
    };
    let once = Arc::new(HandledOnce::new(store.clone(), handler));
    for version in 1..=10 {
        for aggregate in AGGREGATES {
            let e = Envelope::builder(aggregate, "Posted", version)
                .build()
                .unwrap();
            let _receipt = bus.publish(&topic, e).await.unwrap();
        }
    }
    bus.flush().await.unwrap();
    let subscription = bus.subscribe(&topic, once.clone()).await.unwrap();
    wait_for("30 handled", Duration::from_secs(10), || {
        calls.lock().unwrap().len() == 30
    })
    .await;
    assert_eq!(once.skipped(), 0);

    // Another connection (another process's view) reads the versions recorded.
    let other = NatsBus::connect(config(&server.url(), &topic))
        .await
        .unwrap();
    let other_store = NatsHandledVersions::open(&other, &topic).await.unwrap();
    // The acknowledgement follows the record: wait for the last to be handled and stored.
    for aggregate in AGGREGATES {
        let id = AggregateId::new(aggregate).unwrap();
        bus_testkit::wait_for_async("the last version recorded", Duration::from_secs(5), || {
            let (store, id) = (other_store.clone(), id.clone());
            async move { store.last_handled(&id).await.unwrap() == Some(10) }
        })
        .await;
    }
    let unknown = AggregateId::new("acc-9").unwrap();
    assert_eq!(other_store.last_handled(&unknown).await.unwrap(), None);

    // Moved back to the start: all 30 are delivered again and skipped, none handled again.
    let reset = bus
        .reset_group(&topic, ResetTo::Start, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(reset.moved_by.is_some(), "{reset:?}");
    wait_for("30 skipped", Duration::from_secs(10), || {
        once.skipped() == 30
    })
    .await;
    wait_for("the replay acknowledged", Duration::from_secs(10), || {
        subscription.control().unwrap().metrics().in_flight == 0
    })
    .await;
    assert_eq!(calls.lock().unwrap().len(), 30, "nothing handled twice");

    // Forgotten, the same reset rebuilds everything, in order.
    assert_eq!(store.forget_all().await.unwrap(), 3);
    for aggregate in AGGREGATES {
        let id = AggregateId::new(aggregate).unwrap();
        assert_eq!(other_store.last_handled(&id).await.unwrap(), None);
    }
    bus.reset_group(&topic, ResetTo::Start, Duration::from_secs(10))
        .await
        .unwrap();
    wait_for("30 handled again", Duration::from_secs(10), || {
        calls.lock().unwrap().len() == 60
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    for aggregate in AGGREGATES {
        assert_eq!(
            versions_of(&calls[30..], aggregate),
            (1..=10).collect::<Vec<_>>(),
            "{aggregate}"
        );
    }
    assert_eq!(once.skipped(), 30);
    subscription.close().await.unwrap();
    other.close().await.unwrap();
    bus.close().await.unwrap();
}
