//! Test support for the ordered event bus.
//!
//! * [`SequenceVerifier`]: records what handlers saw and counts order violations, gaps and
//!   duplicates, cheaply enough to run inside a benchmark with a million aggregates.
//! * [`NatsServer`]: a real `nats-server` with JetStream on a dynamic port and its own store,
//!   that can be killed and restarted on the same port and store.
//! * [`NatsCluster`]: several such servers forming a JetStream cluster on loopback, whose nodes
//!   can be killed and restarted.
//! * [`TcpProxy`]: a loopback TCP proxy that cuts every connection through it on demand, to
//!   inject network failures between a client and the server.
//! * [`conformance`]: the suite every transport passes.
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![forbid(unsafe_code)]

mod cluster;
pub mod conformance;
mod proxy;
mod server;
mod verifier;
mod wait;

pub use cluster::NatsCluster;
pub use proxy::TcpProxy;
pub use server::{
    find_nats_server, find_old_nats_server, NatsServer, NatsServerError, OlderServer, TestServer,
    JETSTREAM_LIMITS,
};
pub use verifier::{SequenceVerifier, VerifierReport};
pub use wait::{poll_until, wait_for, wait_for_async};
