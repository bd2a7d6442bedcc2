//! The transport conformance suite, run against a real nats-server.

mod common;

use bus_nats::Retention;
use common::NatsHarness;

/// The default: work-queue retention.
mod work_queue {
    use super::*;
    bus_testkit::conformance_tests!(NatsHarness::with_retention(Retention::WorkQueue).await);
}

/// Kept until every consumer has acknowledged, removed in bulk by the subscriptions.
mod acknowledged {
    use super::*;
    bus_testkit::conformance_tests!(NatsHarness::with_retention(Retention::Acknowledged).await);
}

/// Record batches: several events in one message, acknowledged once all are settled.
mod batched {
    use super::*;
    bus_testkit::conformance_tests!(NatsHarness::batched(Retention::WorkQueue).await);
}

/// Each subscription on a thread of its own (`SubscriptionRuntime::OwnThread`), with record
/// batches as in `batched`.
mod own_thread {
    use super::*;
    bus_testkit::conformance_tests!(
        NatsHarness::with_config(Retention::WorkQueue, |config| {
            config.subscription_runtime = bus_nats::SubscriptionRuntime::OwnThread;
            config.batching = bus_nats::BatchConfig::on();
            config.batching.max_events = 16;
            config.batching.max_in_flight = 2;
        })
        .await
    );
}
