//! The wire format: how an [`Envelope`] travels as message headers plus a body.
//!
//! The payload is the message body, untouched. Metadata travels in headers with these names
//! (documented for other languages in `docs/wire-format.md`):
//!
//! | header | value | required |
//! |---|---|---|
//! | `Bus-Aggregate-Id` | the aggregate ID | yes |
//! | `Bus-Event-Type` | the event type | yes |
//! | `Bus-Event-Version` | decimal integer ≥ 1 | yes |
//! | `Bus-Event-Id` | the event ID | yes |
//! | `Bus-Timestamp` | microseconds since the Unix epoch, decimal | yes |
//! | `Bus-Content-Type` | media type of the body | no (default `application/octet-stream`) |
//! | `Bus-Trace-Id`, `Bus-Correlation-Id`, `Bus-Tenant-Id` | text | no |
//!
//! Every other header is a user header, carried as it is. Header names starting with `Bus-` or
//! `Nats-` are reserved and refused as user headers. Header names are matched without regard to
//! ASCII case when decoding.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::codec::ContentType;
use crate::envelope::Envelope;
use crate::error::{DecodeError, ValidationError};
use crate::names::{AggregateId, EventId, EventType};

/// Header carrying the aggregate ID.
pub const AGGREGATE_ID: &str = "Bus-Aggregate-Id";
/// Header carrying the event type.
pub const EVENT_TYPE: &str = "Bus-Event-Type";
/// Header carrying the event version (decimal).
pub const EVENT_VERSION: &str = "Bus-Event-Version";
/// Header carrying the event ID.
pub const EVENT_ID: &str = "Bus-Event-Id";
/// Header carrying the timestamp (microseconds since the Unix epoch, decimal).
pub const TIMESTAMP: &str = "Bus-Timestamp";
/// Header carrying the payload's media type.
pub const CONTENT_TYPE: &str = "Bus-Content-Type";
/// Header carrying the trace ID.
pub const TRACE_ID: &str = "Bus-Trace-Id";
/// Header carrying the correlation ID.
pub const CORRELATION_ID: &str = "Bus-Correlation-Id";
/// Header carrying the tenant ID.
pub const TENANT_ID: &str = "Bus-Tenant-Id";

/// Prefixes of header names that user headers may not use.
pub const RESERVED_PREFIXES: [&str; 2] = ["Bus-", "Nats-"];

fn is_reserved(name: &str) -> bool {
    RESERVED_PREFIXES.iter().any(|prefix| {
        name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix)
    })
}

/// Checks a header value: no CR, LF or other control characters.
pub(crate) fn check_header_value(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if let Some(bad) = value.chars().find(|c| c.is_control()) {
        return Err(ValidationError::new(
            field,
            value,
            format!("contains control character {bad:?}, which cannot travel in a header"),
        ));
    }
    Ok(())
}

/// Checks a user header's name and value.
pub(crate) fn check_user_header(name: &str, value: &str) -> Result<(), ValidationError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        return Err(ValidationError::new(
            "header name",
            name,
            "must be non-empty printable ASCII without ':' or spaces",
        ));
    }
    if is_reserved(name) {
        return Err(ValidationError::new(
            "header name",
            name,
            "starts with a reserved prefix (`Bus-` or `Nats-`)",
        ));
    }
    check_header_value("header value", value)
}

fn micros_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// Calls `put(name, value)` for every header of `envelope`, required ones first.
pub fn encode_headers(envelope: &Envelope, mut put: impl FnMut(&str, &str)) {
    put(AGGREGATE_ID, envelope.aggregate_id.as_str());
    put(EVENT_TYPE, envelope.event_type.as_str());
    put(EVENT_VERSION, &envelope.event_version.get().to_string());
    put(EVENT_ID, envelope.event_id.as_str());
    put(
        TIMESTAMP,
        &micros_since_epoch(envelope.timestamp).to_string(),
    );
    if envelope.content_type != ContentType::Bytes {
        put(CONTENT_TYPE, envelope.content_type.as_str());
    }
    for (name, value) in [
        (TRACE_ID, &envelope.trace_id),
        (CORRELATION_ID, &envelope.correlation_id),
        (TENANT_ID, &envelope.tenant_id),
    ] {
        if let Some(value) = value {
            put(name, value);
        }
    }
    for (name, value) in &envelope.headers {
        put(name, value);
    }
}

