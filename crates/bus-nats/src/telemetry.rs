//! Metrics through the [`metrics`] facade: whatever recorder the application installs
//! (Prometheus, StatsD, ...) receives them; with none installed they cost a branch.
//!
//! Every metric carries a `topic` label; those of subscriptions also `group`. The names are
//! the `METRIC_*` constants of this module, documented in `docs/operations.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bus_core::{
    AggregateControl, CloseReport, SubscribeError, Subscription, SubscriptionHandle, Topic,
};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::connection::Shared;

/// Publishes settled, by `outcome`: `stored`, `duplicate` (the broker had the event ID
/// already) or `failed`.
pub const METRIC_PUBLISHED: &str = "bus_publish_total";
/// Seconds from `publish` to the broker's ack (or the failure), retries included.
pub const METRIC_PUBLISH_SECONDS: &str = "bus_publish_seconds";
/// Publishes sent again after a transient failure.
pub const METRIC_PUBLISH_RETRIES: &str = "bus_publish_retries_total";
/// Events in each message a publisher sends with record batches on (1 for an event sent
/// alone): how full batches are.
pub const METRIC_PUBLISH_BATCH_EVENTS: &str = "bus_publish_batch_events";
/// Events settled by a subscription, by `outcome`: `handled` (acknowledged), `dead_lettered`,
/// `halted` (its aggregate halted on it) or `returned` (failed while the subscription was
/// going; delivered again).
pub const METRIC_HANDLED: &str = "bus_handle_total";
/// Seconds from the first handler call for an event to its last, retries included.
pub const METRIC_HANDLE_SECONDS: &str = "bus_handle_seconds";
/// Handler calls that failed and were tried again in place.
pub const METRIC_HANDLE_RETRIES: &str = "bus_handle_retries_total";
/// Dead letters stored, by `reason` (`permanent`, `retries-exhausted`, `panic`, `skipped`,
/// `undecodable`, `no-key`, `unreadable`).
pub const METRIC_DEAD_LETTERS: &str = "bus_dead_letters_total";
/// Sampled: messages received and not settled (queued, running, retrying, held).
pub const METRIC_IN_FLIGHT: &str = "bus_in_flight";
/// Sampled: messages waiting in the worker queues.
pub const METRIC_QUEUED: &str = "bus_pool_queued";
/// Sampled: messages handled whose acknowledgement waits for an earlier message holding one of
/// their aggregates.
pub const METRIC_ACKS_WAITING: &str = "bus_acks_waiting";
/// Sampled: aggregates halted now.
pub const METRIC_HALTED_AGGREGATES: &str = "bus_halted_aggregates";
/// Sampled: events held behind halted aggregates, the failed ones included.
pub const METRIC_HALTED_EVENTS: &str = "bus_halted_events";
/// Sampled: 1 while this process consumes the topic (or some of its partitions), else 0.
pub const METRIC_OWNER: &str = "bus_owner";
/// Sampled: times delivery restarted in order after a discontinuity.
pub const METRIC_DELIVERY_RESTARTS: &str = "bus_delivery_restarts_total";
/// Sampled: times an operator moved delivery to another point of the topic (a reset).
pub const METRIC_DELIVERY_MOVES: &str = "bus_delivery_moves_total";
/// Sampled, from the broker: events stored and not yet delivered to the group.
pub const METRIC_LAG_UNDELIVERED: &str = "bus_consumer_undelivered";
/// Sampled, from the broker: events delivered and not yet acknowledged.
pub const METRIC_LAG_UNACKNOWLEDGED: &str = "bus_consumer_unacknowledged";
/// Sampled, from the broker: age in seconds of the oldest event the group has not handled
/// (0 when it has handled everything).
pub const METRIC_LAG_SECONDS: &str = "bus_consumer_lag_seconds";

/// The seconds from `from` to `to` (to now, when `None`), for a histogram: worked out only when
/// the histogram records it. A histogram no recorder listens to never converts what it is
/// given (the `metrics` crate's no-op handle), so with no recorder installed, timing each
/// publish and each handler call costs no clock read at its end and no arithmetic (callgrind,
/// `--quick --row default`: 511.4 -> 502.3 M, about 180 instructions per event).
pub(crate) struct Seconds {
    pub(crate) from: Instant,
    pub(crate) to: Option<Instant>,
}

impl Seconds {
    /// From `from` until the histogram takes it.
    pub(crate) fn since(from: Instant) -> Self {
        Self { from, to: None }
    }
}

