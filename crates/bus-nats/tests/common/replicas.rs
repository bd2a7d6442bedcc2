//! Consumer processes for the multi-process tests: a test binary re-executes itself as a
//! replica that subscribes, records every handler call in a log, reports its ownership on
//! stdout and closes when told to on stdin.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bus_core::{handler_fn, Envelope, Subscriber, Topic};
use bus_nats::{NatsBus, NatsConfig};
use bus_testkit::{SequenceVerifier, VerifierReport};

/// How long a test step may take.
pub const STEP: Duration = Duration::from_secs(60);

pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// If this process was started as a replica (`BUS_REPLICA_URL` set), runs it with the
/// configuration `config` gives for the URL, and returns true.
pub fn run_if_replica(
    runtime: &tokio::runtime::Runtime,
    topic: Topic,
    config: impl FnOnce(&str) -> NatsConfig,
) -> bool {
    let Ok(url) = std::env::var("BUS_REPLICA_URL") else {
        return false;
    };
    let log = std::env::var("BUS_REPLICA_LOG").expect("replica log path");
    let name = std::env::var("BUS_REPLICA_NAME").expect("replica name");
    runtime.block_on(replica(config(&url), topic, PathBuf::from(log), name));
    true
}

async fn replica(config: NatsConfig, topic: Topic, log: PathBuf, name: String) {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let bus = NatsBus::connect(config).await.unwrap();
    let file = Arc::new(Mutex::new(std::fs::File::create(log).unwrap()));
    // With `BUS_HOLD_FILE`, the events of aggregates named `hold-…` are held in their handler
    // until that file exists.
    let hold = std::env::var_os("BUS_HOLD_FILE").map(PathBuf::from);
    let subscription = {
        let name = name.clone();
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (file, name) = (file.clone(), name.clone());
                let hold = hold
                    .clone()
                    .filter(|_| e.aggregate_id().as_str().starts_with("hold-"));
                async move {
                    let start = now_ns();
                    if let Some(hold) = hold {
                        while !hold.exists() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    // As slow as events are published (an event per aggregate every 5 ms), so
                    // that events are in flight whenever the owner is killed.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let partition = bus_nats::current_delivery()
                        .and_then(|d| d.partition)
                        .map_or("-".to_owned(), |p| p.to_string());
                    let line = format!(
                        "{name} {} {} {start} {} {partition}\n",
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
                if last != Some((m.owner, m.ownership_gained, m.partitions)) {
                    println!(
                        "owner {} gained {} lost {} restarts {} partitions {}",
                        m.owner,
                        m.ownership_gained,
                        m.ownership_lost,
                        m.delivery_restarts,
                        m.partitions
                    );
                    last = Some((m.owner, m.ownership_gained, m.partitions));
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
pub struct Seen {
    pub ready: bool,
    pub owner: bool,
    pub gained: u64,
    /// Ownership lost, over the partitions it runs (a group member), as of its last line.
    pub lost: u64,
    /// The partitions it runs, owned or waiting as a standby (a group member).
    pub partitions: u64,
    pub closed: Option<String>,
    /// Its log lines (stderr), kept when it was started with `RUST_LOG`.
    pub logged: Vec<String>,
}

pub struct Replica {
    pub name: String,
    pub child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
    seen: Arc<(Mutex<Seen>, Condvar)>,
}

impl Replica {
    pub fn spawn(name: &str, url: &str, dir: &Path) -> Self {
        Self::spawn_with(name, url, dir, &[])
    }

    /// [`Replica::spawn`] with `env` added to the replica's environment (which case of the
    /// test binary it runs).
    pub fn spawn_with(name: &str, url: &str, dir: &Path, env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .envs(env.iter().copied())
            .env("BUS_REPLICA_URL", url)
            .env("BUS_REPLICA_LOG", &log)
            .env("BUS_REPLICA_NAME", name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let seen: Arc<(Mutex<Seen>, Condvar)> = Arc::default();
        let keep_log = env.iter().any(|(name, _)| *name == "RUST_LOG");
        {
            let seen = seen.clone();
            let name = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[{name}] {line}");
                    if keep_log {
                        seen.0.lock().unwrap().logged.push(line);
                        seen.1.notify_all();
                    }
                }
            });
        }
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
                            state.lost = words[5].parse().unwrap();
                            state.partitions = words[9].parse().unwrap();
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

    pub fn wait(&self, what: &str, done: impl Fn(&Seen) -> bool) {
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

    /// What is known of it now.
    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.0.lock().unwrap())
    }

    pub fn is_owner(&self) -> bool {
        self.seen.0.lock().unwrap().owner
    }

    pub fn gained(&self) -> u64 {
        self.seen.0.lock().unwrap().gained
    }

    pub fn kill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL: no close, no acks, no unpin
        self.child.wait().unwrap();
    }

    /// Asks for a graceful close and waits for the report.
    pub fn close(&mut self) -> String {
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
pub struct Call {
    pub process: String,
    pub aggregate: String,
    pub version: u64,
    pub start: u128,
    pub end: u128,
    /// The partition, for a partitioned topic.
    pub partition: Option<u32>,
}

pub fn calls(replicas: &[&Replica]) -> Vec<Call> {
    let mut out = Vec::new();
    for replica in replicas {
        let Ok(text) = std::fs::read_to_string(&replica.log) else {
            continue;
        };
        // A replica may be writing while this reads: a last line without its newline is
        // not complete yet, and is read again next time.
        for line in text.split_inclusive('\n') {
            let Some(line) = line.strip_suffix('\n') else {
                break;
            };
            let w: Vec<&str> = line.split(' ').collect();
            out.push(Call {
                process: w[0].to_owned(),
                aggregate: w[1].to_owned(),
                version: w[2].parse().unwrap(),
                start: w[3].parse().unwrap(),
                end: w[4].parse().unwrap(),
                partition: w.get(5).and_then(|p| p.parse().ok()),
            });
        }
    }
    out.sort_by_key(|c| c.start);
    out
}

pub fn unique_handled(replicas: &[&Replica]) -> u64 {
    let mut seen = std::collections::HashSet::new();
    for call in calls(replicas) {
        seen.insert((call.aggregate, call.version));
    }
    seen.len() as u64
}

pub fn wait_handled(replicas: &[&Replica], at_least: u64) {
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

pub fn owner<'a>(replicas: &'a mut [Replica], what: &str) -> &'a mut Replica {
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
pub fn first_call_after(process: &str, since: u128, all: &[Call]) -> Option<u128> {
    all.iter()
        .filter(|c| c.process == process && c.start >= since)
        .map(|c| c.start)
        .min()
}

/// What the calls of every process show, taken together in start order.
#[derive(Debug)]
pub struct History {
    /// Order, gaps and repeats across processes.
    pub report: VerifierReport,
    /// Calls for one aggregate that overlapped in time (in different processes).
    pub overlaps: u64,
    /// Calls for one partition, in different processes, that overlapped in time: two owners
    /// of one partition at once.
    pub partition_overlaps: u64,
    /// Calls of one process for one aggregate whose version was not above the one before.
    pub in_process_disorder: u64,
    /// Repeated events, by the process that repeated them.
    pub duplicates_by: BTreeMap<String, u64>,
    /// Repeated events of a partitioned topic, by partition.
    pub duplicates_in: BTreeMap<u32, u64>,
    /// Calls by process.
    pub calls_by: BTreeMap<String, u64>,
}

pub fn history(all: &[Call], topic: &str) -> History {
    let verifier = SequenceVerifier::new();
    let mut overlaps = 0;
    let mut partition_overlaps = 0;
    let mut in_process_disorder = 0;
    let mut last_call: HashMap<&str, &Call> = HashMap::new();
    let mut last_of_partition: HashMap<u32, &Call> = HashMap::new();
    let mut last_in_process: HashMap<(&str, &str), u64> = HashMap::new();
    let mut duplicates_by: BTreeMap<String, u64> = BTreeMap::new();
    let mut duplicates_in: BTreeMap<u32, u64> = BTreeMap::new();
    let mut calls_by: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = HashSet::new();
    for call in all {
        verifier.record(topic, &call.aggregate, call.version);
        *calls_by.entry(call.process.clone()).or_default() += 1;
        if let Some(previous) = last_call.get(call.aggregate.as_str()) {
            if call.start < previous.end {
                overlaps += 1;
            }
        }
        last_call.insert(&call.aggregate, call);
        if let Some(p) = call.partition {
            if let Some(previous) = last_of_partition.get(&p) {
                if previous.process != call.process && call.start < previous.end {
                    partition_overlaps += 1;
                }
            }
            last_of_partition.insert(p, call);
        }
        // Within one process an aggregate's versions only go up (they may jump: another
        // process handled the ones between while it did not own the aggregate's partition).
        if let Some(v) = last_in_process.insert((&call.process, &call.aggregate), call.version) {
            if call.version <= v {
                in_process_disorder += 1;
            }
        }
        if !seen.insert((&call.aggregate, call.version)) {
            *duplicates_by.entry(call.process.clone()).or_default() += 1;
            if let Some(p) = call.partition {
                *duplicates_in.entry(p).or_default() += 1;
            }
        }
    }
    History {
        report: verifier.report(),
        overlaps,
        partition_overlaps,
        in_process_disorder,
        duplicates_by,
        duplicates_in,
        calls_by,
    }
}

pub fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bus-replicas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
