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
//! for the dead one's lease, and with that lease on the current server (`Ownership::Lease`,
//! work-queue and acknowledged); each case checks which of the two held the consumer, and how
//! the takeovers restarted delivery: by the consumer reset API on the current server (the
//! consumer is the one first created), by deleting and recreating it on the older ones. Two more wrap the handler in `HandledOnce`: with the handled
//! versions kept in the same write as the handler's effect (its log line), every version is
//! handled exactly once across the kills, no replay at all; with them in NATS KV (written after
//! the handler), no version is handled again once its record was stored, and the successors
//! skipped what was recorded (both counted: the path under test was taken). One more runs the
//! consumers' subscriptions on threads of their own (`SubscriptionRuntime::OwnThread`,
//! work-queue batched on the current server). Each case runs several rounds (`BUS_CRASH_ROUNDS`, default 2) of three kills, at 30 %, 50 %
//! and 70 % of the events. `BUS_CRASH_ONLY` picks cases by a part of their name.
//!
//! And an owner *stopped* (SIGSTOP) with thousands of events queued, taken over, then run
//! again must not handle what it had queued (`an_owner_stopped_past_its_claim_handles_nothing_when_it_runs_again`,
//! work-queue batched cases on the current server, the own-thread one included, and 2.12).
//! `BUS_CRASH_KIND=kill` or `stop`
//! runs only the one kind.
//!
//! This binary is its own child: run with `BUS_CRASH_CHILD_URL` set, it is a consumer that gets
//! killed.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PriorityPolicy;
use bus_core::{
    handler_fn, Envelope, HandledOnce, HandledVersions, HandlerError, Publisher, Subscriber, Topic,
};
use bus_nats::{
    default_stream_name, NatsBus, NatsConfig, NatsHandledVersions, Ownership, Retention, StreamSpec,
};
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
fn config(url: &str, retention: Retention, batched: bool, lease: bool) -> NatsConfig {
    let mut config = common::test_config(url);
    if lease {
        config.consumer.ownership = Ownership::Lease;
    }
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
    once: Once,
    /// `consumer.ownership` Lease: the lease on a server that has the pinned group too.
    lease: bool,
    /// The consumers' subscriptions on a thread of their own (`SubscriptionRuntime::OwnThread`).
    own_thread: bool,
}

