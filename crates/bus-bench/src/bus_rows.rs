//! The rows that run the bus: one process subscribing and publishing (`run_bus`), or a group of
//! member processes consuming a partitioned topic while this one publishes (`run_group`).

use super::*;
/// How the bus is configured for a row.
#[derive(Debug, Clone)]
pub(crate) struct BusSetup {
    pub(crate) async_publish: bool,
    pub(crate) batch: usize,
    pub(crate) expires: Duration,
    pub(crate) max_ack_pending: i64,
    pub(crate) max_waiting: i64,
    pub(crate) share_connection: bool,
    /// Stream retention (the bus's default is work-queue).
    pub(crate) retention: bus_nats::Retention,
    pub(crate) publish_ordering: bus_nats::PublishOrdering,
    /// Typed events: `publish_event` of a struct, handled through `EventHandlers` (the
    /// MessagePack encoding and decoding included), instead of envelopes of raw bytes.
    pub(crate) typed: bool,
    /// Record batches (on in the bus's defaults).
    pub(crate) batching: bus_nats::BatchConfig,
    /// The handler wrapped in `HandledOnce` with the group's versions in NATS KV: a read
    /// before and a write after every event.
    pub(crate) handled_once: bool,
    /// How the group owns each topic's consumer (the bus's default: the pinned group on 2.14+).
    pub(crate) ownership: bus_nats::Ownership,
    /// Each topic's publishing task on a current-thread runtime of a thread of its own, with a
    /// publisher on connections of its own made there
    /// (`NatsBus::publisher_on_own_connections`).
    pub(crate) publishing_thread: bool,
    /// Where the subscriptions run (the bus's default: the row's runtime).
    pub(crate) subscription_runtime: bus_nats::SubscriptionRuntime,
}

/// The typed rows' event: when it was sent, and the filler that makes up the payload size.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct BenchEvent {
    pub(crate) sent_nanos: u64,
    pub(crate) filler: String,
}

impl bus_core::Event for BenchEvent {
    const TYPE: &'static str = "BenchEvent";
}

impl BusSetup {
    /// The design note's "before": synchronous publish, fetch 10, MaxWait 1 s, MaxAckPending
    /// 500, MaxWaiting 200, one connection for every topic, the subscriptions on the caller's
    /// runtime.
    pub(crate) fn seed_before() -> Self {
        Self {
            async_publish: false,
            batch: 10,
            expires: Duration::from_secs(1),
            max_ack_pending: 500,
            max_waiting: 200,
            share_connection: true,
            retention: bus_nats::Retention::default(),
            publish_ordering: bus_nats::PublishOrdering::default(),
            typed: false,
            handled_once: false,
            batching: bus_nats::BatchConfig::off(),
            ownership: bus_nats::Ownership::Auto,
            publishing_thread: false,
            subscription_runtime: bus_nats::SubscriptionRuntime::Caller,
        }
    }

    /// The bus's defaults with record batches off: one event per message.
    pub(crate) fn unbatched() -> Self {
        Self {
            batching: bus_nats::BatchConfig::off(),
            ..Self::default_config()
        }
    }

    /// The bus's defaults (record batches on), the batching limits adjusted by `adjust`.
    pub(crate) fn batched(adjust: impl FnOnce(&mut bus_nats::BatchConfig)) -> Self {
        let mut batching = bus_nats::BatchConfig::default();
        adjust(&mut batching);
        Self {
            batching,
            ..Self::default_config()
        }
    }

    /// The bus's defaults: every optimisation on.
    pub(crate) fn default_config() -> Self {
        Self {
            async_publish: true,
            batch: bus_nats::DEFAULT_FETCH_BATCH,
            expires: bus_nats::DEFAULT_FETCH_EXPIRES,
            max_ack_pending: bus_nats::DEFAULT_MAX_ACK_PENDING,
            max_waiting: bus_nats::DEFAULT_MAX_WAITING,
            share_connection: false,
            retention: bus_nats::Retention::default(),
            publish_ordering: bus_nats::PublishOrdering::default(),
            typed: false,
            handled_once: false,
            batching: bus_nats::BatchConfig::default(),
            ownership: bus_nats::Ownership::Auto,
            publishing_thread: false,
            subscription_runtime: bus_nats::SubscriptionRuntime::default(),
        }
    }

