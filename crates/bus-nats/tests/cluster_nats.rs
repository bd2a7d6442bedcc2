//! A topic replicated on a 3-node JetStream cluster, under node loss.

mod common;

use std::time::Duration;

use bus_core::{Publisher, Topic};
use bus_nats::{default_stream_name, NatsBus, NatsConfig, StreamSpec};
use bus_testkit::conformance::{subscribe_recording, Recorder};
use bus_testkit::NatsCluster;

fn replicated(cluster: &NatsCluster, topic: &Topic) -> NatsConfig {
    let mut config = common::test_config(&cluster.urls());
    let mut spec = StreamSpec::new(default_stream_name(topic), [topic.clone()]);
    spec.replicas = 3;
    config.streams.push(spec);
    config.dead_letters.replicas = 3;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_topic_round_trips() {
    let cluster = NatsCluster::start(3).await;
    let topic = Topic::new("replicated").unwrap();
    let bus = NatsBus::connect(replicated(&cluster, &topic))
        .await
        .unwrap();
    let recorder = Recorder::new();
    let subscription = subscribe_recording(&bus, &topic, &recorder).await;
    for version in 1..=20 {
        let e = bus_core::Envelope::builder("r", "Replicated", version)
            .build()
            .unwrap();
        bus.publish(&topic, e).await.unwrap().await.unwrap();
    }
    recorder
        .wait_until("all", Duration::from_secs(20), |r| r.unique >= 20)
        .await;
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(20);
}

/// The scenario of a cluster losing nodes under load: a topic with three replicas, the bus
/// connected to all three nodes, 16 aggregates published at about 500 events a second while one
/// subscriber handles them. The node leading the topic's stream is killed (SIGKILL) and started
/// again 5 s later; then the node leading its consumer; then the node the subscriber's
/// connection uses. Every publish must succeed (retried through the elections, never refused
/// or aborted), every event be handled once, in order, with no two calls for one aggregate at
/// once; and a close and reopen afterwards must repeat nothing. Reports the outage publishers
/// and the handler saw next to the elections in the servers' logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_under_load_refuses_nothing_overtakes_nothing_repeats_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    use bus_core::{handler_fn, Envelope, Subscriber};

    const AGGREGATES: u64 = 16;
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let mut cluster = NatsCluster::start(3).await;
    let topic = Topic::new("failover").unwrap();
    let mut config = replicated(&cluster, &topic);
    config.publish_retry_for = Duration::from_secs(60);
    let stream = default_stream_name(&topic);
    let consumer = config.consumer_name(&topic);
    let bus = NatsBus::connect(config).await.unwrap();
    let admin = {
        let addrs: Vec<async_nats::ServerAddr> = cluster
            .urls()
            .split(',')
            .map(|u| u.parse().unwrap())
            .collect();
        async_nats::connect(addrs).await.unwrap()
    };
    let leader = |subject: String| {
        let admin = admin.clone();
        async move {
            for _ in 0..100 {
                if let Ok(reply) = admin.request(subject.clone(), "".into()).await {
                    let info: serde_json::Value =
                        serde_json::from_slice(&reply.payload).unwrap_or_default();
                    if let Some(leader) = info["cluster"]["leader"].as_str() {
                        return leader.to_owned();
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("no leader for {subject}");
        }
    };

    // The handler: order, overlaps and the longest silence.
    let recorder = Recorder::new();
    let busy: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let overlaps = Arc::new(AtomicU64::new(0));
    let last_call = Arc::new(Mutex::new(Instant::now()));
    let longest_silence = Arc::new(Mutex::new(Duration::ZERO));
    // Wall-clock times of every handler call and every publish (sent, acknowledged), to measure
    // the outage each kill caused.
    let calls: Arc<Mutex<Vec<f64>>> = Arc::default();
    let publishes: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    fn now_s() -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    }
    let handler = {
        let (recorder, t, busy, overlaps) = (
            recorder.clone(),
            topic.clone(),
            busy.clone(),
            overlaps.clone(),
        );
        let (last_call, longest_silence, calls) =
            (last_call.clone(), longest_silence.clone(), calls.clone());
        Arc::new(handler_fn(move |e: Envelope| {
            let (recorder, t, busy, overlaps) =
                (recorder.clone(), t.clone(), busy.clone(), overlaps.clone());
            let (last_call, longest_silence, calls) =
                (last_call.clone(), longest_silence.clone(), calls.clone());
            async move {
                calls.lock().unwrap().push(now_s());
                let key = e.aggregate_id().to_string();
                if !busy.lock().unwrap().insert(key.clone()) {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                {
                    let mut last = last_call.lock().unwrap();
                    let mut longest = longest_silence.lock().unwrap();
                    if last.elapsed() > Duration::from_secs(2) {
                        tracing::warn!(silence = ?last.elapsed(), "handler silence");
                    }
                    *longest = (*longest).max(last.elapsed());
                    *last = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                recorder.record(&t, &e);
                busy.lock().unwrap().remove(&key);
                Ok(())
            }
        }))
    };
    let subscription = bus.subscribe(&topic, handler.clone()).await.unwrap();
    let control = subscription.control().unwrap();

    // The publisher: every receipt is awaited and kept; none may fail.
    let publisher = bus.publisher();
    let stop = Arc::new(AtomicBool::new(false));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let publishing = {
        let (publisher, topic, stop, slowest) = (
            publisher.clone(),
            topic.clone(),
            stop.clone(),
            slowest.clone(),
        );
        let publishes = publishes.clone();
        tokio::spawn(async move {
            let mut receipts = Vec::new();
            let mut version = 0;
            while !stop.load(Ordering::SeqCst) {
                version += 1;
                for a in 0..AGGREGATES {
                    let event = Envelope::builder(format!("f-{a}"), "FailedOver", version)
                        .build()
                        .unwrap();
                    let sent = Instant::now();
                    let sent_s = now_s();
                    let receipt = publisher.publish(&topic, event).await.unwrap();
                    let (slowest, publishes) = (slowest.clone(), publishes.clone());
                    receipts.push(tokio::spawn(async move {
                        let result = receipt.await;
                        let took = sent.elapsed();
                        publishes.lock().unwrap().push((sent_s, now_s()));
                        let mut s = slowest.lock().unwrap();
                        *s = (*s).max(took);
                        result
                    }));
                }
                // 16 events every 32 ms: about 500 a second.
                tokio::time::sleep(Duration::from_millis(32)).await;
            }
            let mut failures = Vec::new();
            for receipt in receipts {
                if let Err(e) = receipt.await.unwrap() {
                    failures.push(e.to_string());
                }
            }
            (version, failures)
        })
    };

    let wall = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut kills = Vec::new();
    for (what, subject) in [
        ("stream leader", format!("$JS.API.STREAM.INFO.{stream}")),
        (
            "consumer leader",
            format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
        ),
        ("subscriber's server", String::new()),
    ] {
        recorder
            .wait_until("steady flow", Duration::from_secs(60), |r| r.unique >= 500)
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let name = if subject.is_empty() {
            bus.client(&topic).await.unwrap().server_info().server_name
        } else {
            leader(subject).await
        };
        let node = cluster.index_of(&name).unwrap();
        let killed_at = wall();
        cluster.kill(node);
        tokio::time::sleep(Duration::from_secs(5)).await;
        cluster.restart(node).unwrap();
        kills.push((what, name, killed_at));
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (versions, failures) = publishing.await.unwrap();
    let expected = AGGREGATES * versions;
    recorder
        .wait_until("every event", Duration::from_secs(60), |r| {
            r.unique >= expected
        })
        .await;
    let metrics = control.metrics();
    let report = subscription.close().await.unwrap();
    let verified = recorder.verifier.report();

    // A close and reopen repeats nothing: the first event the reopened subscription sees is
    // a new one published after it.
    let subscription = bus.subscribe(&topic, handler).await.unwrap();
    let sentinel = Envelope::builder("sentinel", "FailedOver", 1)
        .build()
        .unwrap();
    bus.publish(&topic, sentinel).await.unwrap().await.unwrap();
    recorder
        .wait_until("the sentinel", Duration::from_secs(30), |r| {
            r.unique > expected
        })
        .await;
    subscription.close().await.unwrap();
    let after = recorder.verifier.report();

    // When, after each kill, a server logged a new leader for the topic's stream or consumer.
    let seconds_of_day = |line: &str| -> Option<f64> {
        let time = line.split_whitespace().nth(2)?;
        let mut parts = time.split(':');
        let (h, m, s): (f64, f64, f64) = (
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        );
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let elections: Vec<(f64, String)> = cluster
        .log_lines("JetStream cluster new")
        .into_iter()
        .filter(|(_, l)| l.contains(&stream))
        .filter_map(|(i, l)| {
            let at = seconds_of_day(&l)?;
            let what = l.split("[INF] ").last().unwrap_or(&l).to_owned();
            Some((at, format!("n{}: {what}", i + 1)))
        })
        .collect();
    let election_after = |killed: Duration| {
        let killed = (killed.as_secs_f64()) % 86_400.0;
        elections
            .iter()
            .filter(|(at, _)| *at > killed)
            .map(|(at, what)| (at - killed, what.clone()))
            .fold(None, |best: Option<(f64, String)>, e| match best {
                Some(b) if b.0 <= e.0 => Some(b),
                _ => Some(e),
            })
    };
    // Per kill: the longest the handler went without a call, the slowest publish sent in the
    // 12 s after it, and when the leader of what was lost was elected again.
    let calls = calls.lock().unwrap().clone();
    let publishes = publishes.lock().unwrap().clone();
    let kills: Vec<String> = kills
        .iter()
        .map(|(what, name, at)| {
            let killed = at.as_secs_f64();
            let window = |t: f64| t > killed - 1.0 && t < killed + 12.0;
            let handler_outage = calls
                .windows(2)
                .filter(|w| window(w[1]))
                .map(|w| w[1] - w[0])
                .fold(0.0, f64::max);
            let publish_outage = publishes
                .iter()
                .filter(|(sent, _)| window(*sent))
                .map(|(sent, acked)| acked - sent)
                .fold(0.0, f64::max);
            let election = election_after(*at)
                .map(|(after, line)| format!("{after:.1} s ({line})"))
                .unwrap_or_else(|| "none logged".into());
            format!(
                "{what} {name}: new leader after {election}; handler outage {handler_outage:.1} s; slowest publish {publish_outage:.1} s"
            )
        })
        .collect();
    eprintln!(
        "cluster fail-over: {versions} rounds, {expected} events; kills {:#?}; slowest publish \
         receipt {:?}; longest handler silence {:?}; publisher retries {}; delivery restarts {}; ownership lost {} gained {}; \
         close {report:?}; {verified:?}",
        kills,
        slowest.lock().unwrap(),
        longest_silence.lock().unwrap(),
        publisher.retries(),
        metrics.delivery_restarts,
        metrics.ownership_lost,
        metrics.ownership_gained,
    );
    assert!(
        failures.is_empty(),
        "{} publishes failed: {failures:?}",
        failures.len()
    );
    assert!(
        publisher.retries() > 0,
        "no publish was retried: the elections were not seen"
    );
    assert!(metrics.delivery_restarts >= 1, "{metrics:?}");
    assert_eq!(verified.order_violations, 0, "{verified:?}");
    assert_eq!(verified.gaps, 0, "{verified:?}");
    assert_eq!(verified.lost(expected), 0, "{verified:?}");
    assert_eq!(verified.duplicates, 0, "{verified:?}");
    assert_eq!(overlaps.load(Ordering::SeqCst), 0);
    assert_eq!(report.unconfirmed, 0, "{report:?}");
    assert_eq!(
        after.handled,
        verified.handled + 1,
        "the reopen repeated events: {after:?}"
    );
}

/// The conformance suite on the cluster: every topic's stream and the dead letters with three
/// replicas.
struct ClusterHarness {
    bus: NatsBus,
}

#[async_trait::async_trait]
impl bus_testkit::conformance::Harness for ClusterHarness {
    async fn publisher(&self) -> std::sync::Arc<dyn bus_core::Publisher> {
        std::sync::Arc::new(self.bus.publisher())
    }
    async fn subscriber(&self) -> std::sync::Arc<dyn bus_core::Subscriber> {
        std::sync::Arc::new(self.bus.clone())
    }
    fn topic(&self, name: &str) -> Topic {
        common::conformance_topic_checked(name)
    }
}

/// One cluster for the whole suite, run part after part: a cluster per part would start 24
/// servers at once on two cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_on_replicated_topics() {
    let cluster = NatsCluster::start(3).await;
    let config = common::conformance_config(&cluster.urls(), bus_nats::Retention::WorkQueue, 3);
    let harness = ClusterHarness {
        bus: NatsBus::connect(config).await.unwrap(),
    };
    bus_testkit::conformance::run_all(&harness).await;
}

/// A stream asking for more replicas than there are nodes is refused when the topic is first
/// used, with an error that names the stream and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_replicas_than_nodes_is_refused_clearly() {
    let server = bus_testkit::NatsServer::start();
    let topic = Topic::new("overreplicated").unwrap();
    let mut config = common::test_config(&server.url());
    let mut spec = StreamSpec::new(default_stream_name(&topic), [topic.clone()]);
    spec.replicas = 3;
    config.streams.push(spec);
    let bus = NatsBus::connect(config).await.unwrap();
    let error = bus
        .publish(
            &topic,
            bus_core::Envelope::builder("o", "Over", 1).build().unwrap(),
        )
        .await
        .unwrap_err();
    let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    eprintln!("{text}");
    assert!(
        text.contains("BUS_OVERREPLICATED") && text.contains("3 replicas"),
        "{text}"
    );
}
