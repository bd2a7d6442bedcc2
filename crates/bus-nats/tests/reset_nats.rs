//! Rebuilding from a point against a real nats-server: a running group moved back to a stream
//! sequence replays every aggregate in order from there; a stopped group reset to a time
//! rebuilds the same projection; and the resets that cannot keep order or have nothing to read
//! are refused, saying why.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bus_core::{current_delivery, handler_fn, Envelope, Publisher, Subscriber, Topic};
use bus_nats::{NatsBus, NatsErrorKind, ResetTo, Retention, StreamSpec};
use bus_testkit::{NatsServer, OlderServer};
use common::{unbatched_config, wait_for};

/// The test configuration, with `topics` each in a stream of its own that keeps its events
/// (`Limits`): what a group is reset to must still be stored.
fn kept(url: &str, topics: &[Topic]) -> bus_nats::NatsConfig {
    let mut config = unbatched_config(url);
    for topic in topics {
        let name = format!("KEPT_{}", topic.as_str().replace('.', "_").to_uppercase());
        let mut spec = StreamSpec::new(name, [topic.clone()]);
        spec.retention = Retention::Limits;
        // Each stream reserves its max_bytes of the server's store: twenty of 1 GiB would not fit.
        spec.max_bytes = 16 << 20;
        config.streams.push(spec);
    }
    config
}

/// (aggregate, version, stream sequence) of every handler call, in the order they ran.
type Calls = Arc<Mutex<Vec<(String, u64, u64)>>>;

async fn publish(bus: &NatsBus, topic: &Topic, aggregates: usize, versions: u64) {
    for version in 1..=versions {
        for a in 0..aggregates {
            let envelope = Envelope::builder(format!("acc-{a}"), "Deposited", version)
                .payload(version.to_be_bytes().to_vec())
                .build()
                .unwrap();
            let _receipt = bus.publish(topic, envelope).await.unwrap();
        }
    }
    bus.flush().await.unwrap();
}

async fn subscribe(bus: &NatsBus, topic: &Topic, calls: &Calls) -> bus_core::Subscription {
    let calls = calls.clone();
    bus.subscribe(
        topic,
        Arc::new(handler_fn(move |e: Envelope| {
            let calls = calls.clone();
            async move {
                let sequence = current_delivery()
                    .and_then(|d| d.stream_sequence)
                    .expect("NATS deliveries have a stream sequence");
                calls.lock().unwrap().push((
                    e.aggregate_id().to_string(),
                    e.event_version(),
                    sequence,
                ));
                Ok(())
            }
        })),
    )
    .await
    .unwrap()
}

/// Where an aggregate's calls (version, stream sequence) start again from an older version.
fn restart_of(handled: &[(u64, u64)]) -> Option<usize> {
    (1..handled.len()).find(|i| handled[*i].0 != handled[i - 1].0 + 1)
}

/// Per aggregate, the calls after its replay began.
fn replays(calls: &[(String, u64, u64)]) -> BTreeMap<String, Vec<(u64, u64)>> {
    let mut out = BTreeMap::new();
    for aggregate in calls
        .iter()
        .map(|c| &c.0)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let handled: Vec<(u64, u64)> = calls
            .iter()
            .filter(|c| &c.0 == aggregate)
            .map(|c| (c.1, c.2))
            .collect();
        if let Some(split) = restart_of(&handled) {
            out.insert(aggregate.clone(), handled[split..].to_vec());
        }
    }
    out
}

/// Each aggregate's versions in the order its calls ran.
fn by_aggregate(calls: &[(String, u64, u64)]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (aggregate, version, _) in calls {
        out.entry(aggregate.clone()).or_default().push(*version);
    }
    out
}

/// A running group moved back to stream sequence 41 by an operator's bus in another
/// connection: the owner moves its own delivery, and every aggregate's events from 41 on come
/// again, in order, after what it had handled: each replay is a contiguous run ending at the
/// aggregate's last version. Twenty rounds, moved while the handlers are busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_group_moved_back_replays_every_aggregate_in_order() {
    moved_back(NatsServer::start(), 20, 1).await;
}

/// The same on a topic of four partitions, all consumed by one member: every partition moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_partitioned_group_moved_back_replays_every_aggregate_in_order() {
    moved_back(NatsServer::start(), 5, 4).await;
}

