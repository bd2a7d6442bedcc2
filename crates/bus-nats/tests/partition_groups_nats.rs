//! A consumer group scales out over a partitioned topic: each process consumes the partitions
//! assigned to it, and partitions move when processes come and go, without reordering.
//!
//! An 8-partition topic, three consumer processes of one group, events of 40 aggregates
//! published throughout. A fourth process joins (partitions move to it), one closes gracefully
//! (its partitions move to the others), one is killed with SIGKILL (its partitions move once
//! its membership runs out and its pins expire). Every handler call is recorded with its
//! process and partition; across processes: no aggregate out of order, no two calls for one
//! aggregate at once, no two processes handling one partition at once, nothing lost, repeats
//! only by the processes that took over the killed one's partitions, and every process handled
//! some partitions.
//!
//! Run on the current server (pinned priority groups) and on servers before 2.14 (2.9, 2.12),
//! where each partition's ownership is a lease and a member that no longer owns a partition
//! waits for it as a standby. On each: the killed member's partitions move within a few
//! `takeover_after`, the leaving member's at once, and every close finishes within its deadline.
//!
//! And on the current server, three members of a group on a topic that keeps its events are
//! moved back to a stream sequence together (`reset_group`): each moves the partitions it
//! consumes, together they cover all eight, and every aggregate's events stored from the point
//! on are handled again, once, in order, after what had been handled. And a reset that arrives
//! while partitions are being handed over to a member that just joined (held open by handlers
//! that wait): that member moves them once the others let go (current server and 2.12).
//!
//! This binary is its own child: run with `BUS_REPLICA_URL` set, it is one member
//! (`BUS_GROUPS_CASE=reset` or `handover`: of those cases).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::{Envelope, Publisher, Topic};
use bus_nats::{NatsBus, NatsConfig, StreamSpec};
use bus_testkit::{OlderServer, TestServer};
use common::replicas::{calls, history, tempfile_dir, unique_handled, wait_handled, Replica};

const AGGREGATES: u64 = 40;
const PARTITIONS: u32 = 8;
const MIN_VERSIONS: u64 = 100;
const TAKEOVER_AFTER: Duration = Duration::from_secs(2);

fn topic() -> Topic {
    Topic::new("grouped").unwrap()
}

fn config(url: &str) -> NatsConfig {
    let mut config = common::test_config(url);
    config.consumer.takeover_after = TAKEOVER_AFTER;
    let mut spec = StreamSpec::new("GROUPED", [topic()]);
    spec.partitions = PARTITIONS;
    config.streams.push(spec);
    config
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let reset_case = std::env::var("BUS_GROUPS_CASE").is_ok_and(|c| c == "reset");
    if reset_case && common::replicas::run_if_replica(&runtime, reset_topic(), reset_config) {
        return;
    }
    let handover_case = std::env::var("BUS_GROUPS_CASE").is_ok_and(|c| c == "handover");
    if handover_case && common::replicas::run_if_replica(&runtime, reset_topic(), handover_config) {
        return;
    }
    if common::replicas::run_if_replica(&runtime, topic(), config) {
        return;
    }
    // `BUS_GROUPS_SERVER` (`current`, `2.9`, `2.12`) runs one of them.
    let servers = TestServer::chosen(
        "BUS_GROUPS_SERVER",
        &[
            TestServer::Current,
            TestServer::Older(OlderServer::V2_9),
            TestServer::Older(OlderServer::V2_12),
        ],
    );
    println!("running {} tests", servers.len());
    for &server in &servers {
        members_join_leave_and_crash_under_load(&runtime, server);
        println!(
            "test members_join_leave_and_crash_under_load ({} server) ... ok",
            server.name()
        );
    }
    let mut passed = servers.len();
    if servers.contains(&TestServer::Current) {
        members_are_reset_together(&runtime);
        println!("test members_are_reset_together (current server) ... ok");
        passed += 1;
    }
    // Pinned partitions (the current server), leased ones (2.12), and leased ones on the
    // current server (`consumer.ownership` Lease, restarted by the reset API).
    for &server in &servers {
        let leases: &[bool] = match server {
            TestServer::Current => &[false, true],
            TestServer::Older(OlderServer::V2_12) => &[false],
            _ => &[],
        };
        for &lease in leases {
            a_reset_moves_a_partition_being_handed_over_once_it_is_taken_over(
                &runtime, server, lease,
            );
            println!(
                "test a_reset_moves_a_partition_being_handed_over_once_it_is_taken_over ({} server{}) ... ok",
                server.name(),
                if lease { ", lease" } else { "" }
            );
            passed += 1;
        }
    }
    println!("\npartition_groups_nats: {passed} passed, 0 failed");
}

