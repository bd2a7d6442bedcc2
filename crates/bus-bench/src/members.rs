//! Rows whose consumers are separate processes: the members of one consumer group over a
//! partitioned topic. Each member is this binary run with `--member URL`; it handles what the
//! group assigns it, reports how many events it has handled on stdout, and when its stdin
//! closes it closes its subscription and prints what it saw.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bus_core::{handler_fn, Envelope, Subscriber, Topic};
use bus_nats::{NatsBus, NatsConfig, StreamSpec};
use bus_testkit::SequenceVerifier;
use serde::{Deserialize, Serialize};

use crate::stats::Histogram;

/// The partitioned topic of the group rows.
pub(crate) const TOPIC: &str = "bench.group";
/// Its partitions.
pub(crate) const PARTITIONS: u32 = 8;
/// What a member's handler does per event: an I/O call of 1 ms.
const HANDLER_DELAY: Duration = Duration::from_millis(1);

/// The configuration every member and the publisher use for the group rows.
pub(crate) fn config(url: &str) -> NatsConfig {
    let mut config = NatsConfig::new(url).with_group("bench");
    let mut spec = StreamSpec::new("BENCH_GROUP", [topic()]);
    spec.partitions = PARTITIONS;
    config.streams.push(spec);
    config
}

pub(crate) fn topic() -> Topic {
    Topic::new(TOPIC).expect("valid topic")
}

/// What a member saw, printed when it closes.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) handled: u64,
    pub(crate) unique: u64,
    pub(crate) order_violations: u64,
    pub(crate) duplicates: u64,
    /// The latency histogram's counts.
    pub(crate) latency: Vec<u64>,
}

/// Runs this process as a member of the group rows' consumer group.
pub(crate) async fn run_member(url: &str) -> Result<()> {
    let bus = NatsBus::connect(config(url)).await?;
    let verifier = Arc::new(SequenceVerifier::new());
    let latency = Arc::new(Histogram::new());
    let handled = Arc::new(AtomicU64::new(0));
    let subscription = {
        let (verifier, latency, handled) = (verifier.clone(), latency.clone(), handled.clone());
        bus.subscribe(
            &topic(),
            Arc::new(handler_fn(move |e: Envelope| {
                let (verifier, latency, handled) =
                    (verifier.clone(), latency.clone(), handled.clone());
                async move {
                    tokio::time::sleep(HANDLER_DELAY).await;
                    latency.record(crate::latency_micros(e.payload()));
                    verifier.record(TOPIC, e.aggregate_id().as_str(), e.event_version());
                    handled.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            })),
        )
        .await?
    };
    println!("READY");
    let reporter = {
        let handled = handled.clone();
        let control = subscription.control().context("the group's control")?;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                println!("HANDLED {}", handled.load(Ordering::Relaxed));
                println!("PARTITIONS {}", control.metrics().partitions);
            }
        })
    };
    // Until the row process closes stdin.
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    })
    .await?;
    reporter.abort();
    subscription.close().await?;
    bus.close().await?;
    let report = verifier.report();
    let summary = Summary {
        handled: report.handled,
        unique: report.unique,
        order_violations: report.order_violations,
        duplicates: report.duplicates,
        latency: latency.counts(),
    };
    println!("SUMMARY {}", serde_json::to_string(&summary)?);
    std::io::stdout().flush()?;
    Ok(())
}

/// A member process, seen from the row process.
pub(crate) struct Member {
    child: Child,
    stdin: Option<ChildStdin>,
    handled: Arc<AtomicU64>,
    partitions: Arc<AtomicU64>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Member {
    pub(crate) fn spawn(url: &str) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--member", url])
            .args(crate::threads_arg())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a member process")?;
        let stdout = child.stdout.take().context("member stdout")?;
        let handled = Arc::new(AtomicU64::new(0));
        let partitions = Arc::new(AtomicU64::new(0));
        let (tx, lines) = std::sync::mpsc::channel();
        {
            let (handled, partitions) = (handled.clone(), partitions.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(n) = line.strip_prefix("HANDLED ") {
                        handled.store(n.parse().unwrap_or(0), Ordering::Relaxed);
                    } else if let Some(n) = line.strip_prefix("PARTITIONS ") {
                        partitions.store(n.parse().unwrap_or(0), Ordering::Relaxed);
                    } else {
                        let _ = tx.send(line);
                    }
                }
            });
        }
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            handled,
            partitions,
            lines,
        })
    }

    /// Waits for a line starting with `prefix`; returns the rest.
    fn expect(&self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Err(_) => bail!("a member printed no `{prefix}` within {timeout:?}"),
            }
        }
    }

    pub(crate) fn wait_ready(&self) -> Result<()> {
        self.expect("READY", Duration::from_secs(60)).map(drop)
    }

    /// The partitions the member consumes now.
    pub(crate) fn partitions(&self) -> u64 {
        self.partitions.load(Ordering::Relaxed)
    }

    pub(crate) fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Closes the member (its stdin) and reads what it saw.
    pub(crate) fn close(mut self) -> Result<Summary> {
        drop(self.stdin.take());
        let line = self.expect("SUMMARY ", Duration::from_secs(120))?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("a member exited with {status}");
        }
        Ok(serde_json::from_str(&line)?)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