    /// The bus's defaults, each topic owned by a lease (`consumer.ownership` Lease).
    pub(crate) fn lease() -> Self {
        Self {
            ownership: bus_nats::Ownership::Lease,
            ..Self::default_config()
        }
    }
}

pub(crate) struct Timing {
    pub(crate) publish: Duration,
    pub(crate) end_to_end: Duration,
    /// Messages the broker stored (a record batch is one), when the row knows.
    pub(crate) stored: Option<u64>,
}

/// Runs `task` on a current-thread runtime of a new thread; the handle ends with it.
fn on_a_thread_of_its_own(
    task: impl std::future::Future<Output = Result<()>> + Send + 'static,
) -> tokio::task::JoinHandle<Result<()>> {
    let (done, finished) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("bench-publishing".into())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(task));
            let _ = done.send(outcome);
        });
    tokio::spawn(async move {
        thread.context("starting the publishing thread")?;
        finished
            .await
            .context("the publishing thread ended without an outcome")?
    })
}

pub(crate) fn topics_for(s: &Scenario) -> Vec<Topic> {
    (0..s.topics)
        .map(|t| Topic::new(format!("bench.t{t}")).unwrap())
        .collect()
}

/// Paces publishing at `rate` messages per second, for one of `share` publishers.
pub(crate) struct Pacer {
    pub(crate) start: Instant,
    pub(crate) per_message: Option<Duration>,
    pub(crate) sent: u64,
}

impl Pacer {
    pub(crate) fn new(rate: Option<f64>, share: usize) -> Self {
        Self {
            start: Instant::now(),
            per_message: rate.map(|r| Duration::from_secs_f64(share as f64 / r)),
            sent: 0,
        }
    }

    pub(crate) async fn pace(&mut self) {
        if let Some(due) = self.would_sleep() {
            tokio::time::sleep_until(due.into()).await;
        }
        self.sent += 1;
    }

    /// When the next message is due, if [`Pacer::pace`] would sleep for it (it lets messages
    /// due within 500 µs go at once).
    pub(crate) fn would_sleep(&self) -> Option<Instant> {
        let due = self.start + self.per_message? * self.sent as u32;
        (due > Instant::now() + Duration::from_micros(500)).then_some(due)
    }
}

