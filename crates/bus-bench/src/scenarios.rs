//! The rows: what each one publishes, to how many topics and aggregates, and how the bus is
//! configured for it.

use super::*;

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// Raw async-nats: async publish with a window, one pull consumer acking each message.
    Ceiling,
    /// Raw async-nats with MaxAckPending 1: the documented recipe for strict order.
    Strict,
    /// The ceiling's client and consumer, carrying the bus's wire format (its `Bus-Event`
    /// header and `Nats-Msg-Id`, decoded by `wire::decode`) into a stream with the bus's default
    /// work-queue retention: what the broker allows for the bus's messages, so the bus's own
    /// overhead can be told from what the broker does for its guarantees.
    CeilingWire,
    /// Raw async-nats publishing messages that each carry `PACKED` events (a 4-byte length, the
    /// aggregate index, the version and the 128-byte payload each), and a raw consumer that
    /// splits them and acknowledges each message: the limit the record-batch design can
    /// approach, with no per-event work beyond the split.
    CeilingPacked,
    Bus(BusSetup),
}

/// Events per message of the `ceiling-packed` row (the bus's default `max_events`).
pub(crate) const PACKED: usize = 128;

#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) topics: usize,
    pub(crate) aggregates_per_topic: u64,
    pub(crate) versions: u64,
    pub(crate) payload: usize,
    pub(crate) handler_delay: Option<Duration>,
    /// Publish at this many messages per second (all topics together).
    pub(crate) rate: Option<f64>,
    /// Publish everything before the consumer starts; throughput is then the drain rate.
    pub(crate) backlog: bool,
    /// Above 1: run against a cluster of this many nodes, every stream with this many replicas.
    pub(crate) replicas: usize,
    /// Above 0: the consumers are this many member processes of one group over the
    /// partitioned topic of `members.rs`, with its 1 ms handler.
    pub(crate) members: usize,
}

impl Scenario {
    pub(crate) fn new(name: &str, kind: Kind, aggregates_per_topic: u64, versions: u64) -> Self {
        Self {
            name: name.into(),
            kind,
            topics: 1,
            aggregates_per_topic,
            versions,
            payload: 128,
            handler_delay: None,
            rate: None,
            backlog: false,
            replicas: 1,
            members: 0,
        }
    }

    pub(crate) fn messages(&self) -> u64 {
        self.topics as u64 * self.aggregates_per_topic * self.versions
    }
}

