//! Restricted users, as an operator sets them up: a provisioning user creates streams and
//! consumers, a publisher-only user publishes, a consumer-only user consumes (with dead
//! letters). Each works with exactly the subjects `docs/permissions.md` lists; a user missing a
//! subject gets `PermissionDenied` at once, naming it, instead of a timeout.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{
    handler_fn, Envelope, HandlerError, PublishErrorKind, Publisher, SubscribeErrorKind,
    Subscriber, Topic,
};
use bus_nats::{NatsBus, NatsConfig, Provisioning};
use bus_testkit::conformance::Recorder;
use bus_testkit::NatsServer;

const TOPIC: &str = "orders";
const STREAM: &str = "BUS_ORDERS";
const GROUP: &str = "billing";

/// The server's users, with the permissions `docs/permissions.md` gives each role for topic
/// `orders` and group `billing`.
fn server_config(consumer: &str) -> String {
    let publisher = format!(
        r#"{{user: publisher, password: p, permissions: {{
            publish: {{allow: ["{TOPIC}", "$JS.API.STREAM.INFO.{STREAM}"]}},
            subscribe: {{allow: ["_INBOX.>"]}} }} }}"#
    );
    let consumer_user = format!(
        r#"{{user: consumer, password: c, permissions: {{
            publish: {{allow: [
                "$JS.API.STREAM.INFO.{STREAM}",
                "$JS.API.CONSUMER.INFO.{STREAM}.{consumer}",
                "$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{consumer}",
                "$JS.API.CONSUMER.RESET.{STREAM}.{consumer}",
                "$JS.API.CONSUMER.UNPIN.{STREAM}.{consumer}",
                "$JS.ACK.{STREAM}.{consumer}.>",
                "$JS.API.STREAM.MSG.GET.{STREAM}",
                "$JS.API.STREAM.MSG.DELETE.{STREAM}",
                "$JS.API.STREAM.INFO.BUS_DEAD_LETTERS",
                "bus-dlq.{TOPIC}",
                "bus-dlq.$body.{TOPIC}"
            ]}},
            subscribe: {{allow: ["_INBOX.>", "$BUS.control.{GROUP}.{TOPIC}"]}} }} }}"#
    );
    let operator = format!(
        r#"{{user: operator, password: o, permissions: {{
            publish: {{allow: [
                "$JS.API.STREAM.INFO.BUS_DEAD_LETTERS",
                "$JS.API.CONSUMER.CREATE.BUS_DEAD_LETTERS",
                "$JS.API.CONSUMER.INFO.BUS_DEAD_LETTERS.*",
                "$JS.API.CONSUMER.MSG.NEXT.BUS_DEAD_LETTERS.*",
                "$JS.API.CONSUMER.DELETE.BUS_DEAD_LETTERS.*",
                "$JS.API.STREAM.MSG.GET.BUS_DEAD_LETTERS",
                "$JS.API.STREAM.MSG.DELETE.BUS_DEAD_LETTERS",
                "{TOPIC}",
                "$JS.API.STREAM.LIST",
                "$JS.API.STREAM.INFO.*",
                "$JS.API.CONSUMER.LIST.*",
                "$JS.API.CONSUMER.INFO.{STREAM}.{consumer}",
                "$JS.API.STREAM.MSG.GET.{STREAM}",
                "$BUS.control.{GROUP}.{TOPIC}"
            ]}},
            subscribe: {{allow: ["_INBOX.>"]}} }} }}"#
    );
    let no_jetstream = format!(
        r#"{{user: nojs, password: n, permissions: {{
            publish: {{allow: ["{TOPIC}"]}},
            subscribe: {{allow: ["_INBOX.>"]}} }} }}"#
    );
    format!(
        "authorization {{ users = [ {{user: admin, password: a}}, {publisher}, {consumer_user}, {operator}, {no_jetstream} ] }}\n{}",
        bus_testkit::JETSTREAM_LIMITS
    )
}

fn config(server: &NatsServer, user: &str, password: &str) -> NatsConfig {
    let url = server
        .url()
        .replace("nats://", &format!("nats://{user}:{password}@"));
    let mut config = common::test_config(&url).with_group(GROUP);
    config.provisioning = Provisioning::UseExisting;
    config
}