/// The same on nats-server 2.12, where ownership is a lease and the consumer has no reset API:
/// the owner deletes and recreates it at the point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_group_on_a_lease_server_moved_back_replays_in_order() {
    moved_back(NatsServer::start_older(OlderServer::V2_12), 10, 1).await;
}

/// [`kept`] with every topic's stream in `partitions` partitions.
fn kept_in(url: &str, topics: &[Topic], partitions: u32) -> bus_nats::NatsConfig {
    let mut config = kept(url, topics);
    for spec in &mut config.streams {
        spec.partitions = partitions;
    }
    config
}

async fn moved_back(server: NatsServer, rounds: usize, partitions: u32) {
    let topics: Vec<Topic> = (0..rounds)
        .map(|round| Topic::new(format!("rebuild.running.{round}")).unwrap())
        .collect();
    let bus = NatsBus::connect(kept_in(&server.url(), &topics, partitions))
        .await
        .unwrap();
    let operator = NatsBus::connect(kept_in(&server.url(), &topics, partitions))
        .await
        .unwrap();
    for (round, topic) in topics.iter().enumerate() {
        let topic = topic.clone();
        publish(&bus, &topic, 5, 40).await;
        let calls: Calls = Arc::default();
        let subscription = subscribe(&bus, &topic, &calls).await;
        // Moved while delivery is under way: once every aggregate is past version 12 (the
        // stream holds 40 of each), not only once it is idle.
        wait_for("every aggregate past v12", Duration::from_secs(20), || {
            let calls = calls.lock().unwrap();
            (0..5).all(|a| calls.iter().any(|c| c.0 == format!("acc-{a}") && c.1 >= 12))
        })
        .await;
        let reset = operator
            .reset_group(&topic, ResetTo::Sequence(41), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(reset.sequence, 41);
        assert!(
            reset.moved_by.is_some(),
            "{reset:?}: the running owner moved"
        );
        // The events stored from 41 on (160 of the 200: aggregates publish side by side, so
        // which version of each is stored at 41 depends on how their publishes interleaved)
        // all come again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while replays(&calls.lock().unwrap())
            .values()
            .map(Vec::len)
            .sum::<usize>()
            < 160
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: no replay from 41 within 20s; handled {:?}",
                by_aggregate(&calls.lock().unwrap())
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The owner moved its delivery (not a restart at the ack floor after some break), every
        // partition of it.
        let metrics = subscription.control().unwrap().metrics();
        assert_eq!(
            metrics.delivery_moves,
            u64::from(partitions),
            "round {round}: {metrics:?}"
        );
        if partitions > 1 {
            assert!(
                reset
                    .moved_by
                    .as_deref()
                    .is_some_and(|m| m.contains("(partitions [0, 1, 2, 3])")),
                "{reset:?}"
            );
        }
        subscription.close().await.unwrap();
        let calls = calls.lock().unwrap().clone();
        let replayed = replays(&calls);
        assert_eq!(
            replayed.values().map(Vec::len).sum::<usize>(),
            160,
            "round {round}: every event stored from 41 on, once: {replayed:?}"
        );
        // Per aggregate: 1..=k as first handled (k >= 12: moved while busy), then a contiguous
        // run from its first event stored at or after 41 to its last.
        for aggregate in (0..5).map(|a| format!("acc-{a}")) {
            let handled: Vec<(u64, u64)> = calls
                .iter()
                .filter(|c| c.0 == aggregate)
                .map(|c| (c.1, c.2))
                .collect();
            let split = restart_of(&handled)
                .unwrap_or_else(|| panic!("round {round} {aggregate}: no replay {handled:?}"));
            let (first, replay) = handled.split_at(split);
            let k = first.len() as u64;
            assert!(
                first.iter().map(|c| c.0).eq(1..=k) && k >= 12,
                "round {round} {aggregate}: first handled {first:?}"
            );
            let from = replay[0].0;
            assert!(
                replay.iter().map(|c| c.0).eq(from..=40),
                "round {round} {aggregate}: the replay is a contiguous run to the last: {replay:?}"
            );
            assert!(
                replay.iter().all(|c| c.1 >= 41),
                "round {round} {aggregate}: replayed from before 41: {replay:?}"
            );
            // The version before the replay's first was stored before 41.
            if from > 1 {
                let before = first.get((from - 2) as usize).copied().unwrap_or_default();
                assert!(
                    before.0 == from - 1 && before.1 < 41,
                    "round {round} {aggregate}: the replay starts late: {before:?} then {replay:?}"
                );
            }
        }
        // Nothing before 41 came twice.
        let mut before: Vec<u64> = calls.iter().map(|c| c.2).filter(|s| *s < 41).collect();
        before.sort_unstable();
        before.dedup();
        assert_eq!(
            before.len(),
            calls.iter().filter(|c| c.2 < 41).count(),
            "round {round}"
        );
    }
    bus.close().await.unwrap();
    operator.close().await.unwrap();
}

/// A group with no subscription running is reset to a time before its topic's first event:
/// the consumer itself moves, and a new subscription rebuilds exactly the projection the first
/// one built. Reset past the last event, it skips ahead: nothing is handled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_group_reset_to_a_time_rebuilds_the_same_projection() {
    let server = NatsServer::start();
    let topic = Topic::new("rebuild.stopped").unwrap();
    let bus = NatsBus::connect(kept(&server.url(), std::slice::from_ref(&topic)))
        .await
        .unwrap();
    let before_everything = SystemTime::now() - Duration::from_secs(1);
    publish(&bus, &topic, 4, 25).await;
    let first: Calls = Arc::default();
    let subscription = subscribe(&bus, &topic, &first).await;
    wait_for("100 handled", Duration::from_secs(20), || {
        first.lock().unwrap().len() == 100
    })
    .await;
    subscription.close().await.unwrap();

    let reset = bus
        .reset_group(
            &topic,
            ResetTo::Time(before_everything),
            Duration::from_millis(500),
        )
        .await
        .unwrap();
    assert_eq!(
        (reset.sequence, reset.moved_by.clone()),
        (1, None),
        "{reset:?}"
    );
    let rebuilt: Calls = Arc::default();
    let subscription = subscribe(&bus, &topic, &rebuilt).await;
    wait_for("100 handled again", Duration::from_secs(20), || {
        rebuilt.lock().unwrap().len() == 100
    })
    .await;
    subscription.close().await.unwrap();
    assert_eq!(
        by_aggregate(&rebuilt.lock().unwrap()),
        by_aggregate(&first.lock().unwrap())
    );
    let mut sequences: Vec<u64> = rebuilt.lock().unwrap().iter().map(|c| c.2).collect();
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=100).collect::<Vec<_>>());

    // To a time after the last event: the end; a subscription then waits for new events.
    let reset = bus
        .reset_group(
            &topic,
            ResetTo::Time(SystemTime::now() + Duration::from_secs(3600)),
            Duration::from_millis(500),
        )
        .await
        .unwrap();
    assert_eq!(reset.sequence, 101);
    let after: Calls = Arc::default();
    let subscription = subscribe(&bus, &topic, &after).await;
    publish(&bus, &topic, 1, 1).await; // acc-0 v1 again, stored at 101
    wait_for("the new event", Duration::from_secs(20), || {
        !after.lock().unwrap().is_empty()
    })
    .await;
    subscription.close().await.unwrap();
    assert_eq!(*after.lock().unwrap(), [("acc-0".to_owned(), 1, 101)]);
    bus.close().await.unwrap();
}

