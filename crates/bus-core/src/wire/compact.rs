//! A record's compact head: the five fields of its `Bus-Event` line in binary, in about three
//! quarters of the line's bytes (`docs/wire-format.md`). The broker's work per event follows the
//! bytes it stores and delivers.
//!
//! | bytes | what |
//! |---|---|
//! | 1 | 0, which no text header block starts with (a header name does) |
//! | varint `A`, varint `T`, varint `I` | the lengths of the three names, each at least 1 |
//! | `A`, `T`, `I` | the aggregate ID, the event type and the event ID, printable ASCII without spaces |
//! | varint | the event version |
//! | 8 | the timestamp, microseconds since the Unix epoch, unsigned big-endian |
//! | the rest | the record's other header lines, `Name: value` each ended by CR LF, as in a text block |
//!
//! The names lie together so that one check reads them as text. The event ID stays text: a
//! UUID as its 16 bytes would save 20 more bytes an event, but reading and writing it cost the
//! bus more than the broker saved (`docs/performance.md`, twenty-eighth look).
//!
//! A varint is unsigned LEB128: seven bits a byte, least significant first, the high bit set on
//! every byte but the last; at most ten bytes.

use bytes::Bytes;

use super::{decode_from, header_pairs, malformed, well_formed_block, EventFields, EVENT};
use crate::envelope::Envelope;
use crate::error::DecodeError;
use crate::names::{AggregateId, AggregateIds, EventId, EventType};

/// The first byte of a compact head.
pub(super) const COMPACT: u8 = 0;

/// The bytes the compact head of `envelope` takes, without its other header lines.
pub(super) fn head_len(envelope: &Envelope) -> usize {
    let names = names(envelope);
    1 + names
        .iter()
        .map(|name| varint_len(name.len() as u64) + name.len())
        .sum::<usize>()
        + varint_len(envelope.event_version.get())
        + 8
}

/// Appends the compact head of `envelope` (without its other header lines) to `out`.
pub(super) fn write_head(envelope: &Envelope, out: &mut Vec<u8>) {
    out.push(COMPACT);
    let names = names(envelope);
    for name in names {
        put_varint(out, name.len() as u64);
    }
    for name in names {
        out.extend_from_slice(name.as_bytes());
    }
    put_varint(out, envelope.event_version.get());
    out.extend_from_slice(&envelope.timestamp_micros.to_be_bytes());
}

/// The head's names, in order.
fn names(envelope: &Envelope) -> [&str; 3] {
    [
        envelope.aggregate_id.as_str(),
        envelope.event_type.as_str(),
        envelope.event_id.as_str(),
    ]
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
    pub(super) id: &'a str,
    /// The other header lines, checked to be UTF-8 `Name: value` lines each ended by CR LF.
    pub(super) rest: &'a str,
}

/// Reads a compact head (`block` starts with [`COMPACT`]), naming what does not fit.
pub(super) fn read(block: &[u8]) -> Result<Head<'_>, String> {
    let fields = fields(block)?;
    // The three names are read as text at once: ASCII, so UTF-8 (checked again only because
    // this crate does without `unsafe`), split where their lengths say.
    let names = std::str::from_utf8(fields.names).expect("printable ASCII is UTF-8");
    let (aggregate, names) = names.split_at(fields.lengths[0]);
    let (kind, id) = names.split_at(fields.lengths[1]);
    Ok(Head {
        aggregate,
        version: fields.version,
        kind,
        micros: fields.micros,
        id,
        rest: match fields.rest {
            [] => "",
            rest => std::str::from_utf8(rest).expect("checked to be UTF-8"),
        },
    })
}

/// Whether `block` is a compact head that reads, naming what does not fit: [`read`] without
/// reading the names as text, for a consumer that only splits and routes.
pub(super) fn check(block: &[u8]) -> Result<(), String> {
    fields(block).map(|_| ())
}

