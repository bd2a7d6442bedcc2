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
//! This binary is its own child: run with `BUS_REPLICA_URL` set, it is one replica.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bus_core::{handler_fn, Envelope, Publisher, Subscriber, Topic};
use bus_nats::NatsBus;
use bus_testkit::{NatsServer, SequenceVerifier};

const AGGREGATES: u64 = 40;
/// Versions published at least, however early the handovers are done.
const MIN_VERSIONS: u64 = 100;
/// Short, so the test does not wait long for the takeover after the kill.
const TAKEOVER_AFTER: Duration = Duration::from_secs(2);
const STEP: Duration = Duration::from_secs(60);

fn topic() -> Topic {
    Topic::new("replicated").unwrap()
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(url) = std::env::var("BUS_REPLICA_URL") {
        let log = std::env::var("BUS_REPLICA_LOG").expect("replica log path");
        let name = std::env::var("BUS_REPLICA_NAME").expect("replica name");
        runtime.block_on(replica(url, PathBuf::from(log), name));
        return;
    }
    println!("running 1 test");
    owner_killed_then_closed_while_standbys_wait(&runtime);
    println!("test owner_killed_then_closed_while_standbys_wait ... ok");
    println!("\nreplicas_nats: 1 passed, 0 failed");
}

/// One replica: subscribes, records every handler call, reports ownership changes on stdout,
/// and closes gracefully when told so on stdin.
async fn replica(url: String, log: PathBuf, name: String) {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let mut config = common::test_config(&url);
    config.consumer.takeover_after = TAKEOVER_AFTER;
    let bus = NatsBus::connect(config).await.unwrap();
    let file = Arc::new(Mutex::new(std::fs::File::create(log).unwrap()));
    let subscription = {
        let name = name.clone();
        bus.subscribe(
            &topic(),
            Arc::new(handler_fn(move |e: Envelope| {
                let (file, name) = (file.clone(), name.clone());
                async move {
                    let start = now_ns();
                    // As slow as events are published (an event per aggregate every 5 ms), so
                    // that events are in flight whenever the owner is killed.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let line = format!(
                        "{name} {} {} {start} {}\n",
                        e.aggregate_id(),
                        e.event_version(),
                        now_ns()
                    );
                    // One write per call: a kill never leaves half a line.
                    file.lock().unwrap().write_all(line.as_bytes()).unwrap();
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    let control = subscription.control().unwrap();
    println!("ready");
    let monitor = {
        let control = control.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let m = control.metrics();
                if last != Some((m.owner, m.ownership_gained)) {
                    println!(
                        "owner {} gained {} lost {} restarts {}",
                        m.owner, m.ownership_gained, m.ownership_lost, m.delivery_restarts
                    );
                    last = Some((m.owner, m.ownership_gained));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)
    })
    .await;
    monitor.abort();
    let m = control.metrics();
    let report = subscription.close().await.unwrap();
    println!(
        "closed handled {} returned {} gained {} restarts {} at {}",
        report.handled,
        report.returned,
        m.ownership_gained,
        m.delivery_restarts,
        now_ns()
    );
    bus.close().await.unwrap();
}

/// What the parent knows of one replica from its stdout.
#[derive(Debug, Default)]
struct Seen {
    ready: bool,
    owner: bool,
    gained: u64,
    closed: Option<String>,
}

struct Replica {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
    seen: Arc<(Mutex<Seen>, Condvar)>,
}

impl Replica {
    fn spawn(name: &str, url: &str, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("BUS_REPLICA_URL", url)
            .env("BUS_REPLICA_LOG", &log)
            .env("BUS_REPLICA_NAME", name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let seen: Arc<(Mutex<Seen>, Condvar)> = Arc::default();
        {
            let seen = seen.clone();
            let name = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[{name}] {line}");
                    let mut state = seen.0.lock().unwrap();
                    let words: Vec<&str> = line.split_whitespace().collect();
                    match words.first() {
                        Some(&"ready") => state.ready = true,
                        Some(&"owner") => {
                            state.owner = words[1] == "true";
                            state.gained = words[3].parse().unwrap();
                        }
                        Some(&"closed") => state.closed = Some(line.clone()),
                        _ => {}
                    }
                    seen.1.notify_all();
                }
            });
        }
        Self {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            log,
            seen,
        }
    }

    fn wait(&self, what: &str, done: impl Fn(&Seen) -> bool) {
        let (lock, changed) = &*self.seen;
        let deadline = Instant::now() + STEP;
        let mut state = lock.lock().unwrap();
        while !done(&state) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("replica {} never {what}: {state:?}", self.name));
            state = changed.wait_timeout(state, left).unwrap().0;
        }
    }

    fn is_owner(&self) -> bool {
        self.seen.0.lock().unwrap().owner
    }

    fn gained(&self) -> u64 {
        self.seen.0.lock().unwrap().gained
    }

    fn kill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL: no close, no acks, no unpin
        self.child.wait().unwrap();
    }

    /// Asks for a graceful close and waits for the report.
    fn close(&mut self) -> String {
        let mut stdin = self.stdin.take().expect("open stdin");
        stdin.write_all(b"close\n").unwrap();
        drop(stdin);
        self.wait("closed", |s| s.closed.is_some());
        let deadline = Instant::now() + STEP;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} did not exit after closing",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            status.success(),
            "replica {} exited with {status}",
            self.name
        );
        self.seen.0.lock().unwrap().closed.clone().unwrap()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // A failed assertion must not leave replicas running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One handler call, as a replica recorded it.
