//! Consumer processes are killed with SIGKILL one after another while thousands of messages over
//! many aggregates are in flight; each time a new process of the same group starts at once.
//! JetStream would hand the new consumer newer messages immediately and the dead one's
//! unacknowledged messages only after AckWait (30 s), so a naive design handles version 7
//! before the redelivered 6. And with record batches, a later batch finished first could be
//! acknowledged (and removed from a work-queue stream) while an earlier batch holding an older
//! event of one of its aggregates waits: the successor would handle that old event again after
//! the newer ones.
//!
//! What every aggregate's handled versions must look like, read across the processes' logs in
//! the order the processes ran: in order, nothing lost, and a replay only ever a contiguous run
//! that goes back and runs forward to where the dead process stopped (`broken_replays`, counted
//! by the sequence verifier, is the failure above). Replays stay within what the dead process
//! left unacknowledged.
//!
//! Cases: work-queue and acknowledged retention, batched and unbatched, on the current server
//! and on servers before 2.14 (2.9, 2.10, 2.12), where a restarted process waits as a standby
//! for the dead one's lease. Each case runs several rounds (`BUS_CRASH_ROUNDS`, default 2) of three kills, at 30 %, 50 %
//! and 70 % of the events. `BUS_CRASH_ONLY` picks cases by a part of their name.
//!
//! This binary is its own child: run with `BUS_CRASH_CHILD_URL` set, it is a consumer that gets
//! killed.

mod common;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{handler_fn, Envelope, Publisher, Subscriber, Topic};
use bus_nats::{default_stream_name, NatsBus, NatsConfig, Retention, StreamSpec};
use bus_testkit::{OlderServer, SequenceVerifier, TestServer, VerifierReport};

const AGGREGATES: u64 = 200;
const VERSIONS: u64 = 100;
/// How long a successor waits for a dead consumer's claim (pin or lease).
const TAKEOVER_AFTER: Duration = Duration::from_secs(2);
/// Where the consumers are killed, as a share of the events.
const KILLS: [f64; 3] = [0.3, 0.5, 0.7];

fn topic() -> Topic {
    Topic::new("crash").unwrap()
}

/// The tests' configuration with the topic's stream kept by `retention`.
fn config(url: &str, retention: Retention, batched: bool) -> NatsConfig {
    let mut config = common::test_config(url);
    if !batched {
        config.batching = bus_nats::BatchConfig::off();
    }
    // Quick takeovers: the next subscriber waits this long for the dead one's claim.
    config.consumer.takeover_after = TAKEOVER_AFTER;
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

struct Case {
    retention: Retention,
    server: TestServer,
    batched: bool,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{:?}-{}-{}",
            self.retention,
            self.server.name(),
            if self.batched { "batched" } else { "unbatched" }
        )
        .to_lowercase()
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
    let rounds: usize = std::env::var("BUS_CRASH_ROUNDS")
        .map(|r| r.parse().expect("BUS_CRASH_ROUNDS is a number"))
        .unwrap_or(2);
    let only = std::env::var("BUS_CRASH_ONLY").unwrap_or_default();
    let cases = [
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Current,
            batched: true,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Current,
            batched: false,
        },
        Case {
            retention: Retention::Acknowledged,
            server: TestServer::Current,
            batched: true,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Older(OlderServer::V2_9),
            batched: true,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Older(OlderServer::V2_9),
            batched: false,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Older(OlderServer::V2_10),
            batched: true,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Older(OlderServer::V2_12),
            batched: true,
        },
    ];
    let cases: Vec<&Case> = cases
        .iter()
        .filter(|c| c.name().contains(&only))
        .filter(|c| match c.server.not_run() {
            Some(why) => {
                eprintln!("NOT RUN: consumers_killed_in_turn ({}): {why}", c.name());
                false
            }
            None => true,
        })
        .collect();
    println!("running {} tests of {rounds} rounds", cases.len());
    for case in &cases {
        let mut total = Totals::default();
        for round in 1..=rounds {
            let outcome = runtime.block_on(consumers_killed_in_turn(case));
            println!("  {} round {round}: {outcome}", case.name());
            total.add(&outcome);
        }
        assert!(
            total.replays > 0,
            "{}: no kill was followed by a replay in {rounds} rounds; the path under test was not taken",
            case.name()
        );
        println!(
            "test consumers_killed_in_turn ({}) ... ok: {rounds} rounds, {} kills, {} replays, 0 broken, {} events replayed of {} left unacknowledged",
            case.name(),
            total.kills,
            total.replays,
            total.duplicates,
            total.replayable
        );
    }
    println!("\ncrash_nats: {} passed, 0 failed", cases.len());
}

#[derive(Default)]
struct Totals {
    kills: u64,
    replays: u64,
    duplicates: u64,
    replayable: u64,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        self.kills += o.kills;
        self.replays += o.report.replays;
        self.duplicates += o.report.duplicates;
        self.replayable += o.replayable;
    }
}

struct Outcome {
    /// From each kill to the first event its successor handled (its start included).
    takeovers: Vec<Duration>,
    kills: u64,
    /// Events in what the killed processes left unacknowledged, summed over the kills.
    replayable: u64,
    report: VerifierReport,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.report;
        write!(
            f,
            "{} kills, taken over after {:.1?}; handled {} ({} unique), {} replays of {} events (of {} left unacknowledged), {} broken, {} violations, {} gaps",
            self.kills,
            self.takeovers,
            r.handled,
            r.unique,
            r.replays,
            r.duplicates,
            self.replayable,
            r.broken_replays,
            r.order_violations,
            r.gaps
        )
    }
}

