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