/// Whether and where the consumers keep the versions they handled (`HandledOnce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Once {
    Off,
    /// In the handler's own write: the log line is the record.
    Log,
    /// In the group's NATS KV bucket, written after the handler succeeded.
    Kv,
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
            + match self.once {
                Once::Off => "",
                Once::Log => "-handled-once-in-the-log",
                Once::Kv => "-handled-once-in-kv",
            }
            + if self.lease { "-lease" } else { "" }
            + if self.own_thread { "-own-thread" } else { "" }
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
        let lease = std::env::var("BUS_CRASH_CHILD_LEASE").is_ok();
        let once = match std::env::var("BUS_CRASH_CHILD_ONCE").as_deref() {
            Ok("log") => Once::Log,
            Ok("kv") => Once::Kv,
            _ => Once::Off,
        };
        runtime.block_on(child(
            url,
            log,
            retention_named(&retention),
            batched,
            once,
            lease,
        ));
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
            once: Once::Off,
            lease: false,
            own_thread: false,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Current,
            batched: true,
            once: Once::Off,
            lease: true,
            own_thread: false,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Current,
            batched: false,
            once: Once::Off,
            lease: false,
            own_thread: false,
        },
        Case {
            retention: Retention::Acknowledged,
            server: TestServer::Current,
            batched: true,
            once: Once::Off,
            lease: false,
            own_thread: false,
        },
        Case {
            retention: Retention::Acknowledged,
            server: TestServer::Current,
            batched: true,
            once: Once::Off,
            lease: true,
            own_thread: false,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Older(OlderServer::V2_9),
            batched: true,
            once: Once::Off,
            lease: false,
            own_thread: false,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Older(OlderServer::V2_9),
            batched: false,
            once: Once::Off,
            lease: false,
            own_thread: false,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Older(OlderServer::V2_10),
            batched: true,
            once: Once::Off,
            lease: false,
            own_thread: false,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Older(OlderServer::V2_12),
            batched: true,
            once: Once::Off,
            lease: false,
            own_thread: false,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Current,
            batched: true,
            once: Once::Log,
            lease: false,
            own_thread: false,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Current,
            batched: true,
            once: Once::Kv,
            lease: false,
            own_thread: false,
        },
        Case {
            retention: Retention::WorkQueue,
            server: TestServer::Current,
            batched: true,
            once: Once::Off,
            lease: false,
            own_thread: true,
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
    // Stopped owners, on the current server with either ownership and on 2.12's lease.
    // `BUS_CRASH_KIND` (`kill` or `stop`) runs only those.
    let kind = std::env::var("BUS_CRASH_KIND").unwrap_or_default();
    let paused: Vec<&Case> = cases
        .iter()
        .copied()
        .filter(|_| kind != "kill")
        .filter(|c| c.once == Once::Off && c.batched && c.retention == Retention::WorkQueue)
        .filter(|c| {
            !matches!(
                c.server,
                TestServer::Older(OlderServer::V2_9 | OlderServer::V2_10)
            )
        })
        .collect();
    let cases: Vec<&Case> = cases.into_iter().filter(|_| kind != "stop").collect();
    println!(
        "running {} tests of {rounds} rounds",
        cases.len() + paused.len()
    );
    for case in &paused {
        for round in 1..=rounds {
            let (late, report) = runtime.block_on(owner_paused(case));
            println!(
                "  {} round {round}: the stopped owner started {late} handlers after it ran again; {report:?}",
                case.name()
            );
            assert!(
                late <= 2,
                "{}: the old owner handled {late} events after its successor took over",
                case.name()
            );
            assert_eq!(
                (report.order_violations, report.broken_replays, report.gaps),
                (0, 0, 0),
                "{}: {report:?}",
                case.name()
            );
        }
        println!(
            "test an_owner_stopped_past_its_claim_handles_nothing_when_it_runs_again ({}) ... ok: {rounds} rounds",
            case.name()
        );
    }
    for case in &cases {
        let mut total = Totals::default();
        for round in 1..=rounds {
            let outcome = runtime.block_on(consumers_killed_in_turn(case));
            println!("  {} round {round}: {outcome}", case.name());
            total.add(&outcome);
        }
        if case.once == Once::Off {
            assert!(
                total.replays > 0,
                "{}: no kill was followed by a replay in {rounds} rounds; the path under test was not taken",
                case.name()
            );
        } else {
            assert!(
                total.skipped > 0,
                "{}: no successor skipped a handled version in {rounds} rounds; the path under test was not taken",
                case.name()
            );
        }
        println!(
            "test consumers_killed_in_turn ({}) ... ok: {rounds} rounds, {} kills, {} replays, 0 broken, {} events replayed of {} left unacknowledged{}",
            case.name(),
            total.kills,
            total.replays,
            total.duplicates,
            total.replayable,
            if case.once == Once::Off {
                String::new()
            } else {
                format!(", {} skipped as handled", total.skipped)
            }
        );
    }
    println!(
        "\ncrash_nats: {} passed, 0 failed",
        cases.len() + paused.len()
    );
}

#[derive(Default)]
struct Totals {
    skipped: u64,
    kills: u64,
    replays: u64,
    duplicates: u64,
    replayable: u64,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        self.kills += o.kills;
        self.skipped += o.skipped.unwrap_or(0);
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
    /// Deliveries the consumers skipped as handled (`HandledOnce`), as far as they reported;
    /// `None` when they kept no handled versions.
    skipped: Option<u64>,
    report: VerifierReport,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.report;
        write!(
            f,
            "{} kills, taken over after {:.1?}; handled {} ({} unique), {} replays of {} events (of {} left unacknowledged), {} broken, {} violations, {} gaps{}",
            self.kills,
            self.takeovers,
            r.handled,
            r.unique,
            r.replays,
            r.duplicates,
            self.replayable,
            r.broken_replays,
            r.order_violations,
            r.gaps,
            self.skipped
                .map(|s| format!(", {s} skipped as handled"))
                .unwrap_or_default()
        )
    }
}

