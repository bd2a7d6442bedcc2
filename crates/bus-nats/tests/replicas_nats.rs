//! Several replicas of one service consume one topic: the usual two- or three-pod deployment.
//! Exactly one consumes at a time; the others wait and take over when it goes.
//!
//! Three consumer processes of one group start on one topic while events are published. The
//! owner is killed with SIGKILL mid-stream; a standby takes over and restarts delivery at the
//! ack floor. A fourth process is started (a rolling deploy), then the new owner is closed
//! gracefully; another standby takes over at once. Every handler call is recorded by its process
//! with its start and end time, and the test checks across processes: no aggregate handled out
//! of order, no two calls for one aggregate overlapping, nothing lost, and repeats only as an
//! in-order replay by the process that took over after the kill, of no more events than the
//! killed one left unacknowledged.
//!
//! Run on the current server (the broker's pinned client) and on servers before 2.14 (2.9,
//! 2.12), where the owner holds a lease and the others wait for it as standbys (they report
//! `owner: false` in their metrics, as on the current server).
//!
//! This binary is its own child: run with `BUS_REPLICA_URL` set, it is one replica.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{Envelope, Publisher, Topic};
use bus_nats::NatsBus;
use bus_testkit::{OlderServer, TestServer};
use common::replicas::{
    calls, first_call_after, history, now_ns, owner, tempfile_dir, unique_handled, wait_handled,
    Replica, STEP,
};

const AGGREGATES: u64 = 40;
/// Versions published at least, however early the handovers are done.
const MIN_VERSIONS: u64 = 100;
/// Short, so the test does not wait long for the takeover after the kill.
const TAKEOVER_AFTER: Duration = Duration::from_secs(2);

fn topic() -> Topic {
    Topic::new("replicated").unwrap()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if common::replicas::run_if_replica(&runtime, topic(), |url| {
        let mut config = common::test_config(url);
        config.consumer.takeover_after = TAKEOVER_AFTER;
        config
    }) {
        return;
    }
    // `BUS_REPLICAS_SERVER` (`current`, `2.9`, `2.12`) runs one of them.
    let servers = TestServer::chosen(
        "BUS_REPLICAS_SERVER",
        &[
            TestServer::Current,
            TestServer::Older(OlderServer::V2_9),
            TestServer::Older(OlderServer::V2_12),
        ],
    );
    println!("running {} tests", servers.len());
    for &server in &servers {
        owner_killed_then_closed_while_standbys_wait(&runtime, server);
        println!(
            "test owner_killed_then_closed_while_standbys_wait ({} server) ... ok",
            server.name()
        );
    }
    println!("\nreplicas_nats: {} passed, 0 failed", servers.len());
}