/// Every row, for a quick run or a full one; `versions` (`--versions`) in place of the run's
/// standard count of events per aggregate, in every row that takes it.
pub(crate) fn scenarios(quick: bool, versions: Option<u64>) -> Vec<Scenario> {
    // 10 000 aggregates; versions set the message count.
    let versions = versions.unwrap_or(if quick { 5 } else { 20 });
    let seed_versions = if quick { 1 } else { 4 };
    let bus = |setup: BusSetup| Kind::Bus(setup);
    let seed = BusSetup::seed_before;
    let mut rows = vec![
        Scenario::new("ceiling", Kind::Ceiling, 10_000, versions),
        Scenario::new("ceiling-bus-wire", Kind::CeilingWire, 10_000, versions),
        Scenario::new("ceiling-packed", Kind::CeilingPacked, 10_000, versions),
        Scenario::new(
            "nats-strict",
            Kind::Strict,
            1_000,
            if quick { 5 } else { 20 },
        ),
        Scenario {
            topics: 5,
            ..Scenario::new("seed-before", bus(seed()), 2_000, seed_versions)
        },
    ];
    if !quick {
        rows.extend([
            Scenario {
                topics: 5,
                ..Scenario::new(
                    "opt1-async-publish",
                    bus(BusSetup {
                        async_publish: true,
                        ..seed()
                    }),
                    2_000,
                    seed_versions,
                )
            },
            Scenario {
                topics: 5,
                ..Scenario::new(
                    "opt2-batch-500",
                    bus(BusSetup {
                        batch: 500,
                        ..seed()
                    }),
                    2_000,
                    seed_versions,
                )
            },
            Scenario {
                topics: 5,
                ..Scenario::new(
                    "opt3-maxwait-100ms",
                    bus(BusSetup {
                        expires: Duration::from_millis(100),
                        ..seed()
                    }),
                    2_000,
                    seed_versions,
                )
            },
            Scenario {
                topics: 5,
                ..Scenario::new(
                    "opt5-conn-per-topic",
                    bus(BusSetup {
                        share_connection: false,
                        ..seed()
                    }),
                    2_000,
                    seed_versions,
                )
            },
            Scenario {
                topics: 5,
                ..Scenario::new(
                    "opt8-config",
                    bus(BusSetup {
                        max_ack_pending: 10_000,
                        max_waiting: 1_000,
                        ..seed()
                    }),
                    2_000,
                    seed_versions,
                )
            },
            Scenario {
                topics: 5,
                ..Scenario::new(
                    "seed-all",
                    bus(BusSetup::unbatched()),
                    2_000,
                    seed_versions * 10,
                )
            },
        ]);
    }
    rows.push(Scenario::new(
        "default",
        bus(BusSetup::default_config()),
        10_000,
        versions,
    ));
    // `default` over a backlog: everything published before the subscription starts, so that
    // `--instructions default-backlog` splits the bus's work into publishing and consuming.
    rows.push(Scenario {
        backlog: true,
        ..Scenario::new(
            "default-backlog",
            bus(BusSetup::default_config()),
            10_000,
            versions,
        )
    });
    // One event per message: the bus without record batches, as consumers that read only
    // single events need it.
    rows.push(Scenario::new(
        "default-unbatched",
        bus(BusSetup::unbatched()),
        10_000,
        versions,
    ));
    if !quick {
        // Each batching limit moved alone from the default (128 events, 64 KiB, 16 in flight,
        // no linger).
        for (name, setup) in [
            ("batched-max-8", BusSetup::batched(|b| b.max_events = 8)),
            ("batched-max-32", BusSetup::batched(|b| b.max_events = 32)),
            ("batched-max-512", BusSetup::batched(|b| b.max_events = 512)),
            (
                "batched-16kib",
                BusSetup::batched(|b| b.max_bytes = 16 << 10),
            ),
            (
                "batched-1-in-flight",
                BusSetup::batched(|b| b.max_in_flight = 1),
            ),
            (
                "batched-8-in-flight",
                BusSetup::batched(|b| b.max_in_flight = 8),
            ),
            (
                "batched-linger-1ms",
                BusSetup::batched(|b| b.linger = Duration::from_millis(1)),
            ),
        ] {
            rows.push(Scenario::new(name, bus(setup), 10_000, versions));
        }
        rows.push(Scenario {
            backlog: true,
            ..Scenario::new(
                "backlog-1m-unbatched",
                bus(BusSetup::unbatched()),
                10_000,
                100,
            )
        });
    }
    // The same on a 3-node cluster, every stream with three replicas, next to the raw client
    // there: what replication costs, and what of it is the bus's.
    rows.extend([
        Scenario {
            replicas: 3,
            ..Scenario::new("ceiling-r3-cluster", Kind::Ceiling, 10_000, versions)
        },
        Scenario {
            replicas: 3,
            ..Scenario::new(
                "ceiling-bus-wire-r3-cluster",
                Kind::CeilingWire,
                10_000,
                versions,
            )
        },
        Scenario {
            replicas: 3,
            ..Scenario::new(
                "default-r3-cluster",
                bus(BusSetup::default_config()),
                10_000,
                versions,
            )
        },
    ]);
    if !quick {
        rows.extend([
            Scenario::new(
                "default-limits",
                bus(BusSetup {
                    retention: bus_nats::Retention::Limits,
                    ..BusSetup::default_config()
                }),
                10_000,
                versions,
            ),
            Scenario::new(
                "typed",
                bus(BusSetup {
                    typed: true,
                    ..BusSetup::default_config()
                }),
                10_000,
                versions,
            ),
            // What handled-once costs with the versions in NATS KV.
            Scenario::new(
                "handled-once-kv",
                bus(BusSetup {
                    handled_once: true,
                    ..BusSetup::default_config()
                }),
                10_000,
                versions,
            ),
            Scenario::new(
                "default-acknowledged",
                bus(BusSetup {
                    retention: bus_nats::Retention::Acknowledged,
                    ..BusSetup::default_config()
                }),
                10_000,
                versions,
            ),
            Scenario {
                topics: 5,
                ..Scenario::new("5-topics", bus(BusSetup::default_config()), 2_000, versions)
            },
            Scenario::new(
                "1m-aggregates",
                bus(BusSetup::default_config()),
                1_000_000,
                1,
            ),
            // Few aggregates, each with many events in flight at once: a publisher's window
            // holds about 100 events of each, so most batches leave later events of their
            // aggregates behind (to wait for the batch to be stored).
            Scenario::new(
                "100-aggregates",
                bus(BusSetup::default_config()),
                100,
                versions * 100,
            ),
            // `default` with each topic's publishing task and its publisher on a thread of
            // their own (a current-thread runtime).
            Scenario::new(
                "default-publishing-thread",
                bus(BusSetup {
                    publishing_thread: true,
                    ..BusSetup::default_config()
                }),
                10_000,
                versions,
            ),
            // `default` with each subscription on a thread of its own
            // (`SubscriptionRuntime::OwnThread`), the publishing tasks on the row's runtime.
            Scenario::new(
                "default-own-thread",
                bus(BusSetup {
                    subscription_runtime: bus_nats::SubscriptionRuntime::OwnThread,
                    ..BusSetup::default_config()
                }),
                10_000,
                versions,
            ),
            Scenario {
                payload: 1024,
                ..Scenario::new(
                    "1kib-payload",
                    bus(BusSetup::default_config()),
                    10_000,
                    versions,
                )
            },
            Scenario {
                handler_delay: Some(Duration::from_millis(1)),
                ..Scenario::new(
                    "handler-1ms",
                    bus(BusSetup::default_config()),
                    10_000,
                    versions,
                )
            },
            // One group over an 8-partition topic with the 1 ms handler, consumed by 1, 2 and 4
            // member processes: how far partitions scale out on this machine's two cores.
            Scenario {
                handler_delay: Some(Duration::from_millis(1)),
                members: 1,
                ..Scenario::new(
                    "group-8p-1-member",
                    bus(BusSetup::default_config()),
                    10_000,
                    versions,
                )
            },
            Scenario {
                handler_delay: Some(Duration::from_millis(1)),
                members: 2,
                ..Scenario::new(
                    "group-8p-2-members",
                    bus(BusSetup::default_config()),
                    10_000,
                    versions,
                )
            },
            Scenario {
                handler_delay: Some(Duration::from_millis(1)),
                members: 4,
                ..Scenario::new(
                    "group-8p-4-members",
                    bus(BusSetup::default_config()),
                    10_000,
                    versions,
                )
            },
            Scenario {
                backlog: true,
                ..Scenario::new("backlog-1m", bus(BusSetup::default_config()), 10_000, 100)
            },
        ]);
    }
    if !quick {
        rows.push(Scenario::new(
            "seed-single-pipelined",
            bus(BusSetup {
                publish_ordering: bus_nats::PublishOrdering::Pipelined,
                ..BusSetup::default_config()
            }),
            1,
            1_000,
        ));
    }
    rows.push(Scenario::new(
        "seed-single",
        bus(BusSetup::default_config()),
        1,
        1_000,
    ));
    rows
}

