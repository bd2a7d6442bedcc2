//! The envelope every event travels in.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::codec::{Codec, ContentType};
use crate::error::{CodecError, ValidationError};
use crate::names::{AggregateId, EventId, EventType};
use crate::trace::{TraceParent, TRACEPARENT};
use crate::wire;

/// One event of one aggregate, with its metadata and payload.
///
/// Every field is validated when the envelope is built, so a value of this type is always
/// publishable. Cloning is cheap: names are shared and the payload is reference-counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub(crate) aggregate_id: AggregateId,
    pub(crate) event_type: EventType,
    pub(crate) event_version: NonZeroU64,
    pub(crate) event_id: EventId,
    /// When the event was created, in microseconds since the Unix epoch: what the wire
    /// carries, kept as it is written rather than converted on every encoding.
    pub(crate) timestamp_micros: u64,
    pub(crate) schema_version: NonZeroU32,
    pub(crate) content_type: ContentType,
    /// Trace, correlation and tenant IDs and user headers; `None` when it has none of them.
    pub(crate) context: Option<Box<Context>>,
    pub(crate) payload: Bytes,
}

/// What many events are published without: trace, correlation and tenant IDs and user headers,
/// held apart from the envelope. An envelope is moved several times between the publishing
/// call and the wire, and between the wire and the handler; without these it is about a third
/// smaller to move.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Context {
    pub(crate) trace_id: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) tenant_id: Option<String>,
    pub(crate) headers: BTreeMap<String, String>,
}

/// No context at all.
static EMPTY_CONTEXT: Context = Context {
    trace_id: None,
    correlation_id: None,
    tenant_id: None,
    headers: BTreeMap::new(),
};

impl Context {
    /// Boxed, unless it is empty: an envelope holds `None` then, so that two envelopes with
    /// the same fields are equal however they were made.
    pub(crate) fn boxed(self) -> Option<Box<Context>> {
        let empty = self.trace_id.is_none()
            && self.correlation_id.is_none()
            && self.tenant_id.is_none()
            && self.headers.is_empty();
        (!empty).then(|| Box::new(self))
    }
}

impl Envelope {
    /// Starts an envelope for version `event_version` of aggregate `aggregate_id`.
    ///
    /// Validation happens in [`EnvelopeBuilder::build`], which names the field at fault.
    pub fn builder(
        aggregate_id: impl AsRef<str>,
        event_type: impl AsRef<str>,
        event_version: u64,
    ) -> EnvelopeBuilder {
        EnvelopeBuilder::start(
            Unchecked::Text(aggregate_id.as_ref().to_owned()),
            Unchecked::Text(event_type.as_ref().to_owned()),
            event_version,
        )
    }

    /// Starts an envelope from names already validated, as a publisher that sends many events
    /// of the same aggregates and types keeps them: the names are shared, not copied, and not
    /// checked again.
    ///
    /// ```
    /// use bus_core::{AggregateId, Envelope, EventType};
    /// let account = AggregateId::new("acc-1")?;
    /// let deposited = EventType::new("Deposited")?;
    /// for version in 1..=3 {
    ///     let envelope = Envelope::builder_for(&account, &deposited, version).build()?;
    ///     assert_eq!(envelope.aggregate_id(), &account);
    /// }
    /// # Ok::<(), bus_core::ValidationError>(())
    /// ```
    pub fn builder_for(
        aggregate_id: &AggregateId,
        event_type: &EventType,
        event_version: u64,
    ) -> EnvelopeBuilder {
        EnvelopeBuilder::start(
            Unchecked::Valid(aggregate_id.clone()),
            Unchecked::Valid(event_type.clone()),
            event_version,
        )
    }

    /// The aggregate this event belongs to: the ordering key.
    pub fn aggregate_id(&self) -> &AggregateId {
        &self.aggregate_id
    }

    /// The event's type.
    pub fn event_type(&self) -> &EventType {
        &self.event_type
    }

    /// The aggregate's own version after this event, starting at 1.
    pub fn event_version(&self) -> u64 {
        self.event_version.get()
    }

    /// The event's unique ID; transports use it to de-duplicate retried publishes.
    pub fn event_id(&self) -> &EventId {
        &self.event_id
    }

