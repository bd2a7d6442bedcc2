//! A health report a service can expose on its health endpoint, and alerts when it changes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use bus_core::{AggregateControl, SubscriptionMetrics, Topic};
use tokio::sync::mpsc;

use crate::{Lag, NatsBus};

/// How long the health report waits for a topic's lag.
const LAG_TIMEOUT: Duration = Duration::from_secs(2);

/// Limits beyond which a subscription counts as degraded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthThresholds {
    /// Age of the oldest event the group has not handled (default 60 s).
    pub max_lag_age: Option<Duration>,
    /// Events stored and not yet delivered to the group (default none).
    pub max_undelivered: Option<u64>,
    /// Events delivered and not yet acknowledged (default none).
    pub max_unacknowledged: Option<u64>,
    /// Halted aggregates (default 0: any halted aggregate degrades the subscription).
    pub max_halted_aggregates: Option<u64>,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            max_lag_age: Some(Duration::from_secs(60)),
            max_undelivered: None,
            max_unacknowledged: None,
            max_halted_aggregates: Some(0),
        }
    }
}

/// Overall state, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthStatus {
    /// A connection is down or the broker cannot be read: events are not flowing.
    Unhealthy,
    /// Events flow, but a threshold is exceeded (lag, halted aggregates).
    Degraded,
    /// Nothing to report.
    Healthy,
}

/// One thing wrong with a topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum HealthProblem {
    /// The topic's connection is not connected (reconnecting).
    Disconnected,
    /// The group's lag could not be read from the broker; the text says why.
    LagUnknown(String),
    /// The oldest unhandled event is older than the threshold.
    LagAge {
        /// Its age.
        age: Duration,
        /// The threshold.
        max: Duration,
    },
    /// More undelivered events than the threshold.
    Undelivered {
        /// How many.
        count: u64,
        /// The threshold.
        max: u64,
    },
    /// More unacknowledged events than the threshold.
    Unacknowledged {
        /// How many.
        count: u64,
        /// The threshold.
        max: u64,
    },
    /// More halted aggregates than the threshold.
    Halted {
        /// How many.
        count: u64,
        /// The threshold.
        max: u64,
    },
}

impl HealthProblem {
    /// How bad it is.
    pub fn status(&self) -> HealthStatus {
        match self {
            HealthProblem::Disconnected | HealthProblem::LagUnknown(_) => HealthStatus::Unhealthy,
            _ => HealthStatus::Degraded,
        }
    }

    /// A stable name for the kind of problem (`disconnected`, `lag-unknown`, `lag-age`,
    /// `undelivered`, `unacknowledged`, `halted`): what an alert is raised and cleared by.
    pub fn kind(&self) -> &'static str {
        match self {
            HealthProblem::Disconnected => "disconnected",
            HealthProblem::LagUnknown(_) => "lag-unknown",
            HealthProblem::LagAge { .. } => "lag-age",
            HealthProblem::Undelivered { .. } => "undelivered",
            HealthProblem::Unacknowledged { .. } => "unacknowledged",
            HealthProblem::Halted { .. } => "halted",
        }
    }
}

impl fmt::Display for HealthProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthProblem::Disconnected => f.write_str("not connected to the broker"),
            HealthProblem::LagUnknown(why) => write!(f, "lag unknown: {why}"),
            HealthProblem::LagAge { age, max } => {
                write!(f, "oldest unhandled event is {age:?} old (over {max:?})")
            }
            HealthProblem::Undelivered { count, max } => {
                write!(f, "{count} events undelivered (over {max})")
            }
            HealthProblem::Unacknowledged { count, max } => {
                write!(f, "{count} events unacknowledged (over {max})")
            }
            HealthProblem::Halted { count, max } => {
                write!(f, "{count} aggregates halted (over {max})")
            }
        }
    }
}

/// One subscription of this bus, as the health report sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionHealth {
    /// Its topic.
    pub topic: Topic,
    /// Its counters.
    pub metrics: SubscriptionMetrics,
    /// Its group's lag, when it could be read.
    pub lag: Option<Lag>,
    /// What is wrong, if anything.
    pub problems: Vec<HealthProblem>,
}

/// This bus's health: each open subscription, and each topic connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// The worst status of any problem; `Healthy` when there is none.
    pub status: HealthStatus,
    /// The open subscriptions of this bus, in topic order.
    pub subscriptions: Vec<SubscriptionHealth>,
    /// Topics whose connection is down (publishing or subscribing), in topic order.
    pub disconnected: Vec<Topic>,
}

impl Health {
    /// Every problem, with its topic.
    pub fn problems(&self) -> impl Iterator<Item = (&Topic, &HealthProblem)> {
        self.disconnected
            .iter()
            .map(|t| (t, &HealthProblem::Disconnected))
            .chain(
                self.subscriptions
                    .iter()
                    .flat_map(|s| s.problems.iter().map(move |p| (&s.topic, p))),
            )
    }
}

/// An alert: a problem appeared or went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthAlert {
    /// `problem` appeared on `topic`.
    Raised {
        /// The topic.
        topic: Topic,
        /// What is wrong.
        problem: HealthProblem,
    },
    /// The problem of this kind on `topic` went away.
    Cleared {
        /// The topic.
        topic: Topic,
        /// [`HealthProblem::kind`] of the problem.
        kind: &'static str,
    },
}