impl metrics::IntoF64 for Seconds {
    fn into_f64(self) -> f64 {
        self.to
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(self.from)
            .as_secs_f64()
    }
}

/// One topic's publish metrics, looked up once per topic.
pub(crate) struct PublishMetrics {
    pub(crate) stored: Counter,
    pub(crate) duplicate: Counter,
    pub(crate) failed: Counter,
    pub(crate) retries: Counter,
    pub(crate) seconds: Histogram,
    pub(crate) batch_events: Histogram,
}

impl PublishMetrics {
    pub(crate) fn new(topic: &Topic) -> Self {
        let topic = topic.to_string();
        Self {
            stored: counter!(METRIC_PUBLISHED, "topic" => topic.clone(), "outcome" => "stored"),
            duplicate: counter!(METRIC_PUBLISHED, "topic" => topic.clone(), "outcome" => "duplicate"),
            failed: counter!(METRIC_PUBLISHED, "topic" => topic.clone(), "outcome" => "failed"),
            retries: counter!(METRIC_PUBLISH_RETRIES, "topic" => topic.clone()),
            seconds: histogram!(METRIC_PUBLISH_SECONDS, "topic" => topic.clone()),
            batch_events: histogram!(METRIC_PUBLISH_BATCH_EVENTS, "topic" => topic),
        }
    }
}

/// One subscription's handling metrics.
pub(crate) struct HandleMetrics {
    topic: String,
    group: String,
    pub(crate) handled: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) halted: Counter,
    pub(crate) returned: Counter,
    pub(crate) retries: Counter,
    pub(crate) seconds: Histogram,
}

impl HandleMetrics {
    pub(crate) fn new(topic: &Topic, group: &str) -> Self {
        let (topic, group) = (topic.to_string(), group.to_owned());
        let outcome = |outcome: &'static str| counter!(METRIC_HANDLED, "topic" => topic.clone(), "group" => group.clone(), "outcome" => outcome);
        Self {
            handled: outcome("handled"),
            dead_lettered: outcome("dead_lettered"),
            halted: outcome("halted"),
            returned: outcome("returned"),
            retries: counter!(METRIC_HANDLE_RETRIES, "topic" => topic.clone(), "group" => group.clone()),
            seconds: histogram!(METRIC_HANDLE_SECONDS, "topic" => topic.clone(), "group" => group.clone()),
            topic,
            group,
        }
    }

    /// A dead letter stored, for `reason`.
    pub(crate) fn dead_letter(&self, reason: &str) {
        counter!(METRIC_DEAD_LETTERS, "topic" => self.topic.clone(), "group" => self.group.clone(), "reason" => reason.to_owned())
            .increment(1);
    }
}

/// The sampled gauges of one subscription.
struct Gauges {
    in_flight: Gauge,
    queued: Gauge,
    acks_waiting: Gauge,
    halted_aggregates: Gauge,
    halted_events: Gauge,
    owner: Gauge,
    restarts: Counter,
    moves: Counter,
    undelivered: Gauge,
    unacknowledged: Gauge,
    lag_seconds: Gauge,
}

impl Gauges {
    fn new(topic: &Topic, group: &str) -> Self {
        let labels = [("topic", topic.to_string()), ("group", group.to_owned())];
        Self {
            in_flight: gauge!(METRIC_IN_FLIGHT, &labels),
            queued: gauge!(METRIC_QUEUED, &labels),
            acks_waiting: gauge!(METRIC_ACKS_WAITING, &labels),
            halted_aggregates: gauge!(METRIC_HALTED_AGGREGATES, &labels),
            halted_events: gauge!(METRIC_HALTED_EVENTS, &labels),
            owner: gauge!(METRIC_OWNER, &labels),
            restarts: counter!(METRIC_DELIVERY_RESTARTS, &labels),
            moves: counter!(METRIC_DELIVERY_MOVES, &labels),
            undelivered: gauge!(METRIC_LAG_UNDELIVERED, &labels),
            unacknowledged: gauge!(METRIC_LAG_UNACKNOWLEDGED, &labels),
            lag_seconds: gauge!(METRIC_LAG_SECONDS, &labels),
        }
    }
}

