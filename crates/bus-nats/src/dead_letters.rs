//! Listing and replaying dead letters.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy};
use bus_core::{wire, DecodeError, Envelope, Published, Topic};
use bytes::Bytes;
use futures::StreamExt;

use crate::{NatsBus, NatsError};

/// Why an event was dead-lettered (the header `Bus-Dlq-Reason`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// Its handler failed with a permanent error.
    #[default]
    Permanent,
    /// Its handler failed with retryable errors until the retry policy gave up.
    RetriesExhausted,
    /// Its handler panicked.
    Panic,
    /// It could not be decoded as an envelope (or a record batch).
    Undecodable,
    /// A raw subscription's key function found no ordering key in it.
    NoKey,
    /// An operator skipped it while its aggregate was halted.
    Skipped,
    /// Its header block was one no client can read; it was removed from its stream.
    Unreadable,
    /// A reason this version does not know (a letter written by another version).
    Other(String),
}

impl DeadLetterReason {
    /// The reason as it is written in the header and in metrics labels (`permanent`,
    /// `retries-exhausted`, `panic`, `undecodable`, `no-key`, `skipped`, `unreadable`).
    pub fn as_str(&self) -> &str {
        match self {
            DeadLetterReason::Permanent => "permanent",
            DeadLetterReason::RetriesExhausted => "retries-exhausted",
            DeadLetterReason::Panic => "panic",
            DeadLetterReason::Undecodable => "undecodable",
            DeadLetterReason::NoKey => "no-key",
            DeadLetterReason::Skipped => "skipped",
            DeadLetterReason::Unreadable => "unreadable",
            DeadLetterReason::Other(other) => other,
        }
    }

    /// Reads a reason as written.
    pub fn parse(text: &str) -> Self {
        [
            DeadLetterReason::Permanent,
            DeadLetterReason::RetriesExhausted,
            DeadLetterReason::Panic,
            DeadLetterReason::Undecodable,
            DeadLetterReason::NoKey,
            DeadLetterReason::Skipped,
            DeadLetterReason::Unreadable,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
        .unwrap_or_else(|| DeadLetterReason::Other(text.to_owned()))
    }

    /// Why a handler's last failure gave up.
    pub(crate) fn of_failure(reason: &bus_core::FailureReason) -> Self {
        match reason {
            bus_core::FailureReason::Handler(e) if e.is_retryable() => {
                DeadLetterReason::RetriesExhausted
            }
            bus_core::FailureReason::Handler(_) => DeadLetterReason::Permanent,
            bus_core::FailureReason::Panicked(_) => DeadLetterReason::Panic,
        }
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for DeadLetterReason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What a dead letter says about its original, in headers besides the original's own
/// (`Bus-Dlq-*`): written when a letter is stored, read when it is listed, here alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LetterHeaders {
    /// Why (`Bus-Dlq-Reason`).
    pub(crate) reason: DeadLetterReason,
    /// The last error's text, on one line (`Bus-Dlq-Error`).
    pub(crate) error: String,
    /// Handler attempts (`Bus-Dlq-Attempts`).
    pub(crate) attempts: u32,
    /// The topic it was consumed from (`Bus-Dlq-Topic`).
    pub(crate) topic: Option<Topic>,
    /// The original's stream position (`Bus-Dlq-Stream-Seq`).
    pub(crate) stream_sequence: Option<u64>,
    /// Its delivery count (`Bus-Dlq-Delivered`).
    pub(crate) delivered: Option<u64>,
    /// For a message no client could read, its header block in base64 (`Bus-Dlq-Raw-Headers`).
    pub(crate) raw_headers: Option<String>,
    /// Where its body was stored apart (`Bus-Dlq-Body-Seq`).
    pub(crate) body_sequence: Option<u64>,
    /// Its index in its record batch (`Bus-Dlq-Batch-Index`).
    pub(crate) batch_index: Option<u32>,
}

impl LetterHeaders {
    /// The header names, in the order of [`dead_letter_headers`].
    const NAMES: [&'static str; 9] = [
        "Bus-Dlq-Reason",
        "Bus-Dlq-Error",
        "Bus-Dlq-Attempts",
        "Bus-Dlq-Topic",
        "Bus-Dlq-Stream-Seq",
        "Bus-Dlq-Delivered",
        "Bus-Dlq-Raw-Headers",
        "Bus-Dlq-Body-Seq",
        "Bus-Dlq-Batch-Index",
    ];

    /// Adds these headers to a letter's (an error's line breaks become spaces, and it is cut
    /// at 1 024 characters: header values hold one line).
    pub(crate) fn write(&self, headers: &mut async_nats::HeaderMap) {
        let [reason, error, attempts, topic, seq, delivered, raw, body, index] = Self::NAMES;
        let error_text: String = self
            .error
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(1024)
            .collect();
        headers.insert(reason, self.reason.as_str());
        headers.insert(error, error_text.as_str());
        headers.insert(attempts, self.attempts.to_string());
        let optional = [
            (topic, self.topic.as_ref().map(Topic::to_string)),
            (seq, self.stream_sequence.map(|v| v.to_string())),
            (delivered, self.delivered.map(|v| v.to_string())),
            (raw, self.raw_headers.clone()),
            (body, self.body_sequence.map(|v| v.to_string())),
            (index, self.batch_index.map(|v| v.to_string())),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                headers.insert(name, value.as_str());
            }
        }
    }

    /// Takes in one header of a stored letter; `false` if it is not one of these.
    fn read(&mut self, name: &str, value: &str) -> bool {
        match Self::NAMES
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
        {
            Some(0) => self.reason = DeadLetterReason::parse(value),
            Some(1) => self.error = value.to_owned(),
            Some(2) => self.attempts = value.parse().unwrap_or(0),
            Some(3) => self.topic = Topic::new(value).ok(),
            Some(4) => self.stream_sequence = value.parse().ok(),
            Some(5) => self.delivered = value.parse().ok(),
            Some(6) => self.raw_headers = Some(value.to_owned()),
            Some(7) => self.body_sequence = value.parse().ok(),
            Some(8) => self.batch_index = value.parse().ok(),
            _ => return false,
        }
        true
    }
}

/// Where one topic's dead letters go, and how large a message may be there.
#[derive(Debug, Clone)]
pub(crate) struct LetterBox {
    pub(crate) jetstream: async_nats::jetstream::Context,
    /// `<prefix>.<topic>`.
    pub(crate) subject: String,
    /// Where a letter's body goes when the letter would not fit with it: under the prefix, with
    /// a `$` token no topic can have.
    pub(crate) body_subject: String,
    /// The server's `max_payload`.
    pub(crate) max_payload: usize,
}

impl LetterBox {
    pub(crate) fn new(
        jetstream: async_nats::jetstream::Context,
        prefix: &str,
        topic: &Topic,
        max_payload: usize,
    ) -> Self {
        Self {
            jetstream,
            subject: format!("{prefix}.{topic}"),
            body_subject: format!("{prefix}.$body.{topic}"),
            max_payload,
        }
    }