/// An open subscription: its topic and its control.
type Open = (Topic, Option<Arc<dyn AggregateControl>>);

/// The open subscriptions of one bus, for its health report.
#[derive(Default)]
pub(crate) struct Watched {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Open>>,
}

impl Watched {
    /// Adds a subscription; the returned ID removes it.
    pub(crate) fn add(&self, topic: Topic, control: Option<Arc<dyn AggregateControl>>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open.lock().unwrap().insert(id, (topic, control));
        id
    }

    pub(crate) fn remove(&self, id: u64) {
        self.open.lock().unwrap().remove(&id);
    }
}

impl NatsBus {
    /// This bus's health: for each open subscription its counters, its group's lag (read from
    /// the broker) and the thresholds it exceeds, and every topic connection that is down.
    /// Cheap enough for a health endpoint: one consumer read per subscribed partition.
    pub async fn health(&self, thresholds: &HealthThresholds) -> Health {
        let disconnected: Vec<Topic> = {
            let mut down: Vec<Topic> = self
                .shared
                .all_connections()
                .into_iter()
                .filter(|(_, c)| c.client.connection_state() != State::Connected)
                .map(|(t, _)| t)
                .collect();
            down.sort();
            // A topic whose publishing connection and topic connection are both down is one
            // topic down.
            down.dedup();
            down
        };
        let open: Vec<Open> = self
            .watched
            .open
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        let mut subscriptions = Vec::new();
        for (topic, control) in open {
            let metrics = control.map(|c| c.metrics()).unwrap_or_default();
            let mut problems = Vec::new();
            // A topic whose connection is down is reported as such (in `disconnected`); its
            // lag is not asked for, which would only wait for the request to time out.
            let lag = if disconnected.contains(&topic) {
                None
            } else {
                match tokio::time::timeout(
                    LAG_TIMEOUT,
                    crate::lag::lag_of(&self.shared, &topic, crate::lag::Missing::Waiting),
                )
                .await
                {
                    Ok(Ok(lag)) => Some(lag),
                    Ok(Err(e)) => {
                        problems.push(HealthProblem::LagUnknown(e.to_string()));
                        None
                    }
                    Err(_) => {
                        problems.push(HealthProblem::LagUnknown(format!(
                            "the broker did not answer within {LAG_TIMEOUT:?}"
                        )));
                        None
                    }
                }
            };
            if let Some(lag) = &lag {
                if let (Some(age), Some(max)) = (lag.oldest_unhandled_age, thresholds.max_lag_age) {
                    if age > max {
                        problems.push(HealthProblem::LagAge { age, max });
                    }
                }
                if let Some(max) = thresholds.max_undelivered {
                    if lag.undelivered > max {
                        problems.push(HealthProblem::Undelivered {
                            count: lag.undelivered,
                            max,
                        });
                    }
                }
                if let Some(max) = thresholds.max_unacknowledged {
                    if lag.unacknowledged > max {
                        problems.push(HealthProblem::Unacknowledged {
                            count: lag.unacknowledged,
                            max,
                        });
                    }
                }
            }
            if let Some(max) = thresholds.max_halted_aggregates {
                if metrics.halted_aggregates > max {
                    problems.push(HealthProblem::Halted {
                        count: metrics.halted_aggregates,
                        max,
                    });
                }
            }
            subscriptions.push(SubscriptionHealth {
                topic,
                metrics,
                lag,
                problems,
            });
        }
        subscriptions.sort_by(|a, b| a.topic.cmp(&b.topic));
        let mut health = Health {
            status: HealthStatus::Healthy,
            subscriptions,
            disconnected,
        };
        health.status = health
            .problems()
            .map(|(_, p)| p.status())
            .min()
            .unwrap_or(HealthStatus::Healthy);
        health
    }

    /// Checks [`NatsBus::health`] every `every` and sends an alert each time a problem
    /// appears on a topic ([`HealthAlert::Raised`]) or goes away ([`HealthAlert::Cleared`]).
    /// Stops when the receiver is dropped or the bus is closed.
    pub fn health_alerts(
        &self,
        thresholds: HealthThresholds,
        every: Duration,
    ) -> mpsc::Receiver<HealthAlert> {
        let (tx, rx) = mpsc::channel(64);
        let bus = self.clone();
        tokio::spawn(async move {
            let mut raised: BTreeSet<(Topic, &'static str)> = BTreeSet::new();
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = tx.closed() => return,
                }
                if bus.shared.closed.load(Ordering::Acquire) {
                    return;
                }
                let health = bus.health(&thresholds).await;
                let mut now = BTreeSet::new();
                for (topic, problem) in health.problems() {
                    let key = (topic.clone(), problem.kind());
                    if !raised.contains(&key) {
                        let alert = HealthAlert::Raised {
                            topic: topic.clone(),
                            problem: problem.clone(),
                        };
                        if tx.send(alert).await.is_err() {
                            return;
                        }
                    }
                    now.insert(key);
                }
                for (topic, kind) in raised.difference(&now) {
                    let alert = HealthAlert::Cleared {
                        topic: topic.clone(),
                        kind,
                    };
                    if tx.send(alert).await.is_err() {
                        return;
                    }
                }
                raised = now;
            }
        });
        rx
    }
}
