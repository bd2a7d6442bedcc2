//! A record's compact head: the five fields of its `Bus-Event` line in binary, which takes
//! about half the bytes of the line (`docs/wire-format.md`). The broker's work per event
//! follows the bytes it stores and delivers.
//!
//! | bytes | what |
//! |---|---|
//! | 1 | 0, which no text header block starts with (a header name does) |
//! | varint `A`, `A` | the aggregate ID |
//! | varint | the event version |
//! | varint `T`, `T` | the event type |
//! | 8 | the timestamp, microseconds since the Unix epoch, unsigned big-endian |
//! | varint `I`, then `I` bytes, or 0 then 16 | the event ID: its text, or (`I` = 0) a UUID written `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in lower case, as its 16 bytes big-endian |
//! | the rest | the record's other header lines, `Name: value` each ended by CR LF, as in a text block |
//!
//! A varint is unsigned LEB128: seven bits a byte, least significant first, the high bit set on
//! every byte but the last; at most ten bytes.

use std::borrow::Cow;

use bytes::Bytes;

use super::{decode_from, header_pairs, malformed, well_formed_block, EventFields, EVENT};
use crate::envelope::Envelope;
use crate::error::DecodeError;
use crate::names::{AggregateId, AggregateIds, EventId, EventType};

/// The first byte of a compact head.
pub(super) const COMPACT: u8 = 0;

/// The bytes the compact head of `envelope` takes, without its other header lines.
pub(super) fn head_len(envelope: &Envelope) -> usize {
    let text = |len: usize| varint_len(len as u64) + len;
    1 + text(envelope.aggregate_id.as_str().len())
        + varint_len(envelope.event_version.get())
        + text(envelope.event_type.as_str().len())
        + 8
        + match envelope.event_id.uuid() {
            Some(_) => 1 + 16,
            None => text(envelope.event_id.as_str().len()),
        }
}

/// Appends the compact head of `envelope` (without its other header lines) to `out`.
pub(super) fn write_head(envelope: &Envelope, out: &mut Vec<u8>) {
    out.push(COMPACT);
    put_text(out, envelope.aggregate_id.as_str());
    put_varint(out, envelope.event_version.get());
    put_text(out, envelope.event_type.as_str());
    out.extend_from_slice(&envelope.timestamp_micros.to_be_bytes());
    match envelope.event_id.uuid() {
        Some(id) => {
            out.push(0);
            out.extend_from_slice(&id.to_be_bytes());
        }
        None => put_text(out, envelope.event_id.as_str()),
    }
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn varint_len(n: u64) -> usize {
    (64 - (n | 1).leading_zeros() as usize).div_ceil(7)
}

/// A compact head's fields, borrowed from its block; its names are printable ASCII without
/// spaces (what a `Bus-Event` line can carry), checked when the head was read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Head<'a> {
    pub(super) aggregate: &'a str,
    pub(super) version: u64,
    pub(super) kind: &'a str,
    pub(super) micros: u64,
    pub(super) id: Id<'a>,
    /// The other header lines, checked to be UTF-8 `Name: value` lines each ended by CR LF.
    pub(super) rest: &'a str,
}

/// A compact head's event ID.
#[derive(Debug, Clone, Copy)]
pub(super) enum Id<'a> {
    Uuid(u128),
    Text(&'a str),
}

/// Reads a compact head (`block` starts with [`COMPACT`]), naming what does not fit.
pub(super) fn read(block: &[u8]) -> Result<Head<'_>, String> {
    let mut at = 1;
    let aggregate = name(block, &mut at, "aggregate ID")?;
    let version = varint(block, &mut at, "event version")?;
    let kind = name(block, &mut at, "event type")?;
    let micros = block
        .get(at..at + 8)
        .ok_or("the block ends in the timestamp")?;
    let micros = u64::from_be_bytes(micros.try_into().expect("8 bytes"));
    at += 8;
    let id = if block.get(at) == Some(&0) {
        let bytes = block
            .get(at + 1..at + 17)
            .ok_or("the block ends in the event ID")?;
        at += 17;
        Id::Uuid(u128::from_be_bytes(bytes.try_into().expect("16 bytes")))
    } else {
        Id::Text(name(block, &mut at, "event ID")?)
    };
    let rest = &block[at..];
    if !rest.is_ascii() {
        std::str::from_utf8(rest).map_err(|e| format!("its header lines are not UTF-8 ({e})"))?;
    }
    if !well_formed_block(rest) {
        return Err(
            "its header lines after the head are not `Name: value` each ended by CR LF".to_owned(),
        );
    }
    Ok(Head {
        aggregate,
        version,
        kind,
        micros,
        id,
        rest: std::str::from_utf8(rest).expect("checked above"),
    })
}