    /// Stores one dead letter: the original's `headers`, what `about` says, `msg_id` (one
    /// letter per stream position, however often this is tried) and the original's payload.
    /// The original fitted `max_payload` with its own headers; with the dead-letter headers
    /// added it may not: then its body is stored apart first, with no headers at all (so it
    /// always fits), and the letter points at it.
    pub(crate) async fn store(
        &self,
        mut headers: async_nats::HeaderMap,
        about: &LetterHeaders,
        msg_id: Option<String>,
        payload: Bytes,
    ) -> Result<(), NatsError> {
        let what = || "storing a dead letter".to_owned();
        about.write(&mut headers);
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        let mut payload = payload;
        if crate::publisher::header_len(&headers) + payload.len() > self.max_payload {
            let body = self
                .jetstream
                .publish(self.body_subject.clone(), payload)
                .await
                .map_err(|e| NatsError::api(what(), e))?
                .await
                .map_err(|e| NatsError::api(what(), e))?;
            LetterHeaders {
                body_sequence: Some(body.sequence),
                ..about.clone()
            }
            .write(&mut headers);
            payload = Bytes::new();
        }
        self.jetstream
            .publish_with_headers(self.subject.clone(), headers, payload)
            .await
            .map_err(|e| NatsError::api(what(), e))?
            .await
            .map_err(|e| NatsError::api(what(), e))?;
        Ok(())
    }
}

/// The headers a dead letter carries besides the original message's own: reason, error,
/// attempts, topic, the original's stream sequence, its delivery count, (for a message no client
/// could read, whose own headers cannot be carried) its raw header block in base64, (for a
/// message too large to carry the others besides its body) the dead-letter stream position
/// where its body was stored apart, and (for an event of a record batch) its index in the batch.
/// For other tools that read the dead-letter stream; [`DeadLetter`] gives them parsed.
pub fn dead_letter_headers() -> [&'static str; 9] {
    LetterHeaders::NAMES
}

/// A message that was dead-lettered, as stored in the dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its position in the dead-letter stream; [`NatsBus::replay_dead_letter`] removes it.
    pub sequence: u64,
    /// The topic it was consumed from.
    pub topic: Topic,
    /// Why (`unreadable`: a header block no client could parse; see `raw_headers`).
    pub reason: DeadLetterReason,
    /// The last error's text.
    pub error: String,
    /// Handler attempts made (0 for messages that could not be decoded).
    pub attempts: u32,
    /// The original message's position in the topic's stream.
    pub stream_sequence: Option<u64>,
    /// How many times the broker had delivered the original.
    pub delivered: Option<u64>,
    /// The original message's headers (`Bus-Dlq-*` removed).
    pub headers: Vec<(String, String)>,
    /// The original payload.
    pub payload: Bytes,
    /// For an `unreadable` message, its header block as stored, in base64: it could not be
    /// carried as headers.
    pub raw_headers: Option<String>,
    /// Where in the dead-letter stream the body was stored apart, when the letter would not
    /// fit `max_payload` with it (`payload` holds the body either way).
    pub body_sequence: Option<u64>,
    /// For an event of a record batch, its index in the batch (`stream_sequence` is the
    /// batch's position); the letter holds that one event as a single-event message.
    pub batch_index: Option<u32>,
}

