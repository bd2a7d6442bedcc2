//! Creating, updating or validating streams (here) and consumers ([`consumers`]).

use async_nats::jetstream::{self, stream};

use bus_core::Topic;

use crate::config::{Discard, Provisioning, Retention, StreamSpec};
use crate::{NatsConfig, NatsError};

mod consumers;
pub(crate) use consumers::ensure_consumer;

/// The subjects of a stream: each topic, or each topic's partitions.
pub(crate) fn stream_subjects(spec: &StreamSpec) -> Vec<String> {
    spec.topics
        .iter()
        .flat_map(|t| partition_subjects(t.as_str(), spec.partitions))
        .collect()
}

/// The subjects of topic `topic` with `partitions` partitions (`topic` itself when 1).
pub(crate) fn partition_subjects(topic: &str, partitions: u32) -> Vec<String> {
    if partitions <= 1 {
        vec![topic.to_owned()]
    } else {
        (0..partitions).map(|p| format!("{topic}.{p}")).collect()
    }
}

/// The priority group every subscription of the bus pulls in.
pub(crate) const PRIORITY_GROUP: &str = "bus";

pub(crate) fn stream_config(spec: &StreamSpec) -> stream::Config {
    stream::Config {
        name: spec.name.clone(),
        subjects: stream_subjects(spec),
        retention: match spec.retention {
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
            // The bus removes what every consumer has acknowledged (`retention.rs`).
            Retention::Limits | Retention::Acknowledged => stream::RetentionPolicy::Limits,
        },
        // A full stream refuses new messages (the publisher is told) rather than dropping old
        // ones a consumer has not handled yet, unless limits retention was asked for.
        discard: match (spec.discard, spec.retention) {
            (Some(Discard::New), _) => stream::DiscardPolicy::New,
            (Some(Discard::Old), _) => stream::DiscardPolicy::Old,
            (None, Retention::WorkQueue | Retention::Acknowledged) => stream::DiscardPolicy::New,
            (None, Retention::Limits) => stream::DiscardPolicy::Old,
        },
        max_age: spec.max_age,
        max_bytes: spec.max_bytes,
        max_messages: spec.max_msgs,
        duplicate_window: spec.duplicate_window,
        storage: spec.storage.into(),
        num_replicas: spec.replicas,
        ..Default::default()
    }
}

/// The fields of something provisioned that differ from what was asked for, each shown in
/// its `Debug` form.
#[derive(Debug, Default)]
pub(super) struct Mismatches(Vec<String>);