/// A consumer in its own process: records every handled event in its log, one line each, before
/// its handler returns (so before the event can be acknowledged). With `HandledOnce`, it also
/// writes how many deliveries it skipped to `<log>.skipped` every few milliseconds, and with
/// the KV store an `R <aggregate> <version>` line once a version's record is stored.
async fn child(
    url: String,
    log: String,
    retention: Retention,
    batched: bool,
    once: Once,
    lease: bool,
) {
    // `RUST_LOG` shows what each consumer did, on the test's standard error.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let mut config = config(&url, retention, batched, lease);
    let own_thread = std::env::var("BUS_CRASH_CHILD_OWN_THREAD").is_ok();
    if own_thread {
        config.subscription_runtime = bus_nats::SubscriptionRuntime::OwnThread;
    }
    let bus = NatsBus::connect(config).await.unwrap();
    let log = PathBuf::from(log);
    let store = Arc::new(LogStore::open(&log));
    // With `BUS_CRASH_CHILD_AT_START` the line is written when the handler starts: a handler
    // running when the process is stopped has written its line already.
    let at_start = std::env::var("BUS_CRASH_CHILD_AT_START").is_ok();
    let handler = {
        let store = store.clone();
        Arc::new(handler_fn(move |e: Envelope| {
            let store = store.clone();
            // Off the subscription's thread the event is dead-lettered, not logged: the case
            // then fails with events lost.
            let thread = std::thread::current();
            assert!(
                !own_thread || thread.name().is_some_and(|n| n.starts_with("bus:")),
                "handled on `{:?}`, not the subscription's own thread",
                thread.name()
            );
            async move {
                if at_start {
                    store.handled(e.aggregate_id(), e.event_version());
                }
                // Some work, so that many messages are in flight when the kill comes.
                tokio::time::sleep(Duration::from_micros(200)).await;
                if !at_start {
                    store.handled(e.aggregate_id(), e.event_version());
                }
                Ok(())
            }
        }))
    };
    let skipped: Option<Box<dyn Fn() -> u64 + Send + Sync>>;
    let _subscription = match once {
        Once::Off => {
            skipped = None;
            bus.subscribe(&topic(), handler).await.unwrap()
        }
        Once::Log => {
            let once = Arc::new(HandledOnce::new(store.clone(), handler));
            let counter = once.clone();
            skipped = Some(Box::new(move || counter.skipped()));
            bus.subscribe(&topic(), once).await.unwrap()
        }
        Once::Kv => {
            let kv = NatsHandledVersions::open(&bus, &topic()).await.unwrap();
            let once = Arc::new(HandledOnce::new(
                Recorded {
                    inner: kv,
                    log: store.clone(),
                },
                handler,
            ));
            let counter = once.clone();
            skipped = Some(Box::new(move || counter.skipped()));
            bus.subscribe(&topic(), once).await.unwrap()
        }
    };
    // Every few milliseconds: how often the subscription lost its topic, and with
    // `HandledOnce` how many deliveries it skipped.
    let lost = log.with_extension("lost");
    let skipped_path = log.with_extension("skipped");
    let control = _subscription
        .control()
        .expect("NATS subscriptions have control");
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        std::fs::write(&lost, control.metrics().ownership_lost.to_string()).unwrap();
        if let Some(skipped) = &skipped {
            std::fs::write(&skipped_path, skipped().to_string()).unwrap();
        }
    }
}

/// A child's log, which is also its store of handled versions: the line a handler writes is
/// the record, in one write (the handler's effect and the version together). Opened with what
/// the earlier processes' logs (in the same directory) hold.
struct LogStore {
    state: Mutex<(std::fs::File, std::collections::HashMap<String, u64>)>,
}

