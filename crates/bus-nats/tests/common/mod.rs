//! Shared set-up of the NATS integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod replicas;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{Publisher, RetryPolicy, Subscriber, Topic};
use bus_nats::{default_stream_name, NatsBus, NatsConfig, Retention, StreamSpec};
use bus_testkit::conformance::Harness;
use bus_testkit::NatsServer;

/// The configuration tests use: defaults, but quick retries.
pub fn test_config(url: &str) -> NatsConfig {
    let mut config = NatsConfig::new(url).with_group("test");
    config.retry = RetryPolicy {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(100),
        ..RetryPolicy::default()
    };
    config
}

/// [`test_config`] with record batches off: for tests whose assertions count what the broker
/// counts per message (stream messages, a consumer's pending and redelivered messages, lag) as
/// events, or that drive the single-event path on purpose. The batched path has its own tests
/// (`batches_nats`, the `batched` conformance suite, the batched crash and cut tests).
#[allow(dead_code)]
pub fn unbatched_config(url: &str) -> NatsConfig {
    let mut config = test_config(url);
    config.batching = bus_nats::BatchConfig::off();
    config
}

pub struct NatsHarness {
    pub server: NatsServer,
    pub bus: NatsBus,
    retention: Retention,
}

/// Every topic name the conformance suite uses; a harness with a retention other than the
/// default gives each of them a stream of that retention.
const CONFORMANCE_TOPICS: [&str; 10] = [
    "round-trip",
    "order",
    "retry",
    "reopen",
    "iso-a",
    "iso-b",
    "close-flush",
    "graceful",
    "cancel",
    "raw",
];

fn conformance_topic(name: &str) -> Topic {
    Topic::new(format!("nats.{name}")).unwrap()
}

impl NatsHarness {
    pub async fn new() -> Self {
        Self::with_retention(Retention::default()).await
    }

    /// A harness whose topics' streams are kept by `retention`.
    pub async fn with_retention(retention: Retention) -> Self {
        Self::with_config(retention, |_| {}).await
    }

    /// Publishing record batches: small ones, two in flight per topic, so that batches form
    /// and an aggregate's events span several.
    pub async fn batched(retention: Retention) -> Self {
        Self::with_config(retention, |config| {
            config.batching = bus_nats::BatchConfig::on();
            config.batching.max_events = 16;
            config.batching.max_in_flight = 2;
        })
        .await
    }

    pub async fn with_config(retention: Retention, adjust: impl FnOnce(&mut NatsConfig)) -> Self {
        let server = NatsServer::start();
        let mut config = conformance_config(&server.url(), retention, 1);
        adjust(&mut config);
        let bus = NatsBus::connect(config).await.expect("connect");
        Self {
            server,
            bus,
            retention,
        }
    }
}

/// The tests' configuration with a stream of `retention` and `replicas` for every topic the
/// conformance suite uses.
pub fn conformance_config(url: &str, retention: Retention, replicas: usize) -> NatsConfig {
    let mut config = test_config(url);
    for name in CONFORMANCE_TOPICS {
        let topic = conformance_topic(name);
        let mut spec = StreamSpec::new(default_stream_name(&topic), [topic]);
        spec.retention = retention;
        spec.replicas = replicas;
        // The suite stores little; a file stream reserves its max_bytes on every replica's
        // disk, and ten topics of the default 1 GiB on three nodes sharing one disk ask for
        // 30 GiB ("insufficient storage" on a machine with less free).
        spec.max_bytes = 64 << 20;
        config.streams.push(spec);
    }
    config.dead_letters.replicas = replicas;
    config
}

/// The conformance suite's topic for test `name`, which must be one of `CONFORMANCE_TOPICS`.
pub fn conformance_topic_checked(name: &str) -> Topic {
    assert!(
        CONFORMANCE_TOPICS.contains(&name),
        "topic `{name}` is not in CONFORMANCE_TOPICS, so its stream is not configured"
    );
    conformance_topic(name)
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
        assert!(
            CONFORMANCE_TOPICS.contains(&name),
            "topic `{name}` is not in CONFORMANCE_TOPICS, so it would not get {:?} retention",
            self.retention
        );
        conformance_topic(name)
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
    // On servers before 2.14 a new owner restarts delivery by deleting the consumer and
    // creating it again: read in between, it is not there for a moment.
    let name = bus.config().consumer_name(topic);
    // One request per attempt: a consumer looked up and then asked for its info could be gone
    // in between.
    bus_testkit::poll_until(
        &format!("consumer `{name}` to be readable"),
        std::time::Duration::from_secs(10),
        || async {
            match stream.consumer_info(&name).await {
                Ok(info) => Some(info),
                Err(e) => {
                    eprintln!("consumer `{name}` not readable yet ({e}); asking again");
                    None
                }
            }
        },
    )
    .await
}

/// The events in the messages the topic's consumer has delivered above its ack floor (a record
/// batch counts its events): an upper bound of what a successor may replay.
#[allow(dead_code)]
pub async fn events_above_ack_floor(server: &NatsServer, bus: &NatsBus, topic: &Topic) -> u64 {
    let info = consumer_info(server, bus, topic).await;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let stream = js
        .get_stream(bus.stream_name(topic).await.unwrap())
        .await
        .unwrap();
    let mut events = 0;
    for seq in info.ack_floor.stream_sequence + 1..=info.delivered.stream_sequence {
        // Acknowledged and removed (work-queue retention) is not above the floor's gaps.
        if let Ok(message) = stream.get_raw_message(seq).await {
            events += message
                .headers
                .get(bus_core::wire::BATCH)
                .map_or(1, |n| n.to_string().parse::<u64>().unwrap());
        }
    }
    events
}

#[allow(unused_imports)]
pub use bus_testkit::wait_for;

/// Subscribes a handler that accepts every event and does nothing: for tests about whether a
/// subscription is accepted, or to provision its consumer.
pub async fn subscribe_ignoring(
    bus: &NatsBus,
    topic: &Topic,
) -> Result<bus_core::Subscription, bus_core::SubscribeError> {
    let handler = bus_core::handler_fn(|_e: bus_core::Envelope| async { Ok(()) });
    bus.subscribe(topic, Arc::new(handler)).await
}

/// The stream sequence of the topic's last stored message.
pub async fn stream_last_sequence(server: &NatsServer, bus: &NatsBus, topic: &Topic) -> u64 {
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    js.get_stream(bus.stream_name(topic).await.unwrap())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence
}
