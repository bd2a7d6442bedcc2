//! The wire format: how an [`Envelope`] travels as message headers plus a body.
//!
//! The payload is the message body, untouched. Metadata travels in headers with these names
//! (documented for other languages in `docs/wire-format.md`):
//!
//! | header | value | required |
//! |---|---|---|
//! | `Bus-Event` | `<aggregate ID> <event version> <event type> <timestamp> <event ID>` | yes |
//! | `Bus-Content-Type` | media type of the body | no (default `application/octet-stream`) |
//! | `Bus-Trace-Id`, `Bus-Correlation-Id`, `Bus-Tenant-Id` | text | no |
//!
//! In `Bus-Event` the five fields are separated by single spaces (none of them can contain one):
//! the event version is a decimal integer ≥ 1 and the timestamp is microseconds since the Unix
//! epoch, in decimal. One header instead of five keeps each message small: the broker scans
//! header blocks on every publish and stores them with every message.
//!
//! Every other header is a user header, carried as it is. Header names starting with `Bus-` or
//! `Nats-` are reserved and refused as user headers. Header names are matched without regard to
//! ASCII case when decoding.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::codec::ContentType;
use crate::envelope::Envelope;
use crate::error::{DecodeError, ValidationError};
use crate::names::{AggregateId, AggregateIds, EventId, EventType};

mod batch;
mod compact;
pub use batch::{
    batch_count, decode_batch, encode_record, encode_text_record, header_lines_len, record_len,
    split_batch, Record, RecordSpan, RecordView, BATCH,
};

/// Header carrying the required metadata: aggregate ID, event version, event type, timestamp
/// (microseconds since the Unix epoch) and event ID, separated by single spaces.
pub const EVENT: &str = "Bus-Event";
/// Header carrying the payload's media type.
pub const CONTENT_TYPE: &str = "Bus-Content-Type";
/// Header carrying the trace ID.
pub const TRACE_ID: &str = "Bus-Trace-Id";
/// Header carrying the correlation ID.
pub const CORRELATION_ID: &str = "Bus-Correlation-Id";
/// Header carrying the tenant ID.
pub const TENANT_ID: &str = "Bus-Tenant-Id";
/// Header: the version of the payload's schema, in decimal (at least 1); absent means 1, and it
/// is written only when it is not 1.
pub const SCHEMA: &str = "Bus-Schema";

/// Prefixes of header names that user headers may not use.
pub const RESERVED_PREFIXES: [&str; 2] = ["Bus-", "Nats-"];

fn is_reserved(name: &str) -> bool {
    // Compared as bytes: a name may hold any character, and slicing it as text could cut one.
    RESERVED_PREFIXES.iter().any(|prefix| {
        name.len() >= prefix.len()
            && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    })
}

/// Checks a header value: no CR, LF or other control characters, and no whitespace at either
/// end (NATS clients trim header values, so it would not arrive).
pub(crate) fn check_header_value(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if let Some(bad) = value.chars().find(|c| c.is_control()) {
        return Err(ValidationError::new(
            field,
            value,
            format!("contains control character {bad:?}, which cannot travel in a header"),
        ));
    }
    if value.trim() != value {
        return Err(ValidationError::new(
            field,
            value,
            "starts or ends with whitespace, which is lost in transit (NATS trims header values)",
        ));
    }
    Ok(())
}

/// A decimal number as the wire format writes it: ASCII digits only, no sign, no leading zero
/// (except `0` itself).
fn parse_decimal(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || (bytes.len() > 1 && bytes[0] == b'0') {
        return None;
    }
    if bytes.len() > 19 {
        // Twenty digits may overflow (u64::MAX has twenty): checked digit by digit.
        return bytes.iter().try_fold(0u64, |value, &b| {
            let digit = b.wrapping_sub(b'0');
            (digit <= 9)
                .then_some(value)?
                .checked_mul(10)?
                .checked_add(u64::from(digit))
        });
    }
    // Nineteen digits never overflow. A timestamp in microseconds has sixteen: read eight at a
    // time, the rest one by one.
    let mut value: u64 = 0;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        value = value * 100_000_000 + eight_digits(chunk.try_into().ok()?)?;
    }
    for &b in chunks.remainder() {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value * 10 + u64::from(digit);
    }
    Some(value)
}