    /// When the event was created (microsecond precision on the wire).
    pub fn timestamp(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.timestamp_micros)
    }

    /// [`timestamp`](Self::timestamp) as microseconds since the Unix epoch, as it travels on
    /// the wire (0 for a time before the epoch).
    pub fn timestamp_micros(&self) -> u64 {
        self.timestamp_micros
    }

    /// The distributed trace this event belongs to, if any.
    pub fn trace_id(&self) -> Option<&str> {
        self.context().trace_id.as_deref()
    }

    /// The request or process this event was caused by, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        self.context().correlation_id.as_deref()
    }

    /// The tenant, in multi-tenant systems.
    pub fn tenant_id(&self) -> Option<&str> {
        self.context().tenant_id.as_deref()
    }

    /// The version of the payload's schema: which shape of the event type's struct wrote it
    /// (1 unless set; typed events write `Event::VERSION`).
    pub fn schema_version(&self) -> u32 {
        self.schema_version.get()
    }

    /// What the payload bytes are.
    pub fn content_type(&self) -> &ContentType {
        &self.content_type
    }

    /// User headers, carried as they are.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.context().headers
    }

    /// Its context, or an empty one.
    pub(crate) fn context(&self) -> &Context {
        self.context.as_deref().unwrap_or(&EMPTY_CONTEXT)
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The W3C trace context in its `traceparent` header, if it carries a valid one.
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.headers()
            .get(TRACEPARENT)
            .and_then(|v| TraceParent::parse(v))
    }

    /// Sets its `traceparent` header to `traceparent`.
    pub fn set_traceparent(&mut self, traceparent: &TraceParent) {
        self.context
            .get_or_insert_with(Default::default)
            .headers
            .insert(TRACEPARENT.to_owned(), traceparent.to_string());
    }

    /// Decodes the payload with the codec its content type names.
    pub fn decode_payload<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        let codec = self.content_type.codec().ok_or_else(|| {
            CodecError::new(
                format!(
                    "payload content type `{}` has no codec; read payload() instead",
                    self.content_type
                ),
                None,
            )
        })?;
        codec.decode(&self.payload)
    }
}

/// Builds an [`Envelope`]; see [`Envelope::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct EnvelopeBuilder {
    aggregate_id: Unchecked<AggregateId>,
    event_type: Unchecked<EventType>,
    event_version: u64,
    event_id: Option<String>,
    timestamp: Option<SystemTime>,
    schema_version: u32,
    content_type: ContentType,
    /// Boxed as in the envelope, and for the same reason: each builder call moves the builder.
    context: Option<Box<Context>>,
    payload: Bytes,
}

/// A name as the builder was given it: text to validate at build time, or a name already valid.
#[derive(Debug, Clone)]
enum Unchecked<T> {
    Text(String),
    Valid(T),
}

impl EnvelopeBuilder {
    /// A builder with the names as given and every other field at its default.
    fn start(
        aggregate_id: Unchecked<AggregateId>,
        event_type: Unchecked<EventType>,
        event_version: u64,
    ) -> Self {
        Self {
            aggregate_id,
            event_type,
            event_version,
            event_id: None,
            timestamp: None,
            schema_version: 1,
            content_type: ContentType::Bytes,
            context: None,
            payload: Bytes::new(),
        }
    }

    /// Sets the event ID. Without it a new UUID v7 is generated at build time; set it when the
    /// event already has an identity, so that publishing it twice is recognised as a duplicate.
    pub fn event_id(mut self, event_id: impl Into<String>) -> Self {
        self.event_id = Some(event_id.into());
        self
    }

    /// Sets the timestamp (default: now). It is kept to whole microseconds, as the wire carries
    /// it; one before the Unix epoch is refused at build time.
    pub fn timestamp(mut self, timestamp: SystemTime) -> Self {
        self.timestamp = Some(timestamp);
        self
    }