/// A compact head's parts, checked.
struct Fields<'a> {
    /// The three names, one after the other: printable ASCII without spaces.
    names: &'a [u8],
    lengths: [usize; 3],
    version: u64,
    micros: u64,
    /// UTF-8 `Name: value` lines, each ended by CR LF.
    rest: &'a [u8],
}

const NAMES: [&str; 3] = ["aggregate ID", "event type", "event ID"];

fn fields(block: &[u8]) -> Result<Fields<'_>, String> {
    // Names under 128 bytes each (all but the longest) have one-byte lengths: read at once.
    let (lengths, mut at) = match block.get(1..4) {
        Some(&[a, t, i]) if (a | t | i) < 0x80 => {
            ([usize::from(a), usize::from(t), usize::from(i)], 4)
        }
        _ => long_lengths(block)?,
    };
    let [aggregate, kind, id] = lengths;
    let Some(names) = aggregate
        .checked_add(kind)
        .and_then(|n| n.checked_add(id))
        .and_then(|n| block.get(at..at.checked_add(n)?))
    else {
        return Err(format!(
            "its names are {aggregate} + {kind} + {id} bytes, more than the block holds"
        ));
    };
    if aggregate == 0 || kind == 0 || id == 0 {
        let empty = NAMES[lengths.iter().position(|&len| len == 0).expect("one is 0")];
        return Err(format!("its {empty} is empty"));
    }
    if !crate::names::all_graphic(names) {
        return Err("its names are not printable ASCII without spaces".to_owned());
    }
    at += names.len();
    let version = varint(block, &mut at, "event version")?;
    let micros = block
        .get(at..at + 8)
        .ok_or("the block ends in the timestamp")?;
    let micros = u64::from_be_bytes(micros.try_into().expect("8 bytes"));
    at += 8;
    let rest = &block[at..];
    if !rest.is_ascii() {
        std::str::from_utf8(rest).map_err(|e| format!("its header lines are not UTF-8 ({e})"))?;
    }
    if !well_formed_block(rest) {
        return Err(
            "its header lines after the head are not `Name: value` each ended by CR LF".to_owned(),
        );
    }
    Ok(Fields {
        names,
        lengths,
        version,
        micros,
        rest,
    })
}

/// The three names' lengths, any of them longer than one byte, and where the names start.
#[cold]
fn long_lengths(block: &[u8]) -> Result<([usize; 3], usize), String> {
    let mut at = 1;
    let mut lengths = [0; 3];
    for (length, what) in lengths.iter_mut().zip(NAMES) {
        let len = varint(block, &mut at, what)?;
        *length = usize::try_from(len).map_err(|_| format!("its {what} is {len} bytes"))?;
    }
    Ok((lengths, at))
}

/// The aggregate ID's bytes of a compact head, unchecked: what routes a record before it is
/// decoded (a record that does not decode may have read anything here).
pub(super) fn aggregate_bytes(block: &[u8]) -> Option<&[u8]> {
    let mut at = 1;
    let aggregate = varint(block, &mut at, "").ok()?;
    // Past the other two names' lengths.
    varint(block, &mut at, "").ok()?;
    varint(block, &mut at, "").ok()?;
    block.get(at..at.checked_add(usize::try_from(aggregate).ok()?)?)
}

#[inline]
fn varint(block: &[u8], at: &mut usize, what: &str) -> Result<u64, String> {
    // Most varints here (a name's length, a version under 16 384) are one or two bytes.
    match block.get(*at..) {
        Some(&[low, ..]) if low < 0x80 => {
            *at += 1;
            return Ok(u64::from(low));
        }
        Some(&[low, high, ..]) if high < 0x80 => {
            *at += 2;
            return Ok(u64::from(low & 0x7F) | (u64::from(high) << 7));
        }
        _ => {}
    }
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
        format!(
            "{} {} {} {} {}",
            self.aggregate, self.version, self.kind, self.micros, self.id
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
            // Its bytes were checked with the other names when the head was read.
            event_id: EventId::from_graphic(self.id)?,
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