/// Sets a subscription's gauges every `every`: its own counters, and its group's lag as the
/// broker sees it.
async fn sample(
    shared: Arc<Shared>,
    topic: Topic,
    control: Option<Arc<dyn AggregateControl>>,
    every: Duration,
) {
    let gauges = Gauges::new(&topic, &shared.config.consumer.group);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Some(control) = &control {
            let m = control.metrics();
            gauges.in_flight.set(m.in_flight as f64);
            gauges.queued.set(m.queued as f64);
            gauges.acks_waiting.set(m.acks_waiting as f64);
            gauges.halted_aggregates.set(m.halted_aggregates as f64);
            gauges.halted_events.set(m.halted_events as f64);
            gauges.owner.set(if m.owner { 1.0 } else { 0.0 });
            gauges.restarts.absolute(m.delivery_restarts);
            gauges.moves.absolute(m.delivery_moves);
        }
        match crate::lag::lag_of(&shared, &topic, crate::lag::Missing::Waiting).await {
            Ok(lag) => {
                gauges.undelivered.set(lag.undelivered as f64);
                gauges.unacknowledged.set(lag.unacknowledged as f64);
                gauges.lag_seconds.set(
                    lag.oldest_unhandled_age
                        .map_or(0.0, |age| age.as_secs_f64()),
                );
            }
            Err(error) => tracing::debug!(%topic, %error, "sampling the consumer's lag failed"),
        }
    }
}

/// A subscription whose gauges are sampled, which answers control requests
/// ([`crate::control`]), and which the bus's health report lists, until it closes.
struct Sampled {
    /// Taken by `close`.
    inner: Option<Subscription>,
    /// Its gauge sampler and its control-request server.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    watched: Arc<crate::health::Watched>,
    id: u64,
}

/// Lists `subscription` in the bus's health report, answers control requests for it, and
/// samples its gauges every `config.metrics_interval` (none if zero), until it closes.
pub(crate) fn sampled(
    shared: Arc<Shared>,
    watched: Arc<crate::health::Watched>,
    answering: Arc<crate::control::ControlConnection>,
    topic: &Topic,
    subscription: Subscription,
) -> Subscription {
    let control = subscription.control();
    let id = watched.add(topic.clone(), control.clone());
    let every = shared.config.metrics_interval;
    let mut tasks = Vec::new();
    if let Some(control) = &control {
        tasks.push(tokio::spawn(crate::control::serve(
            shared.clone(),
            answering,
            topic.clone(),
            control.clone(),
        )));
    }
    if !every.is_zero() {
        tasks.push(tokio::spawn(sample(
            shared.clone(),
            topic.clone(),
            control,
            every,
        )));
    }
    Subscription::new(Sampled {
        inner: Some(subscription),
        tasks,
        watched,
        id,
    })
}

#[async_trait]
impl SubscriptionHandle for Sampled {
    async fn close(mut self: Box<Self>, deadline: Duration) -> Result<CloseReport, SubscribeError> {
        let inner = self.inner.take().expect("closed once");
        drop(self);
        inner.close_within(deadline).await
    }

    fn control(&self) -> Option<Arc<dyn AggregateControl>> {
        self.inner.as_ref().and_then(Subscription::control)
    }
}

/// Also when a subscription is dropped without being closed.
impl Drop for Sampled {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.watched.remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use metrics::{HistogramFn, IntoF64};

    use super::*;

    /// Counts the conversions of what it wraps.
    struct Counted<'a>(&'a AtomicUsize, Seconds);

    impl IntoF64 for Counted<'_> {
        fn into_f64(self) -> f64 {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.into_f64()
        }
    }

    #[derive(Default)]
    struct Recorded(Mutex<Vec<f64>>);

    impl HistogramFn for Recorded {
        fn record(&self, value: f64) {
            self.0.lock().unwrap().push(value);
        }
    }

    #[test]
    fn seconds_are_worked_out_only_for_a_histogram_that_records_them() {
        let from = Instant::now();
        let quarter = || Seconds {
            from,
            to: Some(from + Duration::from_millis(250)),
        };
        let conversions = AtomicUsize::new(0);
        Histogram::noop().record(Counted(&conversions, quarter()));
        assert_eq!(
            conversions.load(Ordering::SeqCst),
            0,
            "a no-op handle converts nothing"
        );

        let recorded = Arc::new(Recorded::default());
        let live = Histogram::from_arc(recorded.clone());
        live.record(Counted(&conversions, quarter()));
        assert_eq!(conversions.load(Ordering::SeqCst), 1);
        // An end before the start counts as no time; without an end, now is the end.
        live.record(Seconds {
            from: from + Duration::from_secs(1),
            to: Some(from),
        });
        live.record(Seconds::since(from));
        let values = recorded.0.lock().unwrap().clone();
        assert_eq!(values[..2], [0.25, 0.0]);
        assert!(values[2] >= 0.0 && values[2] < 60.0, "{values:?}");
    }
}
