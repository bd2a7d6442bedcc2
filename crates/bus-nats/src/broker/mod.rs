//! The JetStream API requests the bus builds itself: those async-nats has no call for (consumer
//! reset and unpin, message get by subject, subject-filtered stream info, filtered purge,
//! stream names by subject) or cannot read on older servers (creating a KV bucket's stream).
//! One place builds the `$JS.API` subjects, bounds every request with a deadline, and reads
//! the broker's refusals as [`ApiError`]s, by JetStream error code, never by their text.
//! Provisioning, taking the ownership and creating buckets run under [`guarded`]
//! ([`violations`]): a permission violation fails them at once instead of leaving them to wait
//! for their timeout.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::Client;
use serde::de::DeserializeOwned;

use crate::NatsError;

mod violations;
pub(crate) use violations::{guarded, guarded_on, Violation};

/// How long one request may take unless its caller says otherwise: an answer that does not come
/// in that time will not come (a server that lacks the API, an election).
pub(crate) const DEADLINE: Duration = Duration::from_secs(5);

/// A refusal from the JetStream API: its status code, its JetStream error code and the text.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(crate) struct ApiError {
    #[serde(default)]
    pub(crate) code: u16,
    #[serde(default)]
    pub(crate) err_code: u64,
    #[serde(default)]
    pub(crate) description: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (status {}, error code {})",
            self.description, self.code, self.err_code
        )
    }
}

impl std::error::Error for ApiError {}

/// JetStream error codes the bus decides on.
pub(crate) mod codes {
    /// No message at (or after) the sequence asked for.
    pub(crate) const NO_MESSAGE: u64 = 10037;
    /// No such stream.
    pub(crate) const STREAM_NOT_FOUND: u64 = 10059;
    /// No such consumer.
    pub(crate) const CONSUMER_NOT_FOUND: u64 = 10014;
    /// No suitable peers for placement: more replicas than the cluster can place.
    pub(crate) const NO_PEERS: u64 = 10005;
    /// Insufficient resources (a stream's `max_bytes` beyond what the server can reserve).
    pub(crate) const INSUFFICIENT_RESOURCES: u64 = 10023;
    /// Memory storage exhausted.
    pub(crate) const MEMORY_EXCEEDED: u64 = 10028;
    /// File storage exhausted.
    pub(crate) const STORAGE_EXCEEDED: u64 = 10047;
    /// Replicas above 1 on a server that is not clustered.
    pub(crate) const REPLICAS_NOT_SUPPORTED: u64 = 10074;
}

/// The broker's refusal inside `error`, if it refused a request of this module.
pub(crate) fn refusal(error: &NatsError) -> Option<&ApiError> {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(api) = e.downcast_ref::<ApiError>() {
            return Some(api);
        }
        source = e.source();
    }
    None
}

/// The JetStream error code inside `error` (a refusal of this module's requests, or one that
/// async-nats read), if the broker refused.
pub(crate) fn error_code(error: &NatsError) -> Option<u64> {
    if let Some(api) = refusal(error) {
        return Some(api.err_code);
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(js) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(js.error_code().0);
        }
        if let Some(create) = e.downcast_ref::<async_nats::jetstream::context::CreateStreamError>()
        {
            if let async_nats::jetstream::context::CreateStreamErrorKind::JetStream(js) =
                create.kind()
            {
                return Some(js.error_code().0);
            }
        }
        source = e.source();
    }
    None
}

/// Sends `body` to `$JS.API.<suffix>` and reads the reply, within `deadline`. A reply with an
/// `error` is an [`ApiError`] (the source of the `NatsError`).
async fn request<T: DeserializeOwned>(
    client: &Client,
    what: impl Fn() -> String,
    suffix: &str,
    body: &serde_json::Value,
    deadline: Duration,
) -> Result<T, NatsError> {
    #[derive(serde::Deserialize)]
    struct Refusal {
        error: Option<ApiError>,
    }
    let body = if body.is_null() {
        bytes::Bytes::new()
    } else {
        body.to_string().into()
    };
    let reply = tokio::time::timeout(deadline, client.request(format!("$JS.API.{suffix}"), body))
        .await
        .map_err(|elapsed| {
            NatsError::api(
                format!("{}: no answer within {deadline:?}", what()),
                elapsed,
            )
        })?
        .map_err(|e| NatsError::api(what(), e))?;
    if let Ok(Refusal { error: Some(error) }) = serde_json::from_slice::<Refusal>(&reply.payload) {
        return Err(NatsError::api(what(), error));
    }
    serde_json::from_slice(&reply.payload).map_err(|e| NatsError::api(what(), e))
}

/// The subject pull requests of `consumer` go to.
pub(crate) fn next_subject(stream: &str, consumer: &str) -> String {
    format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}")
}

