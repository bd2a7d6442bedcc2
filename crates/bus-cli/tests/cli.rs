//! The `bus` binary against a real nats-server and a service in this process: it lists topics
//! and lag, lists a halted aggregate held by the service, resumes one and skips another there
//! (so the service's handler sees them), lists and replays dead letters, and fails clearly.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{handler_fn, Envelope, FailurePolicy, HandlerError, Publisher, Subscriber, Topic};
use bus_nats::{NatsBus, NatsConfig};
use bus_testkit::NatsServer;

/// Runs `bus` with `args`; (success, stdout, stderr).
async fn bus(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_bus"))
            .args(&args)
            .env_remove("NATS_URL")
            .env_remove("BUS_GROUP")
            .env_remove("BUS_CONFIG")
            .output()
            .expect("bus runs")
    })
    .await
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `bus --server url --group billing` with `args`.
async fn bus_billing(url: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["--server", url, "--group", "billing"];
    all.extend_from_slice(args);
    bus(&all).await
}

#[tokio::test]
async fn completions_are_printed_without_a_server() {
    for (shell, start) in [
        ("bash", "_bus()"),
        ("zsh", "#compdef bus"),
        ("fish", "# Print an optspec"),
    ] {
        let (ok, out, err) = bus(&["--server", "nats://127.0.0.1:1", "completions", shell]).await;
        assert!(ok, "{shell}: {err}");
        assert!(out.trim_start().starts_with(start), "{shell}: {out}");
        assert!(
            out.contains("dead-letters"),
            "{shell}: the commands are completed"
        );
    }
}