/// The number eight ASCII digits write, or `None` if one of them is not a digit: in a few
/// word-wide operations rather than eight rounds of a loop.
fn eight_digits(chunk: [u8; 8]) -> Option<u64> {
    const ZEROS: u64 = u64::from_le_bytes([b'0'; 8]);
    const HIGH: u64 = u64::from_le_bytes([0xF0; 8]);
    const SIXES: u64 = u64::from_le_bytes([0x06; 8]);
    let v = u64::from_le_bytes(chunk);
    // Each byte is 0x30..=0x3F, and adding 6 leaves it below 0x40: 0x30..=0x39.
    if v & HIGH != ZEROS || (v + SIXES) & HIGH != ZEROS {
        return None;
    }
    // Digits d0..d7, the first in the lowest byte. Pairs first (each even byte becomes
    // 10 d(i) + d(i+1)), then the four pairs weighted 10^6, 10^4, 10^2, 1 in the top half.
    let d = v - ZEROS;
    let pairs = d * 10 + (d >> 8);
    const MASK: u64 = 0x0000_00FF_0000_00FF;
    let value = ((pairs & MASK).wrapping_mul(100 + (1_000_000 << 32))
        + ((pairs >> 16) & MASK).wrapping_mul(1 + (10_000 << 32)))
        >> 32;
    Some(value)
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

/// `time` in whole microseconds since the Unix epoch, as the wire carries it; refused before
/// the epoch or past what 64 bits of microseconds hold.
pub(crate) fn wire_micros(time: SystemTime) -> Result<u64, ValidationError> {
    micros_since_epoch(time.duration_since(UNIX_EPOCH))
}

/// [`wire_micros`] of a time already measured from the Unix epoch (`Err` before it).
pub(crate) fn micros_since_epoch(
    since: Result<std::time::Duration, std::time::SystemTimeError>,
) -> Result<u64, ValidationError> {
    let since = since.map_err(|e| {
        ValidationError::new(
            "timestamp",
            format!("{:?} before the Unix epoch", e.duration()),
            "must not be before 1970-01-01T00:00:00Z (the wire carries microseconds since then)",
        )
    })?;
    u64::try_from(since.as_micros()).map_err(|_| {
        ValidationError::new(
            "timestamp",
            format!("{since:?} after the Unix epoch"),
            "does not fit in 64 bits of microseconds",
        )
    })
}

/// The partition of a topic with `partitions` partitions that an aggregate's events go to:
/// FNV-1a (32 bits) of the aggregate ID's bytes, modulo `partitions`.
///
/// It is the function of nats-server's `partition(n, ...)` subject mapping, so a stream
/// transform `{{partition(n,1)}}` over a subject whose token 1 is the aggregate ID puts events in
/// the same partition (for IDs without a `.`); other languages reproduce it in a few lines.
/// `partitions` of 0 or 1 means no partitioning: always 0.
///
/// ```
/// assert_eq!(bus_core::wire::partition_of("account-42", 8), 5);
/// assert_eq!(bus_core::wire::partition_of("anything", 1), 0);
/// ```
pub fn partition_of(aggregate_id: &str, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    let hash = aggregate_id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash % partitions
}

/// Calls `put(name, value)` for every header of `envelope`, required ones first.
pub fn encode_headers(envelope: &Envelope, mut put: impl FnMut(&str, &str)) {
    let mut event = String::with_capacity(event_value_len(envelope));
    push_event_value(envelope, |part| event.push_str(part));
    put(EVENT, &event);
    encode_other_headers(envelope, put);
}

/// The `Bus-Event` value, `<aggregate ID> <event version> <event type> <timestamp> <event ID>`,
/// handed over in parts: decimals written with `itoa`, no intermediate string.
fn push_event_value(envelope: &Envelope, mut push: impl FnMut(&str)) {
    let mut number = itoa::Buffer::new();
    push(envelope.aggregate_id.as_str());
    push(" ");
    push(number.format(envelope.event_version.get()));
    push(" ");
    push(envelope.event_type.as_str());
    push(" ");
    push(number.format(envelope.timestamp_micros));
    push(" ");
    push(envelope.event_id.as_str());
}

/// The length of the `Bus-Event` value.
fn event_value_len(envelope: &Envelope) -> usize {
    envelope.aggregate_id.as_str().len()
        + digits(envelope.event_version.get())
        + envelope.event_type.as_str().len()
        + digits(envelope.timestamp_micros)
        + envelope.event_id.as_str().len()
        + 4
}

/// Every header of `envelope` but `Bus-Event`.
fn encode_other_headers(envelope: &Envelope, mut put: impl FnMut(&str, &str)) {
    if envelope.content_type != ContentType::Bytes {
        put(CONTENT_TYPE, envelope.content_type.as_str());
    }
    if envelope.schema_version.get() != 1 {
        put(
            SCHEMA,
            itoa::Buffer::new().format(envelope.schema_version.get()),
        );
    }
    let Some(context) = envelope.context.as_deref() else {
        return;
    };
    for (name, value) in [
        (TRACE_ID, &context.trace_id),
        (CORRELATION_ID, &context.correlation_id),
        (TENANT_ID, &context.tenant_id),
    ] {
        if let Some(value) = value {
            put(name, value);
        }
    }
    for (name, value) in &context.headers {
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
    decode_from(None, headers, payload)
}

/// The five fields of a `Bus-Event` value.
struct EventFields {
    aggregate_id: AggregateId,
    event_version: std::num::NonZeroU64,
    event_type: EventType,
    micros: u64,
    event_id: EventId,
}

/// Reads a `Bus-Event` value, naming what is wrong with it.
fn event_fields(value: &str) -> Result<EventFields, DecodeError> {
    let invalid = |reason: &str| DecodeError::InvalidHeader {
        name: EVENT,
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let mut fields = split_byte(value, b' ');
    let (Some(aggregate), Some(version), Some(kind), Some(micros), Some(id), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(invalid(
            "expected `<aggregate ID> <event version> <event type> <timestamp> <event ID>` separated by single spaces",
        ));
    };
    Ok(EventFields {
        aggregate_id: AggregateId::new(aggregate)?,
        event_version: parse_decimal(version)
            .and_then(std::num::NonZeroU64::new)
            .ok_or_else(|| invalid("the event version must be a decimal integer greater than 0"))?,
        event_type: EventType::new(kind)?,
        micros: parse_decimal(micros).ok_or_else(|| {
            invalid("the timestamp must be microseconds since the Unix epoch, in decimal")
        })?,
        event_id: EventId::new(id)?,
    })
}

/// [`event_fields`] of a well-formed value, reading it once: the version and the timestamp
/// (short runs of digits) are delimited by a plain loop, the two names by `memchr`. `None` for
/// anything else, which [`event_fields`] then reads again to name what is wrong; so both accept
/// exactly the same values.
fn event_fields_fast(value: &str, ids: Option<&mut AggregateIds>) -> Option<EventFields> {
    let bytes = value.as_bytes();
    let space_after = |at: usize| bytes[at..].iter().position(|&b| b == b' ').map(|n| at + n);
    let aggregate = memchr::memchr(b' ', bytes)?;
    let version = space_after(aggregate + 1)?;
    let kind = version + 1 + memchr::memchr(b' ', &bytes[version + 1..])?;
    let micros = space_after(kind + 1)?;
    let mut ids = ids;
    Some(EventFields {
        aggregate_id: match ids.as_deref_mut() {
            Some(ids) => ids.get(&value[..aggregate]),
            None => AggregateId::new(&value[..aggregate]),
        }
        .ok()?,
        event_version: parse_decimal(&value[aggregate + 1..version])
            .and_then(std::num::NonZeroU64::new)?,
        event_type: match ids {
            Some(ids) => ids.event_type(&value[version + 1..kind]),
            None => EventType::new(&value[version + 1..kind]),
        }
        .ok()?,
        micros: parse_decimal(&value[kind + 1..micros])?,
        event_id: EventId::new(&value[micros + 1..]).ok()?,
    })
}

/// [`decode`], with the `Bus-Event` header already read when `event` is given (then `headers`
/// are the others).
fn decode_from<'a>(
    event: Option<EventFields>,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    payload: Bytes,
) -> Result<Envelope, DecodeError> {
    let mut event = event;
    let mut content_type = ContentType::Bytes;
    let mut trace_id = None;
    let mut correlation_id = None;
    let mut tenant_id = None;
    let mut schema_version = std::num::NonZeroU32::MIN;
    let mut user = std::collections::BTreeMap::new();

    // The bus's own headers may appear once each: two `Bus-Event` headers would leave it
    // ambiguous which event this is.
    const OWN: [&str; 6] = [
        EVENT,
        CONTENT_TYPE,
        TRACE_ID,
        CORRELATION_ID,
        TENANT_ID,
        SCHEMA,
    ];
    let mut seen = [false; OWN.len()];
    // `Bus-Event`, read already on the fast path, may not appear again.
    seen[0] = event.is_some();
    for (name, value) in headers {
        let own = OWN
            .iter()
            .position(|known| name.eq_ignore_ascii_case(known));
        if let Some(i) = own {
            if std::mem::replace(&mut seen[i], true) {
                return Err(DecodeError::InvalidHeader {
                    name: OWN[i],
                    value: value.to_owned(),
                    reason: "the header appears more than once".to_owned(),
                });
            }
        }
        let is = |known: &str| own.is_some_and(|i| OWN[i] == known);
        if is(EVENT) {
            event = Some(event_fields(value)?);
        } else if is(CONTENT_TYPE) {
            content_type = ContentType::parse(value);
        } else if is(TRACE_ID) {
            trace_id = Some(value.to_owned());
        } else if is(CORRELATION_ID) {
            correlation_id = Some(value.to_owned());
        } else if is(TENANT_ID) {
            tenant_id = Some(value.to_owned());
        } else if is(SCHEMA) {
            schema_version = parse_decimal(value)
                .and_then(|v| u32::try_from(v).ok())
                .and_then(std::num::NonZeroU32::new)
                .ok_or_else(|| DecodeError::InvalidHeader {
                    name: SCHEMA,
                    value: value.to_owned(),
                    reason: "the schema version must be a decimal integer from 1 to 4294967295"
                        .to_owned(),
                })?;
        } else if own.is_none() && !is_reserved(name) {
            user.insert(name.to_owned(), value.to_owned());
        }
    }

    let Some(EventFields {
        aggregate_id,
        event_version,
        event_type,
        micros,
        event_id,
    }) = event
    else {
        return Err(DecodeError::MissingHeader(EVENT));
    };
    Ok(Envelope {
        aggregate_id,
        event_type,
        event_version,
        event_id,
        timestamp_micros: micros,
        schema_version,
        content_type,
        // Most events carry none of these: no context is built (and dropped) for them.
        context: if trace_id.is_none()
            && correlation_id.is_none()
            && tenant_id.is_none()
            && user.is_empty()
        {
            None
        } else {
            crate::envelope::Context {
                trace_id,
                correlation_id,
                tenant_id,
                headers: user,
            }
            .boxed()
        },
        payload,
    })
}

/// The `name: value` pairs of a header block checked to be made of such lines (a
/// [`RecordView::header_block`], say), in order.
pub fn header_pairs(block: &str) -> impl Iterator<Item = (&str, &str)> {
    lines(block).map(|line| {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        (name, value.trim_start_matches(' '))
    })
}

/// The non-empty lines of a header block, each ended by CR LF (a last line without one is
/// returned too). Splits on `\n` bytes rather than searching for the two-byte pattern: this
/// runs for every event of every batch.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    split_byte(text, b'\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty())
}

/// `text` split at each `sep`, an ASCII byte, like `str::split` with that character, found
/// with `memchr`. A plain byte loop (`position`) was measured slower here: the `Bus-Event`
/// line is about 90 bytes, and a loop that looks at one byte at a time costs more than the
/// vectorised search's set-up (callgrind, 50 000 events: 722 M -> 747 M instructions).
fn split_byte(text: &str, sep: u8) -> impl Iterator<Item = &str> {
    debug_assert!(sep.is_ascii());
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match memchr::memchr(sep, current.as_bytes()) {
            // An ASCII byte is a character boundary on both sides.
            Some(at) => {
                rest = Some(&current[at + 1..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// The first line of a header block that is not `Name: value` ended by CR LF (every line, if
/// one ends with a bare LF). The rule [`well_formed_block`] checks fast.
fn ill_formed_line(text: &str) -> Option<&str> {
    let bare_lf = text.split('\n').rev().skip(1).any(|l| !l.ends_with('\r'));
    lines(text).find(|l| bare_lf || l.contains('\r') || !l.contains(':'))
}

/// Whether a record's header block is only `Name: value` lines, each ended by CR LF (empty
/// lines allowed): one pass over its bytes. What it refuses is looked at again, slowly, to
/// name the line at fault.
fn well_formed_block(block: &[u8]) -> bool {
    let mut rest = block;
    while !rest.is_empty() {
        // Each line ends at its first CR or LF, which must be a CR followed by an LF.
        let Some(end) = memchr::memchr2(b'\r', b'\n', rest) else {
            return false;
        };
        if rest[end] != b'\r' || rest.get(end + 1) != Some(&b'\n') {
            return false;
        }
        // The colon ends a header's name, a few bytes in: a plain loop finds it sooner than
        // `contains` sets up its word-at-a-time search (callgrind, 50 000 events: 622.1 M
        // with `contains`, 618.7 M with the loop).
        let line = &rest[..end];
        // Most lines are the `Bus-Event` line this library writes first: its name is compared
        // whole, ten bytes at once, rather than looked through for the colon byte by byte.
        #[allow(clippy::manual_contains)]
        let has_colon = line.starts_with(b"Bus-Event:") || line.iter().any(|&b| b == b':');
        if !(line.is_empty() || has_colon) {
            return false;
        }
        rest = &rest[end + 2..];
    }
    true
}
fn malformed(why: impl Into<String>) -> DecodeError {
    DecodeError::MalformedBatch(why.into())
}

/// Decimal digits of `n`.
fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Codec;
    use proptest::prelude::*;
    use std::time::Duration;

    /// The trip through NATS: the headers written as a header block (`name: value` lines) and
    /// read back as the client library reads them, values trimmed.
    fn through_nats(env: &Envelope) -> Envelope {
        let mut block = String::from("NATS/1.0\r\n");
        encode_headers(env, |n, v| block.push_str(&format!("{n}: {v}\r\n")));
        block.push_str("\r\n");
        let read: Vec<(String, String)> = block
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').expect("every line has a colon");
                (n.to_owned(), v.trim().to_owned())
            })
            .collect();
        decode(
            read.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            env.payload().clone(),
        )
        .unwrap()
    }

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
    fn the_schema_version_travels_when_it_is_not_1() {
        let plain = Envelope::builder("a", "T", 1).build().unwrap();
        assert_eq!(plain.schema_version(), 1);
        let mut names = Vec::new();
        encode_headers(&plain, |n, _| names.push(n.to_owned()));
        assert!(!names.iter().any(|n| n == SCHEMA), "{names:?}");

        let third = Envelope::builder("a", "T", 1)
            .schema_version(3)
            .build()
            .unwrap();
        let mut headers = Vec::new();
        encode_headers(&third, |n, v| headers.push((n.to_owned(), v.to_owned())));
        assert!(
            headers.contains(&(SCHEMA.to_owned(), "3".to_owned())),
            "{headers:?}"
        );
        assert_eq!(through_nats(&third).schema_version(), 3);
        let mut body = Vec::new();
        encode_record(&third, &mut body);
        assert_eq!(body.len(), record_len(&third));

        let good = "a 7 T 1700000000000000 id-1";
        for bad in ["0", "-1", "+2", "02", "x", "4294967296"] {
            let err = decode([(EVENT, good), (SCHEMA, bad)], Bytes::new()).unwrap_err();
            assert!(
                matches!(err, DecodeError::InvalidHeader { name: SCHEMA, .. }),
                "`{bad}`: {err}"
            );
        }
        let twice =
            decode([(EVENT, good), (SCHEMA, "2"), (SCHEMA, "2")], Bytes::new()).unwrap_err();
        assert!(twice.to_string().contains("more than once"), "{twice}");
        let zero = Envelope::builder("a", "T", 1)
            .schema_version(0)
            .build()
            .unwrap_err();
        assert_eq!(zero.field(), "schema_version");
    }

    #[test]
    fn the_wire_is_strict() {
        let good = "a 7 T 1700000000000000 id-1";
        assert!(decode([(EVENT, good)], Bytes::new()).is_ok());
        for bad in [
            "a +7 T 1700000000000000 id-1",
            "a 007 T 1700000000000000 id-1",
            "a 7 T +1700000000000000 id-1",
            "a 7 T 01 id-1",
            "a 7 T -1 id-1",
        ] {
            assert!(
                decode([(EVENT, bad)], Bytes::new()).is_err(),
                "`{bad}` must be refused"
            );
        }
        let twice = decode([(EVENT, good), (EVENT, "b 1 T 1 id-2")], Bytes::new()).unwrap_err();
        assert!(twice.to_string().contains("more than once"), "{twice}");
        let before_1970 = Envelope::builder("a", "T", 1)
            .timestamp(UNIX_EPOCH - Duration::from_secs(1))
            .build()
            .unwrap_err();
        assert_eq!(before_1970.field(), "timestamp");
        for spaced in [" x", "x ", "\tx"] {
            let err = Envelope::builder("a", "T", 1)
                .trace_id(spaced)
                .build()
                .unwrap_err();
            assert_eq!(err.field(), "trace_id", "{err}");
        }
        let nanos = Envelope::builder("a", "T", 1)
            .timestamp(UNIX_EPOCH + Duration::from_nanos(1_234_567))
            .build()
            .unwrap();
        assert_eq!(nanos.timestamp(), UNIX_EPOCH + Duration::from_micros(1_234));
    }

    #[test]
    fn refused_values_cannot_forge_log_lines() {
        let err = Envelope::builder("a", "T", 1)
            .trace_id("x\r\nFAKE log line\0")
            .build()
            .unwrap_err();
        let shown = err.to_string();
        assert!(
            !shown.contains('\n') && !shown.contains('\r') && !shown.contains('\0'),
            "{shown}"
        );
        assert!(shown.contains(r"x\r\nFAKE log line\u{0}"), "{shown}");
    }

    #[test]
    fn missing_required_header_is_named() {
        let err = decode([(CONTENT_TYPE, "application/json")], Bytes::new()).unwrap_err();
        assert_eq!(err, DecodeError::MissingHeader(EVENT));
        assert_eq!(err.to_string(), "header `Bus-Event` is missing");
    }

    #[test]
    fn bad_fields_are_named() {
        let err = decode([(EVENT, "a 0 T 1 id")], Bytes::new()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("header `Bus-Event` value `a 0 T 1 id` is invalid"),
            "{text}"
        );
        assert!(text.contains("event version"), "{text}");
        for short in ["", "a 1 T 1", "a 1 T 1 id extra", "a  1 T 1 id"] {
            assert!(
                matches!(
                    decode([(EVENT, short)], Bytes::new()),
                    Err(DecodeError::InvalidHeader { .. }) | Err(DecodeError::Invalid(_))
                ),
                "`{short}` must be refused"
            );
        }
        let err = decode([(EVENT, "a 1 T soon id")], Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("timestamp"), "{err}");
    }

    #[test]
    fn one_header_carries_the_required_fields() {
        let env = Envelope::builder("acc-1", "Opened", 7).build().unwrap();
        let mut headers = Vec::new();
        encode_headers(&env, |n, v| headers.push((n.to_owned(), v.to_owned())));
        assert_eq!(headers.len(), 1, "{headers:?}");
        let (name, value) = &headers[0];
        assert_eq!(name, EVENT);
        let fields: Vec<&str> = value.split(' ').collect();
        assert_eq!(fields[0], "acc-1");
        assert_eq!(fields[1], "7");
        assert_eq!(fields[2], "Opened");
        assert_eq!(fields[4], env.event_id().as_str());
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

    fn batch_of(envelopes: &[Envelope]) -> Bytes {
        let mut body = Vec::new();
        for e in envelopes {
            let before = body.len();
            encode_record(e, &mut body);
            assert_eq!(body.len() - before, record_len(e));
        }
        Bytes::from(body)
    }

    /// A batch with text heads, as versions before compact heads wrote it.
    fn text_batch_of(envelopes: &[Envelope]) -> Bytes {
        let mut body = Vec::new();
        for e in envelopes {
            let before = body.len();
            encode_text_record(e, &mut body);
            assert_eq!(
                body.len() - before,
                8 + header_lines_len(e) + e.payload().len()
            );
        }
        Bytes::from(body)
    }

    #[test]
    fn a_span_reads_only_the_body_it_was_split_from() {
        let envelopes: Vec<Envelope> = (1..=2)
            .map(|v| {
                Envelope::builder("a-1", "T", v)
                    .payload(vec![7; 10])
                    .build()
                    .unwrap()
            })
            .collect();
        let body = batch_of(&envelopes);
        let (spans, _) = split_batch("2", &body, |_| ()).unwrap();
        let second = spans[1].record(&body).unwrap();
        assert_eq!(second.decode().unwrap(), envelopes[1]);
        assert_eq!(spans[1].payload(&body), envelopes[1].payload());
        // A shorter body, and one whose bytes there are not UTF-8.
        assert_eq!(spans[1].record(&body.slice(..body.len() - 1)), None);
        let mut other = body.to_vec();
        other[spans[1].headers.0 as usize] = 0xFF;
        assert_eq!(spans[1].record(&Bytes::from(other)), None);
    }

    #[test]
    fn a_span_decodes_as_its_view_does_whatever_the_body() {
        let e = Envelope::builder("a-1", "T", 2)
            .event_id("e-2")
            .payload(vec![7; 10])
            .build()
            .unwrap();
        let body = text_batch_of(&[e.clone(), e.clone()]);
        let (spans, _) = split_batch("2", &body, |_| ()).unwrap();
        let mut ids = AggregateIds::new(4);
        let decoded = |body: &Bytes, ids: &mut AggregateIds| {
            spans[1]
                .decode_with(body, ids)
                .map(|r| r.map_err(|e| e.to_string()))
        };
        let viewed = |body: &Bytes, ids: &mut AggregateIds| {
            spans[1]
                .view(body)
                .map(|v| v.decode_with(ids).map_err(|e| e.to_string()))
        };
        assert_eq!(decoded(&body, &mut ids), Some(Ok(e.clone())));
        assert_eq!(decoded(&body.slice(..body.len() - 1), &mut ids), None);
        // The same span over bodies whose bytes there differ: a line end inside the event's
        // ID (the block is no longer one well-formed line), bytes that are not UTF-8, a
        // version that is not one, a line without its LF.
        let block = spans[1].headers.0 as usize;
        let line = &body[block..spans[1].headers.1 as usize];
        let at = |text: &[u8]| block + line.windows(text.len()).position(|w| w == text).unwrap();
        for (what, spoiled) in [
            ("CR in the ID", vec![(at(b"e-2") + 1, b'\r')]),
            ("LF in the ID", vec![(at(b"e-2") + 1, b'\n')]),
            (
                "CR LF in the ID",
                vec![(at(b"e-2"), b'\r'), (at(b"e-2") + 1, b'\n')],
            ),
            ("not UTF-8", vec![(at(b"a-1"), 0xFF)]),
            ("not a version", vec![(at(b" 2 ") + 1, b'x')]),
            ("no LF", vec![(spans[1].headers.1 as usize - 1, b'x')]),
        ] {
            let mut other = body.to_vec();
            for (i, b) in spoiled {
                other[i] = b;
            }
            let other = Bytes::from(other);
            assert_eq!(
                decoded(&other, &mut ids),
                viewed(&other, &mut ids),
                "{what}"
            );
            assert!(
                !matches!(decoded(&other, &mut ids), Some(Ok(_))),
                "{what}: {:?}",
                decoded(&other, &mut ids)
            );
        }
    }

    #[test]
    fn a_batch_is_its_records_in_order() {
        let envelopes: Vec<Envelope> = (1..=3)
            .map(|v| {
                Envelope::builder("account-42", "Deposited", v)
                    .timestamp(UNIX_EPOCH + Duration::from_micros(1_763_942_400_000_000))
                    .event_id(format!("e{v}"))
                    .trace_id("t-1")
                    .payload(vec![v as u8; v as usize])
                    .build()
                    .unwrap()
            })
            .collect();
        let body = batch_of(&envelopes);
        let records = decode_batch("3", &body).unwrap();
        let back: Vec<Envelope> = records.iter().map(|r| r.decode().unwrap()).collect();
        assert_eq!(back, envelopes);
        // The documented example: the first record's bytes, with its compact head.
        let first = &body[..4 + 53 + 4 + 1];
        assert_eq!(&first[..4], &53u32.to_be_bytes());
        let mut head = vec![0, 10, 9, 2];
        head.extend_from_slice(b"account-42Depositede1");
        head.extend_from_slice(&[1, 0x00, 0x06, 0x44, 0x4b, 0xd8, 0x28, 0x00, 0x00]);
        head.extend_from_slice(b"Bus-Trace-Id: t-1\r\n");
        assert_eq!(&first[4..57], &head[..]);
        assert_eq!(&first[57..61], &1u32.to_be_bytes());
        assert_eq!(first[61], 1);
        // Its header block as text: the line its compact head stands for.
        assert_eq!(
            &records[0].header_block()[..],
            b"Bus-Event: account-42 1 Deposited 1763942400000000 e1\r\nBus-Trace-Id: t-1\r\n"
        );
        // Record payloads share the body's memory.
        assert_eq!(
            records[2].payload().as_ptr(),
            body[body.len() - 3..].as_ptr()
        );
        let body = text_batch_of(&envelopes);
        let records = decode_batch("3", &body).unwrap();
        let back: Vec<Envelope> = records.iter().map(|r| r.decode().unwrap()).collect();
        assert_eq!(back, envelopes);
        // A header block that is UTF-8 but not ASCII reads back as it was written.
        let accented = Envelope::builder("account-42", "Deposited", 4)
            .header("X-Branch", "Zürich, 東京")
            .build()
            .unwrap();
        let pair = [envelopes[0].clone(), accented];
        let mixed = decode_batch("2", &text_batch_of(&pair)).unwrap();
        assert!(!mixed[1].header_block().is_ascii());
        assert_eq!(mixed[1].decode().unwrap(), pair[1]);
        // The same record with a text head, as versions before compact heads wrote it.
        let first = &body[..4 + 74 + 4 + 1];
        assert_eq!(&first[..4], &74u32.to_be_bytes());
        assert_eq!(
            std::str::from_utf8(&first[4..78]).unwrap(),
            "Bus-Event: account-42 1 Deposited 1763942400000000 e1\r\nBus-Trace-Id: t-1\r\n"
        );
        assert_eq!(&first[78..82], &1u32.to_be_bytes());
        assert_eq!(first[82], 1);
        // Record payloads share the body's memory.
        assert_eq!(
            records[2].payload().as_ptr(),
            body[body.len() - 3..].as_ptr()
        );
    }

    #[test]
    fn compact_heads_that_do_not_read_are_refused_saying_why() {
        let e = Envelope::builder("a-1", "T", 2)
            .event_id("e-2")
            .payload(vec![7; 3])
            .build()
            .unwrap();
        let good = batch_of(&[e.clone(), e.clone()]);
        let (spans, _) = split_batch("2", &good, |_| ()).unwrap();
        let head = spans[1].headers.0 as usize;
        let len = spans[1].headers.1 as usize - head;
        // The second record's head: 0, the lengths 3 1 3, "a-1" "T" "e-2", 2, 8 bytes of time.
        assert_eq!(len, 1 + 3 + 7 + 1 + 8);
        let spoiled = |at: usize, b: u8| {
            let mut body = good.to_vec();
            body[head + at] = b;
            Bytes::from(body)
        };
        for (what, body, expected) in [
            (
                "a name longer than the block",
                spoiled(1, 100),
                "names are 100 + 1 + 3 bytes, more than the block holds",
            ),
            ("an empty name", spoiled(2, 0), "its event type is empty"),
            (
                "a space in a name",
                spoiled(5, b' '),
                "names are not printable ASCII",
            ),
            (
                "a byte that is not ASCII",
                spoiled(4, 0xC3),
                "names are not printable ASCII",
            ),
            (
                "an ID running past the block",
                spoiled(3, 40),
                "3 + 1 + 40 bytes, more than the block holds",
            ),
        ] {
            let refused = decode_batch("2", &body).unwrap_err().to_string();
            assert!(
                refused.contains("record 1: its compact head does not read")
                    && refused.contains(expected),
                "{what}: {refused}"
            );
            assert_eq!(spans[1].view(&body).map(|_| ()), None, "{what}");
            assert!(
                spans[1]
                    .decode_with(&body, &mut AggregateIds::new(4))
                    .is_none(),
                "{what}"
            );
        }
        // Lines after the head must be header lines; a varint may not run past 64 bits.
        let mut head_only = vec![0, 1, 1, 1, b'a', b'T', b'e', 1];
        head_only.extend_from_slice(&[0; 8]);
        let record = |block: &[u8]| {
            let mut body = Vec::new();
            for _ in 0..2 {
                body.extend_from_slice(&(block.len() as u32).to_be_bytes());
                body.extend_from_slice(block);
                body.extend_from_slice(&0u32.to_be_bytes());
            }
            Bytes::from(body)
        };
        assert_eq!(
            decode_batch("2", &record(&head_only)).unwrap()[0]
                .decode()
                .unwrap()
                .aggregate_id()
                .as_str(),
            "a"
        );
        for (what, block, expected) in [
            (
                "a line without CR LF",
                [&head_only[..], b"X-A: 1"].concat(),
                "not `Name: value`",
            ),
            (
                "a line without a colon",
                [&head_only[..], b"X-A 1\r\n"].concat(),
                "not `Name: value`",
            ),
            (
                "lines not UTF-8",
                [&head_only[..], b"X-A: \xFF\r\n"].concat(),
                "not UTF-8",
            ),
            (
                "a version past 64 bits",
                [&head_only[..7], &[0xFF; 10], &[1]].concat(),
                "longer than a 64-bit varint",
            ),
            (
                "no timestamp",
                [&head_only[..8], &[0, 0]].concat(),
                "ends in the timestamp",
            ),
            (
                "an empty event ID",
                [&[0, 1, 1, 0, b'a', b'T'][..], &head_only[7..]].concat(),
                "its event ID is empty",
            ),
        ] {
            let refused = decode_batch("2", &record(&block)).unwrap_err().to_string();
            assert!(refused.contains(expected), "{what}: {refused}");
        }
        // A head that reads but whose fields an envelope refuses: its record alone is refused.
        let mut zero = head_only.clone();
        zero[7] = 0;
        let records = decode_batch("2", &record(&zero)).unwrap();
        let refused = records[0].decode().unwrap_err().to_string();
        assert!(refused.contains("the event version must be"), "{refused}");
        let viewed = split_batch("2", &record(&zero), |view| {
            view.decode().unwrap_err().to_string()
        })
        .unwrap()
        .1;
        assert!(
            viewed[0].contains("the event version must be greater than 0"),
            "{viewed:?}"
        );
        assert!(
            std::str::from_utf8(records[0].header_block())
                .unwrap()
                .starts_with("Bus-Event: a 0 T 0 e\r\n"),
            "{:?}",
            records[0].header_block()
        );
    }

    #[test]
    fn compact_heads_with_the_longest_names_and_largest_numbers_round_trip() {
        for (aggregate, kind, id, version) in [
            ("a".repeat(256), "T".repeat(256), "e".repeat(256), u64::MAX),
            ("a".repeat(127), "T".repeat(128), "e".to_owned(), 16_383),
            ("a".to_owned(), "T".repeat(127), "e".repeat(200), 16_384),
        ] {
            let e = Envelope::builder(&aggregate, &kind, version)
                .event_id(id)
                .timestamp(UNIX_EPOCH + Duration::from_micros(u64::MAX / 2))
                .payload(vec![1; 3])
                .build()
                .unwrap();
            let body = batch_of(&[e.clone(), e.clone()]);
            let records = decode_batch("2", &body).unwrap();
            assert_eq!(records[1].decode().unwrap(), e);
            let (spans, routed) = split_batch("2", &body, |view| {
                view.aggregate_id_str().map(str::to_owned)
            })
            .unwrap();
            assert_eq!(routed[0].as_deref(), Some(aggregate.as_str()));
            let mut ids = AggregateIds::new(4);
            assert_eq!(spans[0].decode_with(&body, &mut ids).unwrap().unwrap(), e);
        }
    }

    #[test]
    fn a_compact_head_takes_about_three_quarters_of_the_bytes_of_the_line() {
        // The benchmark's events: a 7-byte aggregate ID, a 10-byte event type, a version past
        // 127, the default event ID (a UUID).
        let e = Envelope::builder("t0-a123", "BenchEvent", 1_000)
            .payload(vec![0; 128])
            .build()
            .unwrap();
        let head = 1 + 3 + 7 + 10 + 36 + 2 + 8;
        assert_eq!(record_len(&e), 4 + head + 4 + 128);
        let line = "Bus-Event: t0-a123 1000 BenchEvent 1763942400000000 \r\n".len() + 36;
        assert_eq!(header_lines_len(&e), line);
        assert_eq!((head, line), (67, 90));
    }

    #[test]
    fn malformed_batches_are_refused_saying_why() {
        let e = Envelope::builder("a", "T", 1).build().unwrap();
        let two = batch_of(&[e.clone(), e.clone()]);
        for (count, body, expected) in [
            ("1", two.clone(), "at least 2"),
            ("02", two.clone(), "at least 2"),
            ("x", two.clone(), "at least 2"),
            ("3", two.clone(), "ends before"),
            (
                "2",
                two.slice(..two.len() - 1),
                "ends before the length of its payload",
            ),
            ("2", two.slice(..two.len() - 6), "only"),
            (
                "2",
                Bytes::from([&two[..], b"!"].concat()),
                "follow the last",
            ),
            ("1000000", two.clone(), "announced"),
        ] {
            let err = decode_batch(count, &body).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{count}: `{err}` should say `{expected}`"
            );
        }
        // A header block that is not `Name: value` lines.
        let mut bad = Vec::new();
        for block in [
            &b"Bus-Event a 1 T 1 x\r\n"[..],
            &b"\xff\xfe: x\r\n"[..],
            &b"A: b"[..],
        ] {
            bad.clear();
            for _ in 0..2 {
                bad.extend_from_slice(&(block.len() as u32).to_be_bytes());
                bad.extend_from_slice(block);
                bad.extend_from_slice(&0u32.to_be_bytes());
            }
            let err = decode_batch("2", &Bytes::from(bad.clone())).unwrap_err();
            assert!(matches!(err, DecodeError::MalformedBatch(_)), "{err}");
            if block.starts_with(b"\xff") {
                assert!(err.to_string().contains("is not UTF-8"), "{err}");
            }
        }
        // A well-formed batch whose record is not an envelope: the batch reads, the record
        // does not decode.
        let mut body = Vec::new();
        encode_record(&e, &mut body);
        let block = b"X-Other: 1\r\n";
        body.extend_from_slice(&(block.len() as u32).to_be_bytes());
        body.extend_from_slice(block);
        body.extend_from_slice(&0u32.to_be_bytes());
        let records = decode_batch("2", &Bytes::from(body)).unwrap();
        assert!(records[0].decode().is_ok());
        assert_eq!(
            records[1].decode().unwrap_err(),
            DecodeError::MissingHeader(EVENT)
        );
    }

    #[test]
    fn decimals_at_the_edges() {
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(
            parse_decimal("9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(parse_decimal("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_decimal("18446744073709551616"), None);
        assert_eq!(parse_decimal("99999999999999999999"), None);
        for refused in ["", "01", "+1", "-1", " 1", "1 ", "1a"] {
            assert_eq!(parse_decimal(refused), None, "{refused:?}");
        }
    }

    proptest! {
        #[test]
        fn the_fast_block_check_accepts_nothing_the_slow_one_refuses(
            lines in proptest::collection::vec("[a-z:\r\n ]{0,6}", 0..5),
            crlf in proptest::collection::vec(any::<bool>(), 5),
        ) {
            let mut block = String::new();
            for (line, crlf) in lines.iter().zip(&crlf) {
                block.push_str(line);
                block.push_str(if *crlf { "\r\n" } else { "\n" });
            }
            // What the fast check accepts, the slow one does (what it refuses, the slow one
            // looks at again: an empty line ended by a bare LF is accepted there).
            if (block.is_empty() || block.ends_with("\r\n")) && well_formed_block(block.as_bytes()) {
                prop_assert_eq!(ill_formed_line(&block), None, "{:?}", block);
            }
        }

        /// The memchr line check says what a byte-by-byte reading of the block says.
        #[test]
        fn the_block_check_reads_lines_as_a_bytewise_pass_does(block in "[a:\r\n]{0,16}") {
            fn bytewise(block: &[u8]) -> bool {
                let (mut cr, mut colon, mut empty) = (false, false, true);
                for &b in block {
                    if b == b'\n' {
                        if !cr || !(empty || colon) {
                            return false;
                        }
                        (cr, colon, empty) = (false, false, true);
                        continue;
                    }
                    if cr {
                        return false;
                    }
                    match b {
                        b'\r' => cr = true,
                        b':' => (colon, empty) = (true, false),
                        _ => empty = false,
                    }
                }
                !cr && empty
            }
            prop_assert_eq!(well_formed_block(block.as_bytes()), bytewise(block.as_bytes()), "{:?}", block);
        }

        /// A decimal is read as the wire writes it: digits only, no leading zero, within u64.
        #[test]
        fn decimals_read_eight_digits_at_a_time_as_one_by_one(text in "[/0-9:]{0,21}") {
            // '/' and ':' are the bytes either side of the digits.
            let reference = (!text.is_empty()
                && (text.len() == 1 || !text.starts_with('0'))
                && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse::<u64>().ok())
            .flatten();
            prop_assert_eq!(parse_decimal(&text), reference, "{:?}", text);
        }

        #[test]
        fn decimals_are_digits_without_a_leading_zero(text in "[0-9+ -]{0,22}") {
            let reference = (!text.is_empty()
                && text.bytes().all(|b| b.is_ascii_digit())
                && !(text.len() > 1 && text.starts_with('0')))
            .then(|| text.parse::<u64>().ok())
            .flatten();
            prop_assert_eq!(parse_decimal(&text), reference, "{:?}", text);
        }

        #[test]
        fn split_byte_splits_like_str_split(text in "[a b]{0,12}") {
            prop_assert_eq!(
                split_byte(&text, b' ').collect::<Vec<_>>(),
                text.split(' ').collect::<Vec<_>>()
            );
        }


        /// Any list of envelopes the builder accepts comes back from a batch equal and in order,
        /// whichever records have compact heads and whichever text heads.
        #[test]
        fn batches_round_trip(
            events in proptest::collection::vec(("[A-Za-z0-9:_-]{1,12}", 1u64..u64::MAX, proptest::option::of("[a-z]{1,8}"), proptest::collection::vec(any::<u8>(), 0..64), 1u32..12, any::<bool>(), proptest::option::of("[!-~]{1,40}")), 2..20),
        ) {
            let envelopes: Vec<Envelope> = events.iter().map(|(a, v, t, p, schema, _, id)| {
                let mut b = Envelope::builder(a, "T", *v).payload(p.clone()).schema_version(*schema);
                if let Some(t) = t { b = b.header("X-T", t.clone()); }
                if let Some(id) = id { b = b.event_id(id.clone()); }
                b.build().unwrap()
            }).collect();
            let mut body = Vec::new();
            for (e, text) in envelopes.iter().zip(events.iter().map(|event| event.5)) {
                if text { encode_text_record(e, &mut body) } else { encode_record(e, &mut body) }
            }
            let body = Bytes::from(body);
            let routed = split_batch(&envelopes.len().to_string(), &body, |view| view.aggregate_id_str().map(str::to_owned)).unwrap().1;
            prop_assert_eq!(routed, envelopes.iter().map(|e| Some(e.aggregate_id().as_str().to_owned())).collect::<Vec<_>>());
            let records = decode_batch(&envelopes.len().to_string(), &body).unwrap();
            let back: Vec<Envelope> = records.iter().map(|r| r.decode().unwrap()).collect();
            prop_assert_eq!(&back, &envelopes);
            // Split in place: the same envelopes, and spans that give the same records back.
            let mut ids = AggregateIds::default();
            let (spans, viewed) = split_batch(&envelopes.len().to_string(), &body, |view| {
                (view.decode_with(&mut ids).unwrap(), view.header_block().into_owned(), view.span())
            })
            .unwrap();
            for (i, (envelope, block, span)) in viewed.iter().enumerate() {
                prop_assert_eq!(envelope, &envelopes[i]);
                prop_assert_eq!(block.as_bytes(), &records[i].header_block()[..]);
                prop_assert_eq!(*span, spans[i]);
                prop_assert_eq!(span.record(&body), Some(records[i].clone()));
            }
        }

        /// A compact batch with any one byte changed: split and decoded from spans as from views,
        /// never a panic, and the owned record (its head as text) decodes exactly when the view does.
        #[test]
        fn a_spoiled_compact_batch_reads_alike_every_way(at in any::<prop::sample::Index>(), b in any::<u8>()) {
            let envelopes: Vec<Envelope> = (1..=2)
                .map(|v| Envelope::builder("a-1", "T", v).header("X-A", "b").payload(vec![7; 4]).build().unwrap())
                .collect();
            let mut body = batch_of(&envelopes).to_vec();
            let at = at.index(body.len());
            body[at] = b;
            let body = Bytes::from(body);
            let mut ids = AggregateIds::new(4);
            if let Ok((spans, viewed)) = split_batch("2", &body, |view| view.decode().map_err(|e| e.to_string())) {
                for (span, viewed) in spans.iter().zip(&viewed) {
                    let from_span = span.decode_with(&body, &mut ids).map(|r| r.map_err(|e| e.to_string()));
                    prop_assert_eq!(from_span.as_ref(), Some(viewed));
                    let record = span.record(&body).unwrap();
                    prop_assert_eq!(record.decode().is_ok(), viewed.is_ok());
                }
            }
        }

        /// Arbitrary bodies and counts never panic the batch decoder.
        #[test]
        fn decode_batch_never_panics(
            count in "[0-9]{1,4}|.{0,4}",
            body in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let body = Bytes::from(body);
            let split = split_batch(&count, &body, |view| (header_pairs(&view.header_block()).count(), view.decode().is_ok()));
            match decode_batch(&count, &body) {
                Ok(records) => {
                    // Refused by both or by neither, and read alike.
                    let (spans, read) = split.unwrap();
                    for (i, r) in records.iter().enumerate() {
                        prop_assert_eq!(read[i], (r.headers().count(), r.decode().is_ok()));
                        prop_assert_eq!(spans[i].record(&body), Some(r.clone()));
                    }
                }
                Err(error) => prop_assert_eq!(split.unwrap_err().to_string(), error.to_string()),
            }
        }
        /// Every envelope the builder accepts, whatever its text fields hold, comes back equal
        /// after the trip through a NATS header block (where values are trimmed); what cannot
        /// make that trip is refused at build time.
        #[test]
        fn every_envelope_the_builder_accepts_round_trips_exactly(
            aggregate in "[A-Za-z0-9:/#_-]{1,64}|\\PC{0,10}",
            event_type in "[A-Za-z][A-Za-z0-9._]{0,20}|\\PC{0,10}",
            version in 0u64..,
            nanos in 0u64..4_000_000_000_000_000_000,
            trace in proptest::option::of("\\PC{0,30}|[ -~]{0,30}"),
            tenant in proptest::option::of("[a-z0-9]{1,10}| [a-z]{0,3} ?"),
            user in proptest::collection::btree_map("X-[A-Za-z0-9-]{1,10}|\\PC{0,6}", "\\PC{0,20}|[ -~]{0,20}", 0..4),
            payload in proptest::collection::vec(any::<u8>(), 0..256),
            json in any::<bool>(),
        ) {
            let mut builder = Envelope::builder(&aggregate, &event_type, version)
                .timestamp(UNIX_EPOCH + Duration::from_nanos(nanos));
            if let Some(t) = &trace { builder = builder.trace_id(t.clone()); }
            if let Some(t) = &tenant { builder = builder.tenant_id(t.clone()); }
            for (k, v) in &user { builder = builder.header(k.clone(), v.clone()); }
            builder = if json {
                builder.typed_payload(&payload, Codec::Json).unwrap()
            } else {
                builder.payload(payload.clone())
            };
            let Ok(env) = builder.build() else { return Ok(()); };
            let back = through_nats(&env);
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

        /// Arbitrary header maps (known names with any values among them) and bodies never
        /// panic the decoder.
        #[test]
        fn decode_never_panics(
            headers in proptest::collection::vec(("Bus-Event|Bus-[A-Za-z-]{1,14}|[A-Za-z-]{1,8}|\\PC{0,8}", "\\PC{0,60}|[a-z0-9 ]{0,40}|.{0,20}"), 0..8),
            payload in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let _ = decode(headers.iter().map(|(n, v)| (n.as_str(), v.as_str())), payload.into());
        }

        /// A record's `Bus-Event` line read on the fast path decodes exactly as the general
        /// path decodes it: the same envelope, or the same error. Values are made of the
        /// field shapes and their near misses (spaces doubled or missing, leading zeros,
        /// letters among digits, forbidden characters), followed by other headers or not.
        #[test]
        fn a_record_decodes_as_its_headers_do(
            aggregate in prop_oneof![8 => "[a-z0-9-]{1,6}", 1 => "[a-z ]{0,3}", 1 => ".{0,3}"],
            version in prop_oneof![8 => "[1-9][0-9]{0,2}", 1 => "0|0[0-9]", 1 => "[0-9a ]{0,3}"],
            kind in prop_oneof![8 => "[A-Za-z.]{1,6}", 1 => "[a-z ]{0,3}"],
            micros in prop_oneof![8 => "[1-9][0-9]{15}", 1 => "[0-9]{0,21}", 1 => "[0-9 x]{0,4}"],
            id in prop_oneof![8 => "[0-9a-f-]{1,36}", 1 => "[a-z ]{0,3}", 1 => "\\PC{0,4}"],
            separators in proptest::collection::vec(prop_oneof![12 => Just(" "), 1 => Just("  "), 1 => Just("")], 4),
            prefix in prop_oneof![8 => Just("Bus-Event: "), 1 => Just("Bus-Event:  "), 1 => Just("bus-event: "), 1 => Just("Bus-Event:")],
            rest in prop_oneof![
                6 => Just(""),
                1 => Just("Bus-Content-Type: json\r\n"),
                1 => Just("Bus-Event: a 1 T 1 x\r\nX-A: b\r\n"),
                1 => Just("X-A: b\r\n"),
            ],
        ) {
            let value = format!(
                "{aggregate}{}{version}{}{kind}{}{micros}{}{id}",
                separators[0], separators[1], separators[2], separators[3]
            );
            let block = format!("{prefix}{value}\r\n{rest}");
            // Only blocks a batch accepts reach `Record::decode`.
            prop_assume!(!value.contains(['\r', '\n']) && well_formed_block(block.as_bytes()));
            let record = Record {
                headers: bytestring::ByteString::from(block.as_str()),
                payload: Bytes::from_static(b"p"),
            };
            let general = decode(header_pairs(&block), Bytes::from_static(b"p"));
            // Without kept IDs, then with them: the first read keeps the ID, the second finds it;
            // then with a decoder that keeps none.
            let mut ids = AggregateIds::new(4);
            let mut none_kept = AggregateIds::new(0);
            for fast in [record.decode(), record.decode_with(&mut ids), record.decode_with(&mut ids), record.decode_with(&mut none_kept)] {
                match (fast, &general) {
                    (Ok(fast), Ok(general)) => prop_assert_eq!(&fast, general),
                    (Err(fast), Err(general)) => prop_assert_eq!(fast.to_string(), general.to_string()),
                    (fast, general) => prop_assert!(false, "{block:?}: fast {fast:?}, general {general:?}"),
                }
            }
            // The aggregate ID read without decoding is the decoded one, whenever it is read
            // and the record decodes; and a record as this library writes it always has it.
            // (In a batch of two copies of the record, as a view only comes of a split.)
            let mut body = Vec::new();
            for _ in 0..2 {
                body.extend_from_slice(&(block.len() as u32).to_be_bytes());
                body.extend_from_slice(block.as_bytes());
                body.extend_from_slice(&1u32.to_be_bytes());
                body.push(b'p');
            }
            let body = Bytes::from(body);
            let (spans, read) = split_batch("2", &body, |view| view.aggregate_id_str().map(str::to_owned)).unwrap();
            let viewed = spans[1].view(&body).expect("a span of its own body");
            prop_assert_eq!(viewed.aggregate_id_str().map(str::to_owned), read[1].clone());
            prop_assert_eq!(viewed.aggregate_id_bytes(), read[1].as_ref().map(String::as_bytes));
            match (&read[0], &general) {
                (Some(key), Ok(general)) => prop_assert_eq!(key.as_str(), general.aggregate_id().as_str()),
                (None, Ok(_)) => prop_assert!(
                    block.strip_prefix("Bus-Event: ").is_none_or(|line| line.starts_with(' ')),
                    "{block:?}"
                ),
                (_, Err(_)) => {}
            }
            prop_assert_eq!(viewed.decode().map_err(|e| e.to_string()), general.clone().map_err(|e| e.to_string()));
            // Decoded from its span as from its view (twice: the second finds the kept names).
            let mut span_ids = AggregateIds::new(4);
            for _ in 0..2 {
                let from_span = spans[1].decode_with(&body, &mut span_ids).expect("a span of its own body");
                prop_assert_eq!(from_span.map_err(|e| e.to_string()), general.clone().map_err(|e| e.to_string()));
            }
        }
    }

    #[test]
    fn a_record_as_written_takes_the_fast_path() {
        let e = Envelope::builder("a-1", "T", 3)
            .header("X-A", "b")
            .build()
            .unwrap();
        let body = batch_of(&[e.clone(), e.clone()]);
        let records = decode_batch("2", &body).unwrap();
        let block = std::str::from_utf8(records[0].header_block()).unwrap();
        let line = block.strip_prefix("Bus-Event: ").unwrap();
        let mut ids = AggregateIds::default();
        assert!(event_fields_fast(&line[..line.find('\r').unwrap()], Some(&mut ids)).is_some());
        assert_eq!(ids.len(), 1);
        assert_eq!(records[0].decode().unwrap(), e);
        // The second record's names are the ones the first one's decoding kept (an aggregate ID
        // as short as this one is kept in place, and copied).
        let first = records[0].decode_with(&mut ids).unwrap();
        let second = records[1].decode_with(&mut ids).unwrap();
        assert_eq!(first.aggregate_id(), second.aggregate_id());
        assert_eq!(ids.len(), 1);
        assert!(std::ptr::eq(
            first.event_type().as_str(),
            second.event_type().as_str()
        ));
    }
}
