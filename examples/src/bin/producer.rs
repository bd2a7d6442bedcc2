//! Publishes the history of some accounts as typed events: each opened, then deposits and
//! withdrawals, each aggregate's events in version order. Waits until the broker has stored
//! every one and says how many.

use anyhow::Result;
use bus_core::{PublishEvent, Publisher};
use bus_examples::{accounts, Connection, Deposited, Opened, Withdrawn, GROUP};
use bus_nats::NatsBus;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Publish typed account events")]
struct Args {
    #[command(flatten)]
    connection: Connection,
    /// How many accounts.
    #[arg(long, default_value_t = 10)]
    accounts: u32,
    /// Deposits and withdrawals per account, after its opening.
    #[arg(long, default_value_t = 9)]
    movements: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bus = NatsBus::connect(args.connection.config(GROUP)?).await?;
    let topic = accounts();
    let mut published = 0;
    for account in 0..args.accounts {
        let id = format!("account-{account}");
        let _receipt = bus
            .publish_event(
                &topic,
                &id,
                1,
                &Opened {
                    owner: format!("owner {account}"),
                    currency: "EUR".into(),
                },
            )
            .await?;
        published += 1;
        for movement in 1..=args.movements {
            let version = movement + 1;
            // Receipts can be awaited one by one; here flush() below waits for all of them.
            let _receipt = if movement % 3 == 0 {
                bus.publish_event(&topic, &id, version, &Withdrawn { cents: 50 })
                    .await?
            } else {
                bus.publish_event(&topic, &id, version, &Deposited { cents: 100 })
                    .await?
            };
            published += 1;
        }
    }
    bus.flush().await?;
    println!("published {published} events on {topic}");
    bus.close().await?;
    Ok(())
}
