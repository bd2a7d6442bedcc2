//! Shared set-up of the NATS integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{Publisher, RetryPolicy, Subscriber, Topic};
use bus_nats::{NatsBus, NatsConfig};
use bus_testkit::conformance::Harness;
use bus_testkit::NatsServer;

/// The configuration tests use: defaults, but quick retries.
pub fn test_config(url: &str) -> NatsConfig {
    let mut config = NatsConfig::new(url);
    config.retry = RetryPolicy {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(100),
        ..RetryPolicy::default()
    };
    config
}

pub struct NatsHarness {
    pub server: NatsServer,
    pub bus: NatsBus,
}

impl NatsHarness {
    pub async fn new() -> Self {
        let server = NatsServer::start();
        let bus = NatsBus::connect(test_config(&server.url()))
            .await
            .expect("connect");
        Self { server, bus }
    }
}

#[async_trait]
impl Harness for NatsHarness {
    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.bus.publisher())
    }
    async fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(self.bus.clone())
    }
    fn topic(&self, name: &str) -> Topic {
        Topic::new(format!("nats.{name}")).unwrap()
    }
}

/// The topic's durable consumer as the server sees it, read over a connection of its own.
pub async fn consumer_info(
    server: &NatsServer,
    bus: &NatsBus,
    topic: &Topic,
) -> async_nats::jetstream::consumer::Info {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(bus.stream_name(topic).await.unwrap())
        .await
        .unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&bus.config().consumer_name(topic))
        .await
        .unwrap();
    consumer.info().await.unwrap().clone()
}
