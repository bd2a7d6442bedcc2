//! The health report and its alerts against a real nats-server: healthy, degraded by a halted
//! aggregate and by lag over a threshold, unhealthy while the broker is down, and healthy
//! again; each change raised and cleared as an alert.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::{handler_fn, Envelope, FailurePolicy, HandlerError, Publisher, Subscriber, Topic};
use bus_nats::{HealthAlert, HealthProblem, HealthStatus, HealthThresholds, NatsBus};
use bus_testkit::NatsServer;
use common::test_config;
use tokio::sync::mpsc;

async fn next_alert(alerts: &mut mpsc::Receiver<HealthAlert>) -> HealthAlert {
    tokio::time::timeout(Duration::from_secs(15), alerts.recv())
        .await
        .expect("an alert in time")
        .expect("alerts keep coming")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_halts_lag_and_the_broker() {
    let mut server = NatsServer::start();
    let mut config = test_config(&server.url());
    config.on_failure = FailurePolicy::HaltAggregate;
    config.connection.max_reconnects = None;
    let bus = NatsBus::connect(config).await.unwrap();
    let topic = Topic::new("health.accounts").unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let stalled = Arc::new(AtomicBool::new(false));
    let subscription = {
        let (broken, stalled) = (broken.clone(), stalled.clone());
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let (broken, stalled) = (broken.clone(), stalled.clone());
                async move {
                    if e.aggregate_id().as_str() == "bad" && broken.load(Ordering::Acquire) {
                        return Err(HandlerError::permanent("broken"));
                    }
                    while e.aggregate_id().as_str() == "slow" && stalled.load(Ordering::Acquire) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    let thresholds = HealthThresholds {
        max_lag_age: Some(Duration::from_millis(300)),
        ..HealthThresholds::default()
    };
    let health = bus.health(&thresholds).await;
    assert_eq!(health.status, HealthStatus::Healthy, "{health:#?}");
    assert_eq!(health.subscriptions.len(), 1);
    assert_eq!(health.subscriptions[0].topic, topic);
    assert!(health.subscriptions[0].lag.is_some());

    let mut alerts = bus.health_alerts(thresholds.clone(), Duration::from_millis(50));
    // A halted aggregate degrades the subscription.
    let _receipt = bus
        .publish(&topic, Envelope::builder("bad", "T", 1).build().unwrap())
        .await
        .unwrap();
    bus.flush().await.unwrap();
    match next_alert(&mut alerts).await {
        HealthAlert::Raised {
            topic: t,
            problem: HealthProblem::Halted { count: 1, max: 0 },
        } => {
            assert_eq!(t, topic)
        }
        other => panic!("expected the halt raised, got {other:?}"),
    }
    let health = bus.health(&thresholds).await;
    assert_eq!(health.status, HealthStatus::Degraded);
    broken.store(false, Ordering::Release);
    subscription.control().unwrap().resume("bad").await.unwrap();
    assert_eq!(
        next_alert(&mut alerts).await,
        HealthAlert::Cleared {
            topic: topic.clone(),
            kind: "halted"
        }
    );

    // Lag over the threshold: a stalled event older than 300 ms.
    stalled.store(true, Ordering::Release);
    let _receipt = bus
        .publish(&topic, Envelope::builder("slow", "T", 1).build().unwrap())
        .await
        .unwrap();
    bus.flush().await.unwrap();
    match next_alert(&mut alerts).await {
        HealthAlert::Raised {
            problem: HealthProblem::LagAge { age, max },
            ..
        } => {
            assert!(age > max, "{age:?} {max:?}")
        }
        other => panic!("expected lag raised, got {other:?}"),
    }
    stalled.store(false, Ordering::Release);
    assert_eq!(
        next_alert(&mut alerts).await,
        HealthAlert::Cleared {
            topic: topic.clone(),
            kind: "lag-age"
        }
    );
    assert_eq!(bus.health(&thresholds).await.status, HealthStatus::Healthy);

    // The broker goes away: unhealthy, disconnected; back: healthy.
    server.kill();
    match next_alert(&mut alerts).await {
        HealthAlert::Raised {
            topic: t,
            problem: HealthProblem::Disconnected,
        } => assert_eq!(t, topic),
        other => panic!("expected the disconnection raised, got {other:?}"),
    }
    let health = bus.health(&thresholds).await;
    assert_eq!(health.status, HealthStatus::Unhealthy, "{health:#?}");
    assert!(health.disconnected.contains(&topic), "{health:#?}");
    server.restart().unwrap();
    // Back: everything raised is cleared (the broker may answer lag requests only a moment
    // after the connection is back, which raises and clears `lag-unknown` on the way).
    let mut open = std::collections::BTreeSet::from(["disconnected"]);
    while !open.is_empty() {
        match next_alert(&mut alerts).await {
            HealthAlert::Raised { problem, .. } => {
                assert_eq!(problem.kind(), "lag-unknown", "{problem}");
                open.insert(problem.kind());
            }
            HealthAlert::Cleared { kind, .. } => {
                assert!(open.remove(kind), "{kind} cleared, never raised");
            }
        }
    }
    assert_eq!(bus.health(&thresholds).await.status, HealthStatus::Healthy);

    subscription.close().await.unwrap();
    assert!(
        bus.health(&thresholds).await.subscriptions.is_empty(),
        "a closed subscription is not listed"
    );
    bus.close().await.unwrap();
}
