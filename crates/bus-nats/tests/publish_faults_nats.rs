//! A publish that fails in the middle of a pipeline must not become out-of-order handling.
//!
//! The publisher reaches the server through a `TcpProxy` that cuts the connection several times
//! while thousands of publishes over a few aggregates are in flight: bytes already written are
//! lost, the client reconnects, later publishes go through. The consumer reads the server
//! directly.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bus_core::{Envelope, Publisher, Receipt, Topic};
use bus_nats::{NatsBus, PublishOrdering};
use bus_testkit::conformance::{subscribe_recording, Recorder};
use bus_testkit::{NatsServer, TcpProxy, VerifierReport};
use common::{test_config, unbatched_config};

const AGGREGATES: u64 = 20;
const VERSIONS: u64 = 400;

struct Outcome {
    report: VerifierReport,
    stored: u64,
    failed: u64,
    duplicates_acked: u64,
    reconnections: u64,
    /// Publishes sent again after a transient failure.
    retries: u64,
    /// Messages the stream holds (fewer than events when batches form).
    messages: u64,
}

async fn publish_through_cuts(ordering: PublishOrdering) -> Outcome {
    publish_through_cuts_with(ordering, false).await
}

async fn publish_through_cuts_with(ordering: PublishOrdering, batched: bool) -> Outcome {
    let server = NatsServer::start();
    let target = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    let proxy = Arc::new(TcpProxy::start(target).await.unwrap());
    let topic = Topic::new("pipeline").unwrap();

    let consumer_bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let recorder = Recorder::new();
    let subscription = subscribe_recording(&consumer_bus, &topic, &recorder).await;

    let mut config = test_config(&proxy.url());
    config.publish_ordering = ordering;
    if batched {
        config.batching.max_events = 16;
    } else {
        config.batching = bus_nats::BatchConfig::off();
    }
    let publisher_bus = NatsBus::connect(config).await.unwrap();
    let publisher = publisher_bus.publisher();

    let total = AGGREGATES * VERSIONS;
    let mut receipts: Vec<(u64, u64, Receipt)> = Vec::with_capacity(total as usize);
    let mut cuts = Vec::new();
    for version in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let event = Envelope::builder(format!("p-{a}"), "Piped", version)
                .payload(vec![7u8; 64])
                .build()
                .unwrap();
            let receipt = publisher.publish(&topic, event).await.unwrap();
            receipts.push((a, version, receipt));
        }
        if version % (VERSIONS / 5) == 0 && version < VERSIONS {
            // Cut with publishes in flight; restore a little later.
            let proxy = proxy.clone();
            proxy.cut();
            cuts.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                proxy.restore();
            }));
        }
        // Paced, so that publishing spans the cuts and each cut finds writes in flight.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for cut in cuts {
        cut.await.unwrap();
    }
    let (mut stored, mut failed, mut duplicates_acked) = (0, 0, 0);
    for (a, version, receipt) in receipts {
        match receipt.await {
            Ok(published) => {
                stored += 1;
                duplicates_acked += u64::from(published.duplicate);
            }
            Err(error) => {
                failed += 1;
                eprintln!("p-{a} v{version}: {error}");
            }
        }
    }
    // Every stored event reaches the handler; the failed ones never do.
    recorder.wait_unique(stored).await;
    subscription.close().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let mut stream = js
        .get_stream(consumer_bus.stream_name(&topic).await.unwrap())
        .await
        .unwrap();
    let messages = stream.info().await.unwrap().state.last_sequence;
    Outcome {
        retries: publisher.retries(),
        messages,
        report: recorder.verifier.report(),
        stored,
        failed,
        duplicates_acked,
        reconnections: proxy.connections_accepted().saturating_sub(1),
    }
}

/// The default ordering: a publish lost in a cut is retried before its aggregate's next event
/// is sent, so every event is stored once, in order, and handled in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_mid_pipeline_keeps_every_aggregate_in_order() {
    let outcome = publish_through_cuts(PublishOrdering::PerAggregate).await;
    let total = AGGREGATES * VERSIONS;
    let report = &outcome.report;
    eprintln!(
        "per-aggregate ordering: {report:?}; stored {}, failed {}, acked as duplicates {}, reconnections {}",
        outcome.stored, outcome.failed, outcome.duplicates_acked, outcome.reconnections
    );
    assert!(
        outcome.reconnections >= 1,
        "the cuts must have forced the publisher to reconnect"
    );
    assert_eq!(outcome.failed, 0, "transient failures are retried");
    assert_eq!(outcome.stored, total);
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    assert_eq!(report.lost(total), 0, "{report:?}");
    assert_eq!(
        report.duplicates, 0,
        "retries carry the event ID as Nats-Msg-Id and are stored once"
    );
}

/// The same with record batches: a batch lost in a cut is sent again, the same bytes under the
/// same `Nats-Msg-Id`, before its aggregates' later events; every event is stored once, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_mid_batches_keeps_every_aggregate_in_order() {
    let outcome = publish_through_cuts_with(PublishOrdering::PerAggregate, true).await;
    let total = AGGREGATES * VERSIONS;
    let report = &outcome.report;
    eprintln!(
        "record batches: {report:?}; stored {} in {} messages, failed {}, acked as duplicates {}, retries {}, reconnections {}",
        outcome.stored, outcome.messages, outcome.failed, outcome.duplicates_acked, outcome.retries, outcome.reconnections
    );
    assert!(
        outcome.reconnections >= 1,
        "the cuts must have forced a reconnect"
    );
    assert!(outcome.retries > 0, "no batch was sent again");
    assert!(
        outcome.messages < total,
        "{total} events in {} messages: no batch formed",
        outcome.messages
    );
    assert_eq!(outcome.failed, 0, "transient failures are retried");
    assert_eq!(outcome.stored, total);
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    assert_eq!(report.lost(total), 0, "{report:?}");
    assert_eq!(report.duplicates, 0, "resent batches are stored once");
}

