//! Typed events against a real nats-server: `publish_event`, `EventHandlers` with one handler
//! per type, the unknown-type policy, and the context a handler gets (attempt, stream
//! sequence, partition, cancellation).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::wire::partition_of;
use bus_core::{
    Event, EventContext, EventHandlers, HandlerError, PublishEvent, Publisher, Subscriber, Topic,
    UnknownEvents,
};
use bus_nats::{NatsBus, StreamSpec};
use bus_testkit::NatsServer;
use common::{test_config, wait_for};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Deposited {
    cents: u64,
}
impl Event for Deposited {
    const TYPE: &'static str = "Deposited";
}

#[derive(Debug, Serialize, Deserialize)]
struct Withdrawn {
    cents: u64,
}
impl Event for Withdrawn {
    const TYPE: &'static str = "Withdrawn";
}

#[derive(Debug, Serialize, Deserialize)]
struct Closed {}
impl Event for Closed {
    const TYPE: &'static str = "Closed";
}

/// (aggregate, type, version, amount, attempt, stream sequence, partition, index in its batch)
type Seen = (
    String,
    &'static str,
    u64,
    u64,
    u32,
    Option<u64>,
    Option<u32>,
    Option<u32>,
);

fn record(seen: &Mutex<Vec<Seen>>, kind: &'static str, cents: u64, cx: &EventContext) {
    seen.lock().unwrap().push((
        cx.aggregate_id().to_string(),
        kind,
        cx.version(),
        cents,
        cx.attempt(),
        cx.stream_sequence(),
        cx.partition(),
        cx.batch_index(),
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_handlers_get_decoded_events_in_order_with_their_context() {
    let server = NatsServer::start();
    let mut config = test_config(&server.url());
    let topic = Topic::new("typed.accounts").unwrap();
    let mut spec = StreamSpec::new("TYPED_ACCOUNTS", [topic.clone()]);
    spec.partitions = 2;
    config.streams.push(spec);
    let bus = NatsBus::connect(config).await.unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    // The first attempt at acc-0 v3 fails: the retry must say it is attempt 2.
    let failed_once = Arc::new(Mutex::new(false));
    let handlers = {
        let (a, b, failed_once) = (seen.clone(), seen.clone(), failed_once.clone());
        EventHandlers::new()
            .on(move |e: Deposited, cx: EventContext| {
                let (seen, failed_once) = (a.clone(), failed_once.clone());
                async move {
                    if cx.aggregate_id().as_str() == "acc-0" && cx.version() == 3 {
                        let mut failed = failed_once.lock().unwrap();
                        if !*failed {
                            *failed = true;
                            return Err(HandlerError::retryable("first attempt fails"));
                        }
                    }
                    record(&seen, "dep", e.cents, &cx);
                    Ok(())
                }
            })
            .on(move |e: Withdrawn, cx: EventContext| {
                let seen = b.clone();
                async move {
                    record(&seen, "wd", e.cents, &cx);
                    Ok(())
                }
            })
    };
    let subscription = bus.subscribe(&topic, Arc::new(handlers)).await.unwrap();

    for version in 1..=6u64 {
        for a in 0..4 {
            let aggregate = format!("acc-{a}");
            let _receipt = if version % 2 == 1 {
                bus.publish_event(
                    &topic,
                    &aggregate,
                    version,
                    &Deposited {
                        cents: version * 10,
                    },
                )
                .await
            } else {
                bus.publish_event(&topic, &aggregate, version, &Withdrawn { cents: version })
                    .await
            }
            .unwrap();
        }
    }
    // A type this service has no handler for, then one more known event behind it.
    let _receipt = bus
        .publish_event(&topic, "acc-1", 7, &Closed {})
        .await
        .unwrap();
    let _receipt = bus
        .publish_event(&topic, "acc-1", 8, &Deposited { cents: 80 })
        .await
        .unwrap();
    bus.flush().await.unwrap();
    wait_for("25 typed events handled", Duration::from_secs(10), || {
        seen.lock().unwrap().len() == 25
    })
    .await;

    let seen = seen.lock().unwrap().clone();
    for a in 0..4 {
        let aggregate = format!("acc-{a}");
        let mine: Vec<&Seen> = seen.iter().filter(|s| s.0 == aggregate).collect();
        let versions: Vec<u64> = mine.iter().map(|s| s.2).collect();
        let expected: Vec<u64> = if a == 1 {
            vec![1, 2, 3, 4, 5, 6, 8]
        } else {
            (1..=6).collect()
        };
        assert_eq!(
            versions, expected,
            "{aggregate} in order, unknown v7 not handled"
        );
        for s in &mine {
            let kind = if s.2 % 2 == 1 || s.2 == 8 {
                "dep"
            } else {
                "wd"
            };
            assert_eq!(s.1, kind, "{s:?} went to its type's handler");
            let cents = if kind == "dep" { s.2 * 10 } else { s.2 };
            assert_eq!(s.3, cents, "{s:?} decoded");
            assert_eq!(s.6, Some(partition_of(&aggregate, 2)), "{s:?} partition");
            assert!(s.5.is_some(), "{s:?} has its stream sequence");
        }
        // Events of one record batch share the stream sequence; with the index in the batch
        // the position grows.
        let positions: Vec<(u64, u32)> = mine
            .iter()
            .map(|s| (s.5.unwrap(), s.7.unwrap_or(0)))
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{aggregate}: positions grow {positions:?}"
        );
    }
    let retried: Vec<&Seen> = seen.iter().filter(|s| s.0 == "acc-0" && s.2 == 3).collect();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].4, 2, "the retry is attempt 2");
    assert!(
        seen.iter()
            .filter(|s| !(s.0 == "acc-0" && s.2 == 3))
            .all(|s| s.4 == 1),
        "every other event succeeded at attempt 1"
    );
    subscription.close().await.unwrap();

    // Unknown types fail by default: dead-lettered, saying why.
    let letters = bus.dead_letters(&topic, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "permanent");
    assert!(
        letters[0]
            .error
            .contains("no handler for event type `Closed`"),
        "{}",
        letters[0].error
    );
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_types_can_be_acknowledged_and_close_cancels_running_handlers() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topic = Topic::new("typed.cancel").unwrap();

    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let cancelled = Arc::new(Mutex::new(Vec::new()));
    let handlers = {
        let cancelled = cancelled.clone();
        Arc::new(
            EventHandlers::new()
                .on(move |_: Deposited, cx: EventContext| {
                    let (started, cancelled) = (started_tx.clone(), cancelled.clone());
                    async move {
                        started.send(cx.version()).unwrap();
                        // Long work that stops when the subscription goes.
                        tokio::select! {
                            _ = cx.cancellation().cancelled() => {
                                cancelled.lock().unwrap().push(cx.version());
                                Err(HandlerError::retryable("cancelled"))
                            }
                            _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(()),
                        }
                    }
                })
                .unknown(UnknownEvents::Acknowledge),
        )
    };
    let subscription = bus.subscribe(&topic, handlers.clone()).await.unwrap();
    let _receipt = bus
        .publish_event(&topic, "acc-9", 1, &Closed {})
        .await
        .unwrap();
    let _receipt = bus
        .publish_event(&topic, "acc-9", 2, &Deposited { cents: 1 })
        .await
        .unwrap();
    // Queued behind v2 when the subscription closes: returned with it, not handled after it.
    let _receipt = bus
        .publish_event(&topic, "acc-9", 3, &Deposited { cents: 2 })
        .await
        .unwrap();
    bus.flush().await.unwrap();
    let version = tokio::time::timeout(Duration::from_secs(10), started.recv())
        .await
        .expect("the handler started")
        .unwrap();
    assert_eq!(version, 2, "the unknown v1 was acknowledged, not handled");
    assert_eq!(handlers.unknown_acknowledged(), 1);

    let report = tokio::time::timeout(Duration::from_secs(20), subscription.close())
        .await
        .expect("close returns once the cancelled handler gives up")
        .unwrap();
    assert_eq!(
        *cancelled.lock().unwrap(),
        [2],
        "the running handler saw the cancellation"
    );
    assert_eq!(
        report.handled, 1,
        "{report:?}: only the acknowledged unknown event"
    );
    assert_eq!(
        report.returned, 2,
        "{report:?}: v2 and v3 returned, not dead-lettered"
    );
    assert!(bus.dead_letters(&topic, 10).await.unwrap().is_empty());

    // The cancelled event was not acknowledged: the next subscription handles it.
    let handled = Arc::new(Mutex::new(Vec::new()));
    let again = {
        let handled = handled.clone();
        EventHandlers::new().on(move |e: Deposited, cx: EventContext| {
            let handled = handled.clone();
            async move {
                handled
                    .lock()
                    .unwrap()
                    .push((cx.version(), e.cents, cx.attempt()));
                Ok(())
            }
        })
    };
    let subscription = bus.subscribe(&topic, Arc::new(again)).await.unwrap();
    wait_for("the returned events again", Duration::from_secs(10), || {
        handled.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(*handled.lock().unwrap(), [(2, 1, 1), (3, 2, 1)]);
    subscription.close().await.unwrap();
    bus.close().await.unwrap();
}

/// A note as the first version of the code wrote it.
#[derive(Debug, Serialize, Deserialize)]
struct NotedV1 {
    text: String,
}
impl Event for NotedV1 {
    const TYPE: &'static str = "Noted";
}

/// The note as the current code (schema version 3) reads it: an author came in version 2,
/// tags in version 3.
#[derive(Debug, Serialize, Deserialize)]
struct Noted {
    text: String,
    author: String,
    tags: Vec<String>,
}
impl Event for Noted {
    const TYPE: &'static str = "Noted";
    const VERSION: u32 = 3;
}

/// A note written by code newer than the reader's.
#[derive(Debug, Serialize, Deserialize)]
struct NotedV4 {
    text: String,
}
impl Event for NotedV4 {
    const TYPE: &'static str = "Noted";
    const VERSION: u32 = 4;
}

/// Events written by the first version of a type are read, through the broker, by code at
/// version 3: each goes through both upcasters, 1 -> 2 then 2 -> 3, before the handler sees it,
/// and every aggregate's events still come in order, old and new shapes mixed. An event newer
/// than the code is dead-lettered, not misread, and the aggregates around it carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_are_read_by_new_code_through_upcasters_in_order() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let topic = Topic::new("typed.upcast").unwrap();

    // Written by the old code: v1..=6 of eight aggregates; then the new code writes v7..=10.
    for version in 1..=6u64 {
        for a in 0..8 {
            let text = format!("n{a}-{version}");
            let _receipt = bus
                .publish_event(&topic, &format!("note-{a}"), version, &NotedV1 { text })
                .await
                .unwrap();
        }
    }
    for version in 7..=10u64 {
        for a in 0..8 {
            let note = Noted {
                text: format!("n{a}-{version}"),
                author: "new".into(),
                tags: vec!["current".into()],
            };
            let _receipt = bus
                .publish_event(&topic, &format!("note-{a}"), version, &note)
                .await
                .unwrap();
        }
    }
    let _receipt = bus
        .publish_event(
            &topic,
            "note-future",
            1,
            &NotedV4 {
                text: "from tomorrow".into(),
            },
        )
        .await
        .unwrap();
    bus.flush().await.unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    // Every upcaster call, as (text, the version it read).
    let steps = Arc::new(Mutex::new(Vec::new()));
    let handlers = {
        let (seen, s1, s2) = (seen.clone(), steps.clone(), steps.clone());
        EventHandlers::new()
            .on(move |e: Noted, cx: EventContext| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push((
                        cx.aggregate_id().to_string(),
                        cx.version(),
                        e.text,
                        e.author,
                        e.tags,
                    ));
                    Ok(())
                }
            })
            .upcast::<Noted>(1, move |mut v| {
                s1.lock()
                    .unwrap()
                    .push((v["text"].as_str().unwrap().to_owned(), 1));
                v["author"] = "unknown".into();
                Ok(v)
            })
            .upcast::<Noted>(2, move |mut v| {
                s2.lock()
                    .unwrap()
                    .push((v["text"].as_str().unwrap().to_owned(), 2));
                v["tags"] = serde_json::json!([]);
                Ok(v)
            })
    };
    let subscription = bus.subscribe(&topic, Arc::new(handlers)).await.unwrap();
    wait_for("80 notes handled", Duration::from_secs(20), || {
        seen.lock().unwrap().len() == 80
    })
    .await;
    let control = subscription.control().unwrap();
    wait_for(
        "the newer note dead-lettered",
        Duration::from_secs(20),
        || control.metrics().dead_lettered == 1,
    )
    .await;
    subscription.close().await.unwrap();

    let seen = seen.lock().unwrap().clone();
    for a in 0..8 {
        let mine: Vec<_> = seen.iter().filter(|s| s.0 == format!("note-{a}")).collect();
        let versions: Vec<u64> = mine.iter().map(|s| s.1).collect();
        assert_eq!(versions, (1..=10).collect::<Vec<_>>(), "note-{a} in order");
        for s in &mine {
            assert_eq!(s.2, format!("n{a}-{}", s.1));
            if s.1 <= 6 {
                assert_eq!((s.3.as_str(), s.4.len()), ("unknown", 0), "{s:?} upcast");
            } else {
                assert_eq!(
                    (s.3.as_str(), s.4.as_slice()),
                    ("new", &["current".to_owned()][..]),
                    "{s:?} as written"
                );
            }
        }
    }
    // Both upcasters ran once for each of the 48 old events, the first before the second;
    // none ran for the new ones.
    let steps = steps.lock().unwrap().clone();
    assert_eq!(steps.len(), 96, "{steps:?}");
    for a in 0..8 {
        for version in 1..=6 {
            let text = format!("n{a}-{version}");
            let mine: Vec<u32> = steps.iter().filter(|s| s.0 == text).map(|s| s.1).collect();
            assert_eq!(mine, [1, 2], "{text}");
        }
    }
    let letters = bus.dead_letters(&topic, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "permanent");
    assert!(
        letters[0].error.contains("newer code"),
        "{}",
        letters[0].error
    );
    let letter = letters[0].envelope().unwrap();
    assert_eq!(
        (letter.aggregate_id().as_str(), letter.schema_version()),
        ("note-future", 4)
    );
    bus.close().await.unwrap();
}