/// A consumer in its own process: records every handled event in its log, one line each, before
/// its handler returns (so before the event can be acknowledged).
async fn child(url: String, log: String, retention: Retention, batched: bool) {
    // `RUST_LOG` shows what each consumer did, on the test's standard error.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
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

/// A child consumer process, killed when dropped (a failing assertion must not leave it behind).
struct Consumer(Child);

impl Consumer {
    fn kill(&mut self) {
        let _ = self.0.kill(); // SIGKILL: no close, no acks
        let _ = self.0.wait();
    }

    fn assert_running(&mut self) {
        assert!(self.0.try_wait().unwrap().is_none(), "a child exited early");
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_child(url: &str, log: &Path, case: &Case) -> Consumer {
    let mut command = Command::new(std::env::current_exe().unwrap());
    if case.batched {
        command.env("BUS_CRASH_CHILD_BATCHED", "1");
    }
    command
        .env("BUS_CRASH_CHILD_URL", url)
        .env("BUS_CRASH_CHILD_LOG", log)
        .env("BUS_CRASH_CHILD_RETENTION", format!("{:?}", case.retention))
        .stdout(Stdio::null())
        .spawn()
        .map(Consumer)
        .unwrap()
}

/// Every log, in the order its process ran, read into one verifier.
fn verify(logs: &[PathBuf]) -> VerifierReport {
    let verifier = SequenceVerifier::new();
    for log in logs {
        let Ok(file) = std::fs::File::open(log) else {
            continue;
        };
        for line in std::io::BufReader::new(file).lines() {
            let line = line.unwrap();
            // A kill can cut the last line short.
            let Some((aggregate, version)) = line.split_once(' ') else {
                continue;
            };
            let Ok(version) = version.parse() else {
                continue;
            };
            verifier.record(topic().as_str(), aggregate, version);
        }
    }
    verifier.report()
}

fn count_lines(logs: &[PathBuf]) -> u64 {
    logs.iter()
        .map(|path| {
            std::fs::read(path)
                .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
                .unwrap_or(0)
        })
        .sum()
}

async fn consumers_killed_in_turn(case: &Case) -> Outcome {
    let server = case.server.start();
    let bus = NatsBus::connect(config(&server.url(), case.retention, case.batched))
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
    if case.batched {
        let stored = common::stream_last_sequence(&server, &bus, &topic()).await;
        assert!(
            stored * 4 < expected,
            "{expected} events in {stored} messages: batches did not form"
        );
    }

    let dir =
        std::env::temp_dir().join(format!("bus-crash-{}-{}", std::process::id(), case.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut logs: Vec<PathBuf> = vec![dir.join("0.log")];
    let mut child = spawn_child(&server.url(), &logs[0], case);
    let mut replayable = 0;
    let mut takeovers = Vec::new();
    for share in KILLS {
        // Bounded: the children are other processes, so their logs are the only signal.
        let target = (expected as f64 * share) as u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while count_lines(&logs) < target {
            assert!(
                Instant::now() < deadline,
                "{}: the consumers handled only {} events of {target} in 60 s",
                case.name(),
                count_lines(&logs)
            );
            child.assert_running();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill();
        // The kill left delivered, unacknowledged messages: the path under test is taken.
        let info = common::consumer_info(&server, &bus, &topic()).await;
        assert!(
            info.num_ack_pending > 0,
            "{}: the kill left nothing unacknowledged: {info:?}",
            case.name()
        );
        // What a successor may replay: the events of the messages above the ack floor that
        // are still stored.
        replayable += common::events_above_ack_floor(&server, &bus, &topic()).await;
        // A new consumer at once, well inside AckWait; it takes over once the dead one's pin or
        // lease runs out (`takeover_after`), by itself.
        let killed = Instant::now();
        logs.push(dir.join(format!("{}.log", logs.len())));
        child = spawn_child(&server.url(), logs.last().unwrap(), case);
        while count_lines(&logs[logs.len() - 1..]) == 0 {
            assert!(
                killed.elapsed() < TAKEOVER_AFTER * 3,
                "{}: the new consumer handled nothing {:?} after the kill",
                case.name(),
                killed.elapsed()
            );
            child.assert_running();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        takeovers.push(killed.elapsed());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let report = verify(&logs);
        if report.unique >= expected {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "{}: only {} of {expected} events handled 60 s after the last kill: {report:?}",
            case.name(),
            report.unique
        );
        child.assert_running();
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    child.kill();
    let outcome = Outcome {
        takeovers,
        kills: KILLS.len() as u64,
        replayable,
        report,
    };
    let r = &outcome.report;
    assert_eq!(r.broken_replays, 0, "{}: {outcome}", case.name());
    assert_eq!(r.order_violations, 0, "{}: {outcome}", case.name());
    assert_eq!(r.gaps, 0, "{}: {outcome}", case.name());
    assert_eq!(r.lost(expected), 0, "{}: {outcome}", case.name());
    // Replays are only of what the dead processes left unacknowledged.
    assert!(r.duplicates <= replayable, "{}: {outcome}", case.name());
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}
