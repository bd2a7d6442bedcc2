//! What the in-memory transport does with messages it cannot handle.

use std::sync::Arc;

use bus_core::{handler_fn, Envelope, HandlerError, Publisher, RetryPolicy, Subscriber, Topic};
use bus_memory::{MemoryBus, MemoryConfig};
use bus_testkit::conformance::{subscribe_recording, Recorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_failing_messages_are_dead_lettered_and_the_topic_flows() {
    let bus = MemoryBus::with_config(MemoryConfig {
        retry: RetryPolicy::never(),
        ..MemoryConfig::default()
    });
    let topic = Topic::new("poison").unwrap();
    let recorder = Recorder::new();
    let subscription = {
        let recorder = recorder.clone();
        let t = topic.clone();
        bus.subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let recorder = recorder.clone();
                let t = t.clone();
                async move {
                    match e.aggregate_id().as_str() {
                        "panics" => panic!("handler bug"),
                        "refuses" => Err(HandlerError::permanent("cannot apply")),
                        _ => {
                            recorder.record(&t, &e);
                            Ok(())
                        }
                    }
                }
            })),
        )
        .await
        .unwrap()
    };
    let _receipt = bus
        .publish_raw(&topic, vec![], "garbage".into())
        .await
        .unwrap();
    let _receipt = bus
        .publish(&topic, Envelope::builder("panics", "T", 1).build().unwrap())
        .await
        .unwrap();
    let _receipt = bus
        .publish(
            &topic,
            Envelope::builder("refuses", "T", 1).build().unwrap(),
        )
        .await
        .unwrap();
    for v in 1..=10 {
        let _receipt = bus
            .publish(&topic, Envelope::builder("fine", "T", v).build().unwrap())
            .await
            .unwrap();
    }
    recorder.wait_unique(10).await;
    subscription.close().await.unwrap();
    recorder.verifier.report().assert_exact(10);
    let mut reasons: Vec<_> = bus.dead_letters().into_iter().map(|d| d.reason).collect();
    reasons.sort();
    assert_eq!(reasons, ["panic", "permanent", "undecodable"]);
    assert_eq!(bus.pending(&topic), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_subscription_on_a_topic_is_refused() {
    let bus = MemoryBus::new();
    let topic = Topic::new("single").unwrap();
    let recorder = Recorder::new();
    let first = subscribe_recording(&bus, &topic, &recorder).await;
    let second = bus
        .subscribe(&topic, Arc::new(handler_fn(|_| async { Ok(()) })))
        .await
        .unwrap_err();
    assert_eq!(
        second.kind(),
        bus_core::SubscribeErrorKind::AlreadySubscribed
    );
    first.close().await.unwrap();
}