#[derive(Debug, Clone)]
struct Call {
    process: String,
    aggregate: String,
    version: u64,
    start: u128,
    end: u128,
}

fn calls(replicas: &[&Replica]) -> Vec<Call> {
    let mut out = Vec::new();
    for replica in replicas {
        let Ok(text) = std::fs::read_to_string(&replica.log) else {
            continue;
        };
        for line in text.lines() {
            let w: Vec<&str> = line.split(' ').collect();
            out.push(Call {
                process: w[0].to_owned(),
                aggregate: w[1].to_owned(),
                version: w[2].parse().unwrap(),
                start: w[3].parse().unwrap(),
                end: w[4].parse().unwrap(),
            });
        }
    }
    out.sort_by_key(|c| c.start);
    out
}

fn unique_handled(replicas: &[&Replica]) -> u64 {
    let mut seen = std::collections::HashSet::new();
    for call in calls(replicas) {
        seen.insert((call.aggregate, call.version));
    }
    seen.len() as u64
}

fn wait_handled(replicas: &[&Replica], at_least: u64) {
    let deadline = Instant::now() + STEP;
    loop {
        let handled = unique_handled(replicas);
        if handled >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {handled} of {at_least} events handled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn owner<'a>(replicas: &'a mut [Replica], what: &str) -> &'a mut Replica {
    let deadline = Instant::now() + STEP;
    loop {
        let owners: Vec<usize> = (0..replicas.len())
            .filter(|&i| replicas[i].child.try_wait().unwrap().is_none() && replicas[i].is_owner())
            .collect();
        assert!(owners.len() <= 1, "two replicas report owning the topic");
        if let Some(&i) = owners.first() {
            return &mut replicas[i];
        }
        assert!(Instant::now() < deadline, "no replica took over {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The first call a process started after `since` (ns since the epoch).
fn first_call_after(process: &str, since: u128, all: &[Call]) -> Option<u128> {
    all.iter()
        .filter(|c| c.process == process && c.start >= since)
        .map(|c| c.start)
        .min()
}

fn owner_killed_then_closed_while_standbys_wait(runtime: &tokio::runtime::Runtime) {
    let server = NatsServer::start();
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
    let gained_before: HashMap<String, u64> = replicas
        .iter()
        .map(|r| (r.name.clone(), r.gained()))
        .collect();
    let killed_at = now_ns();
    replicas
        .iter_mut()
        .find(|r| r.name == killed)
        .unwrap()
        .kill();
    let info = runtime.block_on(common::consumer_info(&server, &bus, &topic()));
    let pending_at_kill = info.num_ack_pending as u64;
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
    let verifier = SequenceVerifier::new();
    let mut overlaps = 0;
    let mut in_process_disorder = 0;
    let mut last_call: HashMap<&str, &Call> = HashMap::new();
    let mut last_in_process: HashMap<(&str, &str), u64> = HashMap::new();
    let mut duplicates_by: BTreeMap<&str, u64> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for call in &all {
        verifier.record("replicated", &call.aggregate, call.version);
        if let Some(previous) = last_call.get(call.aggregate.as_str()) {
            if call.start < previous.end {
                overlaps += 1;
            }
        }
        last_call.insert(&call.aggregate, call);
        if let Some(v) = last_in_process.insert((&call.process, &call.aggregate), call.version) {
            if call.version != v + 1 {
                in_process_disorder += 1;
            }
        }
        if !seen.insert((&call.aggregate, call.version)) {
            *duplicates_by.entry(&call.process).or_default() += 1;
        }
    }
    let report = verifier.report();
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
    assert_eq!(report.gaps, 0, "{report:?}");
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
        assert_eq!(
            *process,
            successor.as_str(),
            "{process} repeated {count} events"
        );
        assert!(*count <= pending_at_kill, "{count} repeats");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bus-replicas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