/// A group owned by a lease on a server with the consumer reset API: with nobody holding the
/// lease the consumer itself is reset, and the next subscription replays from the point; while
/// the lease is held by a subscription that does not answer (a stalled process), the reset is
/// refused and the consumer left where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_owned_by_a_lease_is_reset_while_nobody_holds_the_lease() {
    let server = NatsServer::start();
    let topic = Topic::new("rebuild.lease").unwrap();
    let mut config = kept(&server.url(), std::slice::from_ref(&topic));
    config.consumer.ownership = bus_nats::Ownership::Lease;
    let bus = NatsBus::connect(config).await.unwrap();
    publish(&bus, &topic, 3, 10).await;
    let first: Calls = Arc::default();
    let subscription = subscribe(&bus, &topic, &first).await;
    wait_for("30 handled", Duration::from_secs(20), || {
        first.lock().unwrap().len() == 30
    })
    .await;
    subscription.close().await.unwrap();
    let info = common::consumer_info(&server, &bus, &topic).await;
    assert_eq!(info.ack_floor.stream_sequence, 30, "{info:?}");

    // Someone holds the lease and does not move: refused, nothing moved.
    let client = async_nats::connect(server.url()).await.unwrap();
    let leases = async_nats::jetstream::new(client)
        .get_key_value("BUS_OWNERS")
        .await
        .unwrap();
    let revision = leases
        .create(info.name.as_str(), "a stalled process".into())
        .await
        .unwrap();
    let err = bus
        .reset_group(&topic, ResetTo::Sequence(1), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), NatsErrorKind::Unanswered, "{err}");
    assert!(err.to_string().contains("lease to run out"), "{err}");
    let info = common::consumer_info(&server, &bus, &topic).await;
    assert_eq!(info.ack_floor.stream_sequence, 30, "moved anyway: {info:?}");

    // Released: the consumer is reset by the reset API (the same consumer), and a new
    // subscription handles everything again, in order.
    leases
        .delete_expect_revision(info.name.as_str(), Some(revision))
        .await
        .unwrap();
    let reset = bus
        .reset_group(&topic, ResetTo::Sequence(1), Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(
        (reset.sequence, reset.moved_by.clone()),
        (1, None),
        "{reset:?}"
    );
    let moved = common::consumer_info(&server, &bus, &topic).await;
    assert_eq!(
        (moved.ack_floor.stream_sequence, moved.created),
        (0, info.created),
        "{moved:?}"
    );
    let rebuilt: Calls = Arc::default();
    let subscription = subscribe(&bus, &topic, &rebuilt).await;
    wait_for("30 handled again", Duration::from_secs(20), || {
        rebuilt.lock().unwrap().len() == 30
    })
    .await;
    subscription.close().await.unwrap();
    assert_eq!(
        by_aggregate(&rebuilt.lock().unwrap()),
        by_aggregate(&first.lock().unwrap())
    );
    bus.close().await.unwrap();
}

