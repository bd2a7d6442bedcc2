//! The raw async-nats rows: the per-message ceiling, the strict recipe, the ceiling with the
//! bus's wire format, and the packed ceiling. No bus code runs in them.

use super::*;

pub(crate) async fn run_raw(
    s: &Scenario,
    max_ack_pending: i64,
    bus_wire: bool,
    url: &str,
    sink: Arc<Sink>,
) -> Result<Timing> {
    let addrs: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|u| u.parse())
        .collect::<Result<_, _>>()?;
    let client = async_nats::connect(addrs).await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let topic = "raw.t0".to_string();
    // A cluster that has just formed may still refuse a replicated stream for a moment.
    let mut attempts = 0;
    let stream = loop {
        let created = js
            .create_stream(stream::Config {
                name: "RAW".into(),
                subjects: vec![topic.clone()],
                storage: stream::StorageType::File,
                // With the bus's wire format, also the bus's default retention: the broker then
                // does for each message what it does for the bus's.
                retention: if bus_wire {
                    stream::RetentionPolicy::WorkQueue
                } else {
                    stream::RetentionPolicy::Limits
                },
                num_replicas: s.replicas,
                ..Default::default()
            })
            .await;
        match created {
            Ok(stream) => break stream,
            Err(e) if attempts < 40 => {
                attempts += 1;
                eprintln!("creating the raw stream: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending,
            ..Default::default()
        })
        .await?;
    let consume = {
        let sink = sink.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(500)
                .expires(Duration::from_millis(100))
                .messages()
                .await?;
            while let Some(message) = messages.next().await {
                let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                let headers = message
                    .headers
                    .as_ref()
                    .context("raw message has headers")?;
                if bus_wire {
                    let pairs = headers.iter().flat_map(|(name, values)| {
                        values.iter().map(move |v| (name.as_ref(), v.as_str()))
                    });
                    let envelope = bus_core::wire::decode(pairs, message.payload.clone())?;
                    sink.record(
                        &topic,
                        envelope.aggregate_id().as_str(),
                        envelope.event_version(),
                        envelope.payload(),
                    );
                } else {
                    let aggregate = headers
                        .get("Agg")
                        .context("aggregate header")?
                        .as_str()
                        .to_owned();
                    let version: u64 = headers
                        .get("Ver")
                        .context("version header")?
                        .as_str()
                        .parse()?;
                    sink.record(&topic, &aggregate, version, &message.payload);
                }
                message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                if sink.handled.load(Ordering::Acquire) >= sink.expected {
                    break;
                }
            }
            anyhow::Ok(())
        })
    };
    // The publisher runs as a spawned task, like the bus's publishers, so that both compete
    // for the same runtime threads.
    sink.clock_started();
    let start = Instant::now();
    let publisher = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut pacer = Pacer::new(s.rate, 1);
            for version in 1..=s.versions {
                for a in 0..s.aggregates_per_topic {
                    pacer.pace().await;
                    let mut headers = async_nats::HeaderMap::new();
                    let payload = Bytes::from(stamped_payload(s.payload));
                    if bus_wire {
                        let envelope = Envelope::builder(format!("t0-a{a}"), "BenchEvent", version)
                            .payload(payload.clone())
                            .build()?;
                        bus_core::wire::encode_headers(&envelope, |n, v| headers.insert(n, v));
                        headers.insert("Nats-Msg-Id", envelope.event_id().as_str());
                    } else {
                        headers.insert("Agg", format!("t0-a{a}"));
                        headers.insert("Ver", version.to_string());
                    }
                    let ack = js
                        .publish_with_headers(topic.clone(), headers, payload)
                        .await?;
                    in_flight.push(std::future::IntoFuture::into_future(ack));
                    while in_flight.len() >= 4096 {
                        in_flight.next().await.unwrap()?;
                    }
                }
            }
            while let Some(ack) = in_flight.next().await {
                ack?;
            }
            anyhow::Ok(())
        })
    };
    publisher.await??;
    let publish = start.elapsed();
    sink.wait(Duration::from_secs(600)).await?;
    let end_to_end = start.elapsed();
    consume.await??;
    Ok(Timing {
        publish,
        end_to_end,
        stored: Some(s.messages()),
    })
}

/// Messages the packed consumer asks for in one pull request (12 800 events). With 4 (500
/// events, as until 45c0f61) the row measured its own round trips: 0.75-0.87 million events/s,
/// against 0.83-0.89 with 8, 1.00-1.15 with 40, 1.22 with 100 and 1.06-1.36 with 250 (paired
/// runs of `--row ceiling-packed`); a ceiling must not be bounded by its own requests.
const PACKED_PULL: usize = 100;