impl DeadLetter {
    /// The original message as an envelope (fails for messages dead-lettered as undecodable).
    pub fn envelope(&self) -> Result<Envelope, DecodeError> {
        wire::decode(
            self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            self.payload.clone(),
        )
    }

    fn from_message(message: &async_nats::jetstream::Message) -> Option<Self> {
        let sequence = message.info().ok()?.stream_sequence;
        let mut about = LetterHeaders::default();
        let mut headers = Vec::new();
        for (name, values) in message.headers.iter().flat_map(|h| h.iter()) {
            let name: &str = name.as_ref();
            for value in values {
                let value = value.as_str();
                if about.read(name, value) {
                    continue;
                }
                // The broker's headers: the dead letter's own de-duplication key (the
                // original's is its event ID, which the envelope carries), or headers added on
                // delivery. Replaying them could only do harm.
                if !(name.len() >= 5 && name[..5].eq_ignore_ascii_case("Nats-")) {
                    headers.push((name.to_owned(), value.to_owned()));
                }
            }
        }
        let letter = DeadLetter {
            sequence,
            topic: about
                .topic
                .unwrap_or_else(|| Topic::new("unknown").expect("valid topic")),
            reason: about.reason,
            error: about.error,
            attempts: about.attempts,
            stream_sequence: about.stream_sequence,
            delivered: about.delivered,
            headers,
            payload: message.payload.clone(),
            raw_headers: about.raw_headers,
            body_sequence: about.body_sequence,
            batch_index: about.batch_index,
        };
        Some(letter)
    }
}

