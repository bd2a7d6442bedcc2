//! The transport conformance suite, run against a real nats-server.

mod common;

use bus_testkit::conformance;
use common::NatsHarness;

macro_rules! conformance_tests {
    ($retention:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            conformance::$name(&NatsHarness::with_retention($retention).await).await;
        }
    )*};
}

macro_rules! all_conformance_tests {
    ($retention:expr) => {
        conformance_tests!(
            $retention;
            round_trip,
            per_aggregate_order,
            redelivery_after_handler_error,
            no_loss_across_close_and_reopen,
            topic_isolation,
            publisher_close_flushes,
            graceful_shutdown,
            raw_ordered_by_key,
        );
    };
}

/// The default: work-queue retention.
mod work_queue {
    use super::*;
    all_conformance_tests!(bus_nats::Retention::WorkQueue);
}

/// Kept until every consumer has acknowledged, removed in bulk by the subscriptions.
mod acknowledged {
    use super::*;
    all_conformance_tests!(bus_nats::Retention::Acknowledged);
}
