//! The transport conformance suite, run against a real nats-server.

mod common;

use bus_testkit::conformance;
use common::NatsHarness;

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            conformance::$name(&NatsHarness::new().await).await;
        }
    )*};
}

conformance_tests!(
    round_trip,
    per_aggregate_order,
    redelivery_after_handler_error,
    no_loss_across_close_and_reopen,
    topic_isolation,
    publisher_close_flushes,
    graceful_shutdown,
    raw_ordered_by_key,
);
