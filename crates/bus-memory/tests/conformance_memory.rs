//! The transport conformance suite, run against the in-memory transport.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{Publisher, RetryPolicy, Subscriber, Topic};
use bus_memory::{MemoryBus, MemoryConfig};
use bus_testkit::conformance::Harness;

struct MemoryHarness(MemoryBus);

impl MemoryHarness {
    fn new() -> Self {
        Self(MemoryBus::with_config(MemoryConfig {
            retry: RetryPolicy {
                initial_backoff: Duration::from_millis(5),
                ..RetryPolicy::default()
            },
            // Small queues, so that a close leaves events for the next subscriber.
            pool: keyed_pool::PoolConfig {
                workers: 64,
                queue_capacity: 8,
                ..keyed_pool::PoolConfig::default()
            },
            ..MemoryConfig::default()
        }))
    }
}

#[async_trait]
impl Harness for MemoryHarness {
    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.0.clone())
    }
    async fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(self.0.clone())
    }
    fn topic(&self, name: &str) -> Topic {
        Topic::new(format!("memory.{name}")).unwrap()
    }
}

bus_testkit::conformance_tests!(MemoryHarness::new());