    /// Sets the trace ID.
    pub fn trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.context_mut().trace_id = Some(trace_id.into());
        self
    }

    /// Sets the correlation ID.
    pub fn correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.context_mut().correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets the tenant ID.
    pub fn tenant_id(mut self, tenant_id: impl Into<String>) -> Self {
        self.context_mut().tenant_id = Some(tenant_id.into());
        self
    }

    /// Sets the version of the payload's schema (default 1): raise it when the payload's shape
    /// changes so that readers can turn older payloads into the current shape (see
    /// `EventHandlers::upcast`). 0 is refused at build time.
    pub fn schema_version(mut self, schema_version: u32) -> Self {
        self.schema_version = schema_version;
        self
    }

    /// Adds a user header. Names starting with `Bus-` or `Nats-` are reserved.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.context_mut().headers.insert(name.into(), value.into());
        self
    }

    fn context_mut(&mut self) -> &mut Context {
        self.context.get_or_insert_with(Default::default)
    }

    /// Sets raw payload bytes (content type `application/octet-stream`).
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self.content_type = ContentType::Bytes;
        self
    }

    /// Sets payload bytes of a given content type.
    pub fn payload_with_type(
        mut self,
        payload: impl Into<Bytes>,
        content_type: ContentType,
    ) -> Self {
        self.payload = payload.into();
        self.content_type = content_type;
        self
    }

    /// Encodes `value` with `codec` as the payload.
    pub fn typed_payload<T: Serialize + ?Sized>(
        mut self,
        value: &T,
        codec: Codec,
    ) -> Result<Self, CodecError> {
        self.payload = codec.encode(value)?.into();
        self.content_type = codec.content_type();
        Ok(self)
    }

    /// Validates every field and builds the envelope.
    pub fn build(self) -> Result<Envelope, ValidationError> {
        let event_version = NonZeroU64::new(self.event_version)
            .ok_or_else(|| ValidationError::new("event_version", "0", "must be greater than 0"))?;
        let schema_version = NonZeroU32::new(self.schema_version)
            .ok_or_else(|| ValidationError::new("schema_version", "0", "must be greater than 0"))?;
        // One clock read, measured from the epoch once, serves a generated ID and a default
        // timestamp.
        let now = (self.event_id.is_none() || self.timestamp.is_none())
            .then(|| SystemTime::now().duration_since(UNIX_EPOCH));
        let event_id = match self.event_id {
            Some(id) => EventId::new(id)?,
            // A clock before the epoch fails a default timestamp below, never the ID.
            None => EventId::generate_at(
                now.as_ref()
                    .and_then(|n| n.as_ref().ok())
                    .copied()
                    .unwrap_or_default(),
            ),
        };
        let context = self.context.as_deref().unwrap_or(&EMPTY_CONTEXT);
        for (field, value) in [
            ("trace_id", &context.trace_id),
            ("correlation_id", &context.correlation_id),
            ("tenant_id", &context.tenant_id),
        ] {
            if let Some(value) = value {
                wire::check_header_value(field, value)?;
            }
        }
        if let ContentType::Other(value) = &self.content_type {
            wire::check_header_value("content_type", value)?;
        }
        for (name, value) in &context.headers {
            wire::check_user_header(name, value)?;
        }
        Ok(Envelope {
            aggregate_id: match self.aggregate_id {
                Unchecked::Text(text) => AggregateId::new(text)?,
                Unchecked::Valid(name) => name,
            },
            event_type: match self.event_type {
                Unchecked::Text(text) => EventType::new(text)?,
                Unchecked::Valid(name) => name,
            },
            event_version,
            event_id,
            timestamp_micros: match (self.timestamp, now) {
                (Some(timestamp), _) => wire::wire_micros(timestamp)?,
                (None, Some(now)) => wire::micros_since_epoch(now)?,
                (None, None) => wire::wire_micros(SystemTime::now())?,
            },
            schema_version,
            content_type: self.content_type,
            context: self.context.and_then(|context| context.boxed()),
            payload: self.payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Unix milliseconds a UUID version 7 begins with (its first 48 bits).
    fn id_millis(e: &Envelope) -> u64 {
        let hex: String = e
            .event_id()
            .as_str()
            .chars()
            .filter(|c| *c != '-')
            .collect();
        u64::from_str_radix(&hex[..12], 16).unwrap()
    }

    #[test]
    fn a_generated_id_and_a_default_timestamp_share_one_clock_read() {
        for _ in 0..1_000 {
            let e = Envelope::builder("a", "T", 1).build().unwrap();
            assert_eq!(
                id_millis(&e),
                e.timestamp_micros / 1_000,
                "{}",
                e.event_id()
            );
        }
        // Given a timestamp, the generated ID still carries the time it was built.
        let before = SystemTime::now();
        let e = Envelope::builder("a", "T", 1)
            .timestamp(UNIX_EPOCH + Duration::from_secs(1))
            .build()
            .unwrap();
        let since = before.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!(id_millis(&e) >= since, "{} < {since}", id_millis(&e));
        assert_eq!(e.timestamp(), UNIX_EPOCH + Duration::from_secs(1));
    }

    #[test]
    fn version_zero_is_refused_with_its_field() {
        let err = Envelope::builder("a", "T", 0).build().unwrap_err();
        assert_eq!(err.field(), "event_version");
        assert_eq!(
            err.to_string(),
            "event_version `0` is invalid: must be greater than 0"
        );
    }

    #[test]
    fn empty_fields_are_refused_by_name() {
        assert_eq!(
            Envelope::builder("", "T", 1).build().unwrap_err().field(),
            "aggregate_id"
        );
        assert_eq!(
            Envelope::builder("a", "", 1).build().unwrap_err().field(),
            "event_type"
        );
        let err = Envelope::builder("a", "T", 1)
            .event_id("")
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "event_id");
    }

    #[test]
    fn reserved_and_malformed_headers_are_refused() {
        let err = Envelope::builder("a", "T", 1)
            .header("Bus-Event-Type", "x")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        let err = Envelope::builder("a", "T", 1)
            .header("nats-msg-id", "x")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        let err = Envelope::builder("a", "T", 1)
            .header("X-Ok", "line\r\nbreak")
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "header value");
        let err = Envelope::builder("a", "T", 1)
            .header("X Bad", "v")
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "header name");
        let err = Envelope::builder("a", "T", 1)
            .trace_id("a\nb")
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "trace_id");
    }

    #[test]
    fn json_payload_round_trips() {
        let env = Envelope::builder("a", "T", 1)
            .typed_payload(&vec![1, 2, 3], Codec::Json)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(env.content_type(), &ContentType::Json);
        assert_eq!(&env.payload()[..], b"[1,2,3]");
        assert_eq!(env.decode_payload::<Vec<i32>>().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn raw_bytes_have_no_codec() {
        let env = Envelope::builder("a", "T", 1)
            .payload(vec![1u8])
            .build()
            .unwrap();
        assert!(env.decode_payload::<u8>().is_err());
    }
}