pub(crate) async fn run_bus(
    s: &Scenario,
    setup: &BusSetup,
    url: &str,
    sink: Arc<Sink>,
) -> Result<Timing> {
    let mut config = NatsConfig::new(url).with_group("bench");
    config.fetch.batch = setup.batch;
    config.fetch.expires = setup.expires;
    config.consumer.max_ack_pending = setup.max_ack_pending;
    config.consumer.max_waiting = setup.max_waiting;
    config.share_connection = setup.share_connection;
    config.publish_ordering = setup.publish_ordering;
    config.batching = setup.batching.clone();
    config.consumer.ownership = setup.ownership;
    config.subscription_runtime = setup.subscription_runtime;
    for (i, topic) in topics_for(s).into_iter().enumerate() {
        let mut spec = bus_nats::StreamSpec::new(format!("BENCH_{i}"), [topic]);
        spec.retention = setup.retention;
        spec.replicas = s.replicas;
        config.streams.push(spec);
    }
    config.dead_letters.replicas = s.replicas;
    let bus = NatsBus::connect(config).await?;
    let topics = topics_for(s);
    for topic in &topics {
        // Provision streams before the clock starts.
        bus.stream_name(topic).await?;
    }
    let typed = setup.typed;
    let handled_once = setup.handled_once;
    let subscribe = |bus: NatsBus| {
        let topics = topics.clone();
        let sink = sink.clone();
        async move {
            let mut subscriptions = Vec::new();
            for topic in &topics {
                let sink = sink.clone();
                // Shared, not copied, into each event's handler call.
                let name: Arc<str> = topic.as_str().into();
                if typed {
                    let handlers = bus_core::EventHandlers::new().on(
                        move |e: BenchEvent, cx: bus_core::EventContext| {
                            // Recorded in the call, not in the future it returns, unless the
                            // row's handler waits first: no reference to the sink or the
                            // topic's name is counted per event.
                            let waits = sink.delay.map(|delay| (delay, sink.clone(), name.clone()));
                            if waits.is_none() {
                                sink.record_sent_at(
                                    &name,
                                    cx.aggregate_id().as_str(),
                                    cx.version(),
                                    e.sent_nanos,
                                );
                            }
                            async move {
                                if let Some((delay, sink, name)) = waits {
                                    tokio::time::sleep(delay).await;
                                    sink.record_sent_at(
                                        &name,
                                        cx.aggregate_id().as_str(),
                                        cx.version(),
                                        e.sent_nanos,
                                    );
                                }
                                Ok(())
                            }
                        },
                    );
                    subscriptions.push(bus.subscribe(topic, Arc::new(handlers)).await?);
                    continue;
                }
                let handler: Arc<dyn bus_core::Handler> =
                    Arc::new(handler_fn(move |e: Envelope| {
                        // Sent when it was built: its timestamp. Recorded in the call, not in
                        // the future it returns, unless the row's handler waits first: no
                        // reference to the sink or the topic's name is counted per event.
                        let record = |sink: &Sink, name: &str, e: &Envelope| {
                            sink.record_sent_at(
                                name,
                                e.aggregate_id().as_str(),
                                e.event_version(),
                                e.timestamp_micros() * 1_000,
                            )
                        };
                        let waits = match sink.delay {
                            Some(delay) => Some((delay, sink.clone(), name.clone(), e)),
                            None => {
                                record(&sink, &name, &e);
                                None
                            }
                        };
                        async move {
                            if let Some((delay, sink, name, e)) = waits {
                                tokio::time::sleep(delay).await;
                                record(&sink, &name, &e);
                            }
                            Ok(())
                        }
                    }));
                let handler: Arc<dyn bus_core::Handler> = if handled_once {
                    let store = bus_nats::NatsHandledVersions::open(&bus, topic).await?;
                    Arc::new(bus_core::HandledOnce::new(store, handler))
                } else {
                    handler
                };
                subscriptions.push(bus.subscribe(topic, handler).await?);
            }
            anyhow::Ok(subscriptions)
        }
    };
    let mut subscriptions = if s.backlog {
        Vec::new()
    } else {
        subscribe(bus.clone()).await?
    };

    sink.clock_started();
    let start = Instant::now();
    let mut publishers = Vec::new();
    for (t, topic) in topics.iter().enumerate() {
        // On a thread of its own, the publisher is made there (its ack task runs on the
        // runtime it is made on, its connection on the runtime of its first publish).
        let publisher = (!setup.publishing_thread).then(|| bus.publisher());
        let own = bus.clone();
        let topic = topic.clone();
        let s = s.clone();
        let async_publish = setup.async_publish;
        let typed = setup.typed;
        let publishing = async move {
            let publisher = publisher.unwrap_or_else(|| own.publisher_on_own_connections());
            // Names are validated once, as a publisher of many events of the same aggregates
            // keeps them, and shared by every envelope (`Envelope::builder_for`).
            // Each written into one reused buffer (its numbers by `itoa`, not the formatting
            // machinery): the ID's own allocation is its only one.
            let mut name = String::new();
            let mut number = itoa::Buffer::new();
            let aggregates = (0..s.aggregates_per_topic)
                .map(|a| {
                    name.clear();
                    name.push('t');
                    name.push_str(number.format(t));
                    name.push_str("-a");
                    name.push_str(number.format(a));
                    AggregateId::new(name.as_str())
                })
                .collect::<Result<Vec<_>, _>>()?;
            let event_type = EventType::new("BenchEvent")?;
            // One payload shared by every envelope (cloning it counts a reference): the bus
            // copies a payload into its record and never looks inside, and the handler takes
            // the send time from the envelope's own timestamp, so no event needs bytes of its
            // own. What a careful publisher of pre-encoded events does.
            let payload = Bytes::from(vec![0xA5u8; s.payload]);
            let mut pacer = Pacer::new(s.rate, s.topics);
            for version in 1..=s.versions {
                for aggregate in &aggregates {
                    pacer.pace().await;
                    let receipt = if typed {
                        let event = BenchEvent {
                            sent_nanos: wall_nanos(),
                            filler: "x".repeat(s.payload.saturating_sub(8)),
                        };
                        publisher
                            .publish_event(&topic, aggregate.as_str(), version, &event)
                            .await?
                    } else {
                        let envelope = Envelope::builder_for(aggregate, &event_type, version)
                            .payload(payload.clone())
                            .build()?;
                        publisher.publish(&topic, envelope).await?
                    };
                    if !async_publish {
                        receipt.await?;
                    }
                }
            }
            publisher.flush().await?;
            anyhow::Ok(())
        };
        publishers.push(if setup.publishing_thread {
            on_a_thread_of_its_own(publishing)
        } else {
            tokio::spawn(publishing)
        });
    }
    for p in publishers {
        p.await??;
    }
    let publish = start.elapsed();
    let drain_start = Instant::now();
    if s.backlog {
        if std::env::var_os(SPLIT_AT_DRAIN).is_some() {
            dump_callgrind_counters().await?;
        }
        // The backlog row reports memory while the backlog drains.
        stats::reset_peak_rss();
        subscriptions = subscribe(bus.clone()).await?;
    }
    sink.wait(Duration::from_secs(600)).await?;
    let end_to_end = if s.backlog {
        drain_start.elapsed()
    } else {
        start.elapsed()
    };
    for subscription in subscriptions {
        subscription.close().await?;
    }
    // Every stream's last sequence: the messages the broker stored.
    let js = async_nats::jetstream::new(
        // One server of a cluster's list is enough to read a stream.
        async_nats::connect(url.split(',').next().unwrap_or(url))
            .await
            .context("connecting to read the streams")?,
    );
    let mut stored = 0;
    for topic in &topics {
        let name = bus.stream_name(topic).await.context("stream name")?;
        let mut stream = js
            .get_stream(&name)
            .await
            .with_context(|| format!("reading stream {name}"))?;
        stored += stream
            .info()
            .await
            .with_context(|| format!("reading stream {name}'s state"))?
            .state
            .last_sequence;
    }
    bus.close().await?;
    Ok(Timing {
        publish,
        end_to_end,
        stored: Some(stored),
    })
}

