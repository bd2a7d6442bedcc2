//! `bus`: the operator's command line for the ordered event bus.
//!
//! ```text
//! bus [--server URL | --config FILE] [--group GROUP] [--json] <command>
//!   topics                          every topic, its stream and its consumers
//!   lag <topic>                     how far the group is behind
//!   halted <topic>                  the group's halted aggregates, per live subscription
//!   resume <topic> <aggregate>      hands a halted aggregate's failed event to its handler again
//!   skip <topic> <aggregate>        dead-letters it and goes on with the aggregate
//!   dead-letters <topic>            the topic's dead letters
//!   replay <topic> --sequence N     publishes a dead letter again (or --all) and removes it
//!   reset <topic> --to-start | --to-sequence N | --to-time T
//!                                   moves the group to a point of the topic, to rebuild from it
//!   repartition <topic> --partitions N
//!                                   changes a drained, unread topic's partition count
//!   completions <shell>             a completion script for bash, zsh, fish, ...
//! ```
//!
//! `--json` prints one JSON document per command instead of lines for people (for scripts and
//! dashboards). A topic or group that does not exist is an error and a non-zero exit code,
//! never figures.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bus_core::Topic;
use bus_nats::{NatsBus, NatsConfig, ResetTo};
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(
    name = "bus",
    version,
    about = "Operate the ordered event bus on NATS JetStream"
)]
struct Cli {
    /// The NATS server(s), comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    server: String,
    /// A bus configuration file (TOML, as `NatsConfig::load` reads it, with `BUS__*`
    /// environment overrides); replaces --server.
    #[arg(long, env = "BUS_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The consumer group (the service's `consumer.group`).
    #[arg(long, env = "BUS_GROUP", global = true)]
    group: Option<String>,
    /// How long to gather answers from the group's subscriptions, in milliseconds (500; for
    /// `reset`, how long the subscription that consumes the topic may take: 10 000, as its
    /// running handlers finish first).
    #[arg(long, global = true)]
    wait_ms: Option<u64>,
    /// Print one JSON document instead of lines for people.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every topic the broker holds: stream, retention, partitions, stored messages, and each
    /// consumer's ack floor, undelivered and unacknowledged events.
    Topics,
    /// How far the group is behind on a topic.
    Lag {
        /// The topic.
        topic: String,
    },
    /// The group's halted aggregates on a topic, as each live subscription reports them.
    Halted {
        /// The topic.
        topic: String,
    },
    /// Hands a halted aggregate's failed event to its handler again, then its waiting events.
    Resume {
        /// The topic.
        topic: String,
        /// The aggregate (ordering key).
        aggregate: String,
    },
    /// Dead-letters a halted aggregate's failed event and goes on with the rest.
    Skip {
        /// The topic.
        topic: String,
        /// The aggregate (ordering key).
        aggregate: String,
    },
    /// The topic's dead letters, oldest first.
    DeadLetters {
        /// The topic.
        topic: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Publishes dead letters of a topic again, at its end, and removes them.
    Replay {
        /// The topic.
        topic: String,
        /// The dead letter's sequence (as `dead-letters` lists it).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        sequence: Option<u64>,
        /// Every dead letter of the topic.
        #[arg(long)]
        all: bool,
    },
    /// Moves the group to a point of the topic, to rebuild what it builds from there (or to skip
    /// ahead). The subscription that consumes the topic finishes its running handlers, drops
    /// what it has queued and delivers every aggregate's events again, in order, from the
    /// point; with none running, the group's next subscription starts there. Only for topics
    /// whose stream keeps what was read (Limits or Acknowledged retention).
    #[command(group(clap::ArgGroup::new("to").required(true)))]
    Reset {
        /// The topic.
        topic: String,
        /// The first event the topic still keeps.
        #[arg(long, group = "to")]
        to_start: bool,
        /// A stream sequence (as `dead-letters`, `halted` and the handlers' deliveries show).
        #[arg(long, group = "to", value_name = "N")]
        to_sequence: Option<u64>,
        /// The first event stored at or after this time, RFC 3339 (`2026-12-03T10:00:00Z`).
        #[arg(long, group = "to", value_name = "TIME", value_parser = parse_time)]
        to_time: Option<std::time::SystemTime>,
    },
    /// Changes a topic's partition count (1: none). Refused unless the topic stores no event and
    /// nobody reads it; stop its publishers of the old count first.
    Repartition {
        /// The topic.
        topic: String,
        /// The new count.
        #[arg(long)]
        partitions: u32,
    },
    /// Prints a completion script for a shell (for example `bus completions bash >
    /// /etc/bash_completion.d/bus`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "bus", &mut std::io::stdout());
        return Ok(());
    }
    let mut config = match &cli.config {
        Some(path) => NatsConfig::load(path)?,
        None => NatsConfig::new(&cli.server),
    };
    if let Some(group) = &cli.group {
        config.consumer.group = group.clone();
    }
    // An operator's commands do not subscribe: nothing to sample.
    config.metrics_interval = Duration::ZERO;
    let needs_group = matches!(
        cli.command,
        Command::Lag { .. }
            | Command::Halted { .. }
            | Command::Resume { .. }
            | Command::Skip { .. }
            | Command::Reset { .. }
    );
    if needs_group && config.consumer.group.is_empty() {
        bail!("this command is about one consumer group: give --group (or BUS_GROUP, or consumer.group in --config)");
    }
    let wait = Duration::from_millis(cli.wait_ms.unwrap_or(match cli.command {
        Command::Reset { .. } => 10_000,
        _ => 500,
    }));
    let bus = NatsBus::connect(config).await?;
    let result = run(&bus, cli.command, wait, cli.json).await;
    bus.close().await?;
    result
}