fn owner_killed_then_closed_while_standbys_wait(
    runtime: &tokio::runtime::Runtime,
    which: TestServer,
) {
    let server = which.start();
    let url = server.url();
    let dir = tempfile_dir();
    let bus = runtime
        .block_on(NatsBus::connect(common::test_config(&url)))
        .unwrap();
    // The stream exists before the replicas race to create the consumer.
    runtime.block_on(bus.stream_name(&topic())).unwrap();

    let mut replicas: Vec<Replica> = ["a", "b", "c"]
        .iter()
        .map(|n| Replica::spawn(n, &url, &dir))
        .collect();
    for r in &replicas {
        r.wait("became ready", |s| s.ready);
    }
    // Events are published until every handover is done, so that each one happens under load.
    let stop_publishing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let bus = bus.clone();
        let stop = stop_publishing.clone();
        runtime.spawn(async move {
            let mut version = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || version < MIN_VERSIONS {
                version += 1;
                for a in 0..AGGREGATES {
                    let event = Envelope::builder(format!("k-{a}"), "Replicated", version)
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

    // 1. SIGKILL the owner mid-stream.
    wait_handled(&replicas.iter().collect::<Vec<_>>(), 2_000);
    let killed = owner(&mut replicas, "at first").name.clone();
    // Every replica answers the operator's control requests, and one of them owns the topic.
    let members = runtime
        .block_on(bus.remote_halted(&topic(), Duration::from_millis(500)))
        .unwrap();
    assert_eq!(members.len(), 3, "{members:?}");
    assert_eq!(members.iter().filter(|m| m.owner).count(), 1, "{members:?}");
    assert!(members.iter().all(|m| m.halted.is_empty()), "{members:?}");
    let gained_before: HashMap<String, u64> = replicas
        .iter()
        .map(|r| (r.name.clone(), r.gained()))
        .collect();
    // The handlers keep pace with the publisher, so there are moments with nothing in flight:
    // the kill waits for one with something unacknowledged (checked again after it, below).
    let deadline = Instant::now() + STEP;
    while runtime
        .block_on(common::consumer_info(&server, &bus, &topic()))
        .num_ack_pending
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "nothing was ever left unacknowledged to kill the owner with"
        );
    }
    let killed_at = now_ns();
    replicas
        .iter_mut()
        .find(|r| r.name == killed)
        .unwrap()
        .kill();
    let info = runtime.block_on(common::consumer_info(&server, &bus, &topic()));
    let pending_at_kill = info.num_ack_pending as u64;
    // In events: a record batch left unacknowledged holds several.
    let replayable_at_kill =
        runtime.block_on(common::events_above_ack_floor(&server, &bus, &topic()));
    assert!(
        pending_at_kill > 0,
        "the kill left nothing unacknowledged; the takeover path is not exercised"
    );

    // 2. A standby takes over.
    let successor = owner(&mut replicas, "after the kill").name.clone();
    assert_ne!(successor, killed);
    let handled_so_far = unique_handled(&replicas.iter().collect::<Vec<_>>());

    // 3. A rolling deploy starts a new replica, then closes the owner gracefully.
    replicas.push(Replica::spawn("d", &url, &dir));
    replicas.last().unwrap().wait("became ready", |s| s.ready);
    wait_handled(&replicas.iter().collect::<Vec<_>>(), handled_so_far + 2_000);
    let closed_at = now_ns();
    let close_report = replicas
        .iter_mut()
        .find(|r| r.name == successor)
        .unwrap()
        .close();
    assert!(close_report.contains("returned 0"), "{close_report}");
    let close_returned_at: u128 = close_report.rsplit(' ').next().unwrap().parse().unwrap();
    let third = owner(&mut replicas, "after the graceful close")
        .name
        .clone();
    assert_ne!(third, successor);
    let handled_so_far = unique_handled(&replicas.iter().collect::<Vec<_>>());
    wait_handled(&replicas.iter().collect::<Vec<_>>(), handled_so_far + 1_000);

    stop_publishing.store(true, std::sync::atomic::Ordering::SeqCst);
    let versions = runtime
        .block_on(async { tokio::time::timeout(STEP, publisher).await })
        .expect("publishing finished")
        .unwrap();
    let expected = AGGREGATES * versions;
    wait_handled(&replicas.iter().collect::<Vec<_>>(), expected);
    for r in replicas.iter_mut() {
        if r.name != killed && r.name != successor {
            r.close();
        }
    }
    for r in &replicas {
        if r.name == successor || r.name == third {
            assert!(
                r.gained() > gained_before.get(&r.name).copied().unwrap_or(0),
                "replica {} never gained the topic",
                r.name
            );
        }
    }

    // The history across every process.
    let all = calls(&replicas.iter().collect::<Vec<_>>());
    let h = history(&all, "replicated");
    let (report, overlaps, in_process_disorder, duplicates_by) = (
        h.report.clone(),
        h.overlaps,
        h.in_process_disorder,
        h.duplicates_by.clone(),
    );
    let takeover_kill = first_call_after(&successor, killed_at, &all)
        .map(|t| Duration::from_nanos((t - killed_at) as u64));
    let closing = Duration::from_nanos((close_returned_at - closed_at) as u64);
    let takeover_close = first_call_after(&third, close_returned_at, &all)
        .map(|t| Duration::from_nanos((t - close_returned_at) as u64));
    println!(
        "replicas: killed {killed} with {pending_at_kill} unacknowledged; {successor} took over \
         after {takeover_kill:?} (takeover_after {TAKEOVER_AFTER:?}); {successor} closed in {closing:?} \
         (handling what it had fetched) and {third} took over {takeover_close:?} later; {report:?}; overlapping calls {overlaps}; repeats by \
         process {duplicates_by:?}"
    );
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.broken_replays, 0, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    // The standby took over by itself once the dead owner's claim ran out, and at once after
    // the graceful close (the claim released, not run out).
    let takeover_kill = takeover_kill.expect("nobody handled anything after the kill");
    assert!(
        takeover_kill < TAKEOVER_AFTER * 3,
        "taken over {takeover_kill:?} after the kill"
    );
    let takeover_close = takeover_close.expect("nobody handled anything after the close");
    assert!(
        takeover_close < TAKEOVER_AFTER / 2,
        "taken over {takeover_close:?} after the close"
    );
    assert_eq!(report.lost(expected), 0, "{report:?}");
    assert_eq!(
        overlaps, 0,
        "calls for one aggregate overlapped across processes"
    );
    assert_eq!(
        in_process_disorder, 0,
        "a process handled an aggregate's events out of order"
    );
    // Repeats only by the process that took over after the kill, of what the killed one
    // left unacknowledged; none after the graceful handover.
    for (process, count) in &duplicates_by {
        assert_eq!(process, &successor, "{process} repeated {count} events");
        assert!(
            *count <= replayable_at_kill,
            "{count} repeats, {replayable_at_kill} events were unacknowledged"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
