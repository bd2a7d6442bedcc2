//! `cargo xtask bench`: the bus measured against the raw async-nats ceiling, in one sitting,
//! against nats-server instances it starts itself (file storage, temporary directories).
//!
//! Every row starts a fresh server, subscribes, publishes its workload, waits until every
//! message is handled, and reports throughput, latency, memory, tasks and threads, and what
//! the `SequenceVerifier` saw. Ratios are to the `ceiling` row of the same run.

mod bus_rows;
mod callgrind;
mod members;
mod raw;
mod report;
mod scenarios;
mod sink;
mod stats;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use bus_core::{
    handler_fn, AggregateId, Envelope, EventType, PublishEvent, Publisher, Subscriber, Topic,
};
use bus_nats::{NatsBus, NatsConfig};
use bus_testkit::{NatsServer, SequenceVerifier};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Notify;

use bus_rows::{run_bus, run_group, BusSetup, Pacer, Timing};
use callgrind::{count_instructions, dump_callgrind_counters, SPLIT_AT_DRAIN};
use raw::{run_packed, run_raw};
use report::Row;
use scenarios::{latency_scenario, scenarios, Kind, Scenario, PACKED};
use sink::{epoch, latency_micros, stamped_payload, start_sampler, wall_nanos, Sink};
use stats::Histogram;

/// The broker a row runs against: one server, or a cluster.
enum Broker {
    Single(NatsServer),
    Cluster(bus_testkit::NatsCluster),
}

impl Broker {
    fn url(&self) -> String {
        match self {
            Broker::Single(server) => server.url(),
            Broker::Cluster(cluster) => cluster.urls(),
        }
    }
}