/// Pipelined publishing makes no such promise across a cut, but it loses nothing silently:
/// every publish whose receipt succeeded is handled, every other one has a failed receipt
/// (meaning "may or may not be stored": a lost ack looks the same as a lost message), and what
/// was stored is handled in order. The events lost in the cut are gaps inside aggregates: a
/// caller that now publishes them again would have them stored after their successors, which
/// is what `PerAggregate` exists to prevent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishing_reports_every_publish_lost_in_a_cut() {
    let outcome = publish_through_cuts(PublishOrdering::Pipelined).await;
    let total = AGGREGATES * VERSIONS;
    let report = &outcome.report;
    eprintln!(
        "pipelined: {report:?}; stored {}, failed {}, reconnections {}",
        outcome.stored, outcome.failed, outcome.reconnections
    );
    assert!(outcome.reconnections >= 1);
    assert!(
        outcome.failed > 0,
        "the cuts lost no pipelined publish: the test shows nothing"
    );
    assert_eq!(outcome.stored + outcome.failed, total);
    assert!(
        report.unique >= outcome.stored && report.unique <= total,
        "every acknowledged event is handled; the rest failed loudly: {report:?}"
    );
    assert_eq!(report.duplicates, 0, "{report:?}");
    assert_eq!(report.order_violations, 0, "{report:?}");
}

/// A publish the broker refuses for good (here: a full work-queue stream) is not retried, and
/// the events of its aggregate waiting behind it fail with `Aborted` instead of being stored
/// after the gap; other aggregates are not affected by that chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publish_aborts_the_aggregates_waiting_events() {
    use bus_core::PublishErrorKind;

    let server = NatsServer::start();
    let topic = Topic::new("full").unwrap();
    let mut config = unbatched_config(&server.url());
    let mut spec = bus_nats::StreamSpec::new("FULL", [topic.clone()]);
    spec.max_msgs = 5;
    config.streams.push(spec);
    let bus = NatsBus::connect(config).await.unwrap();
    let publisher = bus.publisher();
    let mut receipts = Vec::new();
    for version in 1..=10 {
        let event = Envelope::builder("acc", "Filled", version).build().unwrap();
        receipts.push(publisher.publish(&topic, event).await.unwrap());
    }
    let mut outcomes = Vec::new();
    for receipt in receipts {
        outcomes.push(receipt.await.map_err(|e| e.kind()));
    }
    let stored = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(stored, 5, "{outcomes:?}");
    assert!(outcomes[..5].iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(outcomes[5], Err(PublishErrorKind::Rejected), "{outcomes:?}");
    assert!(
        outcomes[6..]
            .iter()
            .all(|o| *o == Err(PublishErrorKind::Aborted)),
        "{outcomes:?}"
    );
    // The chain is over: the aggregate can publish again (and is refused again while full).
    let again = Envelope::builder("acc", "Filled", 6).build().unwrap();
    let result = publisher.publish(&topic, again).await.unwrap().await;
    assert_eq!(
        result.map_err(|e| e.kind()).unwrap_err(),
        PublishErrorKind::Rejected
    );
}

/// While no stream stores the topic's subject (what publishers see while a cluster elects a
/// stream leader: "no responders"), publishes are retried with the same `Nats-Msg-Id` within
/// `publish_retry_for`, the aggregates' later events waiting behind them; none is refused or
/// aborted, and once the stream answers again everything is stored once, in order. Here the
/// stream stops storing the subject for a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_retried_while_no_stream_answers() {
    const AGGREGATES: u64 = 10;
    const VERSIONS: u64 = 40;
    let server = NatsServer::start();
    let topic = Topic::new("electing").unwrap();
    let bus = NatsBus::connect(unbatched_config(&server.url()))
        .await
        .unwrap();
    let stream_name = bus.stream_name(&topic).await.unwrap();
    let admin = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let mut stream = admin.get_stream(&stream_name).await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();

    let publish = |versions: std::ops::RangeInclusive<u64>| {
        let bus = bus.clone();
        let topic = topic.clone();
        async move {
            let mut receipts = Vec::new();
            for version in versions {
                for a in 0..AGGREGATES {
                    let event = Envelope::builder(format!("e-{a}"), "Elected", version)
                        .build()
                        .unwrap();
                    receipts.push(bus.publish(&topic, event).await.unwrap());
                }
            }
            receipts
        }
    };
    let mut receipts = publish(1..=10).await;
    bus.flush().await.unwrap();
    // The subject has no stream now: publishes get "no responders".
    let subjects = std::mem::replace(&mut config.subjects, vec!["elsewhere".into()]);
    admin.update_stream(&config).await.unwrap();
    let plain = async_nats::connect(server.url()).await.unwrap();
    let probe = plain
        .request(topic.to_string(), "probe".into())
        .await
        .unwrap_err();
    assert_eq!(
        probe.kind(),
        async_nats::RequestErrorKind::NoResponders,
        "the outage is real"
    );
    receipts.extend(publish(11..=VERSIONS).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    config.subjects = subjects;
    admin.update_stream(&config).await.unwrap();

    let mut failures = Vec::new();
    for receipt in receipts {
        if let Err(error) = receipt.await {
            failures.push(error.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let total = AGGREGATES * VERSIONS;
    assert_eq!(stream.info().await.unwrap().state.messages, total);
    let recorder = Recorder::new();
    let subscription = subscribe_recording(&bus, &topic, &recorder).await;
    recorder.wait_unique(total).await;
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(total);
}