/// What a reset cannot do is refused with its reason: a point outside the stream, a group
/// that never subscribed, a work-queue topic (what was read is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_that_cannot_be_done_are_refused() {
    let server = NatsServer::start();
    let topic = Topic::new("rebuild.refused").unwrap();
    let mut config = kept(&server.url(), std::slice::from_ref(&topic));
    let queue = Topic::new("rebuild.queue").unwrap();
    let mut spec = StreamSpec::new("REBUILD_QUEUE", [queue.clone()]);
    spec.retention = Retention::WorkQueue;
    config.streams.push(spec);
    let bus = NatsBus::connect(config).await.unwrap();
    publish(&bus, &topic, 1, 3).await;
    let never = bus
        .reset_group(&topic, ResetTo::Start, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(never.kind(), NatsErrorKind::NotFound, "{never}");

    let calls: Calls = Arc::default();
    let subscription = subscribe(&bus, &topic, &calls).await;
    wait_for("3 handled", Duration::from_secs(10), || {
        calls.lock().unwrap().len() == 3
    })
    .await;
    for bad in [0, 5] {
        let err = bus
            .reset_group(&topic, ResetTo::Sequence(bad), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), NatsErrorKind::Invalid, "{bad}: {err}");
    }
    subscription.close().await.unwrap();

    publish(&bus, &queue, 1, 2).await;
    let queue_calls: Calls = Arc::default();
    let subscription = subscribe(&bus, &queue, &queue_calls).await;
    wait_for("2 handled", Duration::from_secs(10), || {
        queue_calls.lock().unwrap().len() == 2
    })
    .await;
    let err = bus
        .reset_group(&queue, ResetTo::Start, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), NatsErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("WorkQueue"), "{err}");
    // An operator whose configuration uses the existing stream without saying its retention:
    // the broker's word counts.
    let mut config = unbatched_config(&server.url());
    let mut spec = StreamSpec::new("REBUILD_QUEUE", [queue.clone()]);
    spec.retention = Retention::Limits;
    config.streams.push(spec);
    config.provisioning = bus_nats::Provisioning::UseExisting;
    let operator = NatsBus::connect(config).await.unwrap();
    let err = operator
        .reset_group(&queue, ResetTo::Start, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), NatsErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("work-queue stream"), "{err}");
    operator.close().await.unwrap();
    subscription.close().await.unwrap();
    bus.close().await.unwrap();
}

