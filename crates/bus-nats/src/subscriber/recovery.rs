//! Restarting delivery in order: the one answer to every discontinuity.
//!
//! JetStream redelivers a message the subscription never received (lost with a dropped
//! connection, handed out by a consumer leader that died, held by a process that crashed) only
//! after AckWait, while it hands out newer messages at once: the aggregate's later events would
//! overtake it. So whenever delivery stops being contiguous, the fetcher stops, and delivery
//! restarts at the consumer's ack floor + 1, in stream order: by the consumer reset API on
//! servers 2.14+, by deleting and recreating the consumer on older ones (on a work-queue stream
//! "deliver all" is exactly "from the ack floor + 1": what was acknowledged is gone). Messages
//! already handled above the floor come again as copies, which the subscription recognises.
//!
//! A discontinuity can also be a message no client can read: a header block that the client
//! library refuses (a line without `:`, bytes that are not UTF-8) makes it drop the connection
//! on every delivery. Before restarting, the message after the last one received is read
//! through the stream's message-get API (which returns it as data); if the client would refuse
//! it, it is dead-lettered with its raw header block and deleted from the stream.

use std::str::FromStr;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use async_nats::HeaderMap;
use base64::Engine;
use bus_core::Topic;

use crate::dead_letters::LetterHeaders;
use crate::{broker, provision, NatsError, Provisioning};

/// What restarting delivery needs to know about the consumer.
#[derive(Debug, Clone)]
pub(crate) struct Restarter {
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: async_nats::jetstream::Context,
    pub(crate) topic: Topic,
    /// The subject the consumer filters on: the topic or one of its partitions.
    pub(crate) subject: Topic,
    pub(crate) stream: String,
    pub(crate) want: consumer::pull::Config,
    pub(crate) provisioning: Provisioning,
    /// The server has the consumer reset API (2.14+).
    pub(crate) can_reset: bool,
    /// The consumer is owned through its pinned-client priority group (not a lease).
    pub(crate) pinned: bool,
    pub(crate) work_queue: bool,
    /// Where the topic's dead letters go.
    pub(crate) letters: crate::dead_letters::LetterBox,
}

/// Where a new run of deliveries starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Start {
    /// The consumer sequence the first delivery will carry.
    pub(crate) next_delivery: u64,
    /// Stream sequences up to this one are acknowledged or were seen: the first message that
    /// could be unreadable comes after it.
    pub(crate) seen_up_to: u64,
}

impl Restarter {
    fn name(&self) -> &str {
        self.want.durable_name.as_deref().unwrap_or_default()
    }

    /// Restarts delivery at the ack floor + 1, or at stream sequence `to` (which becomes the
    /// consumer's ack floor + 1).
    pub(crate) async fn restart_at(&self, to: Option<u64>) -> Result<Start, NatsError> {
        let name = self.name().to_owned();
        if self.can_reset {
            let reset = broker::reset_consumer(&self.client, &self.stream, &name, to).await?;
            return Ok(Start {
                next_delivery: 1,
                seen_up_to: reset.saturating_sub(1),
            });
        }
        // Servers before 2.14: delete and recreate, starting after the ack floor. Deliver-all
        // on a work-queue stream (which refuses any other start, error 10101) starts there.
        let stream = self
            .jetstream
            .get_stream(&self.stream)
            .await
            .map_err(|e| NatsError::api(format!("looking up stream `{}`", self.stream), e))?;
        let floor = match (to, stream.consumer_info(&name).await) {
            (Some(to), Ok(_)) => to.saturating_sub(1),
            (None, Ok(info)) => info.ack_floor.stream_sequence,
            (_, Err(e)) => return Err(NatsError::api(format!("reading consumer `{name}`"), e)),
        };
        stream
            .delete_consumer(&name)
            .await
            .map_err(|e| NatsError::api(format!("deleting consumer `{name}`"), e))?;
        let mut config = self.want.clone();
        if !self.work_queue {
            config.deliver_policy = DeliverPolicy::ByStartSequence {
                start_sequence: floor + 1,
            };
        }
        stream
            .create_consumer(config)
            .await
            .map_err(|e| NatsError::api(format!("recreating consumer `{name}`"), e))?;
        Ok(Start {
            next_delivery: 1,
            seen_up_to: floor,
        })
    }

