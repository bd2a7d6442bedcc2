//! A consumer process is killed with SIGKILL while thousands of messages over many aggregates
//! are in flight; a new consumer then starts at once. JetStream would hand the new consumer
//! newer messages immediately and the dead one's unacknowledged messages only after AckWait
//! (30 s), so a naive design handles version 7 before the redelivered 6. The bus restarts
//! delivery at the ack floor instead: every aggregate stays in order, nothing is lost, and the
//! only duplicates are in-order replays of events the dead process handled but never acked.
//!
//! Run under the default work-queue retention and under `Retention::Acknowledged`, where the
//! replays also include handled events above the ack floor, and with record batches, where the
//! kill lands in the middle of batches whose events run on different workers.
//!
//! This binary is its own child: run with `BUS_CRASH_CHILD_URL` set, it is the consumer that
//! gets killed.

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{handler_fn, Envelope, Publisher, SubscribeErrorKind, Subscriber, Topic};
use bus_nats::{default_stream_name, NatsBus, NatsConfig, Retention, StreamSpec};
use bus_testkit::conformance::{subscribe_recording, Recorder};
use bus_testkit::NatsServer;

const AGGREGATES: u64 = 100;
const VERSIONS: u64 = 100;
const KILL_AFTER: usize = 3_000;

fn topic() -> Topic {
    Topic::new("crash").unwrap()
}

/// The tests' configuration with the topic's stream kept by `retention`.
fn config(url: &str, retention: Retention, batched: bool) -> NatsConfig {
    let mut config = common::test_config(url);
    if batched {
        config.batching.max_events = 32;
    } else {
        config.batching = bus_nats::BatchConfig::off();
    }
    // Quick takeovers: the next subscriber waits this long for the dead one's claim.
    config.consumer.takeover_after = Duration::from_secs(2);
    let mut spec = StreamSpec::new(default_stream_name(&topic()), [topic()]);
    spec.retention = retention;
    config.streams.push(spec);
    config
}

fn retention_named(name: &str) -> Retention {
    match name {
        "WorkQueue" => Retention::WorkQueue,
        "Acknowledged" => Retention::Acknowledged,
        other => panic!("unexpected retention {other}"),
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(url) = std::env::var("BUS_CRASH_CHILD_URL") {
        let log = std::env::var("BUS_CRASH_CHILD_LOG").expect("child log path");
        let retention = std::env::var("BUS_CRASH_CHILD_RETENTION").expect("child retention");
        let batched = std::env::var("BUS_CRASH_CHILD_BATCHED").is_ok();
        runtime.block_on(child(url, log, retention_named(&retention), batched));
        return;
    }
    println!("running 4 tests");
    for retention in [Retention::WorkQueue, Retention::Acknowledged] {
        runtime.block_on(consumer_killed_mid_stream(
            retention,
            Server::Current,
            false,
        ));
        println!("test consumer_killed_mid_stream ({retention:?}) ... ok");
    }
    runtime.block_on(consumer_killed_mid_stream(
        Retention::WorkQueue,
        Server::Old,
        false,
    ));
    println!("test consumer_killed_mid_stream (WorkQueue, old server) ... ok");
    runtime.block_on(consumer_killed_mid_stream(
        Retention::WorkQueue,
        Server::Current,
        true,
    ));
    println!("test consumer_killed_mid_stream (WorkQueue, record batches) ... ok");
    println!("\ncrash_nats: 4 passed, 0 failed");
}

/// The consumer that gets killed: records every handled event in a log, one line each.
async fn child(url: String, log: String, retention: Retention, batched: bool) {
    let bus = NatsBus::connect(config(&url, retention, batched))
        .await
        .unwrap();
    let file = Arc::new(Mutex::new(std::fs::File::create(log).unwrap()));
    let _subscription = bus
        .subscribe(
            &topic(),
            Arc::new(handler_fn(move |e: Envelope| {
                let file = file.clone();
                async move {
                    // Some work, so that many messages are in flight when the kill comes.
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    let line = format!("{} {}\n", e.aggregate_id(), e.event_version());
                    file.lock().unwrap().write_all(line.as_bytes()).unwrap();
                    Ok(())
                }
            })),
        )
        .await
        .unwrap();
    std::future::pending::<()>().await;
}

/// Which nats-server runs the test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// The current one (2.14+): a standby takes over after `takeover_after`.
    Current,
    /// Debian's 2.9: no priority groups, no consumer reset API. Ownership is a lease; a second
    /// subscriber is refused while it is held, and recovery deletes and recreates the consumer.
    Old,
}