fn reset_topic() -> Topic {
    Topic::new("regrouped").unwrap()
}

/// A topic that keeps its events (a reset needs them), one event per message (so that the
/// events stored from a sequence on are counted by sequences).
fn reset_config(url: &str) -> NatsConfig {
    let mut config = common::test_config(url);
    config.consumer.takeover_after = TAKEOVER_AFTER;
    config.batching = bus_nats::BatchConfig::off();
    let mut spec = StreamSpec::new("REGROUPED", [reset_topic()]);
    spec.partitions = PARTITIONS;
    spec.retention = bus_nats::Retention::Limits;
    spec.max_bytes = 64 << 20;
    config.streams.push(spec);
    config
}

fn members_are_reset_together(runtime: &tokio::runtime::Runtime) {
    let server = TestServer::Current.start();
    let url = server.url();
    let dir = tempfile_dir();
    let bus = runtime
        .block_on(NatsBus::connect(reset_config(&url)))
        .unwrap();
    runtime.block_on(bus.stream_name(&reset_topic())).unwrap();
    let mut replicas: Vec<Replica> = ["a", "b", "c"]
        .iter()
        .map(|n| Replica::spawn_with(n, &url, &dir, &[("BUS_GROUPS_CASE", "reset")]))
        .collect();
    for r in &replicas {
        r.wait("became ready", |s| s.ready);
    }
    // Published version by version until every member has handled some (the partitions are
    // shared out), then to 20 versions at least.
    let mut version = 0;
    loop {
        version += 1;
        runtime.block_on(async {
            for a in 0..AGGREGATES {
                let event = Envelope::builder(format!("r-{a}"), "Regrouped", version)
                    .build()
                    .unwrap();
                let _receipt = bus.publish(&reset_topic(), event).await.unwrap();
            }
            bus.flush().await.unwrap();
        });
        let all: Vec<&Replica> = replicas.iter().collect();
        let everyone = ["a", "b", "c"].iter().all(|n| handled_by(n, &all) > 0);
        if everyone && version >= 20 {
            break;
        }
        assert!(version < 2_000, "a member was given no partition");
        std::thread::sleep(Duration::from_millis(5));
    }
    let events = AGGREGATES * version;
    wait_handled(&replicas.iter().collect::<Vec<_>>(), events);
    let handled_before = calls(&replicas.iter().collect::<Vec<_>>()).len();

    // Back to the middle of the stream, everyone running (and idle: everything was handled).
    let from = events / 2;
    let reset_at = common::replicas::now_ns();
    let reset = runtime
        .block_on(bus.reset_group(
            &reset_topic(),
            bus_nats::ResetTo::Sequence(from),
            Duration::from_secs(20),
        ))
        .unwrap();
    let moved_by = reset.moved_by.clone().unwrap_or_default();
    let moved = moved_partitions(&moved_by);
    assert_eq!(
        moved,
        (0..PARTITIONS).collect::<Vec<_>>(),
        "every partition moved once: {moved_by}"
    );
    assert_eq!(
        moved_by.matches("(partitions").count(),
        3,
        "each member moved its partitions: {moved_by}"
    );
    // Every event stored from `from` on is handled again: one message per event.
    let replayed = (events - from + 1) as usize;
    let deadline = std::time::Instant::now() + common::replicas::STEP;
    while calls(&replicas.iter().collect::<Vec<_>>()).len() < handled_before + replayed {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {replayed} events handled again",
            calls(&replicas.iter().collect::<Vec<_>>()).len() - handled_before
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in &mut replicas {
        r.close();
    }
    let all = calls(&replicas.iter().collect::<Vec<_>>());
    assert_eq!(all.len(), handled_before + replayed, "nothing more");
    // Per aggregate, across the members in the order the calls started: what came after the
    // reset is a contiguous run to the last version.
    let mut again = 0;
    for a in 0..AGGREGATES {
        let aggregate = format!("r-{a}");
        let versions: Vec<u64> = all
            .iter()
            .filter(|c| c.aggregate == aggregate && c.start > reset_at)
            .map(|c| c.version)
            .collect();
        let first = versions.first().copied().unwrap_or(version + 1);
        assert!(
            versions.iter().copied().eq(first..=version),
            "{aggregate}: the replay is a contiguous run to the last: {versions:?}"
        );
        again += versions.len();
    }
    assert_eq!(again, replayed, "every event stored from {from} on, once");
}

/// The reset case's topic, with the default `takeover_after`: a partition being handed over
/// is waited for that long by a move. A member started with `BUS_GROUPS_LEASE` set owns its
/// partitions by the lease (`consumer.ownership` Lease).
fn handover_config(url: &str) -> NatsConfig {
    handover_config_with(url, std::env::var("BUS_GROUPS_LEASE").is_ok())
}

fn handover_config_with(url: &str, lease: bool) -> NatsConfig {
    let mut config = reset_config(url);
    config.consumer.takeover_after = bus_nats::DEFAULT_TAKEOVER_AFTER;
    if lease {
        config.consumer.ownership = bus_nats::Ownership::Lease;
    }
    config
}

/// A reset that arrives while partitions are being handed over to a member that just joined:
/// the members they come from have let go of them (nobody else moves them), the new member
/// waits for them as a standby, and it moves them once it takes them over. Every partition is
/// moved once, and every event from the point on is handled again, in order.
///
/// The hand-over is held open by events whose handlers wait for a file: the members they run
/// in drain them before letting go.
fn a_reset_moves_a_partition_being_handed_over_once_it_is_taken_over(
    runtime: &tokio::runtime::Runtime,
    which: TestServer,
    lease: bool,
) {
    let server = which.start();
    let url = server.url();
    let dir = tempfile_dir();
    // One directory per test process: a file of its own for each server's run.
    let hold = dir.join(format!("go-{}-{lease}", which.name()));
    let _ = std::fs::remove_file(&hold);
    let hold_env = hold.to_str().unwrap().to_owned();
    let bus = runtime
        .block_on(NatsBus::connect(handover_config_with(&url, lease)))
        .unwrap();
    runtime.block_on(bus.stream_name(&reset_topic())).unwrap();
    let lease_env = if lease { "1" } else { "" };
    let mut env = vec![
        ("BUS_GROUPS_CASE", "handover"),
        ("BUS_HOLD_FILE", hold_env.as_str()),
    ];
    if lease {
        env.push(("BUS_GROUPS_LEASE", lease_env));
    }
    let mut replicas: Vec<Replica> = ["a", "b"]
        .iter()
        .map(|n| Replica::spawn_with(n, &url, &dir, &env))
        .collect();
    for r in &replicas {
        r.wait("became ready", |s| s.ready);
    }
    let versions = 20;
    runtime.block_on(async {
        for version in 1..=versions {
            for a in 0..AGGREGATES {
                let event = Envelope::builder(format!("r-{a}"), "Regrouped", version)
                    .build()
                    .unwrap();
                let _receipt = bus.publish(&reset_topic(), event).await.unwrap();
            }
        }
        bus.flush().await.unwrap();
    });
    wait_handled(&replicas.iter().collect::<Vec<_>>(), AGGREGATES * versions);
    // The first assignment has settled: no member is still closing a partition it handed over
    // (the first member takes every partition until the second joins). A held event fetched by
    // such a member would hold that close until its deadline, which abandons the handler: the
    // event is then handled once, by the next owner, where this test counts the held call and
    // the replay. With a lease, every partition is then owned by the member it is assigned to.
    // With the pinned group, a partition that moved after its last event was delivered has no
    // owner until its next event (the broker pins a standby only when it has a message for
    // it): its member waits as a standby, and the broker shows nobody pinned.
    let pinned = matches!(which, TestServer::Current) && !lease;
    let base = handover_config_with(&url, lease).consumer_name(&reset_topic());
    let deadline = std::time::Instant::now() + common::replicas::STEP;
    loop {
        let seen: Vec<(u64, u64, u64)> = replicas
            .iter()
            .map(|r| r.seen(|s| (s.partitions, s.gained, s.lost)))
            .collect();
        let standing_by: u64 = seen
            .iter()
            .map(|(partitions, gained, lost)| partitions.saturating_sub(gained - lost))
            .sum();
        // A pin held by a member that is still closing would leave the consumer pinned while
        // its new member stands by: the two counts differ until that member lets go.
        let unpinned = if pinned && standing_by > 0 {
            runtime.block_on(unpinned_partitions(&url, "REGROUPED", &base))
        } else {
            0
        };
        // Both members have their share (the first one had them all until the second joined).
        if seen.iter().all(|s| s.0 > 0)
            && seen.iter().map(|s| s.0).sum::<u64>() == PARTITIONS as u64
            && standing_by == unpinned
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first assignment never settled (partitions, gained, lost per member; partitions nobody is pinned to): {seen:?}, {unpinned}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // One held event in every partition.
    let mut holds = Vec::new();
    for i in 0.. {
        let key = format!("hold-{i}");
        let p = bus_core::wire::partition_of(&key, PARTITIONS);
        if !holds.iter().any(|(_, q)| *q == p) {
            holds.push((key, p));
        }
        if holds.len() == PARTITIONS as usize {
            break;
        }
    }
    runtime.block_on(async {
        for (key, _) in &holds {
            let event = Envelope::builder(key.as_str(), "Held", 1u64)
                .build()
                .unwrap();
            let _receipt = bus.publish(&reset_topic(), event).await.unwrap();
        }
        bus.flush().await.unwrap();
    });
    let events = AGGREGATES * versions + PARTITIONS as u64;
    // Each held event is delivered (and not acknowledged) before the third member joins.
    runtime.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
        let stream = js.get_stream("REGROUPED").await.unwrap();
        let base = handover_config_with(&url, lease).consumer_name(&reset_topic());
        let deadline = std::time::Instant::now() + common::replicas::STEP;
        for p in 0..PARTITIONS {
            loop {
                let info = stream.consumer_info(format!("{base}-p{p}")).await.unwrap();
                if info.num_ack_pending > 0 {
                    // The ownership under test: the pinned group only by default on 2.14+.
                    assert_eq!(
                        info.config.priority_policy
                            == async_nats::jetstream::consumer::PriorityPolicy::PinnedClient,
                        matches!(which, TestServer::Current) && !lease,
                        "partition {p}: {:?}",
                        info.config.priority_policy
                    );
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "partition {p}'s held event was never delivered: {info:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let handled_before = calls(&replicas.iter().collect::<Vec<_>>()).len();
    assert_eq!(
        handled_before as u64,
        AGGREGATES * versions,
        "the held events are held"
    );

    // The third member joins: the others let go of its partitions once their held handlers
    // finish, and it waits for them as a standby.
    let mut c_env = env.clone();
    c_env.push(("RUST_LOG", "bus_nats=info"));
    replicas.push(Replica::spawn_with("c", &url, &dir, &c_env));
    replicas[2].wait("became ready", |s| s.ready);
    let deadline = std::time::Instant::now() + common::replicas::STEP;
    loop {
        let running: Vec<(u64, u64)> = replicas
            .iter()
            .map(|r| r.seen(|s| (s.partitions, s.gained)))
            .collect();
        // Handed over: the others run the rest, the newcomer runs its share, all as standbys.
        if running[2].0 > 0 && running.iter().map(|r| r.0).sum::<u64>() == PARTITIONS as u64 {
            assert_eq!(running[2].1, 0, "the newcomer took over a held partition");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the partitions were never shared out among three: {running:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let from = events / 2;
    let reset_at = common::replicas::now_ns();
    let reset = runtime.spawn({
        let bus = bus.clone();
        async move {
            bus.reset_group(
                &reset_topic(),
                bus_nats::ResetTo::Sequence(from),
                Duration::from_secs(20),
            )
            .await
        }
    });
    let waiting = "a move waits for the member this partition comes from to let go";
    replicas[2].wait("waited to take over", |s| {
        s.logged.iter().any(|l| l.contains(waiting))
    });
    assert!(
        !reset.is_finished(),
        "the reset is waiting for the hand-over"
    );
    std::fs::write(&hold, b"go").unwrap();
    let reset = runtime.block_on(reset).unwrap().unwrap();
    let moved_by = reset.moved_by.clone().unwrap_or_default();
    assert_eq!(
        moved_partitions(&moved_by),
        (0..PARTITIONS).collect::<Vec<_>>(),
        "every partition moved once: {moved_by}"
    );
    assert_eq!(
        moved_by.matches("(partitions").count(),
        3,
        "each member moved its partitions, the newcomer too: {moved_by}"
    );

    // The held events are handled (once released), then everything from the point on again.
    let replayed = (events - from + 1) as usize;
    let expected = handled_before + PARTITIONS as usize + replayed;
    let deadline = std::time::Instant::now() + common::replicas::STEP;
    while calls(&replicas.iter().collect::<Vec<_>>()).len() < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {expected} calls",
            calls(&replicas.iter().collect::<Vec<_>>()).len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        replicas[2].seen(|s| s.gained) > 0,
        "the newcomer took its partitions over"
    );
    for r in &mut replicas {
        r.close();
    }
    let all = calls(&replicas.iter().collect::<Vec<_>>());
    assert_eq!(all.len(), expected, "nothing more");
    let mut again = 0;
    let aggregates = (0..AGGREGATES)
        .map(|a| (format!("r-{a}"), versions))
        .chain(holds.iter().map(|(key, _)| (key.clone(), 1)));
    for (aggregate, last) in aggregates {
        let versions: Vec<u64> = all
            .iter()
            .filter(|c| c.aggregate == aggregate && c.start > reset_at)
            .map(|c| c.version)
            .collect();
        let first = versions.first().copied().unwrap_or(last + 1);
        assert!(
            versions.iter().copied().eq(first..=last),
            "{aggregate}: the replay is a contiguous run to the last: {versions:?}"
        );
        again += versions.len();
    }
    assert_eq!(again, replayed, "every event stored from {from} on, once");
}

/// How many of the partitions' consumers (`<base>-p<n>`) of `stream` have no client pinned.
async fn unpinned_partitions(url: &str, stream: &str, base: &str) -> u64 {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let stream = js.get_stream(stream).await.unwrap();
    let mut unpinned = 0;
    for p in 0..PARTITIONS {
        let info = stream.consumer_info(format!("{base}-p{p}")).await.unwrap();
        if info
            .priority_groups
            .iter()
            .all(|g| g.pinned_client_id.as_deref().unwrap_or_default().is_empty())
        {
            unpinned += 1;
        }
    }
    unpinned
}

/// The partitions a `GroupReset::moved_by` names, sorted (a partition moved twice, twice).
fn moved_partitions(moved_by: &str) -> Vec<u32> {
    let mut moved: Vec<u32> = moved_by
        .split('[')
        .skip(1)
        .flat_map(|part| {
            part.split(']')
                .next()
                .unwrap_or_default()
                .split(',')
                .filter_map(|p| p.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    moved.sort_unstable();
    moved
}

fn handled_by(process: &str, replicas: &[&Replica]) -> u64 {
    calls(replicas)
        .iter()
        .filter(|c| c.process == process)
        .count() as u64
}

fn members_join_leave_and_crash_under_load(runtime: &tokio::runtime::Runtime, which: TestServer) {
    let server = which.start();
    let url = server.url();
    let dir = tempfile_dir();
    let bus = runtime.block_on(NatsBus::connect(config(&url))).unwrap();
    runtime.block_on(bus.stream_name(&topic())).unwrap();

    let mut replicas: Vec<Replica> = ["a", "b", "c"]
        .iter()
        .map(|n| Replica::spawn(n, &url, &dir))
        .collect();
    for r in &replicas {
        r.wait("became ready", |s| s.ready);
    }
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publisher = {
        let bus = bus.clone();
        let stop = stop_publishing.clone();
        runtime.spawn(async move {
            let mut version = 0;
            while !stop.load(Ordering::SeqCst) || version < MIN_VERSIONS {
                version += 1;
                for a in 0..AGGREGATES {
                    let event = Envelope::builder(format!("g-{a}"), "Grouped", version)
                        .build()
                        .unwrap();
                    let _receipt = bus.publish(&topic(), event).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            bus.flush().await.unwrap();
            version
        })
    };
    let all = |r: &Vec<Replica>| unique_handled(&r.iter().collect::<Vec<_>>());

    // Every one of the three takes part.
    wait_handled(&replicas.iter().collect::<Vec<_>>(), 2_000);
    for name in ["a", "b", "c"] {
        let deadline = std::time::Instant::now() + common::replicas::STEP;
        while handled_by(name, &replicas.iter().collect::<Vec<_>>()) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{name} was given no partition"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A fourth joins and is given partitions.
    replicas.push(Replica::spawn("d", &url, &dir));
    replicas.last().unwrap().wait("became ready", |s| s.ready);
    let deadline = std::time::Instant::now() + common::replicas::STEP;
    while handled_by("d", &replicas.iter().collect::<Vec<_>>()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new member was given no partition"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // One leaves gracefully.
    let so_far = all(&replicas);
    wait_handled(&replicas.iter().collect::<Vec<_>>(), so_far + 1_000);
    let left_at = common::replicas::now_ns();
    let report = replicas.iter_mut().find(|r| r.name == "b").unwrap().close();
    assert!(report.contains("returned 0"), "{report}");
    let closed_in = Duration::from_nanos((common::replicas::now_ns() - left_at) as u64);
    assert!(
        closed_in < bus_core::Subscription::DEFAULT_CLOSE_DEADLINE,
        "the leaving member took {closed_in:?} to close"
    );
    // One is killed while it owns partitions: once every partition is handled again after the
    // leave (a kill while the group is still handing the leaver's partitions over would leave
    // them with the killed member, and measure its takeover instead).
    let deadline = std::time::Instant::now() + common::replicas::STEP;
    loop {
        let resumed: std::collections::BTreeSet<u32> = calls(&replicas.iter().collect::<Vec<_>>())
            .iter()
            .filter(|c| c.process != "b" && c.start > left_at)
            .filter_map(|c| c.partition)
            .collect();
        if resumed.len() == PARTITIONS as usize {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after the leave, only partitions {resumed:?} were handled again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let so_far = all(&replicas);
    wait_handled(&replicas.iter().collect::<Vec<_>>(), so_far + 1_000);
    // And while the member to be killed is handling: one between two epochs of its partitions
    // (delivery restarting, frequent on 2.9) may have handled nothing for a while, and the
    // partitions it held are read from what it handled in its last 300 ms.
    let deadline = std::time::Instant::now() + common::replicas::STEP;
    loop {
        let last_of_c = calls(&replicas.iter().collect::<Vec<_>>())
            .iter()
            .filter(|c| c.process == "c")
            .map(|c| c.start)
            .max();
        if last_of_c.is_some_and(|t| t + 100_000_000 > common::replicas::now_ns()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the member to be killed has handled nothing since {last_of_c:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed_at = common::replicas::now_ns();
    replicas.iter_mut().find(|r| r.name == "c").unwrap().kill();
    // The events each partition's consumer had awaiting acknowledgement at the kill: those of
    // its messages above its ack floor (a record batch holds several).
    let pending_at_kill: Vec<u64> = runtime.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
        let stream = js.get_stream("GROUPED").await.unwrap();
        let base = config(&url).consumer_name(&topic());
        let mut pending = Vec::new();
        for p in 0..PARTITIONS {
            // Before 2.14 a takeover deletes and recreates the partition's consumer, which a
            // member leaving just before the kill may be doing now: read it once it is back.
            let name = format!("{base}-p{p}");
            let recreated_by = std::time::Instant::now() + common::replicas::STEP;
            let info = loop {
                match stream.consumer_info(&name).await {
                    Ok(info) => break info,
                    Err(e)
                        if e.kind()
                            == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound
                            && std::time::Instant::now() < recreated_by =>
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("reading consumer `{name}` at the kill: {e}"),
                }
            };
            let mut events = 0;
            for seq in info.ack_floor.stream_sequence + 1..=info.delivered.stream_sequence {
                // Acknowledged and removed, or another partition's: not this one's to replay.
                let Ok(message) = stream.get_raw_message(seq).await else {
                    continue;
                };
                if message.subject.as_str() != info.config.filter_subject {
                    continue;
                }
                events += message
                    .headers
                    .get(bus_core::wire::BATCH)
                    .map_or(1, |n| n.to_string().parse::<u64>().unwrap());
            }
            pending.push(events);
        }
        pending
    });
    let so_far = all(&replicas);
    wait_handled(&replicas.iter().collect::<Vec<_>>(), so_far + 2_000);

    stop_publishing.store(true, Ordering::SeqCst);
    let versions = runtime
        .block_on(async { tokio::time::timeout(common::replicas::STEP, publisher).await })
        .expect("publishing finished")
        .unwrap();
    let expected = AGGREGATES * versions;
    wait_handled(&replicas.iter().collect::<Vec<_>>(), expected);
    for name in ["a", "d"] {
        replicas
            .iter_mut()
            .find(|r| r.name == name)
            .unwrap()
            .close();
    }

    let all_calls = calls(&replicas.iter().collect::<Vec<_>>());
    let h = history(&all_calls, "grouped");
    // The partitions the leaving member handled last (in the 300 ms before its last call: a
    // partition it had just been given may not have been delivering yet when it was asked to
    // leave), and when another member went on.
    let last_of_b = all_calls
        .iter()
        .filter(|c| c.process == "b")
        .map(|c| c.start)
        .max()
        .expect("the leaving member handled events");
    let left: std::collections::BTreeSet<u32> = all_calls
        .iter()
        .filter(|c| c.process == "b" && c.start + 300_000_000 > last_of_b.min(left_at))
        .filter_map(|c| c.partition)
        .collect();
    let resumed_after_leave = all_calls
        .iter()
        .filter(|c| {
            c.process != "b" && c.start > left_at && c.partition.is_some_and(|p| left.contains(&p))
        })
        .map(|c| c.start)
        .min()
        .map(|t| Duration::from_nanos((t - left_at) as u64));
    // Partitions the killed member held (it handled them in its last 300 ms), and when
    // another member handled them after the kill.
    let orphaned: std::collections::BTreeSet<u32> = all_calls
        .iter()
        .filter(|c| c.process == "c" && c.start + 300_000_000 > killed_at)
        .filter_map(|c| c.partition)
        .collect();
    let resumed_after_kill = all_calls
        .iter()
        .filter(|c| {
            c.process != "c"
                && c.start > killed_at
                && c.partition.is_some_and(|p| orphaned.contains(&p))
        })
        .map(|c| c.start)
        .min()
        .map(|t| Duration::from_nanos((t - killed_at) as u64));
    println!(
        "partition groups: {versions} rounds, {expected} events; calls by process {:?}; \
         repeats by process {:?}; overlapping calls {}, two owners of a partition at once {}; \
         the leaving member closed in {closed_in:?}, its partitions {left:?} resumed \
         {resumed_after_leave:?} after it was asked to; the killed member's partitions \
         {orphaned:?} resumed {resumed_after_kill:?} after the kill (takeover_after \
         {TAKEOVER_AFTER:?}); {:?}",
        h.calls_by, h.duplicates_by, h.overlaps, h.partition_overlaps, h.report
    );
    assert_eq!(h.report.order_violations, 0, "{:?}", h.report);
    assert_eq!(h.report.broken_replays, 0, "{:?}", h.report);
    assert_eq!(h.report.gaps, 0, "{:?}", h.report);
    assert_eq!(h.report.lost(expected), 0, "{:?}", h.report);
    assert_eq!(h.overlaps, 0, "calls for one aggregate overlapped");
    assert_eq!(
        h.partition_overlaps, 0,
        "two processes handled one partition at once"
    );
    assert_eq!(h.in_process_disorder, 0);
    assert!(!orphaned.is_empty(), "the killed member owned no partition");
    // Taken over once the dead member's membership and claims ran out (`takeover_after`),
    // and its partitions restarted: well within a few of them.
    let resumed_after_kill = resumed_after_kill.expect("its partitions were never taken over");
    assert!(
        resumed_after_kill < TAKEOVER_AFTER * 4,
        "the killed member's partitions resumed only {resumed_after_kill:?} after the kill"
    );
    // The leaving member let go of its partitions (claims released, not run out) and the
    // others took them over as soon as it left.
    assert!(!left.is_empty(), "the leaving member owned no partition");
    let resumed_after_leave = resumed_after_leave.expect("its partitions were never taken over");
    assert!(
        resumed_after_leave < closed_in + TAKEOVER_AFTER / 2,
        "the leaving member's partitions resumed only {resumed_after_leave:?} after it was asked to close"
    );
    // Repeats only by those who took partitions over, and in the killed member's partitions
    // no more than it had awaiting acknowledgement there.
    for (process, count) in &h.duplicates_by {
        assert!(
            process == "a" || process == "d",
            "{process} repeated {count} events"
        );
    }
    let repeats_by_partition = &h.duplicates_in;
    let replayable: u64 = orphaned.iter().map(|p| pending_at_kill[*p as usize]).sum();
    let repeats_orphaned: u64 = orphaned
        .iter()
        .map(|p| repeats_by_partition.get(p).copied().unwrap_or(0))
        .sum();
    println!(
        "repeats by partition {repeats_by_partition:?}; events awaiting acknowledgement at the \
         kill {pending_at_kill:?}; the killed member's partitions {orphaned:?}"
    );
    // On servers before 2.14 every restart of delivery deletes and recreates a consumer and
    // replays from its ack floor, and the members there restart often under this load (55
    // restarts in one member of one CI run): repeats are not the kill's alone, and the bound
    // (2 repeats against 1 event in one run on 2.9) holds only where restarts reset in place.
    // Repeats in other partitions (hand-overs between live members) are printed, not bounded:
    // one run on the current server had more repeats in all than the kill left pending, and
    // where they were was not kept.
    if matches!(which, TestServer::Current) {
        assert!(
            repeats_orphaned <= replayable,
            "{repeats_orphaned} repeats in {orphaned:?}, where {replayable} events awaited acknowledgement at the kill ({repeats_by_partition:?})"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
