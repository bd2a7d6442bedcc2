//! The example programs against a real nats-server: the producer publishes 100 typed events;
//! the projection applies them to its database while serving Prometheus metrics and its
//! health; the producer publishes the same history again and the projection, reading it,
//! changes nothing (its versions are skipped as handled); the operator reports the group's
//! state; and the projection rebuilt from the topic's start (which keeps both histories) comes
//! to the same balances.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bus_testkit::NatsServer;

fn run(bin: &str, args: &[&str]) -> String {
    let output = Command::new(bin)
        .args(args)
        .output()
        .expect("the example runs");
    assert!(
        output.status.success(),
        "{bin} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The response to `GET path`, or the I/O error's text.
fn get(address: &str, path: &str) -> String {
    let attempt = || -> std::io::Result<String> {
        let mut socket = std::net::TcpStream::connect(address)?;
        write!(socket, "GET {path} HTTP/1.0\r\n\r\n")?;
        let mut response = String::new();
        socket.read_to_string(&mut response)?;
        Ok(response)
    };
    attempt().unwrap_or_else(|e| format!("error: {e}"))
}

#[test]
fn producer_projection_and_operator() {
    let server = NatsServer::start();
    let url = server.url();
    let dir = tempfile_dir();
    let db = format!("{dir}/balances.redb");
    let producer = env!("CARGO_BIN_EXE_producer");
    let projection = env!("CARGO_BIN_EXE_projection");

    let out = run(producer, &["--server", &url]);
    assert_eq!(out.trim(), "published 100 events on examples.accounts");

    let projecting = |until: &'static str| {
        [
            "--server",
            &url,
            "--db",
            &db,
            "--listen",
            "127.0.0.1:0",
            until,
        ]
    };
    let mut child = KillOnDrop(
        Command::new(projection)
            .args(projecting("--stop-on-eof"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let address = first
        .trim()
        .strip_prefix("serving /metrics and /health on http://")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    let labels = "{topic=\"examples.accounts\",group=\"account-balances\"}";
    let handled = "bus_handle_total{topic=\"examples.accounts\",group=\"account-balances\",outcome=\"handled\"} 100";
    loop {
        let metrics = get(&address, "/metrics");
        if metrics.contains(handled) {
            // Every handled event's time is recorded before it is counted, but the exporter's
            // histogram storage (metrics-util's `AtomicBucket`) drops a value pushed into the
            // block a scrape has just taken, so a scrape that overlapped the handling may have
            // lost a sample or two. Still one per event, not per batch or per scrape.
            let timed = metric_value(&metrics, &format!("bus_handle_seconds_count{labels}"))
                .unwrap_or_else(|| panic!("no bus_handle_seconds_count:\n{metrics}"));
            assert!(
                (90.0..=100.0).contains(&timed),
                "bus_handle_seconds_count {timed} for 100 handled:\n{metrics}"
            );
            assert!(
                metrics.contains(&format!("bus_consumer_lag_seconds{labels}")),
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed 100 handled:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let health = loop {
        let health = get(&address, "/health");
        if !health.starts_with("error:") || Instant::now() > deadline {
            break health;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(health.starts_with("HTTP/1.0 200 OK"), "{health}");
    assert!(health.ends_with("Healthy\n"), "{health}");
    drop(child.stdin.take()); // stop
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        rest.trim(),
        "handled 100 events; 10 accounts, total balance 4500 cents"
    );

    // The same history again (new event IDs, same versions): handled, and nothing changes.
    run(producer, &["--server", &url]);
    let out = run(projection, &projecting("--exit-when-idle"));
    assert!(
        out.trim_end()
            .ends_with("handled 100 events; 10 accounts, total balance 4500 cents"),
        "{out}"
    );

    let out = run(env!("CARGO_BIN_EXE_operator"), &["--server", &url]);
    assert!(
        out.contains("messages in BUS_EXAMPLES_ACCOUNTS)")
            && !out.contains("topic examples.accounts (0 messages"),
        "{out}"
    );
    assert!(
        out.contains(
            "group account-balances on examples.accounts: 0 undelivered, 0 unacknowledged"
        ),
        "{out}"
    );
    assert!(out.contains("0 dead letters"), "{out}");

    // The stream keeps both histories (Limits retention). Rebuilt from the start: both histories delivered again, the second skipped as handled.
    let mut rebuilding = projecting("--exit-when-idle").to_vec();
    rebuilding.push("--rebuild");
    let out = run(projection, &rebuilding);
    assert!(out.contains("rebuilding from sequence 1"), "{out}");
    assert!(
        out.trim_end()
            .ends_with("handled 200 events; 10 accounts, total balance 4500 cents"),
        "{out}"
    );
}

/// A child process that a failed assertion does not leave running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh directory under the system's temporary directory.
fn tempfile_dir() -> String {
    let dir = std::env::temp_dir().join(format!("bus-examples-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.display().to_string()
}

/// The value of the sample line `name` (with its labels) in a Prometheus text exposition.
fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