/// The streams whose subjects overlap `subject` (a filter with wildcards).
pub(crate) async fn stream_names(client: &Client, subject: &str) -> Result<Vec<String>, NatsError> {
    #[derive(serde::Deserialize)]
    struct Names {
        streams: Option<Vec<String>>,
    }
    let names: Names = request(
        client,
        || format!("looking for the streams that store `{subject}`"),
        "STREAM.NAMES",
        &serde_json::json!({ "subject": subject }),
        DEADLINE,
    )
    .await?;
    Ok(names.streams.unwrap_or_default())
}

/// The subjects of `stream` matching `filter`, with their message counts.
pub(crate) async fn stream_subjects(
    client: &Client,
    stream: &str,
    filter: &str,
    deadline: Duration,
) -> Result<HashMap<String, u64>, NatsError> {
    #[derive(serde::Deserialize)]
    struct Info {
        state: State,
    }
    #[derive(serde::Deserialize)]
    struct State {
        #[serde(default)]
        subjects: HashMap<String, u64>,
    }
    let info: Info = request(
        client,
        || format!("reading the subjects `{filter}` of stream `{stream}`"),
        &format!("STREAM.INFO.{stream}"),
        &serde_json::json!({ "subjects_filter": filter }),
        deadline,
    )
    .await?;
    Ok(info.state.subjects)
}

/// Removes every message of `stream` on `subject`, leaving no marker.
pub(crate) async fn purge_subject(
    client: &Client,
    stream: &str,
    subject: &str,
    deadline: Duration,
) -> Result<(), NatsError> {
    let _: serde_json::Value = request(
        client,
        || format!("purging `{subject}` from stream `{stream}`"),
        &format!("STREAM.PURGE.{stream}"),
        &serde_json::json!({ "filter": subject }),
        deadline,
    )
    .await?;
    Ok(())
}

/// Creates a stream from its configuration as JSON (what servers of every version read).
pub(crate) async fn create_stream(
    client: &Client,
    stream: &str,
    config: serde_json::Value,
) -> Result<(), NatsError> {
    let _: serde_json::Value = request(
        client,
        || format!("creating stream `{stream}`"),
        &format!("STREAM.CREATE.{stream}"),
        &config,
        DEADLINE,
    )
    .await?;
    Ok(())
}

/// What the bus reads of a consumer's info without async-nats' typed reply (which older
/// servers' replies do not always fit): its unacknowledged messages, whether it is owned
/// through a pinned-client priority group and whether a client is pinned in one of them.
pub(crate) struct ConsumerState {
    pub(crate) num_ack_pending: u64,
    /// Its priority policy is the pinned client's (else the bus owns it by a lease).
    pub(crate) pin_group: bool,
    pub(crate) pinned: bool,
}

pub(crate) async fn consumer_state(
    client: &Client,
    stream: &str,
    consumer: &str,
) -> Result<ConsumerState, NatsError> {
    #[derive(serde::Deserialize)]
    struct Info {
        #[serde(default)]
        num_ack_pending: u64,
        #[serde(default)]
        priority_groups: Vec<Group>,
        #[serde(default)]
        config: Config,
    }
    #[derive(serde::Deserialize, Default)]
    struct Config {
        #[serde(default)]
        priority_policy: String,
    }
    #[derive(serde::Deserialize)]
    struct Group {
        #[serde(default)]
        pinned_client_id: String,
    }
    let info: Info = request(
        client,
        || format!("reading consumer `{consumer}`"),
        &format!("CONSUMER.INFO.{stream}.{consumer}"),
        &serde_json::Value::Null,
        DEADLINE,
    )
    .await?;
    Ok(ConsumerState {
        num_ack_pending: info.num_ack_pending,
        pin_group: info.config.priority_policy == "pinned_client",
        pinned: info
            .priority_groups
            .iter()
            .any(|g| !g.pinned_client_id.is_empty()),
    })
}

/// Restarts a consumer's delivery (`CONSUMER.RESET`, nats-server 2.14+) at its ack floor + 1,
/// or at stream sequence `to` (its ack floor becomes `to - 1`); returns the stream sequence
/// delivery restarts at.
pub(crate) async fn reset_consumer(
    client: &Client,
    stream: &str,
    consumer: &str,
    to: Option<u64>,
) -> Result<u64, NatsError> {
    #[derive(serde::Deserialize)]
    struct Reset {
        reset_seq: u64,
    }
    let body = match to {
        Some(sequence) => serde_json::json!({ "seq": sequence }),
        None => serde_json::Value::Null,
    };
    let reset: Reset = request(
        client,
        || format!("resetting consumer `{consumer}`"),
        &format!("CONSUMER.RESET.{stream}.{consumer}"),
        &body,
        DEADLINE,
    )
    .await?;
    Ok(reset.reset_seq)
}

