//! What the example programs share: the account events and the command-line connection
//! options.
//!
//! ```text
//! cargo run -p bus-examples --bin producer   -- --server nats://127.0.0.1:4222
//! cargo run -p bus-examples --bin projection -- --server nats://127.0.0.1:4222 --metrics 127.0.0.1:9898
//! cargo run -p bus-examples --bin operator   -- --server nats://127.0.0.1:4222
//! ```

use std::path::PathBuf;

use bus_core::{Event, Topic};
use bus_nats::{default_stream_name, NatsConfig, NatsError, Retention, StreamSpec};
use serde::{Deserialize, Serialize};

/// The topic the examples use.
pub fn accounts() -> Topic {
    Topic::new("examples.accounts").expect("a valid topic")
}

/// The consumer group of the projection.
pub const GROUP: &str = "account-balances";

/// An account was opened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Opened {
    /// Its owner.
    pub owner: String,
    /// The account's currency (since version 2 of the event: version 1 had only the owner).
    pub currency: String,
}
impl Event for Opened {
    const TYPE: &'static str = "AccountOpened";
    const VERSION: u32 = 2;
}

/// Money came in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deposited {
    /// In cents.
    pub cents: i64,
}
impl Event for Deposited {
    const TYPE: &'static str = "Deposited";
}

/// Money went out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Withdrawn {
    /// In cents.
    pub cents: i64,
}
impl Event for Withdrawn {
    const TYPE: &'static str = "Withdrawn";
}

/// Where to connect: a configuration file, or a server URL.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// The NATS server(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub server: String,
    /// A bus configuration file (see examples/bus.toml); replaces --server.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl Connection {
    /// The configuration these options ask for, with `group` as the consumer group.
    pub fn config(&self, group: &str) -> Result<NatsConfig, NatsError> {
        let mut config = match &self.config {
            Some(path) => NatsConfig::load(path)?,
            None => NatsConfig::new(&self.server),
        };
        if config.consumer.group.is_empty() {
            config.consumer.group = group.to_owned();
        }
        // The accounts' history is kept (Limits retention), so that a projection can be
        // rebuilt from it; a configuration file may say otherwise.
        let topic = accounts();
        if !config.streams.iter().any(|s| s.topics.contains(&topic)) {
            let mut spec = StreamSpec::new(default_stream_name(&topic), [topic]);
            spec.retention = Retention::Limits;
            config.streams.push(spec);
        }
        Ok(config)
    }
}