    /// Where delivery stands when this subscription gains the topic: restarted at the ack floor
    /// when the consumer has unacknowledged messages (an earlier owner stopped uncleanly, or a
    /// pin was just claimed with a message), continued otherwise.
    pub(crate) async fn start_on_gain(&self) -> Result<Start, NatsError> {
        let name = self.name().to_owned();
        let stream = self
            .jetstream
            .get_stream(&self.stream)
            .await
            .map_err(|e| NatsError::api(format!("looking up stream `{}`", self.stream), e))?;
        let info = stream
            .consumer_info(&name)
            .await
            .map_err(|e| NatsError::api(format!("reading consumer `{name}`"), e))?;
        if info.num_ack_pending == 0 {
            return Ok(Start {
                next_delivery: info.delivered.consumer_sequence + 1,
                seen_up_to: info.ack_floor.stream_sequence,
            });
        }
        if self.pinned && info.num_ack_pending == 1 {
            // Most likely the one message a pinned claim comes with: the normal start of an
            // owner, not worth a warning.
            tracing::debug!(
                topic = %self.topic,
                consumer = %name,
                ack_floor = info.ack_floor.stream_sequence,
                "restarting delivery at the ack floor"
            );
        } else {
            tracing::warn!(
                topic = %self.topic,
                consumer = %name,
                unacknowledged = info.num_ack_pending,
                ack_floor = info.ack_floor.stream_sequence,
                "consumer has unacknowledged messages from an earlier owner; restarting delivery at the ack floor"
            );
        }
        self.restart_at(None).await
    }

    /// Waits, up to `within`, until the consumer shows at most `expected` messages awaiting
    /// acknowledgement: the broker processes acks some time after they were written, and a
    /// claim released before they count would hand handled events to the next owner. Returns
    /// how many more than `expected` are still awaiting acknowledgement (0 when confirmed).
    pub(crate) async fn wait_for_acks(&self, expected: u64, within: std::time::Duration) -> u64 {
        let bound = within + std::time::Duration::from_millis(200);
        match tokio::time::timeout(bound, self.acks_within(expected, within)).await {
            Ok(unconfirmed) => unconfirmed,
            Err(_) => {
                tracing::warn!(topic = %self.topic, "acknowledgements could not be confirmed: the broker did not answer");
                0
            }
        }
    }

