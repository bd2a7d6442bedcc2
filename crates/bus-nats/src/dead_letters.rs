//! Listing and replaying dead letters.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy};
use bus_core::{wire, DecodeError, Envelope, Published, Topic};
use bytes::Bytes;
use futures::StreamExt;

use crate::subscriber::dead_letter_headers;
use crate::{NatsBus, NatsError};

/// A message that was dead-lettered, as stored in the dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its position in the dead-letter stream; [`NatsBus::replay_dead_letter`] removes it.
    pub sequence: u64,
    /// The topic it was consumed from.
    pub topic: Topic,
    /// Why: `permanent`, `retries-exhausted`, `panic`, `undecodable`, `no-key`, `skipped`, or
    /// `unreadable` (a header block no client could parse; see `raw_headers`).
    pub reason: String,
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
        let dlq = dead_letter_headers();
        let mut letter = DeadLetter {
            sequence,
            topic: Topic::new("unknown").expect("valid topic"),
            reason: String::new(),
            error: String::new(),
            attempts: 0,
            stream_sequence: None,
            delivered: None,
            headers: Vec::new(),
            payload: message.payload.clone(),
            raw_headers: None,
            body_sequence: None,
            batch_index: None,
        };
        for (name, values) in message.headers.iter().flat_map(|h| h.iter()) {
            let name: &str = name.as_ref();
            for value in values {
                let value = value.as_str();
                match dlq.iter().position(|h| h.eq_ignore_ascii_case(name)) {
                    Some(0) => letter.reason = value.to_owned(),
                    Some(1) => letter.error = value.to_owned(),
                    Some(2) => letter.attempts = value.parse().unwrap_or(0),
                    Some(3) => {
                        if let Ok(topic) = Topic::new(value) {
                            letter.topic = topic;
                        }
                    }
                    Some(4) => letter.stream_sequence = value.parse().ok(),
                    Some(5) => letter.delivered = value.parse().ok(),
                    Some(6) => letter.raw_headers = Some(value.to_owned()),
                    Some(7) => letter.body_sequence = value.parse().ok(),
                    Some(8) => letter.batch_index = value.parse().ok(),
                    _ if name.len() >= 5 && name[..5].eq_ignore_ascii_case("Nats-") => {
                        // The broker's: the dead letter's own de-duplication key (the
                        // original's is its event ID, which the envelope carries), or headers
                        // added on delivery. Replaying them could only do harm.
                    }
                    _ => letter.headers.push((name.to_owned(), value.to_owned())),
                }
            }
        }
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
        crate::connection::guarded(
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