fn parse_time(text: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("{e}: give a time as RFC 3339, for example 2026-12-03T10:00:00Z"))
}

fn topic(name: &str) -> Result<Topic> {
    Topic::new(name).with_context(|| format!("`{name}` is not a topic"))
}

/// Prints a command's JSON document.
fn print_json(value: Value) {
    println!("{value:#}");
}

async fn run(bus: &NatsBus, command: Command, wait: Duration, as_json: bool) -> Result<()> {
    match command {
        Command::Topics => {
            let topics = bus.topics().await?;
            if as_json {
                print_json(Value::Array(
                    topics
                        .iter()
                        .map(|t| {
                            json!({
                                "topic": t.topic.as_str(),
                                "stream": t.stream,
                                "retention": t.retention.to_string(),
                                "partitions": t.partitions,
                                "messages": t.messages,
                                "consumers": t.consumers.iter().map(|c| json!({
                                    "name": c.name,
                                    "partition": c.partition,
                                    "ack_floor": c.ack_floor,
                                    "delivered": c.delivered,
                                    "undelivered": c.undelivered,
                                    "unacknowledged": c.unacknowledged,
                                    "redelivered": c.redelivered,
                                    "waiting_pulls": c.waiting,
                                })).collect::<Vec<_>>(),
                            })
                        })
                        .collect(),
                ));
                return Ok(());
            }
            if topics.is_empty() {
                println!("no topics");
            }
            for t in topics {
                println!(
                    "{}  stream {}  {}  partitions {}  messages {}",
                    t.topic, t.stream, t.retention, t.partitions, t.messages
                );
                for c in t.consumers {
                    let partition = c.partition.map(|p| format!(" p{p}")).unwrap_or_default();
                    println!(
                        "  consumer {}{}  ack floor {}  delivered {}  undelivered {}  unacknowledged {}  redelivered {}  waiting pulls {}",
                        c.name, partition, c.ack_floor, c.delivered, c.undelivered, c.unacknowledged, c.redelivered, c.waiting
                    );
                }
            }
        }
        Command::Lag { topic: name } => {
            let lag = bus.lag(&topic(&name)?).await?;
            if as_json {
                print_json(json!({
                    "topic": lag.topic.as_str(),
                    "undelivered": lag.undelivered,
                    "unacknowledged": lag.unacknowledged,
                    "oldest_unhandled_seconds": lag.oldest_unhandled_age.map(|a| a.as_secs_f64()),
                }));
                return Ok(());
            }
            let age = lag
                .oldest_unhandled_age
                .map_or("-".to_owned(), |a| format!("{:.3}s", a.as_secs_f64()));
            println!(
                "{}  undelivered {}  unacknowledged {}  oldest unhandled {}",
                lag.topic, lag.undelivered, lag.unacknowledged, age
            );
        }
        Command::Halted { topic: name } => {
            let members = bus.remote_halted(&topic(&name)?, wait).await?;
            if as_json {
                print_json(Value::Array(
                    members
                        .iter()
                        .map(|m| {
                            json!({
                                "member": m.member,
                                "owner": m.owner,
                                "halted": m.halted.iter().map(|h| json!({
                                    "aggregate": h.key,
                                    "version": h.event_version,
                                    "stream_sequence": h.stream_sequence,
                                    "waiting": h.waiting,
                                    "attempts": h.attempts,
                                    "reason": h.reason,
                                    "error": h.error,
                                })).collect::<Vec<_>>(),
                            })
                        })
                        .collect(),
                ));
                return Ok(());
            }
            for m in members {
                println!(
                    "{}{}: {} halted",
                    m.member,
                    if m.owner { " (owner)" } else { "" },
                    m.halted.len()
                );
                for h in m.halted {
                    let version = h.event_version.map_or("-".to_owned(), |v| v.to_string());
                    let sequence = h.stream_sequence.map_or("-".to_owned(), |s| s.to_string());
                    println!(
                        "  {}  v{}  seq {}  waiting {}  attempts {}  {}: {}",
                        h.key, version, sequence, h.waiting, h.attempts, h.reason, h.error
                    );
                }
            }
        }
        Command::Resume {
            topic: name,
            aggregate,
        } => {
            let member = bus.remote_resume(&topic(&name)?, &aggregate, wait).await?;
            if as_json {
                print_json(json!({"resumed": aggregate, "member": member.to_string()}));
            } else {
                println!("resumed {aggregate} ({member})");
            }
        }
        Command::Skip {
            topic: name,
            aggregate,
        } => {
            let member = bus.remote_skip(&topic(&name)?, &aggregate, wait).await?;
            if as_json {
                print_json(json!({"skipped": aggregate, "member": member.to_string()}));
            } else {
                println!("skipped the failed event of {aggregate} ({member})");
            }
        }
        Command::DeadLetters { topic: name, limit } => {
            let letters = bus.dead_letters(&topic(&name)?, limit).await?;
            if as_json {
                print_json(Value::Array(
                    letters
                        .iter()
                        .map(|l| {
                            let envelope = l.envelope().ok();
                            json!({
                                "sequence": l.sequence,
                                "aggregate": envelope.as_ref().map(|e| e.aggregate_id().as_str().to_owned()),
                                "version": envelope.as_ref().map(|e| e.event_version()),
                                "event_type": envelope.as_ref().map(|e| e.event_type().as_str().to_owned()),
                                "reason": l.reason.to_string(),
                                "attempts": l.attempts,
                                "error": l.error,
                            })
                        })
                        .collect(),
                ));
                return Ok(());
            }
            if letters.is_empty() {
                println!("no dead letters");
            }
            for l in letters {
                let (aggregate, version) = match l.envelope() {
                    Ok(e) => (e.aggregate_id().to_string(), e.event_version().to_string()),
                    Err(_) => ("-".to_owned(), "-".to_owned()),
                };
                println!(
                    "{}  {} v{}  {}  attempts {}  {}",
                    l.sequence, aggregate, version, l.reason, l.attempts, l.error
                );
            }
        }
        Command::Replay {
            topic: name,
            sequence,
            all,
        } => {
            let topic = topic(&name)?;
            let letters = bus.dead_letters(&topic, usize::MAX).await?;
            let chosen: Vec<_> = letters
                .iter()
                .filter(|l| all || Some(l.sequence) == sequence)
                .collect();
            if chosen.is_empty() {
                bail!("no such dead letter of topic `{topic}`");
            }
            let mut replayed = Vec::new();
            for letter in chosen {
                let published = bus.replay_dead_letter(letter).await?;
                if as_json {
                    replayed.push(
                        json!({"dead_letter": letter.sequence, "sequence": published.sequence}),
                    );
                } else {
                    println!(
                        "replayed {} as sequence {}",
                        letter.sequence,
                        published.sequence.map_or("-".to_owned(), |s| s.to_string())
                    );
                }
            }
            if as_json {
                print_json(json!({ "replayed": replayed }));
            }
        }
        Command::Reset {
            topic: name,
            to_start,
            to_sequence,
            to_time,
        } => {
            let to = match (to_start, to_sequence, to_time) {
                (_, Some(sequence), _) => ResetTo::Sequence(sequence),
                (_, _, Some(time)) => ResetTo::Time(time),
                _ => ResetTo::Start,
            };
            let topic = topic(&name)?;
            let reset = bus.reset_group(&topic, to, wait).await?;
            if as_json {
                print_json(json!({
                    "topic": topic.as_str(),
                    "sequence": reset.sequence,
                    "moved_by": reset.moved_by,
                }));
            } else {
                match reset.moved_by {
                    Some(member) => println!(
                        "{topic}: delivery moved to sequence {} ({member})",
                        reset.sequence
                    ),
                    None => println!(
                        "{topic}: no subscription running; the group starts at sequence {} next time",
                        reset.sequence
                    ),
                }
            }
        }
        Command::Repartition {
            topic: name,
            partitions,
        } => {
            let topic = topic(&name)?;
            let before = bus.repartition(&topic, partitions).await?;
            if as_json {
                print_json(
                    json!({"topic": topic.as_str(), "before": before, "partitions": partitions}),
                );
            } else {
                println!("{topic}: {before} partition(s) -> {partitions}");
            }
        }
        Command::Completions { .. } => unreachable!("answered before connecting"),
    }
    Ok(())
}