impl LogStore {
    fn open(log: &Path) -> Self {
        let mut versions = std::collections::HashMap::new();
        for earlier in std::fs::read_dir(log.parent().unwrap()).unwrap() {
            let path = earlier.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") && path != log {
                for (aggregate, version) in handled_lines(&path) {
                    let last = versions.entry(aggregate).or_insert(0);
                    *last = version.max(*last);
                }
            }
        }
        Self {
            state: Mutex::new((std::fs::File::create(log).unwrap(), versions)),
        }
    }

    /// The handler's effect: its line, and the version with it.
    fn handled(&self, aggregate: &bus_core::AggregateId, version: u64) {
        let mut state = self.state.lock().unwrap();
        let line = format!("{aggregate} {version}\n");
        state.0.write_all(line.as_bytes()).unwrap();
        let last = state.1.entry(aggregate.to_string()).or_insert(0);
        *last = version.max(*last);
    }

    fn write_line(&self, line: &str) {
        self.state
            .lock()
            .unwrap()
            .0
            .write_all(line.as_bytes())
            .unwrap();
    }
}

#[async_trait::async_trait]
impl HandledVersions for LogStore {
    async fn last_handled(
        &self,
        aggregate: &bus_core::AggregateId,
    ) -> Result<Option<u64>, HandlerError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .1
            .get(aggregate.as_str())
            .copied())
    }

    /// Written by the handler, with its line.
    async fn record_handled(
        &self,
        _aggregate: &bus_core::AggregateId,
        _version: u64,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// The KV store, with an `R` line in the log once a record is stored.
struct Recorded {
    inner: NatsHandledVersions,
    log: Arc<LogStore>,
}

#[async_trait::async_trait]
impl HandledVersions for Recorded {
    async fn last_handled(
        &self,
        aggregate: &bus_core::AggregateId,
    ) -> Result<Option<u64>, HandlerError> {
        self.inner.last_handled(aggregate).await
    }

    async fn record_handled(
        &self,
        aggregate: &bus_core::AggregateId,
        version: u64,
    ) -> Result<(), HandlerError> {
        self.inner.record_handled(aggregate, version).await?;
        self.log.write_line(&format!("R {aggregate} {version}\n"));
        Ok(())
    }
}

/// The complete `<aggregate> <version>` lines of a log (a kill can cut the last one short).
fn handled_lines(path: &Path) -> Vec<(String, u64)> {
    log_lines(path)
        .into_iter()
        .filter_map(|line| match line {
            Line::Handled(aggregate, version) => Some((aggregate, version)),
            Line::Recorded(..) => None,
        })
        .collect()
}

enum Line {
    Handled(String, u64),
    Recorded(String, u64),
}

/// The complete lines of a log, in order.
fn log_lines(path: &Path) -> Vec<Line> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter_map(|line| {
            let line = line.trim_end();
            let (recorded, line) = match line.strip_prefix("R ") {
                Some(rest) => (true, rest),
                None => (false, line),
            };
            let (aggregate, version) = line.split_once(' ')?;
            let version = version.parse().ok()?;
            Some(if recorded {
                Line::Recorded(aggregate.to_owned(), version)
            } else {
                Line::Handled(aggregate.to_owned(), version)
            })
        })
        .collect()
}

/// Versions handled again after their record was stored (read across the logs in the order
/// their processes ran): what the KV store promises never happens.
fn handled_after_recorded(logs: &[PathBuf]) -> Vec<(String, u64)> {
    let mut recorded: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut again = Vec::new();
    for log in logs {
        for line in log_lines(log) {
            match line {
                Line::Recorded(aggregate, version) => {
                    let last = recorded.entry(aggregate).or_insert(0);
                    *last = version.max(*last);
                }
                Line::Handled(aggregate, version) => {
                    if recorded.get(&aggregate).is_some_and(|r| *r >= version) {
                        again.push((aggregate, version));
                    }
                }
            }
        }
    }
    again
}

fn skipped_of(logs: &[PathBuf]) -> u64 {
    logs.iter()
        .filter_map(|log| std::fs::read_to_string(log.with_extension("skipped")).ok())
        .filter_map(|count| count.trim().parse::<u64>().ok())
        .sum()
}

/// A child consumer process, killed when dropped (a failing assertion must not leave it behind).
struct Consumer(Child);

