//! `bus`: the operator's command line for the ordered event bus.
//!
//! ```text
//! bus [--server URL | --config FILE] [--group GROUP] <command>
//!   topics                          every topic, its stream and its consumers
//!   lag <topic>                     how far the group is behind
//!   halted <topic>                  the group's halted aggregates, per live subscription
//!   resume <topic> <aggregate>      hands a halted aggregate's failed event to its handler again
//!   skip <topic> <aggregate>        dead-letters it and goes on with the aggregate
//!   dead-letters <topic>            the topic's dead letters
//!   replay <topic> --sequence N     publishes a dead letter again (or --all) and removes it
//!   repartition <topic> --partitions N
//!                                   changes a drained, unread topic's partition count
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bus_core::Topic;
use bus_nats::{NatsBus, NatsConfig};
use clap::{Parser, Subcommand};

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
    /// How long to gather answers from the group's subscriptions, in milliseconds.
    #[arg(long, default_value_t = 500, global = true)]
    wait_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every topic the broker holds: stream, retention, partitions, stored events, and each
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
    /// Changes a topic's partition count (1: none). Refused unless the topic stores no event and
    /// nobody reads it; stop its publishers of the old count first.
    Repartition {
        /// The topic.
        topic: String,
        /// The new count.
        #[arg(long)]
        partitions: u32,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
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
    );
    if needs_group && config.consumer.group.is_empty() {
        bail!("this command is about one consumer group: give --group (or BUS_GROUP, or consumer.group in --config)");
    }
    let wait = Duration::from_millis(cli.wait_ms);
    let bus = NatsBus::connect(config).await?;
    let result = run(&bus, cli.command, wait).await;
    bus.close().await?;
    result
}

fn topic(name: &str) -> Result<Topic> {
    Topic::new(name).with_context(|| format!("`{name}` is not a topic"))
}

async fn run(bus: &NatsBus, command: Command, wait: Duration) -> Result<()> {
    match command {
        Command::Topics => {
            let topics = bus.topics().await?;
            if topics.is_empty() {
                println!("no topics");
            }
            for t in topics {
                println!(
                    "{}  stream {}  {}  partitions {}  events {}",
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
            println!("resumed {aggregate} ({member})");
        }
        Command::Skip {
            topic: name,
            aggregate,
        } => {
            let member = bus.remote_skip(&topic(&name)?, &aggregate, wait).await?;
            println!("skipped the failed event of {aggregate} ({member})");
        }
        Command::DeadLetters { topic: name, limit } => {
            let letters = bus.dead_letters(&topic(&name)?, limit).await?;
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
            for letter in chosen {
                let published = bus.replay_dead_letter(letter).await?;
                println!(
                    "replayed {} as sequence {}",
                    letter.sequence,
                    published.sequence.map_or("-".to_owned(), |s| s.to_string())
                );
            }
        }
        Command::Repartition {
            topic: name,
            partitions,
        } => {
            let topic = topic(&name)?;
            let before = bus.repartition(&topic, partitions).await?;
            println!("{topic}: {before} partition(s) -> {partitions}");
        }
    }
    Ok(())
}