/// A group row: `s.members` member processes consume the partitioned topic; this process
/// publishes, then waits until the members together have handled everything, and merges what
/// they saw into `sink`.
pub(crate) async fn run_group(s: &Scenario, url: &str, sink: Arc<Sink>) -> Result<Timing> {
    let bus = NatsBus::connect(members::config(url)).await?;
    let topic = members::topic();
    bus.stream_name(&topic).await?;
    let group: Vec<members::Member> = (0..s.members)
        .map(|_| members::Member::spawn(url))
        .collect::<Result<_>>()?;
    for member in &group {
        member.wait_ready()?;
    }
    // The partitions are shared out before the clock starts: every one taken, every member
    // with its share.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts: Vec<u64> = group.iter().map(|m| m.partitions()).collect();
        let fair = u64::from(members::PARTITIONS) / s.members as u64;
        if counts.iter().sum::<u64>() == u64::from(members::PARTITIONS)
            && counts.iter().all(|&c| c >= fair.max(1))
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the group never shared out its partitions: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let expected = s.messages();
    sink.clock_started();
    let start = Instant::now();
    let publisher = bus.publisher();
    let mut pacer = Pacer::new(s.rate, 1);
    for version in 1..=s.versions {
        for a in 0..s.aggregates_per_topic {
            pacer.pace().await;
            let envelope = Envelope::builder(format!("g-a{a}"), "BenchEvent", version)
                .payload(Bytes::from(stamped_payload(s.payload)))
                .build()?;
            let _receipt = publisher.publish(&topic, envelope).await?;
        }
    }
    publisher.flush().await?;
    let publish = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let handled: u64 = group.iter().map(|m| m.handled()).sum();
        sink.handled.store(handled, Ordering::Relaxed);
        if handled >= expected {
            break;
        }
        if Instant::now() > deadline {
            bail!("the members handled only {handled} of {expected}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end_to_end = start.elapsed();
    let mut unique = 0;
    for member in group {
        let summary = member.close()?;
        sink.latency.add(&summary.latency);
        sink.group_violations
            .fetch_add(summary.order_violations, Ordering::Relaxed);
        sink.group_duplicates
            .fetch_add(summary.duplicates, Ordering::Relaxed);
        unique += summary.unique;
    }
    sink.group_unique.store(unique, Ordering::Relaxed);
    bus.close().await?;
    Ok(Timing {
        publish,
        end_to_end,
        stored: None,
    })
}