async fn consumer_killed_mid_stream(retention: Retention, which: Server, batched: bool) {
    let server = match which {
        Server::Current => NatsServer::start(),
        Server::Old => NatsServer::start_old(),
    };
    let bus = NatsBus::connect(config(&server.url(), retention, batched))
        .await
        .unwrap();
    for version in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let event = Envelope::builder(format!("k-{a}"), "Tested", version)
                .build()
                .unwrap();
            let _receipt = bus.publish(&topic(), event).await.unwrap();
        }
    }
    bus.flush().await.unwrap();
    let expected = AGGREGATES * VERSIONS;

    let log = tempfile_path();
    let mut command = Command::new(std::env::current_exe().unwrap());
    if batched {
        command.env("BUS_CRASH_CHILD_BATCHED", "1");
    }
    let mut child = command
        .env("BUS_CRASH_CHILD_URL", server.url())
        .env("BUS_CRASH_CHILD_LOG", &log)
        .env("BUS_CRASH_CHILD_RETENTION", format!("{retention:?}"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Wait, bounded, until the child has handled enough; it is another process, so its log is
    // the only signal there is.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_lines(&log) < KILL_AFTER {
        assert!(
            Instant::now() < deadline,
            "child handled only {} events",
            count_lines(&log)
        );
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL: no close, no acks
    child.wait().unwrap();

    let recorder = Recorder::new();
    let mut handled_by_child = 0;
    for line in std::io::BufReader::new(std::fs::File::open(&log).unwrap()).lines() {
        let line = line.unwrap();
        let (aggregate, version) = line.split_once(' ').unwrap();
        recorder
            .verifier
            .record(topic().as_str(), aggregate, version.parse().unwrap());
        handled_by_child += 1;
    }
    assert!(
        handled_by_child < expected as usize,
        "the kill came after the end"
    );

    // The crash left delivered, unacknowledged messages: the path under test is taken.
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(bus.stream_name(&topic()).await.unwrap())
        .await
        .unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&bus.config().consumer_name(&topic()))
        .await
        .unwrap();
    let info = consumer.info().await.unwrap().clone();
    let pending = info.num_ack_pending;
    assert!(pending > 0, "the crash left nothing unacknowledged");
    // What delivery restarts from: under work-queue retention only the unacknowledged
    // messages are still there; otherwise everything above the ack floor is.
    let mut replayable = match retention {
        Retention::WorkQueue => pending as u64,
        _ => info.delivered.stream_sequence - info.ack_floor.stream_sequence,
    };
    if batched {
        let stored = stream.clone().info().await.unwrap().state.last_sequence;
        assert!(
            stored * 4 < expected,
            "{expected} events in {stored} messages: batches did not form"
        );
        // In events: what the messages above the ack floor hold.
        replayable = common::events_above_ack_floor(&server, &bus, &topic()).await;
    }

    // A new consumer starts at once, well inside AckWait.
    let subscription = match which {
        Server::Current => subscribe_recording(&bus, &topic(), &recorder).await,
        Server::Old => {
            // The dead process's lease still stands: refused, saying why and for how long.
            let refused = common::subscribe_ignoring(&bus, &topic())
                .await
                .unwrap_err();
            assert_eq!(
                refused.kind(),
                SubscribeErrorKind::AlreadySubscribed,
                "{refused}"
            );
            let why = format!(
                "{refused}: {}",
                std::error::Error::source(&refused).unwrap()
            );
            assert!(why.contains("2.9.10") && why.contains("2.14"), "{why}");
            println!("old server, while the lease stands: {why}");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let recorder = recorder.clone();
                let handler = Arc::new(handler_fn(move |e: Envelope| {
                    let recorder = recorder.clone();
                    async move {
                        recorder.record(&topic(), &e);
                        Ok(())
                    }
                }));
                match bus.subscribe(&topic(), handler).await {
                    Ok(subscription) => break subscription,
                    Err(e) if e.kind() == SubscribeErrorKind::AlreadySubscribed => {
                        assert!(Instant::now() < deadline, "the lease never ran out: {e}")
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    };
    recorder
        .wait_until("every event", Duration::from_secs(20), |r| {
            r.unique >= expected
        })
        .await;
    subscription.close().await.unwrap();
    let report = recorder.verifier.report();
    println!(
        "consumer crash ({retention:?}, {which:?} server, batched: {batched}): child handled {handled_by_child} then was killed with \
         {pending} unacknowledged, {replayable} replayable; after restart: {report:?}"
    );
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    assert_eq!(report.lost(expected), 0, "{report:?}");
    // Replays are only of what the dead process had in flight.
    assert!(report.duplicates <= replayable, "{report:?}");
    let _ = std::fs::remove_file(&log);
}

fn tempfile_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("bus-crash-child-{}.log", std::process::id()))
}

fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}