/// The sequence of the first message of `stream` stored at or after `time`; `None` if there is
/// none.
pub(crate) async fn first_sequence_at(
    client: &Client,
    stream: &str,
    time: std::time::SystemTime,
) -> Result<Option<u64>, NatsError> {
    #[derive(serde::Deserialize)]
    struct Reply {
        message: Stored,
    }
    let at = humantime::format_rfc3339_nanos(time).to_string();
    let reply: Result<Reply, NatsError> = request(
        client,
        || format!("reading stream `{stream}` at {at}"),
        &format!("STREAM.MSG.GET.{stream}"),
        &serde_json::json!({ "start_time": at }),
        DEADLINE,
    )
    .await;
    match reply {
        Ok(reply) => Ok(Some(reply.message.sequence)),
        Err(e) if refusal(&e).is_some_and(|r| r.code == 404 || r.err_code == codes::NO_MESSAGE) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Releases the pin of `group` on a consumer, so a standby is pinned at once.
pub(crate) async fn unpin(
    client: &Client,
    stream: &str,
    consumer: &str,
    group: &str,
) -> Result<(), NatsError> {
    let _: serde_json::Value = request(
        client,
        || format!("unpinning consumer `{consumer}`"),
        &format!("CONSUMER.UNPIN.{stream}.{consumer}"),
        &serde_json::json!({ "group": group }),
        DEADLINE,
    )
    .await?;
    Ok(())
}

/// One stored message, read as data (the message-get API returns any message, even one whose
/// header block a client would refuse).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Stored {
    #[serde(rename = "seq")]
    pub(crate) sequence: u64,
    /// The header block, base64.
    pub(crate) hdrs: Option<String>,
    /// The body, base64.
    pub(crate) data: Option<String>,
    /// When it was stored (RFC 3339, UTC).
    pub(crate) time: String,
}

/// The first message of `stream` on `subject` at or after `sequence`; `None` if there is none.
pub(crate) async fn next_message(
    client: &Client,
    stream: &str,
    subject: &str,
    sequence: u64,
) -> Result<Option<Stored>, NatsError> {
    #[derive(serde::Deserialize)]
    struct Reply {
        message: Stored,
    }
    let reply: Result<Reply, NatsError> = request(
        client,
        || format!("reading stream `{stream}` at {sequence}"),
        &format!("STREAM.MSG.GET.{stream}"),
        &serde_json::json!({ "seq": sequence, "next_by_subj": subject }),
        DEADLINE,
    )
    .await;
    match reply {
        Ok(reply) => Ok(Some(reply.message)),
        Err(e) if refusal(&e).is_some_and(|r| r.code == 404 || r.err_code == codes::NO_MESSAGE) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Deletes message `sequence` of `stream` (without erasing its bytes on disk).
pub(crate) async fn delete_message(
    client: &Client,
    stream: &str,
    sequence: u64,
) -> Result<(), NatsError> {
    let _: serde_json::Value = request(
        client,
        || format!("deleting message {sequence} of stream `{stream}`"),
        &format!("STREAM.MSG.DELETE.{stream}"),
        &serde_json::json!({ "seq": sequence, "no_erase": true }),
        DEADLINE,
    )
    .await?;
    Ok(())
}

/// Why the broker ended a pull request early (a status reply on the pull inbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PullEnd {
    /// 408, 404, or a 409 that only says a limit was reached: the request is over.
    Over,
    /// 409 Leadership Change: a new consumer leader may not know what the old one handed out.
    LeadershipChange,
    /// 409 Consumer Deleted.
    ConsumerDeleted,
    /// 400: the request was refused as malformed.
    Malformed,
}

/// Reads a status reply to a pull request. Status 409 carries its reason only in its
/// description: this is the one place that reads it.
pub(crate) fn pull_end(status: u16, description: &str) -> PullEnd {
    let lower = description.to_ascii_lowercase();
    match status {
        409 if lower.contains("leadership") => PullEnd::LeadershipChange,
        409 if lower.contains("deleted") => PullEnd::ConsumerDeleted,
        400 => PullEnd::Malformed,
        _ => PullEnd::Over,
    }
}

/// A KV bucket whose keys live `max_age` after their last write, created on first use.
/// Created through the stream API directly: async-nats's `create_key_value` cannot read the
/// reply of servers before 2.14 (seen with 2.9.10).
pub(crate) async fn ensure_bucket(
    client: &async_nats::Client,
    jetstream: &async_nats::jetstream::Context,
    bucket: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, NatsError> {
    if let Ok(store) = jetstream.get_key_value(bucket).await {
        return Ok(store);
    }
    let stream = format!("KV_{bucket}");
    let config = serde_json::json!({
        "name": stream,
        "subjects": [format!("$KV.{bucket}.>")],
        "max_msgs_per_subject": 1,
        "max_age": max_age.as_nanos() as u64,
        "discard": "new",
        "storage": "file",
        "num_replicas": replicas,
        "allow_rollup_hdrs": true,
        "deny_delete": true,
        "allow_direct": true,
    });
    let what = || format!("creating the KV bucket `{bucket}`");
    if let Err(error) = create_stream(client, &stream, config).await {
        // Another subscription may have created it meanwhile.
        if jetstream.get_key_value(bucket).await.is_err() {
            return Err(NatsError::Configuration(format!("{}: {error}", what())));
        }
    }
    jetstream
        .get_key_value(bucket)
        .await
        .map_err(|e| NatsError::api(what(), e))
}
