//! An event bus on NATS JetStream that keeps strict per-aggregate order: the events of one
//! aggregate on one topic are published in order and handled in order, never overtaken, never
//! lost, while different aggregates are handled in parallel.
//!
//! This crate is the common path in one dependency: everything of [`bus_core`] (envelopes,
//! typed events, handlers, the transport traits) at the top, the NATS JetStream transport as
//! [`nats`] (feature `nats`, on by default) with [`NatsBus`] and [`NatsConfig`] at the top, and
//! the in-memory transport as `memory` (feature `memory`). The parts are also published on
//! their own: `ordered-bus-core`, `ordered-bus-nats`, `ordered-bus-memory`,
//! `ordered-bus-testkit`, `ordered-bus-keyed-pool`.
//!
//! ```no_run
//! use ordered_bus::{NatsBus, NatsConfig, PublishEvent, Topic};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = NatsBus::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
//! let topic = Topic::new("accounts")?;
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Opened;
//! # impl ordered_bus::Event for Opened { const TYPE: &'static str = "Opened"; }
//! bus.publish_event(&topic, "account-42", 1, &Opened).await?.await?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub use bus_core::*;

/// The NATS JetStream transport (`ordered-bus-nats`).
#[cfg(feature = "nats")]
pub use bus_nats as nats;
#[cfg(feature = "nats")]
pub use bus_nats::{NatsBus, NatsConfig};

/// The in-memory transport (`ordered-bus-memory`).
#[cfg(feature = "memory")]
pub use bus_memory as memory;