/// The `ceiling-packed` row: see [`Kind::CeilingPacked`]. Events go in publish order (version by
/// version, aggregate by aggregate), `PACKED` to a message, on one connection, so each
/// aggregate's events are stored in order.
///
/// At a fixed rate (`ceiling-packed-latency`) events are paced one by one, and a message goes
/// out when it holds `PACKED` events or when the pacer is about to wait (what is packed then
/// does not wait for more, as the bus's batches do not linger); publishes then have a
/// connection of their own, as the bus's do by default.
pub(crate) async fn run_packed(s: &Scenario, url: &str, sink: Arc<Sink>) -> Result<Timing> {
    let client = async_nats::connect(url).await?;
    let publishing = if s.rate.is_some() {
        async_nats::connect(url).await?
    } else {
        client.clone()
    };
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(publishing);
    let topic = "packed.t0".to_string();
    let stream = js
        .create_stream(stream::Config {
            name: "PACKED".into(),
            subjects: vec![topic.clone()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("packed".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let consume = {
        let sink = sink.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(PACKED_PULL)
                .expires(Duration::from_millis(100))
                .messages()
                .await?;
            let mut aggregate = String::new();
            while let Some(message) = messages.next().await {
                let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut body = &message.payload[..];
                while body.len() >= 4 {
                    let len = u32::from_be_bytes(body[..4].try_into()?) as usize;
                    let record = body.get(4..4 + len).context("a whole record")?;
                    let index = u32::from_be_bytes(record[..4].try_into()?);
                    let version = u64::from_be_bytes(record[4..12].try_into()?);
                    aggregate.clear();
                    let _ = write!(aggregate, "t0-a{index}");
                    sink.record(&topic, &aggregate, version, &record[12..]);
                    body = &body[4 + len..];
                }
                message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                if sink.handled.load(Ordering::Acquire) >= sink.expected {
                    break;
                }
            }
            anyhow::Ok(())
        })
    };
    sink.clock_started();
    let start = Instant::now();
    let publisher = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            // Paced (the latency row) event by event; the throughput row is not paced.
            let per_event = s.rate.is_some();
            let mut pacer = Pacer::new(s.rate, 1);
            let mut body = Vec::with_capacity(PACKED * (16 + s.payload));
            let mut packed = 0;
            let mut stored = 0u64;
            let events = (1..=s.versions)
                .flat_map(|version| (0..s.aggregates_per_topic).map(move |a| (a, version)));
            let total = s.aggregates_per_topic * s.versions;
            for (n, (a, version)) in events.enumerate() {
                if per_event {
                    if let Some(due) = pacer.would_sleep() {
                        if packed > 0 {
                            send_packed(&js, &topic, &mut body, &mut in_flight).await?;
                            stored += 1;
                            packed = 0;
                        }
                        tokio::time::sleep_until(due.into()).await;
                    }
                    pacer.sent += 1;
                }
                // The event's send time and filler written in place: the bus rows allocate no
                // payload per event either.
                let len = s.payload.max(8);
                body.extend_from_slice(&((12 + len) as u32).to_be_bytes());
                body.extend_from_slice(&(a as u32).to_be_bytes());
                body.extend_from_slice(&version.to_be_bytes());
                body.extend_from_slice(&crate::wall_nanos().to_le_bytes());
                body.resize(body.len() + len - 8, 0xA5);
                packed += 1;
                if packed < PACKED && (n as u64 + 1) < total {
                    continue;
                }
                send_packed(&js, &topic, &mut body, &mut in_flight).await?;
                stored += 1;
                packed = 0;
            }
            while let Some(ack) = in_flight.next().await {
                ack?;
            }
            anyhow::Ok(stored)
        })
    };
    let stored = publisher.await??;
    let publish = start.elapsed();
    sink.wait(Duration::from_secs(600)).await?;
    let end_to_end = start.elapsed();
    consume.await??;
    Ok(Timing {
        publish,
        end_to_end,
        stored: Some(stored),
    })
}

/// The acks the packed publisher awaits.
type PackedAcks =
    FuturesUnordered<<jetstream::context::PublishAckFuture as std::future::IntoFuture>::IntoFuture>;

/// Publishes what `body` packs (leaving it empty) and keeps its ack, awaiting the oldest acks
/// while 4 096 are outstanding: the context's window frees a slot only when an ack is awaited.
async fn send_packed(
    js: &jetstream::Context,
    topic: &str,
    body: &mut Vec<u8>,
    in_flight: &mut PackedAcks,
) -> Result<()> {
    let ack = js
        .publish(topic.to_string(), Bytes::from(std::mem::take(body)))
        .await?;
    in_flight.push(std::future::IntoFuture::into_future(ack));
    while in_flight.len() >= 4096 {
        in_flight.next().await.unwrap()?;
    }
    Ok(())
}