async fn run_row(s: &Scenario, bar: ProgressBar) -> Result<Row> {
    let broker = if s.replicas > 1 {
        Broker::Cluster(
            bus_testkit::NatsCluster::try_start(s.replicas)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
    } else {
        Broker::Single(NatsServer::try_start(&[]).map_err(|e| anyhow::anyhow!("{e}"))?)
    };
    let url = broker.url();
    let expected = s.messages();
    let sink = Sink::new(
        expected,
        s.handler_delay,
        match &broker {
            Broker::Single(server) => server.pid(),
            Broker::Cluster(_) => None,
        },
    );
    stats::reset_peak_rss();
    let (sampler, stop) = start_sampler(sink.clone(), bar.clone());
    let timing = match &s.kind {
        Kind::Ceiling => run_raw(s, 10_000, false, &url, sink.clone()).await,
        Kind::CeilingWire => run_raw(s, 10_000, true, &url, sink.clone()).await,
        Kind::CeilingPacked => run_packed(s, &url, sink.clone()).await,
        Kind::Strict => run_raw(s, 1, false, &url, sink.clone()).await,
        Kind::Bus(_) if s.members > 0 => run_group(s, &url, sink.clone()).await,
        Kind::Bus(setup) => run_bus(s, setup, &url, sink.clone()).await,
    };
    let (bus_cores, broker_cores) = sink.cores();
    stop.notify_one();
    let (tasks, threads) = sampler.await?;
    if let Err(e) = &timing {
        // Some sources print nothing with `{}`; their debug form says what went wrong.
        eprintln!("row `{}` failed: {e:?}", s.name);
    }
    let timing = timing.with_context(|| format!("row `{}`", s.name))?;
    let mut report = sink.verifier.report();
    if s.members > 0 {
        report.order_violations = sink.group_violations.load(Ordering::Relaxed);
        report.duplicates = sink.group_duplicates.load(Ordering::Relaxed);
        report.unique = sink.group_unique.load(Ordering::Relaxed);
    }
    bar.finish();
    Ok(Row {
        name: s.name.clone(),
        messages: expected,
        publish_msgs_per_s: expected as f64 / timing.publish.as_secs_f64(),
        e2e_msgs_per_s: expected as f64 / timing.end_to_end.as_secs_f64(),
        broker_msgs_per_s: timing
            .stored
            .map_or(0.0, |n| n as f64 / timing.end_to_end.as_secs_f64()),
        p50_ms: sink.latency.quantile_ms(0.50),
        p99_ms: sink.latency.quantile_ms(0.99),
        p999_ms: sink.latency.quantile_ms(0.999),
        rss_peak_mib: stats::peak_rss_mib(),
        tasks,
        threads,
        order_violations: report.order_violations,
        lost: report.lost(expected),
        duplicates: report.duplicates,
        ratio_to_ceiling: 0.0,
        ratio_to_ceiling_bus_wire: 0.0,
        ratio_to_ceiling_packed: 0.0,
        instructions_per_event: 0.0,
        instructions_split: None,
        stages: sink.stages[0].count().gt(&0).then(|| report::Stages {
            p50_ms: sink.stages.each_ref().map(|h| h.quantile_ms(0.50)),
            p99_ms: sink.stages.each_ref().map(|h| h.quantile_ms(0.99)),
        }),
        cores: (bus_cores.filter(|_| s.members == 0), broker_cores),
    })
}

struct Options {
    quick: bool,
    only: Vec<String>,
    /// Skip the ceiling and latency rows: for profiling one row alone.
    alone: bool,
    /// Run this one row in this process and print it as JSON (how the parent runs each row).
    row: Option<String>,
    /// The publish rate of the row, for the fixed-rate latency row.
    rate: Option<f64>,
    /// Run as a member process of a group row, against this server.
    member: Option<String>,
    /// Rows whose process also runs under callgrind, to count its instructions per event.
    instructions: Vec<String>,
    /// Worker threads of each process's tokio runtime (the bench's own, every row's and every
    /// member's): one per core of the 2-core machine the figures come from, unless told.
    threads: usize,
    /// Times the selection runs, each run with its own ceilings (`--runs`).
    runs: usize,
    /// Events of each aggregate in the rows that take the run's standard count (`--versions`).
    versions: Option<u64>,
}

/// Default worker threads of the bench's runtimes: the machine the figures come from has 2 cores.
const DEFAULT_THREADS: usize = 2;

/// The runtime's worker threads, set once from `--threads`: rows and members are started with it.
static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// `--versions N`, set once: row processes are started with it.
static VERSIONS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

/// `--threads N` for a child process of this binary.
pub(crate) fn threads_arg() -> [String; 2] {
    [
        "--threads".into(),
        THREADS
            .get()
            .copied()
            .unwrap_or(DEFAULT_THREADS)
            .to_string(),
    ]
}

/// What a row's process of this binary is started with besides its row: `--threads N`, and
/// `--versions N` when the run was given it.
pub(crate) fn row_args() -> Vec<String> {
    let mut args = threads_arg().to_vec();
    if let Some(versions) = VERSIONS.get().copied().flatten() {
        args.extend(["--versions".into(), versions.to_string()]);
    }
    args
}

/// The number that follows `flag` on the command line, which must be at least 1.
fn at_least_one(value: Option<String>, flag: &str) -> Result<u64> {
    let n: u64 = value
        .with_context(|| format!("{flag} needs a number"))?
        .parse()
        .with_context(|| format!("{flag} needs a number"))?;
    if n == 0 {
        bail!("{flag} needs at least 1");
    }
    Ok(n)
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        quick: false,
        only: Vec::new(),
        alone: false,
        row: None,
        rate: None,
        member: None,
        instructions: Vec::new(),
        threads: DEFAULT_THREADS,
        runs: 1,
        versions: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--alone" => options.alone = true,
            "--row" => options.row = Some(args.next().context("--row needs a row name")?),
            "--rate" => options.rate = Some(args.next().context("--rate needs msg/s")?.parse()?),
            "--member" => options.member = Some(args.next().context("--member needs a URL")?),
            "--threads" => options.threads = at_least_one(args.next(), "--threads")? as usize,
            "--runs" => options.runs = at_least_one(args.next(), "--runs")? as usize,
            "--versions" => options.versions = Some(at_least_one(args.next(), "--versions")?),
            "--instructions" => options.instructions.extend(
                args.next()
                    .context("--instructions needs row names")?
                    .split(',')
                    .map(String::from),
            ),
            "--only" => options.only.extend(
                args.next()
                    .context("--only needs row names")?
                    .split(',')
                    .map(String::from),
            ),
            "--help" | "-h" => {
                println!(
                    "cargo xtask bench [--quick] [--only ROW,ROW...]\n\n\
                     --quick   a short run (about a minute): ceiling, ceiling-bus-wire, ceiling-packed, nats-strict, seed-before, default, default-backlog, default-unbatched, seed-single, latency (as configured, with the broker's GC tuned: GOGC=off GOMEMLIMIT=1GiB, with each topic owned by a lease, and the raw packed client at the same rate)\n\
                     --only    run only the named rows (the ceiling always runs, for the ratios)\n\
                     --alone   with --only: skip the ceiling and latency rows (for profiling one row)\n\
                     --instructions ROW,ROW  run these rows once more under valgrind's callgrind and report the\n\
                               instructions their process executed per event (the broker is another process); for a\n\
                               backlog row (default-backlog) split into publishing the backlog and draining it\n\
                     --threads N  worker threads of each process's tokio runtime (default 2, this machine's cores)\n\
                     --versions N  events of each aggregate in the rows that take the run's standard count (20, or 5\n\
                               with --quick; `default` has 10 000 aggregates, so 100 makes it a million events): rows\n\
                               long enough for a steady state, whose start and end weigh little\n\
                     --runs N  run the selection N times (default 1), each run against its own ceilings, and report\n\
                               each row's median over the runs as well as the last run's rows\n\n\
                     Writes target/bench/report.{{md,json,svg}}."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`; see --help"),
        }
    }
    Ok(options)
}

/// The broker's garbage collector tuned for latency: no proportional collection, a heap limit
/// instead. nats-server reads both from its environment, which the row's server inherits.
const BROKER_GC_TUNED: &[(&str, &str)] = &[("GOGC", "off"), ("GOMEMLIMIT", "1GiB")];

/// Runs one row in a child process of this binary (with `env` added to its environment, and so
/// to its nats-server's) and reads back its result.
fn run_in_child(name: &str, quick: bool, rate: Option<f64>, env: &[(&str, &str)]) -> Result<Row> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command.args(["--row", name]);
    command.args(row_args());
    command.envs(env.iter().copied());
    if quick {
        command.arg("--quick");
    }
    if let Some(rate) = rate {
        command.args(["--rate", &rate.to_string()]);
    }
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting row `{name}`"))?;
    if !output.status.success() {
        bail!("row `{name}` failed with {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ROW "))
        .with_context(|| format!("row `{name}` printed no result"))?;
    Ok(serde_json::from_str(line)?)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let options = parse_args()?;
    THREADS
        .set(options.threads)
        .expect("the runtime's threads are set once");
    VERSIONS
        .set(options.versions)
        .expect("the rows' versions are set once");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads)
        .enable_all()
        .build()?
        .block_on(run(options))
}

async fn run(options: Options) -> Result<()> {
    epoch();
    if let Some(url) = &options.member {
        return members::run_member(url).await;
    }
    let mut plan = scenarios(options.quick, options.versions);
    if !options.only.is_empty() {
        plan.retain(|s| (s.name == "ceiling" && !options.alone) || options.only.contains(&s.name));
    }
    let style = ProgressStyle::with_template(
        "{prefix:>20} [{bar:30}] {pos:>8}/{len:8} {per_sec:>12} {elapsed:>4}",
    )
    .unwrap()
    .progress_chars("=> ");
    if let Some(name) = &options.row {
        // Child mode: one row, in a fresh process, so that memory and task counts are its own.
        let s = match options.rate {
            Some(rate) => latency_scenario(name, rate, options.quick),
            None => plan
                .iter()
                .find(|s| &s.name == name)
                .cloned()
                .with_context(|| format!("no row named `{name}`"))?,
        };
        let bar = ProgressBar::new(s.messages())
            .with_style(style)
            .with_prefix(s.name.clone());
        let row = run_row(&s, bar).await?;
        println!("ROW {}", serde_json::to_string(&row)?);
        return Ok(());
    }
    let started = Instant::now();
    let mut runs = Vec::with_capacity(options.runs);
    for _ in 0..options.runs {
        runs.push(run_once(&options, &plan).await?);
    }
    let mut rows = runs.pop().expect("at least one run");
    let mut medians = if runs.is_empty() {
        Vec::new()
    } else {
        runs.push(rows.clone());
        report::medians(&runs)?
    };
    for name in &options.instructions {
        let backlog = plan.iter().any(|s| &s.name == name && s.backlog);
        match count_instructions(name, options.quick, backlog) {
            Ok(counted) => {
                let per_event = counted.per_event;
                match counted.split {
                    Some((publish, consume)) => println!(
                        "{name}: {per_event:.0} instructions per event (callgrind, the row's process): {publish:.0} publishing the backlog, {consume:.0} draining it"
                    ),
                    None => println!(
                        "{name}: {per_event:.0} instructions per event (callgrind, the row's process)"
                    ),
                }
                for row in rows.iter_mut().chain(medians.iter_mut()) {
                    if &row.name == name {
                        row.instructions_per_event = per_event;
                        row.instructions_split = counted.split;
                    }
                }
            }
            Err(e) => eprintln!("instructions of row `{name}` not counted: {e:#}"),
        }
    }
    let server_version = {
        let server = NatsServer::try_start(&[]).map_err(|e| anyhow::anyhow!("{e}"))?;
        let client = async_nats::connect(server.url()).await?;
        client.server_info().version
    };
    report::write(
        &rows,
        &medians,
        &runs,
        options.quick,
        options.threads,
        &server_version,
        started.elapsed(),
    )?;
    // Every run's rows: a failure in any run fails the bench.
    let bad: Vec<&Row> = runs
        .iter()
        .flatten()
        .chain(&rows)
        .filter(|r| r.order_violations > 0 || r.lost > 0)
        .collect();
    if !bad.is_empty() {
        bail!(
            "ordering or loss failures in rows: {:?}",
            bad.iter().map(|r| &r.name).collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Runs the selection once: every row in a child process, the latency rows at half of the
/// capacity this run measured, and each row's ratios to this run's ceilings.
async fn run_once(options: &Options, plan: &[Scenario]) -> Result<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    for s in plan {
        rows.push(run_in_child(&s.name, options.quick, None, &[])?);
    }
    // Latency at a fixed rate: half of the default row's measured end-to-end capacity.
    if let Some(default) = rows.iter().find(|r| r.name == "default" && !options.alone) {
        let rate = default.e2e_msgs_per_s / 2.0;
        let mut row = run_in_child("latency-half-capacity", options.quick, Some(rate), &[])?;
        row.name = format!("latency-at-{:.0}-msg-s", rate);
        rows.push(row);
        // The same with the broker's garbage collector tuned: the tail above is mostly its.
        let mut row = run_in_child(
            "latency-half-capacity",
            options.quick,
            Some(rate),
            BROKER_GC_TUNED,
        )?;
        row.name = format!("latency-broker-gogc-off-at-{:.0}-msg-s", rate);
        rows.push(row);
        // The same with each topic owned by a lease instead of the pinned group: the broker copies
        // each message it delivers to a pinned client once more (performance.md, eighteenth look).
        let mut row = run_in_child("latency-lease", options.quick, Some(rate), &[])?;
        row.name = format!("latency-lease-at-{:.0}-msg-s", rate);
        rows.push(row);
        // The raw client packing events as the bus batches them, at the same rate and with the
        // broker as it comes: the tail the broker leaves on this machine.
        let mut row = run_in_child("ceiling-packed-latency", options.quick, Some(rate), &[])?;
        row.name = format!("ceiling-packed-at-{:.0}-msg-s", rate);
        rows.push(row);
        // One event per message at half of its own capacity, next to the raw client at that
        // rate (the raw client cannot carry the batched rate at all).
        if let Some(unbatched) = rows.iter().find(|r| r.name == "default-unbatched") {
            let rate = unbatched.e2e_msgs_per_s / 2.0;
            let mut row = run_in_child("latency-unbatched", options.quick, Some(rate), &[])?;
            row.name = format!("latency-unbatched-at-{:.0}-msg-s", rate);
            rows.push(row);
            if !options.quick {
                for (child, label) in [
                    ("ceiling-latency", "ceiling"),
                    ("ceiling-bus-wire-latency", "ceiling-bus-wire"),
                ] {
                    let mut row = run_in_child(child, options.quick, Some(rate), &[])?;
                    row.name = format!("{label}-at-{:.0}-msg-s", rate);
                    rows.push(row);
                }
            }
        }
    }
    let ceiling = rows
        .iter()
        .find(|r| r.name == "ceiling")
        .map(|r| r.e2e_msgs_per_s)
        .unwrap_or(0.0);
    let wire = rows
        .iter()
        .find(|r| r.name == "ceiling-bus-wire")
        .map(|r| r.e2e_msgs_per_s)
        .unwrap_or(0.0);
    let packed = rows
        .iter()
        .find(|r| r.name == "ceiling-packed")
        .map(|r| r.e2e_msgs_per_s)
        .unwrap_or(0.0);
    let ratio = |rate: f64, to: f64| if to > 0.0 { rate / to } else { 0.0 };
    for row in &mut rows {
        row.ratio_to_ceiling = ratio(row.e2e_msgs_per_s, ceiling);
        row.ratio_to_ceiling_bus_wire = ratio(row.e2e_msgs_per_s, wire);
        row.ratio_to_ceiling_packed = ratio(row.e2e_msgs_per_s, packed);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::at_least_one;

    #[test]
    fn counts_on_the_command_line_are_numbers_of_at_least_one() {
        assert_eq!(at_least_one(Some("5".into()), "--runs").unwrap(), 5);
        for (value, why) in [
            (None, "--runs needs a number"),
            (Some("five".into()), "--runs needs a number"),
            (Some("0".into()), "--runs needs at least 1"),
        ] {
            let error = at_least_one(value, "--runs").unwrap_err().to_string();
            assert_eq!(error, why);
        }
    }
}