/// The versions of `aggregate` the service handled, in order.
fn versions_of(handled: &Mutex<Vec<(String, u64)>>, aggregate: &str) -> Vec<u64> {
    handled
        .lock()
        .unwrap()
        .iter()
        .filter(|(a, _)| a == aggregate)
        .map(|(_, v)| *v)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_operates_a_running_service() {
    let server = NatsServer::start();
    let url = server.url();
    let mut config = NatsConfig::new(&url).with_group("billing");
    // One event per message: the lag checked below counts the broker's messages.
    config.batching = bus_nats::BatchConfig::off();
    config.on_failure = FailurePolicy::HaltAggregate;
    config.retry.max_attempts = 1;
    let service = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("cli.orders").unwrap();
    // Aggregates whose events the handler refuses, until the operator has dealt with them.
    let refused: Arc<Mutex<HashSet<String>>> =
        Arc::new(Mutex::new(["bad", "poison"].map(String::from).into()));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let subscription = {
        let (refused, handled) = (refused.clone(), handled.clone());
        service
            .subscribe(
                &topic,
                Arc::new(handler_fn(move |e: Envelope| {
                    let (refused, handled) = (refused.clone(), handled.clone());
                    async move {
                        let aggregate = e.aggregate_id().to_string();
                        if refused.lock().unwrap().contains(&aggregate) {
                            return Err(HandlerError::permanent("refused"));
                        }
                        handled.lock().unwrap().push((aggregate, e.event_version()));
                        Ok(())
                    }
                })),
            )
            .await
            .unwrap()
    };
    for version in 1..=3 {
        for aggregate in ["good", "bad", "poison"] {
            let e = Envelope::builder(aggregate, "Placed", version)
                .build()
                .unwrap();
            let _receipt = service.publish(&topic, e).await.unwrap();
        }
    }
    service.flush().await.unwrap();
    let control = subscription.control().unwrap();
    bus_testkit::wait_for("two halted aggregates", Duration::from_secs(10), || {
        control.metrics().halted_aggregates == 2
    })
    .await;

    let (ok, out, err) = bus(&["--server", &url, "topics"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("cli.orders  stream BUS_CLI_ORDERS  work-queue  partitions 1"),
        "{out}"
    );
    assert!(out.contains("consumer billing-cli_orders"), "{out}");

    let (ok, out, err) = bus_billing(&url, &["lag", "cli.orders"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("undelivered 0  unacknowledged 6"), "{out}");
    // The same figures as JSON, for scripts.
    let (ok, out, err) = bus_billing(&url, &["--json", "lag", "cli.orders"]).await;
    assert!(ok, "{err}");
    let lag: serde_json::Value = serde_json::from_str(&out).expect("lag --json is JSON");
    assert_eq!(lag["topic"], "cli.orders", "{out}");
    assert_eq!(lag["undelivered"], 0, "{out}");
    assert_eq!(lag["unacknowledged"], 6, "{out}");
    let (ok, out, err) = bus(&["--server", &url, "--json", "topics"]).await;
    assert!(ok, "{err}");
    let topics: serde_json::Value = serde_json::from_str(&out).expect("topics --json is JSON");
    let orders = topics
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == "cli.orders")
        .unwrap_or_else(|| panic!("cli.orders listed: {out}"));
    assert_eq!(orders["stream"], "BUS_CLI_ORDERS", "{out}");
    assert!(
        orders["consumers"][0]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("billing-cli_orders")),
        "{out}"
    );
    // A group that never subscribed, a topic nothing stores: errors, not figures.
    let (ok, out, err) = bus(&[
        "--server",
        &url,
        "--group",
        "no-such-group",
        "lag",
        "cli.orders",
    ])
    .await;
    assert!(
        !ok && out.is_empty() && err.contains("never subscribed"),
        "{out}{err}"
    );
    let (ok, out, err) = bus_billing(&url, &["lag", "no.such.topic"]).await;
    assert!(
        !ok && out.is_empty() && err.contains("no stream stores topic"),
        "{out}{err}"
    );

    let (ok, out, err) = bus_billing(&url, &["halted", "cli.orders"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("(owner): 2 halted"), "{out}");
    assert!(
        out.contains("  bad  v1  seq 2  waiting 3  attempts 1  permanent"),
        "{out}"
    );
    assert!(out.contains("  poison  v1  seq 3  waiting 3"), "{out}");

    // Resume `bad` once it is fixed: the service handles its three events, in order.
    refused.lock().unwrap().remove("bad");
    let (ok, out, err) = bus_billing(&url, &["resume", "cli.orders", "bad"]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("resumed bad (pid "), "{out}");
    bus_testkit::wait_for("bad handled", Duration::from_secs(10), || {
        versions_of(&handled, "bad").len() == 3
    })
    .await;
    assert_eq!(versions_of(&handled, "bad"), [1, 2, 3]);

    // Skip `poison` v1: dead-lettered; v2 and v3 are still refused, so it halts again at v2.
    let (ok, out, err) = bus_billing(&url, &["skip", "cli.orders", "poison"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("skipped the failed event of poison"), "{out}");
    bus_testkit::wait_for("poison halted at v2", Duration::from_secs(10), || {
        control
            .halted()
            .iter()
            .any(|h| h.key == "poison" && h.event_version == Some(2))
    })
    .await;
    let (ok, out, err) = bus(&["--server", &url, "dead-letters", "cli.orders"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("poison v1  skipped  attempts 1"), "{out}");
    let sequence = out.split_whitespace().next().unwrap().to_owned();

    // Fix it, resume (v2, v3 handled), then replay the dead letter: v1 comes again at the end.
    refused.lock().unwrap().remove("poison");
    let (ok, _, err) = bus_billing(&url, &["resume", "cli.orders", "poison"]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = bus(&[
        "--server",
        &url,
        "replay",
        "cli.orders",
        "--sequence",
        &sequence,
    ])
    .await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!("replayed {sequence} as sequence ")),
        "{out}"
    );
    bus_testkit::wait_for("poison handled", Duration::from_secs(10), || {
        versions_of(&handled, "poison").len() == 3
    })
    .await;
    // v2 and v3 after the resume, then the replayed v1 at the end of the topic.
    assert_eq!(versions_of(&handled, "poison"), [2, 3, 1]);
    let (ok, out, _) = bus(&["--server", &url, "dead-letters", "cli.orders"]).await;
    assert!(ok && out.contains("no dead letters"), "{out}");

    // Clear failures.
    let (ok, _, err) = bus(&["--server", &url, "halted", "cli.orders"]).await;
    assert!(!ok);
    assert!(err.contains("--group"), "{err}");
    let (ok, _, err) = bus_billing(&url, &["resume", "cli.orders", "nobody"]).await;
    assert!(!ok);
    assert!(
        err.contains("`nobody`") && err.contains("not halted"),
        "{err}"
    );
    let (ok, _, err) = bus(&[
        "--server",
        &url,
        "--group",
        "nobody",
        "halted",
        "cli.orders",
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("no subscription of group `nobody`"), "{err}");

    subscription.close().await.unwrap();
    service.close().await.unwrap();
}

/// `bus repartition` changes a drained topic's partition count, and refuses while it stores
/// events, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repartition_changes_a_drained_topic_and_refuses_otherwise() {
    let server = NatsServer::start();
    let url = server.url();
    let service = NatsBus::connect(NatsConfig::new(&url)).await.unwrap();
    let topic = Topic::new("cli.recount").unwrap();
    service
        .publish(
            &topic,
            Envelope::builder("r", "Counted", 1).build().unwrap(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let (ok, _, stderr) = bus(&[
        "--server",
        &url,
        "repartition",
        "cli.recount",
        "--partitions",
        "4",
    ])
    .await;
    assert!(!ok && stderr.contains("stores 1 of its events"), "{stderr}");
    service.close().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    js.get_stream(bus_nats::default_stream_name(&topic))
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    let (ok, stdout, stderr) = bus(&[
        "--server",
        &url,
        "repartition",
        "cli.recount",
        "--partitions",
        "4",
    ])
    .await;
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "cli.recount: 1 partition(s) -> 4");
    let (ok, stdout, _) = bus(&["--server", &url, "topics"]).await;
    assert!(
        ok && stdout.contains("cli.recount  stream") && stdout.contains("partitions 4"),
        "{stdout}"
    );
}

/// (aggregate, version, stream sequence) of every handler call, in the order they ran.
type Calls = Arc<Mutex<Vec<(String, u64, u64)>>>;

/// A handler that records every call in `calls`.
fn recording(calls: &Calls) -> Arc<dyn bus_core::Handler> {
    let calls = calls.clone();
    Arc::new(handler_fn(move |e: Envelope| {
        let calls = calls.clone();
        async move {
            let sequence = bus_core::current_delivery()
                .and_then(|d| d.stream_sequence)
                .expect("a NATS delivery has a stream sequence");
            calls
                .lock()
                .unwrap()
                .push((e.aggregate_id().to_string(), e.event_version(), sequence));
            Ok(())
        }
    }))
}

/// `bus reset` against a running service that rebuilds a projection: moved back to a stream
/// sequence, then to a time before everything, the service's handler sees every aggregate's
/// events again in order from the point; stopped, the group is reset for its next start; and
/// a point the stream does not hold is refused. The operator and the service read the same
/// configuration file (a topic whose stream keeps what was read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_resets_a_running_service() {
    let server = NatsServer::start();
    let url = server.url();
    let file = std::env::temp_dir().join(format!("bus-cli-reset-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        format!(
            "[connection]\nservers = [\"{url}\"]\n[consumer]\ngroup = \"ledger\"\n\
             [batching]\nmax_events = 1\n\
             [[streams]]\nname = \"LEDGER\"\ntopics = [\"cli.ledger\"]\nretention = \"limits\"\n\
             max_bytes = 16777216\n"
        ),
    )
    .unwrap();
    let config_arg = file.to_str().unwrap().to_owned();
    let reset = |args: &'static [&'static str]| {
        let config_arg = config_arg.clone();
        async move {
            let mut all = vec![
                "--config",
                config_arg.as_str(),
                "--json",
                "reset",
                "cli.ledger",
            ];
            all.extend_from_slice(args);
            bus(&all).await
        }
    };
    let service = NatsBus::connect(NatsConfig::load(&file).unwrap())
        .await
        .unwrap();
    let topic = Topic::new("cli.ledger").unwrap();
    // (aggregate, version, stream sequence) of every call.
    let calls: Calls = Arc::default();
    let subscription = service.subscribe(&topic, recording(&calls)).await.unwrap();
    let before_everything = std::time::SystemTime::now() - Duration::from_secs(1);
    for version in 1..=10 {
        for aggregate in ["a", "b", "c"] {
            let e = Envelope::builder(aggregate, "Posted", version)
                .build()
                .unwrap();
            let _receipt = service.publish(&topic, e).await.unwrap();
        }
    }
    service.flush().await.unwrap();
    bus_testkit::wait_for("30 handled", Duration::from_secs(10), || {
        calls.lock().unwrap().len() == 30
    })
    .await;
    let control = subscription.control().unwrap();

    // Back to sequence 16: the 15 events stored from there come again, each aggregate's in
    // order, after everything it had handled.
    let (ok, out, err) = reset(&["--to-sequence", "16"]).await;
    assert!(ok, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["sequence"], 16, "{out}");
    assert!(
        answer["moved_by"].as_str().unwrap().starts_with("pid "),
        "{out}"
    );
    bus_testkit::wait_for("15 handled again", Duration::from_secs(10), || {
        calls.lock().unwrap().len() == 45
    })
    .await;
    assert_eq!(control.metrics().delivery_moves, 1);
    let replay: Vec<(String, u64, u64)> = calls.lock().unwrap()[30..].to_vec();
    let mut sequences: Vec<u64> = replay.iter().map(|c| c.2).collect();
    sequences.sort_unstable();
    assert_eq!(sequences, (16..=30).collect::<Vec<_>>(), "{replay:?}");
    for aggregate in ["a", "b", "c"] {
        let versions: Vec<u64> = replay
            .iter()
            .filter(|c| c.0 == aggregate)
            .map(|c| c.1)
            .collect();
        let from = versions[0];
        assert_eq!(
            versions,
            (from..=10).collect::<Vec<_>>(),
            "{aggregate}: in order, to the last"
        );
    }

    // Back to a time before the first event: all 30 again, in order.
    let time = humantime::format_rfc3339(before_everything).to_string();
    let time: &'static str = Box::leak(time.into_boxed_str());
    let args: &'static [&'static str] = Box::leak(Box::new(["--to-time", time]));
    let (ok, out, err) = reset(args).await;
    assert!(ok, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["sequence"], 1, "{out}");
    bus_testkit::wait_for("30 handled again", Duration::from_secs(10), || {
        calls.lock().unwrap().len() == 75
    })
    .await;
    assert_eq!(control.metrics().delivery_moves, 2);
    for aggregate in ["a", "b", "c"] {
        let versions: Vec<u64> = calls.lock().unwrap()[45..]
            .iter()
            .filter(|c| c.0 == aggregate)
            .map(|c| c.1)
            .collect();
        assert_eq!(versions, (1..=10).collect::<Vec<_>>(), "{aggregate}");
    }

    // Stopped: the group's consumer itself is reset, and the next subscription starts there.
    subscription.close().await.unwrap();
    let (ok, out, err) = reset(&["--to-sequence", "28"]).await;
    assert!(ok, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["sequence"], 28, "{out}");
    assert!(answer["moved_by"].is_null(), "{out}");

    // A point past the end is refused, saying what the stream holds.
    let (ok, _, err) = reset(&["--to-sequence", "99"]).await;
    assert!(!ok);
    assert!(err.contains("must be from 1 to 31"), "{err}");
    // A point is required.
    let (ok, _, err) = reset(&[]).await;
    assert!(!ok);
    assert!(err.contains("--to-start"), "{err}");

    let again = calls.lock().unwrap().len();
    let subscription = service.subscribe(&topic, recording(&calls)).await.unwrap();
    bus_testkit::wait_for("28..=30 handled again", Duration::from_secs(10), || {
        calls.lock().unwrap().len() == again + 3
    })
    .await;
    // Aggregates run side by side: compared as a set.
    let mut restarted: Vec<u64> = calls.lock().unwrap()[again..].iter().map(|c| c.2).collect();
    restarted.sort_unstable();
    assert_eq!(restarted, [28, 29, 30]);
    subscription.close().await.unwrap();
    service.close().await.unwrap();
    let _ = std::fs::remove_file(&file);
}