/// New groups start where `consumer.start` says: at a stream sequence, at a time, or with what
/// is stored after they subscribe; a work-queue topic refuses any start but its first event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_groups_start_at_a_sequence_a_time_or_what_is_new() {
    let server = NatsServer::start();
    let topic = Topic::new("rebuild.start").unwrap();
    let publisher = NatsBus::connect(kept(&server.url(), std::slice::from_ref(&topic)))
        .await
        .unwrap();
    let publish = |from: u64, to: u64| {
        let (publisher, topic) = (publisher.clone(), topic.clone());
        async move {
            for version in from..=to {
                for a in ["a", "b"] {
                    let e = Envelope::builder(a, "Posted", version).build().unwrap();
                    let _receipt = publisher.publish(&topic, e).await.unwrap();
                }
            }
            publisher.flush().await.unwrap();
        }
    };
    publish(1, 3).await; // sequences 1..=6
    let between = SystemTime::now();
    publish(4, 5).await; // 7..=10

    let group = |name: &str, start: bus_nats::StartAt| {
        let mut config = kept(&server.url(), std::slice::from_ref(&topic)).with_group(name);
        config.consumer.start = start;
        NatsBus::connect(config)
    };
    let sequences_of = |calls: &Calls| {
        let mut s: Vec<u64> = calls.lock().unwrap().iter().map(|c| c.2).collect();
        s.sort_unstable();
        s
    };
    let from_sequence = group("from-sequence", bus_nats::StartAt::Sequence(5))
        .await
        .unwrap();
    let from_time = group("from-time", bus_nats::StartAt::Time(between))
        .await
        .unwrap();
    let only_new = group("only-new", bus_nats::StartAt::New).await.unwrap();
    let (c1, c2, c3): (Calls, Calls, Calls) = Default::default();
    let s1 = subscribe(&from_sequence, &topic, &c1).await;
    let s2 = subscribe(&from_time, &topic, &c2).await;
    let s3 = subscribe(&only_new, &topic, &c3).await;
    wait_for("6 from sequence 5", Duration::from_secs(10), || {
        c1.lock().unwrap().len() == 6
    })
    .await;
    wait_for("4 from the time", Duration::from_secs(10), || {
        c2.lock().unwrap().len() == 4
    })
    .await;
    publish(6, 6).await; // 11, 12
    wait_for("2 new", Duration::from_secs(10), || {
        c3.lock().unwrap().len() == 2
    })
    .await;
    wait_for("the new ones everywhere", Duration::from_secs(10), || {
        c1.lock().unwrap().len() == 8 && c2.lock().unwrap().len() == 6
    })
    .await;
    assert_eq!(sequences_of(&c1), (5..=12).collect::<Vec<_>>());
    assert_eq!(sequences_of(&c2), (7..=12).collect::<Vec<_>>());
    assert_eq!(sequences_of(&c3), [11, 12]);
    for s in [s1, s2, s3] {
        s.close().await.unwrap();
    }

    // A work-queue topic keeps only what its one group has not read: no other start.
    let queue = Topic::new("rebuild.queue").unwrap();
    let mut config = unbatched_config(&server.url()).with_group("late");
    config.consumer.start = bus_nats::StartAt::New;
    let late = NatsBus::connect(config).await.unwrap();
    let error = late
        .subscribe(
            &queue,
            Arc::new(handler_fn(|_e: Envelope| async { Ok(()) })),
        )
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("consumer.start") && error.to_string().contains("WorkQueue"),
        "{error}"
    );
    for bus in [from_sequence, from_time, only_new, late, publisher] {
        bus.close().await.unwrap();
    }
}

/// A partitioned group with no subscription running: each partition's consumer is reset, and
/// the next subscription handles every aggregate again from the start, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_partitioned_group_is_reset_partition_by_partition() {
    let server = NatsServer::start();
    let topic = Topic::new("rebuild.parts").unwrap();
    let bus = NatsBus::connect(kept_in(&server.url(), std::slice::from_ref(&topic), 4))
        .await
        .unwrap();
    publish(&bus, &topic, 8, 5).await;
    let first: Calls = Arc::default();
    let subscription = subscribe(&bus, &topic, &first).await;
    wait_for("40 handled", Duration::from_secs(20), || {
        first.lock().unwrap().len() == 40
    })
    .await;
    subscription.close().await.unwrap();
    let reset = bus
        .reset_group(&topic, ResetTo::Start, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(reset.sequence, 1);
    assert_eq!(reset.moved_by, None, "no subscription ran: {reset:?}");
    let again: Calls = Arc::default();
    let subscription = subscribe(&bus, &topic, &again).await;
    wait_for("40 handled again", Duration::from_secs(20), || {
        again.lock().unwrap().len() == 40
    })
    .await;
    subscription.close().await.unwrap();
    for (aggregate, versions) in by_aggregate(&again.lock().unwrap()) {
        assert_eq!(versions, (1..=5).collect::<Vec<_>>(), "{aggregate}");
    }
    bus.close().await.unwrap();
}