impl Consumer {
    fn kill(&mut self) {
        let _ = self.0.kill(); // SIGKILL: no close, no acks
        let _ = self.0.wait();
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Stops the process (SIGSTOP) and waits until every one of its threads has stopped: a
    /// thread on a core runs on until the kernel next takes it off.
    fn stop(&self) {
        self.signal("STOP");
        let tasks = PathBuf::from(format!("/proc/{}/task", self.0.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let running = std::fs::read_dir(&tasks)
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("stat")).ok())
                .filter(|stat| {
                    // The state follows the command name, which is in parentheses.
                    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                    !state.starts_with('T') && !state.starts_with('t')
                })
                .count();
            if running == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{running} threads still run after SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
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
    spawn_child_with(url, log, case, false)
}

fn spawn_child_with(url: &str, log: &Path, case: &Case, at_start: bool) -> Consumer {
    let mut command = Command::new(std::env::current_exe().unwrap());
    if at_start {
        command.env("BUS_CRASH_CHILD_AT_START", "1");
    }
    if case.batched {
        command.env("BUS_CRASH_CHILD_BATCHED", "1");
    }
    if case.lease {
        command.env("BUS_CRASH_CHILD_LEASE", "1");
    }
    if case.own_thread {
        command.env("BUS_CRASH_CHILD_OWN_THREAD", "1");
    }
    match case.once {
        Once::Off => {}
        Once::Log => {
            command.env("BUS_CRASH_CHILD_ONCE", "log");
        }
        Once::Kv => {
            command.env("BUS_CRASH_CHILD_ONCE", "kv");
        }
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
        for (aggregate, version) in handled_lines(log) {
            verifier.record(topic().as_str(), &aggregate, version);
        }
    }
    verifier.report()
}

/// Events handled so far, over every log (complete lines but the `R` ones).
fn count_lines(logs: &[PathBuf]) -> u64 {
    logs.iter()
        .map(|path| {
            let bytes = std::fs::read(path).unwrap_or_default();
            let complete = bytes
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |end| end + 1);
            bytes[..complete]
                .split(|&b| b == b'\n')
                .filter(|line| !line.is_empty() && line[0] != b'R')
                .count() as u64
        })
        .sum()
}

/// The owner is stopped (SIGSTOP) mid-batch with thousands of events queued, its successor
/// takes over and handles; then the old owner runs again (SIGCONT). It must not start another
/// handler: what it had queued is its successor's now. Returns the events it started after
/// running again (a handler started just before the stop may write its line after; at most
/// one per runtime thread), with the verifier's report over both logs.
async fn owner_paused(case: &Case) -> (u64, VerifierReport) {
    let server = case.server.start();
    let bus = NatsBus::connect(config(
        &server.url(),
        case.retention,
        case.batched,
        case.lease,
    ))
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
    let dir =
        std::env::temp_dir().join(format!("bus-pause-{}-{}", std::process::id(), case.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let logs: Vec<PathBuf> = vec![dir.join("0.log"), dir.join("1.log")];
    let mut old = spawn_paused_child(&server.url(), &logs[0], case);
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_lines(&logs[..1]) < expected * 3 / 10 {
        assert!(
            Instant::now() < deadline,
            "{}: the first consumer stalled",
            case.name()
        );
        old.assert_running();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    old.stop();
    let at_stop = count_lines(&logs[..1]);
    // Stopped with events queued and unacknowledged: there is something to handle late.
    let info = common::consumer_info(&server, &bus, &topic()).await;
    assert!(
        info.num_ack_pending > 0,
        "{}: nothing in flight at the stop: {info:?}",
        case.name()
    );
    let mut new = spawn_paused_child(&server.url(), &logs[1], case);
    let deadline = Instant::now() + TAKEOVER_AFTER * 10;
    while count_lines(&logs[1..]) < 2000 {
        assert!(Instant::now() < deadline, "{}: no takeover", case.name());
        new.assert_running();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let lost_before = lost_count(&logs[0]);
    old.signal("CONT");
    // Until the old owner has said it lost the topic: it ran again, and noticed.
    let deadline = Instant::now() + TAKEOVER_AFTER * 5;
    while lost_count(&logs[0]) <= lost_before {
        assert!(
            Instant::now() < deadline,
            "{}: the old owner never said it lost the topic",
            case.name()
        );
        old.assert_running();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let late = count_lines(&logs[..1]) - at_stop;
    old.kill();
    // Its successor kept the topic all along (its keep-alives confirmed it in time).
    assert_eq!(
        lost_count(&logs[1]),
        0,
        "{}: the successor lost the topic",
        case.name()
    );
    // The successor finishes; read in the order the processes ran, everything is in order.
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let report = verify(&logs);
        if report.unique >= expected {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "{}: only {} of {expected} events handled: {report:?}",
            case.name(),
            report.unique
        );
        new.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    new.kill();
    (late, report)
}

/// A consumer whose handlers write their line when they start.
fn spawn_paused_child(url: &str, log: &Path, case: &Case) -> Consumer {
    spawn_child_with(url, log, case, true)
}

/// How often the consumer writing `log` lost its topic, as it last wrote it.
fn lost_count(log: &Path) -> u64 {
    std::fs::read_to_string(log.with_extension("lost"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

async fn consumers_killed_in_turn(case: &Case) -> Outcome {
    let server = case.server.start();
    let bus = NatsBus::connect(config(
        &server.url(),
        case.retention,
        case.batched,
        case.lease,
    ))
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
    // When the consumer the first process made was created.
    let mut first_created = None;
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
        first_created.get_or_insert(info.created);
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
    // The ownership that ran: the pinned group is on the consumer; the lease is a key in its
    // bucket, held by the live consumer.
    let info = common::consumer_info(&server, &bus, &topic()).await;
    let pinned = info.config.priority_policy == PriorityPolicy::PinnedClient;
    assert_eq!(
        pinned,
        matches!(case.server, TestServer::Current) && !case.lease,
        "{}: the consumer's priority policy is {:?}",
        case.name(),
        info.config.priority_policy
    );
    // Every takeover found messages unacknowledged and restarted delivery: with the reset API
    // the consumer is still the first one, before 2.14 it was deleted and created again.
    let current = matches!(case.server, TestServer::Current);
    assert_eq!(
        Some(info.created) == first_created,
        current,
        "{}: consumer created at {:?}, the first one at {first_created:?}",
        case.name(),
        info.created
    );
    if !pinned {
        let client = async_nats::connect(server.url()).await.unwrap();
        let leases = async_nats::jetstream::new(client)
            .get_key_value("BUS_OWNERS")
            .await
            .unwrap();
        let held = leases.get(&info.name).await.unwrap();
        assert!(
            held.is_some_and(|holder| !holder.is_empty()),
            "{}: no lease held for consumer `{}`",
            case.name(),
            info.name
        );
    }
    child.kill();
    let outcome = Outcome {
        takeovers,
        kills: KILLS.len() as u64,
        replayable,
        skipped: (case.once != Once::Off).then(|| skipped_of(&logs)),
        report,
    };
    let r = &outcome.report;
    assert_eq!(r.broken_replays, 0, "{}: {outcome}", case.name());
    assert_eq!(r.order_violations, 0, "{}: {outcome}", case.name());
    assert_eq!(r.gaps, 0, "{}: {outcome}", case.name());
    assert_eq!(r.lost(expected), 0, "{}: {outcome}", case.name());
    // Replays are only of what the dead processes left unacknowledged.
    assert!(r.duplicates <= replayable, "{}: {outcome}", case.name());
    match case.once {
        Once::Off => {}
        // The record is the handler's own write: no version is handled twice.
        Once::Log => {
            assert_eq!(r.duplicates, 0, "{}: {outcome}", case.name());
            assert_eq!(r.replays, 0, "{}: {outcome}", case.name());
        }
        // Kept apart: a version may be handled again only if its record was not stored yet.
        Once::Kv => {
            let again = handled_after_recorded(&logs);
            assert!(
                again.is_empty(),
                "{}: handled again after their record was stored: {again:?}",
                case.name()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}