fn envelope(version: u64) -> Envelope {
    Envelope::builder("acc", "Permitted", version)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_works_with_the_documented_subjects_and_nothing_else() {
    let topic = Topic::new(TOPIC).unwrap();
    let consumer_name = NatsConfig::default()
        .with_group(GROUP)
        .consumer_name(&topic);
    let dir = std::env::temp_dir().join(format!("bus-permissions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("server.conf");
    std::fs::write(&file, server_config(&consumer_name)).unwrap();
    let server = NatsServer::try_start(&["-c", file.to_str().unwrap()]).unwrap();

    // The provisioning user creates the stream, the consumer and the dead-letter stream.
    let mut admin = config(&server, "admin", "a");
    admin.provisioning = Provisioning::CreateOrUpdate;
    let admin = NatsBus::connect(admin).await.unwrap();
    let provisioned = common::subscribe_ignoring(&admin, &topic).await.unwrap();
    provisioned.close().await.unwrap();
    admin.close().await.unwrap();

    // A user with no JetStream rights: refused at once, naming the subject.
    let started = Instant::now();
    let nojs = NatsBus::connect(config(&server, "nojs", "n"))
        .await
        .unwrap();
    let error = nojs.publish(&topic, envelope(1)).await.unwrap_err();
    assert_eq!(error.kind(), PublishErrorKind::Rejected, "{error}");
    let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    assert!(
        text.contains(&format!("$JS.API.STREAM.INFO.{STREAM}")),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // The publisher publishes; it may not consume.
    let publisher = NatsBus::connect(config(&server, "publisher", "p"))
        .await
        .unwrap();
    for version in 1..=10 {
        publisher
            .publish(&topic, envelope(version))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let started = Instant::now();
    let error = common::subscribe_ignoring(&publisher, &topic)
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        SubscribeErrorKind::PermissionDenied,
        "{error}"
    );
    assert!(error.to_string().contains("CONSUMER"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Nor read dead letters: refused at once, naming the subject.
    let started = Instant::now();
    let error = publisher.dead_letters(&topic, 10).await.unwrap_err();
    assert_eq!(
        error.kind(),
        bus_nats::NatsErrorKind::PermissionDenied,
        "{error}"
    );
    assert!(error.to_string().contains("BUS_DEAD_LETTERS"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // The consumer handles everything in order, dead-letters one event, closes and hands over.
    let consumer = NatsBus::connect(config(&server, "consumer", "c"))
        .await
        .unwrap();
    let recorder = Recorder::new();
    let subscription = {
        let (recorder, t) = (recorder.clone(), topic.clone());
        consumer
            .subscribe(
                &topic,
                Arc::new(handler_fn(move |e: Envelope| {
                    let (recorder, t) = (recorder.clone(), t.clone());
                    async move {
                        if e.event_version() == 5 {
                            return Err(HandlerError::permanent("refused by the handler"));
                        }
                        recorder.record(&t, &e);
                        Ok(())
                    }
                })),
            )
            .await
            .unwrap()
    };
    recorder.wait_unique(9).await;
    let control = subscription.control().unwrap();
    common::wait_for("the dead letter", Duration::from_secs(10), || {
        control.metrics().dead_lettered == 1
    })
    .await;
    subscription.close().await.unwrap();
    let report = recorder.verifier.report();
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.unique, 9, "{report:?}");
    // The consumer may not publish on the topic.
    let error = consumer
        .publish(&topic, envelope(11))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(error.kind(), PublishErrorKind::Rejected, "{error}");

    // The operator lists topics, reads the lag, lists and replays the dead letter.
    let operator = NatsBus::connect(config(&server, "operator", "o"))
        .await
        .unwrap();
    let topics = operator.topics().await.unwrap();
    let listed = topics
        .iter()
        .find(|t| t.topic == topic)
        .expect("the topic listed");
    assert_eq!(listed.consumers.len(), 1, "{listed:?}");
    assert_eq!(listed.consumers[0].name, consumer_name);
    let lag = operator.lag(&topic).await.unwrap();
    assert_eq!((lag.undelivered, lag.unacknowledged), (0, 0), "{lag:?}");
    let letters = operator.dead_letters(&topic, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].envelope().unwrap().event_version(), 5);
    operator.replay_dead_letter(&letters[0]).await.unwrap();
    assert!(operator.dead_letters(&topic, 10).await.unwrap().is_empty());
    let error = operator
        .remote_halted(&topic, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), bus_nats::NatsErrorKind::Unanswered, "{error}");
    operator.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
