//! An operator's view through the API (what the `bus` CLI does on the command line): the
//! topics with their consumers, the projection group's lag, its halted aggregates in every
//! live replica, and its dead letters.

use std::time::Duration;

use anyhow::Result;
use bus_examples::{accounts, Connection, GROUP};
use bus_nats::NatsBus;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Show the state of the examples' topic")]
struct Args {
    #[command(flatten)]
    connection: Connection,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut config = args.connection.config(GROUP)?;
    config.metrics_interval = Duration::ZERO;
    let bus = NatsBus::connect(config).await?;
    let topic = accounts();
    for t in bus.topics().await? {
        println!(
            "topic {} ({} messages in {})",
            t.topic, t.messages, t.stream
        );
        for c in &t.consumers {
            println!(
                "  {}: ack floor {}, {} undelivered, {} unacknowledged",
                c.name, c.ack_floor, c.undelivered, c.unacknowledged
            );
        }
    }
    let lag = bus.lag(&topic).await?;
    println!(
        "group {GROUP} on {topic}: {} undelivered, {} unacknowledged, oldest unhandled {:?}",
        lag.undelivered, lag.unacknowledged, lag.oldest_unhandled_age
    );
    match bus.remote_halted(&topic, Duration::from_millis(500)).await {
        Ok(members) => {
            for m in members {
                println!(
                    "{} (owner: {}): {} halted",
                    m.member,
                    m.owner,
                    m.halted.len()
                );
                for h in m.halted {
                    println!("  {} at v{:?}: {}", h.key, h.event_version, h.error);
                }
            }
        }
        Err(e) => println!("no live subscription answered: {e}"),
    }
    let letters = bus.dead_letters(&topic, 100).await?;
    println!("{} dead letters", letters.len());
    for l in letters {
        println!("  {}: {} ({})", l.sequence, l.reason, l.error);
    }
    bus.close().await?;
    Ok(())
}