    async fn acks_within(&self, expected: u64, within: std::time::Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        let name = self.name().to_owned();
        let Ok(stream) = self.jetstream.get_stream(&self.stream).await else {
            return 0;
        };
        loop {
            match stream.consumer_info(&name).await {
                Ok(info) if info.num_ack_pending as u64 <= expected => return 0,
                Ok(info) if tokio::time::Instant::now() >= deadline => {
                    return info.num_ack_pending as u64 - expected;
                }
                Err(error) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(topic = %self.topic, %error, "acknowledgements could not be confirmed");
                    return 0;
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    /// Makes sure the consumer exists (it may have been deleted, or lost with a memory store).
    pub(crate) async fn ensure_consumer(&self) -> Result<(), NatsError> {
        provision::ensure_consumer(&self.jetstream, &self.stream, &self.want, self.provisioning)
            .await
            .map(drop)
    }

    /// Dead-letters and deletes every unreadable message of the topic right after `after`
    /// (stream sequence), stopping at the first readable one. Returns how many it removed.
    pub(crate) async fn remove_unreadable(&self, mut after: u64) -> Result<u64, NatsError> {
        let mut removed = 0;
        loop {
            let Some(stored) = self.next_stored(after + 1).await? else {
                return Ok(removed);
            };
            let Some(why) = stored.headers.as_deref().and_then(unreadable_header_block) else {
                return Ok(removed);
            };
            tracing::error!(topic = %self.topic, stream_sequence = stored.sequence, %why, "a message no client can read: dead-lettering and deleting it");
            self.dead_letter_unreadable(&stored, &why).await?;
            self.delete(stored.sequence).await?;
            removed += 1;
            after = stored.sequence;
        }
    }

    /// The first message of the topic at or after `sequence`, read as data.
    async fn next_stored(&self, sequence: u64) -> Result<Option<Stored>, NatsError> {
        let Some(raw) =
            broker::next_message(&self.client, &self.stream, self.subject.as_str(), sequence)
                .await?
        else {
            return Ok(None);
        };
        let decode = |field: Option<String>| -> Result<Option<Vec<u8>>, NatsError> {
            field
                .map(|text| {
                    base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .map_err(|e| NatsError::api("decoding a stored message".to_owned(), e))
                })
                .transpose()
        };
        Ok(Some(Stored {
            sequence: raw.sequence,
            headers: decode(raw.hdrs)?,
            data: decode(raw.data)?.unwrap_or_default(),
        }))
    }

    async fn dead_letter_unreadable(&self, stored: &Stored, why: &str) -> Result<(), NatsError> {
        let about = LetterHeaders {
            reason: crate::dead_letters::DeadLetterReason::Unreadable,
            error: why.to_owned(),
            topic: Some(self.topic.clone()),
            stream_sequence: Some(stored.sequence),
            raw_headers: Some(
                base64::engine::general_purpose::STANDARD
                    .encode(stored.headers.as_deref().unwrap_or_default()),
            ),
            ..LetterHeaders::default()
        };
        let msg_id = format!("dlq-{}-{}", self.topic, stored.sequence);
        self.letters
            .store(
                HeaderMap::new(),
                &about,
                Some(msg_id),
                stored.data.clone().into(),
            )
            .await
    }

    async fn delete(&self, sequence: u64) -> Result<(), NatsError> {
        broker::delete_message(&self.client, &self.stream, sequence).await
    }
}

/// A message read from the stream as data.
struct Stored {
    sequence: u64,
    headers: Option<Vec<u8>>,
    data: Vec<u8>,
}

/// Why the client library would refuse this header block (and drop its connection), or `None`
/// if it reads it. Follows async-nats 0.51's parser: UTF-8, a `NATS/1.0` version line with an
/// optional numeric status, then `name: value` lines (continuation lines start with
/// whitespace), names valid for `HeaderName`, values without a carriage return.
pub(crate) fn unreadable_header_block(block: &[u8]) -> Option<String> {
    let Ok(text) = std::str::from_utf8(block) else {
        return Some("the header block is not UTF-8".to_owned());
    };
    let mut lines = text.lines().peekable();
    let Some(version) = lines.next() else {
        return Some("the header block is empty".to_owned());
    };
    let Some(rest) = version.strip_prefix("NATS/1.0") else {
        return Some("the header block does not start with NATS/1.0".to_owned());
    };
    let status = rest.trim().split(' ').next().unwrap_or_default();
    if !status.is_empty() && status.parse::<u16>().is_err() {
        return Some(format!("the status `{status}` is not a number"));
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Some(format!("the header line `{}` has no `:`", printable(line)));
        };
        if let Err(e) = async_nats::HeaderName::from_str(name) {
            return Some(format!(
                "the header name `{}` is invalid: {e}",
                printable(name)
            ));
        }
        let mut value = value.to_owned();
        while let Some(more) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        if value.contains('\r') {
            return Some(format!(
                "the value of header `{}` holds a carriage return",
                printable(name)
            ));
        }
    }
    None
}

/// Text safe for a log line or a header value: control characters escaped, at most 200 chars.
fn printable(text: &str) -> String {
    text.chars()
        .take(200)
        .flat_map(char::escape_default)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_blocks_the_client_refuses_are_recognised() {
        assert_eq!(
            unreadable_header_block(b"NATS/1.0\r\nBus-Event: x\r\n\r\n"),
            None
        );
        assert_eq!(unreadable_header_block(b"NATS/1.0 503\r\n\r\n"), None);
        assert_eq!(
            unreadable_header_block(b"NATS/1.0\r\nA: b\r\n  continued\r\n\r\n"),
            None
        );
        let no_colon = unreadable_header_block(b"NATS/1.0\r\nno colon here\r\n\r\n").unwrap();
        assert!(no_colon.contains("has no `:`"), "{no_colon}");
        let binary = unreadable_header_block(b"NATS/1.0\r\nA: \xff\xfe\r\n\r\n").unwrap();
        assert!(binary.contains("not UTF-8"), "{binary}");
        assert!(unreadable_header_block(b"HTTP/1.1\r\n\r\n").is_some());
        assert!(unreadable_header_block(b"NATS/1.0\r\nA b: c\r\n\r\n").is_some());
        assert!(unreadable_header_block(b"NATS/1.0\r\nA: b\rc\r\n\r\n").is_some());
    }
}