/// Reads an envelope from its headers and body.
///
/// Unknown headers that are not reserved become user headers; unknown reserved ones (such as
/// the broker's own `Nats-Msg-Id`) are ignored.
pub fn decode<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    payload: Bytes,
) -> Result<Envelope, DecodeError> {
    let mut aggregate_id = None;
    let mut event_type = None;
    let mut event_version = None;
    let mut event_id = None;
    let mut timestamp = None;
    let mut content_type = ContentType::Bytes;
    let mut trace_id = None;
    let mut correlation_id = None;
    let mut tenant_id = None;
    let mut user = std::collections::BTreeMap::new();

    for (name, value) in headers {
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        if is(AGGREGATE_ID) {
            aggregate_id = Some(AggregateId::new(value)?);
        } else if is(EVENT_TYPE) {
            event_type = Some(EventType::new(value)?);
        } else if is(EVENT_VERSION) {
            let version = value
                .parse::<u64>()
                .ok()
                .and_then(std::num::NonZeroU64::new)
                .ok_or_else(|| DecodeError::InvalidHeader {
                    name: EVENT_VERSION,
                    value: value.to_owned(),
                    reason: "expected a decimal integer greater than 0".into(),
                })?;
            event_version = Some(version);
        } else if is(EVENT_ID) {
            event_id = Some(EventId::new(value)?);
        } else if is(TIMESTAMP) {
            let micros = value
                .parse::<u64>()
                .map_err(|_| DecodeError::InvalidHeader {
                    name: TIMESTAMP,
                    value: value.to_owned(),
                    reason: "expected microseconds since the unix epoch as a decimal integer"
                        .into(),
                })?;
            timestamp = Some(UNIX_EPOCH + Duration::from_micros(micros));
        } else if is(CONTENT_TYPE) {
            content_type = ContentType::parse(value);
        } else if is(TRACE_ID) {
            trace_id = Some(value.to_owned());
        } else if is(CORRELATION_ID) {
            correlation_id = Some(value.to_owned());
        } else if is(TENANT_ID) {
            tenant_id = Some(value.to_owned());
        } else if !is_reserved(name) {
            user.insert(name.to_owned(), value.to_owned());
        }
    }

    Ok(Envelope {
        aggregate_id: aggregate_id.ok_or(DecodeError::MissingHeader(AGGREGATE_ID))?,
        event_type: event_type.ok_or(DecodeError::MissingHeader(EVENT_TYPE))?,
        event_version: event_version.ok_or(DecodeError::MissingHeader(EVENT_VERSION))?,
        event_id: event_id.ok_or(DecodeError::MissingHeader(EVENT_ID))?,
        timestamp: timestamp.ok_or(DecodeError::MissingHeader(TIMESTAMP))?,
        trace_id,
        correlation_id,
        tenant_id,
        content_type,
        headers: user,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Codec;
    use proptest::prelude::*;

    fn round_trip(env: &Envelope) -> Envelope {
        let mut headers = Vec::new();
        encode_headers(env, |n, v| headers.push((n.to_owned(), v.to_owned())));
        decode(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            env.payload().clone(),
        )
        .unwrap()
    }

    #[test]
    fn missing_required_header_is_named() {
        let err = decode([(EVENT_TYPE, "T")], Bytes::new()).unwrap_err();
        assert_eq!(err, DecodeError::MissingHeader(AGGREGATE_ID));
        assert_eq!(err.to_string(), "header `Bus-Aggregate-Id` is missing");
    }

    #[test]
    fn bad_version_is_named() {
        let err = decode(
            [(AGGREGATE_ID, "a"), (EVENT_TYPE, "T"), (EVENT_VERSION, "0")],
            Bytes::new(),
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("header `Bus-Event-Version` value `0` is invalid"));
    }

    #[test]
    fn broker_headers_are_not_user_headers() {
        let env = Envelope::builder("a", "T", 3).build().unwrap();
        let mut headers = Vec::new();
        encode_headers(&env, |n, v| headers.push((n.to_owned(), v.to_owned())));
        headers.push(("Nats-Msg-Id".into(), "x".into()));
        let back = decode(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            Bytes::new(),
        )
        .unwrap();
        assert!(back.headers().is_empty());
    }

    proptest! {
        #[test]
        fn envelopes_round_trip(
            aggregate in "[A-Za-z0-9:/#_-]{1,64}",
            event_type in "[A-Za-z][A-Za-z0-9._]{0,20}",
            version in 1u64..,
            micros in 0u64..4_000_000_000_000_000,
            trace in proptest::option::of("[ -~]{0,30}"),
            tenant in proptest::option::of("[a-z0-9]{1,10}"),
            user in proptest::collection::btree_map("X-[A-Za-z0-9-]{1,10}", "[ -~]{0,20}", 0..4),
            payload in proptest::collection::vec(any::<u8>(), 0..256),
            json in any::<bool>(),
        ) {
            let mut builder = Envelope::builder(&aggregate, &event_type, version)
                .timestamp(UNIX_EPOCH + Duration::from_micros(micros));
            if let Some(t) = &trace { builder = builder.trace_id(t.clone()); }
            if let Some(t) = &tenant { builder = builder.tenant_id(t.clone()); }
            for (k, v) in &user { builder = builder.header(k.clone(), v.clone()); }
            builder = if json {
                builder.typed_payload(&payload, Codec::Json).unwrap()
            } else {
                builder.payload(payload.clone())
            };
            let env = builder.build().unwrap();
            let back = round_trip(&env);
            prop_assert_eq!(&back, &env);
            if json {
                prop_assert_eq!(back.decode_payload::<Vec<u8>>().unwrap(), payload);
            }
        }

        #[test]
        fn msgpack_payloads_round_trip(values in proptest::collection::vec((any::<i64>(), ".{0,12}"), 0..20)) {
            let env = Envelope::builder("a", "T", 1)
                .typed_payload(&values, Codec::MessagePack).unwrap()
                .build().unwrap();
            let back = round_trip(&env);
            prop_assert_eq!(back.decode_payload::<Vec<(i64, String)>>().unwrap(), values);
        }

        #[test]
        fn decode_never_panics(
            headers in proptest::collection::vec(("Bus-[A-Za-z-]{1,14}|[A-Za-z-]{1,8}", ".{0,20}"), 0..8),
            payload in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let _ = decode(headers.iter().map(|(n, v)| (n.as_str(), v.as_str())), payload.into());
        }
    }
}