/// A fixed-rate row: the bus's default (`latency-half-capacity`), the same with each topic owned
/// by a lease (`latency-lease`), or the raw ceiling's client
/// at the same rate, plain (`ceiling-latency`), carrying the bus's wire format
/// (`ceiling-bus-wire-latency`) or packing events like the bus's record batches
/// (`ceiling-packed-latency`), so the bus's latency can be told from the broker's.
pub(crate) fn latency_scenario(name: &str, rate: f64, quick: bool) -> Scenario {
    let seconds = if quick { 5.0 } else { 10.0 };
    let versions = ((rate * seconds) / 10_000.0).ceil().max(1.0) as u64;
    let kind = if name == "ceiling-packed-latency" {
        Kind::CeilingPacked
    } else if name == "ceiling-bus-wire-latency" {
        Kind::CeilingWire
    } else if name == "ceiling-latency" {
        Kind::Ceiling
    } else if name == "latency-unbatched" {
        Kind::Bus(BusSetup::unbatched())
    } else if name == "latency-lease" {
        Kind::Bus(BusSetup::lease())
    } else {
        Kind::Bus(BusSetup::default_config())
    };
    Scenario {
        rate: Some(rate),
        ..Scenario::new(name, kind, 10_000, versions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(plan: &[Scenario], name: &str) -> u64 {
        plan.iter().find(|s| s.name == name).unwrap().messages()
    }

    #[test]
    fn versions_set_the_events_of_the_rows_that_take_the_standard_count() {
        let standard = scenarios(false, None);
        let long = scenarios(false, Some(100));
        assert_eq!(events(&standard, "default"), 200_000);
        assert_eq!(events(&long, "default"), 1_000_000);
        assert_eq!(events(&long, "ceiling-packed"), 1_000_000);
        // A row with a count of its own keeps it.
        assert_eq!(
            events(&long, "1m-aggregates"),
            events(&standard, "1m-aggregates")
        );
        assert_eq!(events(&scenarios(true, None), "default"), 50_000);
    }
}