impl NatsBus {
    /// Up to `limit` dead letters of `topic`, oldest first. Reading does not remove them.
    pub async fn dead_letters(
        &self,
        topic: &Topic,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, NatsError> {
        let connection = self.shared.connection(topic).await?;
        // A subject this user may not use is refused only in a violation report: fail at
        // once, naming it, instead of after the request timeout.
        crate::broker::guarded(
            &connection.violations,
            || format!("reading the dead letters of topic `{topic}`"),
            self.read_dead_letters(&connection, topic, limit),
        )
        .await
    }

    async fn read_dead_letters(
        &self,
        connection: &crate::TopicConnection,
        topic: &Topic,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, NatsError> {
        let config = &self.shared.config.dead_letters;
        let stream = match connection.jetstream.get_stream(&config.stream).await {
            Ok(stream) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::context::GetStreamErrorKind::JetStream(ref js)
                        if js.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                // No subscription ever dead-lettered anything.
                return Ok(Vec::new());
            }
            Err(e) => {
                return Err(NatsError::api(
                    format!("looking up dead-letter stream `{}`", config.stream),
                    e,
                ))
            }
        };
        let subject = format!("{}.{topic}", config.subject_prefix);
        let reader: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: subject.clone(),
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::All,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| NatsError::api(format!("reading dead letters of `{subject}`"), e))?;
        let mut reader_info = reader.clone();
        let pending = reader_info
            .info()
            .await
            .map_err(|e| NatsError::api(format!("reading dead letters of `{subject}`"), e))?
            .num_pending as usize;
        let wanted = pending.min(limit);
        let mut letters = Vec::with_capacity(wanted);
        while letters.len() < wanted {
            let mut batch = reader
                .fetch()
                .max_messages(wanted - letters.len())
                .expires(Duration::from_secs(2))
                .messages()
                .await
                .map_err(|e| NatsError::api(format!("reading dead letters of `{subject}`"), e))?;
            let before = letters.len();
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| {
                    NatsError::api(format!("reading dead letters of `{subject}`"), e)
                })?;
                if let Some(mut letter) = DeadLetter::from_message(&message) {
                    if let Some(body) = letter.body_sequence {
                        let stored = stream.get_raw_message(body).await.map_err(|e| {
                            NatsError::api(
                                format!("reading the body of dead letter {}", letter.sequence),
                                e,
                            )
                        })?;
                        letter.payload = stored.payload;
                    }
                    letters.push(letter);
                }
            }
            if letters.len() == before {
                break; // removed meanwhile
            }
        }
        let _ = stream
            .delete_consumer(&reader_info.cached_info().name)
            .await;
        Ok(letters)
    }

    /// Publishes a dead letter's original message on its topic again and, once it is stored,
    /// removes the dead letter. The replay is a new message at the end of the topic, so the
    /// handler sees it after the aggregate's events that followed it when it was dead-lettered.
    /// Its `Nats-Msg-Id` is `replay-<dead letter's position>`, so replaying the same dead letter
    /// twice stores it once.
    pub async fn replay_dead_letter(&self, letter: &DeadLetter) -> Result<Published, NatsError> {
        let connection = self.shared.connection(&letter.topic).await?;
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in &letter.headers {
            headers.append(name.as_str(), value.as_str());
        }
        // Not the event ID: the original may still be in the duplicate window. Short, so that
        // an original that filled `max_payload` still fits: replaying twice stores it once.
        headers.insert("Nats-Msg-Id", format!("replay-{}", letter.sequence));
        let what = || {
            format!(
                "replaying dead letter {} of `{}`",
                letter.sequence, letter.topic
            )
        };
        let ack = connection
            .jetstream
            .publish_with_headers(connection.subject.clone(), headers, letter.payload.clone())
            .await
            .map_err(|e| NatsError::api(what(), e))?
            .await
            .map_err(|e| NatsError::api(what(), e))?;
        let dlq = connection
            .jetstream
            .get_stream(&self.shared.config.dead_letters.stream)
            .await
            .map_err(|e| NatsError::api(what(), e))?;
        if let Err(e) = dlq.delete_message(letter.sequence).await {
            // Replayed before: the publish was a duplicate and the letter already removed.
            if !ack.duplicate {
                return Err(NatsError::api(what(), e));
            }
        }
        if let Some(body) = letter.body_sequence {
            // Gone already if replayed before.
            let _ = dlq.delete_message(body).await;
        }
        Ok(Published {
            topic: letter.topic.clone(),
            sequence: Some(ack.sequence),
            duplicate: ack.duplicate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letter_headers_read_back_what_was_written() {
        let about = LetterHeaders {
            reason: DeadLetterReason::Permanent,
            error: "line one\nline two".into(),
            attempts: 3,
            topic: Some(Topic::new("orders").unwrap()),
            stream_sequence: Some(42),
            delivered: Some(2),
            raw_headers: Some("TkFUUy8xLjA=".into()),
            body_sequence: Some(7),
            batch_index: Some(5),
        };
        let mut headers = async_nats::HeaderMap::new();
        about.write(&mut headers);
        let mut read = LetterHeaders::default();
        for (name, values) in headers.iter() {
            for value in values {
                assert!(read.read(name.as_ref(), value.as_str()), "{name:?}");
            }
        }
        assert_eq!(read.error, "line one line two", "one line");
        assert_eq!(
            read,
            LetterHeaders {
                error: "line one line two".into(),
                ..about
            }
        );
        assert!(!read.read("Bus-Event", "x"), "not a dead-letter header");
        assert_eq!(dead_letter_headers().len(), headers.len());
    }
}