/// The aggregate ID's bytes of a compact head, unchecked: what routes a record before it is
/// decoded (a record that does not decode may have read anything here).
pub(super) fn aggregate_bytes(block: &[u8]) -> Option<&[u8]> {
    let mut at = 1;
    let len = varint(block, &mut at, "").ok()?;
    block.get(at..at.checked_add(usize::try_from(len).ok()?)?)
}

/// A name of a compact head: its length, then that many bytes of printable ASCII (no space).
fn name<'a>(block: &'a [u8], at: &mut usize, what: &str) -> Result<&'a str, String> {
    let len = varint(block, at, what)?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|len| at.checked_add(len))
        .filter(|&end| end <= block.len())
        .ok_or_else(|| format!("its {what} is {len} bytes, more than the block holds"))?;
    let bytes = &block[*at..end];
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(format!(
            "its {what} is not 1 or more printable ASCII characters without spaces"
        ));
    }
    *at = end;
    Ok(std::str::from_utf8(bytes).expect("ASCII"))
}

fn varint(block: &[u8], at: &mut usize, what: &str) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        let Some(&byte) = block.get(*at) else {
            return Err(format!("the block ends in its {what}"));
        };
        *at += 1;
        let bits = u64::from(byte & 0x7F);
        if shift == 63 && bits > 1 {
            break;
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(format!("its {what} is longer than a 64-bit varint"))
}

impl<'a> Head<'a> {
    /// The `Bus-Event` value the head stands for.
    fn event_value(&self) -> String {
        let id = match self.id {
            Id::Uuid(id) => Cow::Owned(EventId::from_uuid(id).as_str().to_owned()),
            Id::Text(text) => Cow::Borrowed(text),
        };
        format!(
            "{} {} {} {} {id}",
            self.aggregate, self.version, self.kind, self.micros
        )
    }

    /// The header block as text: the `Bus-Event` line the head stands for, then its other
    /// lines.
    pub(super) fn text(&self) -> String {
        format!("{EVENT}: {}\r\n{}", self.event_value(), self.rest)
    }

    /// The envelope of the record with this head and `payload`.
    pub(super) fn decode(
        &self,
        payload: Bytes,
        ids: Option<&mut AggregateIds>,
    ) -> Result<Envelope, DecodeError> {
        let invalid = |reason: &str| DecodeError::InvalidHeader {
            name: EVENT,
            value: self.event_value(),
            reason: reason.to_owned(),
        };
        let (aggregate_id, event_type) = match ids {
            Some(ids) => (ids.get(self.aggregate)?, ids.event_type(self.kind)?),
            None => (
                AggregateId::new(self.aggregate)?,
                EventType::new(self.kind)?,
            ),
        };
        let fields = EventFields {
            aggregate_id,
            event_version: std::num::NonZeroU64::new(self.version)
                .ok_or_else(|| invalid("the event version must be greater than 0"))?,
            event_type,
            micros: self.micros,
            event_id: match self.id {
                Id::Uuid(id) => EventId::from_uuid(id),
                Id::Text(text) => EventId::new(text)?,
            },
        };
        if self.rest.is_empty() {
            decode_from(Some(fields), std::iter::empty(), payload)
        } else {
            decode_from(Some(fields), header_pairs(self.rest), payload)
        }
    }
}

/// A compact head's fault as a batch's.
pub(super) fn refused(record: usize, why: String) -> DecodeError {
    malformed(format!(
        "record {record}: its compact head does not read: {why}"
    ))
}