impl Mismatches {
    /// Notes `field` if `want` and `have` differ.
    pub(super) fn check<T: std::fmt::Debug + PartialEq + ?Sized>(
        mut self,
        field: &str,
        want: &T,
        have: &T,
    ) -> Self {
        if want != have {
            self.0
                .push(format!("{field}: wanted {want:?}, found {have:?}"));
        }
        self
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The error refusing `what`, naming every field that differs.
    pub(super) fn error(self, what: String) -> NatsError {
        NatsError::Configuration(format!(
            "{what} differs from the configuration: {}",
            self.0.join("; ")
        ))
    }
}

/// Checks the named fields, the same on both sides, in turn.
macro_rules! mismatches {
    ($want:expr, $have:expr; $($field:ident),+ $(,)?) => {
        Mismatches::default()$(.check(stringify!($field), &$want.$field, &$have.$field))+
    };
}
pub(super) use mismatches;

/// Fields of the stream that differ from what was asked for.
fn stream_mismatches(want: &stream::Config, have: &stream::Config) -> Mismatches {
    let sorted = |subjects: &[String]| {
        let mut subjects = subjects.to_vec();
        subjects.sort();
        subjects
    };
    mismatches!(want, have; retention, discard, max_bytes, max_age, duplicate_window, storage)
        .check("subjects", &sorted(&want.subjects), &sorted(&have.subjects))
        .check("max_msgs", &want.max_messages, &have.max_messages)
        .check("replicas", &want.num_replicas, &have.num_replicas.max(1))
}

/// Subjects of `have` that `want` does not list: the stream holds other topics.
fn foreign_subjects(want: &stream::Config, have: &stream::Config) -> Vec<String> {
    have.subjects
        .iter()
        .filter(|s| !want.subjects.contains(s))
        .cloned()
        .collect()
}

/// Refuses a stream that already holds other topics than the configuration gives it: two topics
/// whose default stream names coincide (`orders.v1` and `orders-v1` are both `BUS_ORDERS_V1`),
/// or a stream configured elsewhere. Its subjects are never rewritten away from a topic in use.
fn refuse_foreign(spec: &StreamSpec, foreign: &[String]) -> NatsError {
    let topics: Vec<String> = spec.topics.iter().map(|t| format!("`{t}`")).collect();
    NatsError::Configuration(format!(
        "stream `{}` already holds `{}`, which the configuration does not give it; it cannot \
         also hold {} without taking the stream from them. Give {} a stream of its own in \
         `NatsConfig::streams` (a `StreamSpec` with another name), or list every topic of the \
         stream in one `StreamSpec`",
        spec.name,
        foreign.join("`, `"),
        topics.join(", "),
        topics.join(", "),
    ))
}

/// Whether `subject` is one of `topic`'s subjects: the topic itself or a partition of it.
fn is_topic_subject(topic: &str, subject: &str) -> bool {
    subject == topic
        || subject
            .strip_prefix(topic)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// How many partitions a stream with `subjects` gives `topic` (1: the topic itself; 0: none).
pub(crate) fn partitions_in(topic: &str, subjects: &[String]) -> u32 {
    let stored: Vec<&String> = subjects
        .iter()
        .filter(|s| is_topic_subject(topic, s))
        .collect();
    if stored.len() == 1 && stored[0] == topic {
        1
    } else {
        stored.len() as u32
    }
}

/// Refuses a configuration that partitions a topic differently from its stream: the partition
/// count changes only through [`crate::NatsBus::repartition`], never as a side effect of the
/// next process's configuration (a rolling deploy with two counts would send one aggregate's
/// events to two partitions, out of order).
fn refuse_repartition(spec: &StreamSpec, have: &stream::Config) -> Option<NatsError> {
    spec.topics.iter().find_map(|topic| {
        let had = partitions_in(topic.as_str(), &have.subjects);
        (had != 0 && had != spec.partitions).then(|| {
            NatsError::Configuration(format!(
                "topic `{topic}` has {had} partition(s) in stream `{}` and {} in this \
                 configuration; a process configured with another count would send an \
                 aggregate's events to another partition, out of order with those already there. \
                 Configure {had} (`StreamSpec::partitions`), or change the count explicitly once \
                 the topic is drained and its publishers and consumers of the old count are \
                 stopped: `NatsBus::repartition` or `bus repartition {topic} --partitions {}`",
                spec.name, spec.partitions, spec.partitions
            ))
        })
    })
}

/// Before a stream is created for `spec`: refuses if another stream already stores one of its
/// topics (the topic itself, or its partitions' subjects, which do not overlap the topic's own
/// subject, so the broker would accept both): the topic's events would be split over two
/// streams. Typically a process whose configuration lacks the topic's `StreamSpec`.
async fn refuse_second_home(js: &jetstream::Context, spec: &StreamSpec) -> Result<(), NatsError> {
    for topic in &spec.topics {
        let t = topic.as_str();
        for filter in [t.to_owned(), format!("{t}.*")] {
            let what = || format!("looking for the streams that store topic `{t}`");
            let names = crate::broker::stream_names(&js.client(), &filter).await?;
            for name in names {
                if name == spec.name {
                    continue;
                }
                let mut other = js
                    .get_stream(&name)
                    .await
                    .map_err(|e| NatsError::api(what(), e))?;
                let subjects = other
                    .info()
                    .await
                    .map_err(|e| NatsError::api(what(), e))?
                    .config
                    .subjects
                    .clone();
                let holds: Vec<&String> = subjects
                    .iter()
                    .filter(|s| {
                        is_topic_subject(t, s)
                            || crate::retention::subject_matches(s, t)
                            || crate::retention::subject_matches(s, &format!("{t}.0"))
                    })
                    .collect();
                if holds.is_empty() {
                    continue;
                }
                let partitions = partitions_in(t, &subjects).max(1);
                return Err(NatsError::Configuration(format!(
                    "topic `{t}` is already stored in stream `{name}` (subjects {holds:?}); this \
                     configuration would create stream `{}` for it beside that one, splitting \
                     its events over two streams. Add the topic's stream to \
                     `NatsConfig::streams`: a `StreamSpec` named `{name}` holding `{t}` with \
                     {partitions} partition(s) (`[[streams]] name = \"{name}\" topics = \
                     [\"{t}\"] partitions = {partitions}` in TOML)",
                    spec.name
                )));
            }
        }
    }
    Ok(())
}

/// Whether the broker said that the stream does not exist.
pub(super) fn stream_missing(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
    strategy: Provisioning,
) -> Result<(), NatsError> {
    let want = stream_config(spec);
    let existing = match js.get_stream(&spec.name).await {
        Ok(mut s) => Some(
            s.info()
                .await
                .map_err(|e| NatsError::api(format!("reading stream `{}`", spec.name), e))?
                .config
                .clone(),
        ),
        Err(e) if stream_missing(&e) => None,
        Err(e) => {
            return Err(NatsError::api(
                format!("looking up stream `{}`", spec.name),
                e,
            ))
        }
    };
    if let Some(have) = &existing {
        if let Some(error) = refuse_repartition(spec, have) {
            return Err(error);
        }
        let foreign = foreign_subjects(&want, have);
        if !foreign.is_empty() && strategy != Provisioning::UseExisting {
            return Err(refuse_foreign(spec, &foreign));
        }
        let missing: Vec<&Topic> = spec
            .topics
            .iter()
            .filter(|t| {
                !have
                    .subjects
                    .iter()
                    .any(|s| crate::retention::subject_matches(s, t.as_str()))
            })
            .collect();
        if !missing.is_empty() && strategy == Provisioning::UseExisting {
            let missing: Vec<String> = missing.iter().map(|t| t.to_string()).collect();
            return Err(NatsError::Configuration(format!(
                "stream `{}` does not store topic `{}` and provisioning is UseExisting",
                spec.name,
                missing.join("`, `")
            )));
        }
    }
    match (strategy, existing) {
        (Provisioning::UseExisting | Provisioning::ValidateOnly, None) => {
            Err(NatsError::Configuration(format!(
                "stream `{}` does not exist and provisioning is {strategy:?}",
                spec.name
            )))
        }
        (Provisioning::UseExisting, Some(_)) => Ok(()),
        (Provisioning::ValidateOnly | Provisioning::Create, Some(have)) => {
            let mismatches = stream_mismatches(&want, &have);
            if mismatches.is_empty() {
                Ok(())
            } else {
                Err(mismatches.error(format!("stream `{}`", spec.name)))
            }
        }
        (Provisioning::CreateOrUpdate, Some(have)) => {
            if stream_mismatches(&want, &have).is_empty() {
                return Ok(());
            }
            js.update_stream(&want)
                .await
                .map_err(|e| NatsError::api(format!("updating stream `{}`", spec.name), e))?;
            Ok(())
        }
        (Provisioning::Create | Provisioning::CreateOrUpdate, None) => {
            refuse_second_home(js, spec).await?;
            match js.create_stream(want).await {
                Ok(_) => Ok(()),
                Err(e) => Err(creation_hint(
                    NatsError::api(format!("creating stream `{}`", spec.name), e),
                    spec.max_bytes,
                    spec.replicas,
                )),
            }
        }
    }
}

/// Adds to a refused stream creation what to change: more replicas than the cluster has nodes,
/// or storage the server lacks (each stream reserves its `max_bytes` of the server's
/// `max_file_store` or `max_memory_store`). Read by JetStream error code.
fn creation_hint(error: NatsError, max_bytes: i64, replicas: usize) -> NatsError {
    use crate::broker::codes;
    let code = crate::broker::error_code(&error);
    let placement = matches!(code, Some(codes::NO_PEERS | codes::REPLICAS_NOT_SUPPORTED));
    let storage = matches!(
        code,
        Some(codes::INSUFFICIENT_RESOURCES | codes::STORAGE_EXCEEDED | codes::MEMORY_EXCEEDED)
    );
    if replicas > 1 && (placement || storage) {
        NatsError::Configuration(format!(
            "{error}: the stream asks for {replicas} replicas, and needs a JetStream cluster of at \
             least {replicas} nodes (with room for it on each); lower `StreamSpec::replicas` \
             (or `DeadLetterConfig::replicas`) to what the cluster has"
        ))
    } else if storage {
        NatsError::Configuration(format!(
            "{error}: every stream reserves its max_bytes ({max_bytes} bytes here; the default is \
             1 GiB per topic and 128 MiB for dead letters) of the server's max_file_store; lower \
             `StreamSpec::max_bytes` (or `DeadLetterConfig::max_bytes`) or raise the server's \
             jetstream max_file_store"
        ))
    } else {
        error
    }
}

/// The dead-letter stream: kept by limits (dead letters are for reading and replaying), and
/// provisioned with the bus's strategy.
pub(crate) async fn ensure_dead_letter_stream(
    js: &jetstream::Context,
    want: stream::Config,
    strategy: Provisioning,
) -> Result<(), NatsError> {
    match js.get_stream(&want.name).await {
        Ok(_) => Ok(()),
        Err(e)
            if stream_missing(&e)
                && matches!(
                    strategy,
                    Provisioning::Create | Provisioning::CreateOrUpdate
                ) =>
        {
            let (max_bytes, replicas) = (want.max_bytes, want.num_replicas);
            match js.create_stream(want.clone()).await {
                Ok(_) => Ok(()),
                // Another subscription created it meanwhile.
                Err(_) if js.get_stream(&want.name).await.is_ok() => Ok(()),
                Err(e) => Err(creation_hint(
                    NatsError::api(format!("creating dead-letter stream `{}`", want.name), e),
                    max_bytes,
                    replicas,
                )),
            }
        }
        Err(e) if stream_missing(&e) => Err(NatsError::Configuration(format!(
            "dead-letter stream `{}` does not exist and provisioning is {strategy:?}",
            want.name
        ))),
        Err(e) => Err(NatsError::api(
            format!("looking up dead-letter stream `{}`", want.name),
            e,
        )),
    }
}

/// What a subscription needs besides its topic's stream: its durable consumer (`name`, filtered
/// on `subject`) and the dead-letter stream, provisioned with the bus's strategy (the caller
/// guards it against permission violations). Returns the consumer's configuration, which
/// restarting delivery provisions again.
pub(crate) async fn subscription(
    js: &jetstream::Context,
    stream: &str,
    config: &NatsConfig,
    name: &str,
    subject: &str,
    pinned: bool,
) -> Result<async_nats::jetstream::consumer::pull::Config, NatsError> {
    let want = consumers::consumer_config(name, subject, &config.consumer, pinned);
    let mut dlq = StreamSpec::new(config.dead_letters.stream.clone(), []);
    dlq.retention = Retention::Limits;
    dlq.max_bytes = config.dead_letters.max_bytes;
    dlq.replicas = config.dead_letters.replicas;
    let mut dead_letters = stream_config(&dlq);
    dead_letters.subjects = vec![format!("{}.>", config.dead_letters.subject_prefix)];
    ensure_consumer(js, stream, &want, config.provisioning).await?;
    ensure_dead_letter_stream(js, dead_letters, config.provisioning).await?;
    Ok(want)
}
