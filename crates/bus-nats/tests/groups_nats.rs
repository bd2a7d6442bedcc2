//! Consumer groups (`ConsumerSpec::group`): how many may read one topic under each
//! retention, and what a user is told when one too many tries.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bus_core::{Envelope, Publisher, SubscribeErrorKind, Topic};
use bus_nats::{NatsBus, Retention, StreamSpec};
use bus_testkit::conformance::{subscribe_recording, Recorder};
use bus_testkit::NatsServer;
use common::unbatched_config;

fn envelope(aggregate: &str, version: u64) -> Envelope {
    Envelope::builder(aggregate, "Tested", version)
        .payload(format!("{aggregate}:{version}").into_bytes())
        .build()
        .unwrap()
}

/// A bus of consumer group `group`; the topic's stream kept with `retention`. One event per
/// message: the tests count what the stream keeps as events.
async fn group(server: &NatsServer, group: &str, topic: &Topic, retention: Retention) -> NatsBus {
    let mut config = unbatched_config(&server.url());
    config.consumer.group = group.to_owned();
    let mut spec = StreamSpec::new("GROUPS", [topic.clone()]);
    spec.retention = retention;
    config.streams.push(spec);
    NatsBus::connect(config).await.unwrap()
}

async fn publish_versions(bus: &NatsBus, topic: &Topic, versions: std::ops::RangeInclusive<u64>) {
    let publisher = bus.publisher();
    for version in versions {
        for aggregate in ["a", "b", "c", "d"] {
            let _receipt = publisher
                .publish(topic, envelope(aggregate, version))
                .await
                .unwrap();
        }
    }
    publisher.flush().await.unwrap();
}

/// Each recorder saw `n` events, in order per aggregate, none missing, none twice.
fn assert_all_in_order(recorders: &[(&str, &Arc<Recorder>)], n: u64) {
    for (name, recorder) in recorders {
        let report = recorder.verifier.report();
        assert_eq!(report.order_violations, 0, "{name}: {report:?}");
        assert_eq!(report.gaps, 0, "{name}: {report:?}");
        assert_eq!(report.lost(n), 0, "{name}: {report:?}");
        assert_eq!(report.duplicates, 0, "{name}: {report:?}");
    }
}

#[tokio::test]
async fn a_work_queue_topic_refuses_a_second_group_and_says_why() {
    let server = NatsServer::start();
    let topic = Topic::new("groups.wq").unwrap();
    let orders = group(&server, "orders", &topic, Retention::WorkQueue).await;
    let billing = group(&server, "billing", &topic, Retention::WorkQueue).await;
    let recorder = Recorder::new();
    let first = subscribe_recording(&orders, &topic, &recorder).await;

    let error = common::subscribe_ignoring(&billing, &topic)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), SubscribeErrorKind::Configuration, "{error}");
    let text = error.to_string();
    for part in ["work-queue", "Retention::Acknowledged", "orders-groups_wq"] {
        assert!(text.contains(part), "`{part}` missing from: {text}");
    }

    // The first group is unaffected.
    publish_versions(&orders, &topic, 1..=5).await;
    recorder.wait_unique(20).await;
    first.close().await.unwrap();
}

#[tokio::test]
async fn a_limits_topic_serves_every_group_everything_in_order() {
    let server = NatsServer::start();
    let topic = Topic::new("groups.limits").unwrap();
    let orders = group(&server, "orders", &topic, Retention::Limits).await;
    let billing = group(&server, "billing", &topic, Retention::Limits).await;
    let (seen_by_orders, seen_by_billing) = (Recorder::new(), Recorder::new());
    let a = subscribe_recording(&orders, &topic, &seen_by_orders).await;
    let b = subscribe_recording(&billing, &topic, &seen_by_billing).await;

    publish_versions(&orders, &topic, 1..=50).await;
    seen_by_orders.wait_unique(200).await;
    seen_by_billing.wait_unique(200).await;
    a.close().await.unwrap();
    b.close().await.unwrap();
    assert_all_in_order(
        &[("orders", &seen_by_orders), ("billing", &seen_by_billing)],
        200,
    );
}

/// Messages the topic's stream holds, read over a connection of its own.
async fn kept(server: &NatsServer) -> u64 {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("GROUPS").await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn an_acknowledged_topic_keeps_what_any_group_still_needs_and_drops_the_rest() {
    let server = NatsServer::start();
    let topic = Topic::new("groups.acked").unwrap();
    let orders = group(&server, "orders", &topic, Retention::Acknowledged).await;
    let billing = group(&server, "billing", &topic, Retention::Acknowledged).await;
    let (seen_by_orders, seen_by_billing) = (Recorder::new(), Recorder::new());
    let a = subscribe_recording(&orders, &topic, &seen_by_orders).await;

    // Both groups handle the first 100 events (stream sequences 1..=100); then billing stops.
    let b = subscribe_recording(&billing, &topic, &seen_by_billing).await;
    publish_versions(&orders, &topic, 1..=25).await;
    seen_by_billing.wait_unique(100).await;
    b.close().await.unwrap();

    // 100 more, which only orders handles. The stream must keep exactly the 100 billing has
    // not acknowledged, and drop the 100 both have: removal follows the lowest ack floor.
    publish_versions(&orders, &topic, 26..=50).await;
    seen_by_orders.wait_unique(200).await;
    bus_testkit::wait_for_async(
        "the stream to keep only billing's 100",
        Duration::from_secs(15),
        || async { kept(&server).await == 100 },
    )
    .await;

    // Billing comes back: it gets the other 100, in order and without a gap, and then
    // nothing is kept.
    let b = subscribe_recording(&billing, &topic, &seen_by_billing).await;
    seen_by_billing.wait_unique(200).await;
    bus_testkit::wait_for_async(
        "the stream to be emptied",
        Duration::from_secs(15),
        || async { kept(&server).await == 0 },
    )
    .await;
    a.close().await.unwrap();
    b.close().await.unwrap();
    assert_all_in_order(
        &[("orders", &seen_by_orders), ("billing", &seen_by_billing)],
        200,
    );
}

#[tokio::test]
async fn an_acknowledged_topic_goes_on_removing_after_the_broker_restarts() {
    let mut server = NatsServer::start();
    let topic = Topic::new("groups.restart").unwrap();
    let orders = group(&server, "orders", &topic, Retention::Acknowledged).await;
    let seen = Recorder::new();
    let subscription = subscribe_recording(&orders, &topic, &seen).await;
    publish_versions(&orders, &topic, 1..=25).await;
    seen.wait_unique(100).await;
    bus_testkit::wait_for_async(
        "the first 100 to be removed",
        Duration::from_secs(15),
        || async { kept(&server).await == 0 },
    )
    .await;

    // SIGKILL and restart on the same store: the purger's rounds fail meanwhile, then resume.
    server.kill();
    server.restart().unwrap();
    publish_versions(&orders, &topic, 26..=50).await;
    seen.wait_unique(200).await;
    bus_testkit::wait_for_async(
        "the next 100 to be removed after the restart",
        Duration::from_secs(20),
        || async { kept(&server).await == 0 },
    )
    .await;
    subscription.close().await.unwrap();
    let report = seen.verifier.report();
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    assert_eq!(report.lost(200), 0, "{report:?}");
}
