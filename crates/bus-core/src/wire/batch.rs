//! Record batches: many envelopes in one message, each as a record (its header block, then its
//! payload), split and routed in place and decoded where they are handled. The format is
//! [`BATCH`]'s; a record's header block is exactly the headers a single-event message of the
//! envelope carries (the parent module).

use std::borrow::Cow;

use bytes::Bytes;

use super::compact::{self, COMPACT};
use super::{
    decode, decode_from, digits, encode_other_headers, event_fields_fast, event_value_len,
    header_pairs, ill_formed_line, malformed, parse_decimal, push_event_value, well_formed_block,
    CONTENT_TYPE, CORRELATION_ID, EVENT, SCHEMA, TENANT_ID, TRACE_ID,
};
use crate::codec::ContentType;
use crate::envelope::Envelope;
use crate::error::DecodeError;
use crate::names::AggregateIds;

/// Header of a record batch: the number of events it holds, in decimal (at least 2).
///
/// A record batch is one message carrying several envelopes, each as a *record*: its header
/// block as text, then its payload. The message's body is the records one after the other:
///
/// | bytes | what |
/// |---|---|
/// | 4 | `H`, the length of the record's header block, unsigned big-endian |
/// | `H` | the header block: exactly the headers a single-event message of the envelope carries, `Bus-Event` first, as one `Name: value\r\n` line per header (UTF-8), or with the `Bus-Event` line as a *compact head* (its five fields in binary, below) |
/// | 4 | `P`, the length of the payload, unsigned big-endian |
/// | `P` | the payload |
///
/// The message itself carries only `Bus-Batch` and the broker's `Nats-Msg-Id`. A message
/// without `Bus-Batch` is a single event, in the format above.
///
/// This library writes compact heads: a 0 byte, the lengths of the aggregate ID, the event
/// type and the event ID, those three names, then the event version and the timestamp in
/// binary, then the other header lines as text. Readers take either form, record by record:
/// a stream keeps the text heads earlier versions wrote. `docs/wire-format.md` has the byte
/// layout.
pub const BATCH: &str = "Bus-Batch";

/// One event of a record batch: its header block (in text form: a compact head as the
/// `Bus-Event` line it stands for) and its payload, not yet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Checked to be UTF-8 once, when the batch is split: reading the headers checks no more.
    /// (Visible to the parent module for its tests, which make records by hand.)
    pub(super) headers: bytestring::ByteString,
    pub(super) payload: Bytes,
}

impl Record {
    /// The record's headers, in the order they were written.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        header_pairs(&self.headers)
    }

    /// The header block as text: as it travelled, or the text a compact head stands for.
    pub fn header_block(&self) -> &Bytes {
        self.headers.as_bytes()
    }

    /// The payload, sharing the batch's memory.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The record as an envelope.
    pub fn decode(&self) -> Result<Envelope, DecodeError> {
        self.decode_in(None)
    }

    /// [`decode`](Self::decode), sharing the aggregate ID with earlier records that had the
    /// same one (kept in `ids`) rather than validating and allocating it again.
    pub fn decode_with(&self, ids: &mut AggregateIds) -> Result<Envelope, DecodeError> {
        self.decode_in(Some(ids))
    }

    fn decode_in(&self, ids: Option<&mut AggregateIds>) -> Result<Envelope, DecodeError> {
        decode_block(&self.headers, self.payload.clone(), ids)
    }
}

/// An envelope from a record's header block (checked: `Name: value` lines, each ended by CR
/// LF) and its payload.
#[inline]
fn decode_block(
    block: &str,
    payload: Bytes,
    ids: Option<&mut AggregateIds>,
) -> Result<Envelope, DecodeError> {
    // As this library writes a record: `Bus-Event` first, the rest (usually nothing) after.
    // Every line of the block ends with CR LF and holds no other CR (checked when the batch
    // was split), so the first CR ends the line.
    if let Some(line) = block.strip_prefix("Bus-Event: ") {
        if let Some(end) = memchr::memchr(b'\r', line.as_bytes()) {
            if let Some(fields) = event_fields_fast(&line[..end], ids) {
                let rest = &line[end + 2..];
                return if rest.is_empty() {
                    decode_from(Some(fields), std::iter::empty(), payload)
                } else {
                    decode_from(Some(fields), header_pairs(rest), payload)
                };
            }
        }
    }
    decode(header_pairs(block), payload)
}

/// Where one record lies in its batch's body: the byte ranges of its header block and its
/// payload. Sixteen bytes and no reference to the body: what a consumer keeps of each record
/// of a batch it holds, rather than two shared slices of the body per record (each one a
/// reference count taken and given back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSpan {
    /// (Visible to the parent module for its tests, which spoil a record's bytes by hand.)
    pub(super) headers: (u32, u32),
    payload: (u32, u32),
}

impl RecordSpan {
    /// The header block, from the body the span was split from.
    ///
    /// # Panics
    /// If `body` is shorter than the batch the span was split from.
    pub fn header_block(&self, body: &Bytes) -> Bytes {
        body.slice(self.headers.0 as usize..self.headers.1 as usize)
    }

    /// The payload, sharing the body's memory.
    ///
    /// # Panics
    /// As [`RecordSpan::header_block`].
    pub fn payload(&self, body: &Bytes) -> Bytes {
        body.slice(self.payload.0 as usize..self.payload.1 as usize)
    }

    /// The record, borrowed from the body the span was split from ([`split_batch`] hands the
    /// same view); `None` from another body, too short or whose bytes there are not a header
    /// block (checked again: UTF-8 `Name: value` lines each ended by CR LF, after a compact
    /// head that reads).
    pub fn view<'a>(&self, body: &'a Bytes) -> Option<RecordView<'a>> {
        if body.len() < self.headers.1.max(self.payload.1) as usize {
            return None;
        }
        let block = body.get(self.headers.0 as usize..self.headers.1 as usize)?;
        let headers = if block.first() == Some(&COMPACT) {
            compact::check(block).ok()?;
            Block::Compact(block)
        } else {
            let text = std::str::from_utf8(block).ok()?;
            if !well_formed_block(block) {
                return None;
            }
            Block::Text(text)
        };
        Some(RecordView {
            headers,
            body,
            span: *self,
        })
    }

    /// The record as an envelope, from the body the span was split from: what
    /// `self.view(body)` and then [`RecordView::decode_with`] give (`None` where `view` gives
    /// `None`), at less cost. A header block of one `Bus-Event` line, as this library writes
    /// it, is read as it lies, without going through it again for its line ends: each of that
    /// line's fields admits neither CR nor LF, so a line that reads as an event is a
    /// well-formed block. Any other block is checked as `view` checks it.
    pub fn decode_with(
        &self,
        body: &Bytes,
        ids: &mut AggregateIds,
    ) -> Option<Result<Envelope, DecodeError>> {
        if body.len() < self.headers.1.max(self.payload.1) as usize {
            return None;
        }
        let block = body.get(self.headers.0 as usize..self.headers.1 as usize)?;
        if block.first() == Some(&COMPACT) {
            let head = compact::read(block).ok()?;
            return Some(head.decode(self.payload(body), Some(ids)));
        }
        let line = block
            .strip_prefix(b"Bus-Event: ")
            .and_then(|rest| rest.strip_suffix(b"\r\n"));
        if let Some(Ok(line)) = line.map(std::str::from_utf8) {
            if let Some(fields) = event_fields_fast(line, Some(ids)) {
                return Some(decode_from(
                    Some(fields),
                    std::iter::empty(),
                    self.payload(body),
                ));
            }
        }
        Some(self.view(body)?.decode_with(ids))
    }

    /// The record, from the body the span was split from; `None` from another body, too short
    /// or whose bytes there are not a header block.
    pub fn record(&self, body: &Bytes) -> Option<Record> {
        Some(self.view(body)?.record())
    }
}

/// One record of a batch, borrowed from its body while it is split ([`split_batch`]): its
/// header block, checked to be UTF-8 `Name: value` lines each ended by CR LF (after a compact
/// head that reads, if it has one), and where its payload lies.
///
/// As [`split_batch`] hands it, the block is kept as bytes (checked UTF-8 a word at a time)
/// and read as text only when asked for, each time: a consumer that only routes the record by
/// [`RecordView::aggregate_id_str`] does not read all of it.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    headers: Block<'a>,
    body: &'a Bytes,
    span: RecordSpan,
}

/// A record's header block: read as text already, bytes checked to be UTF-8, or a compact
/// head checked to read.
#[derive(Debug, Clone, Copy)]
enum Block<'a> {
    Text(&'a str),
    Checked(&'a [u8]),
    Compact(&'a [u8]),
}

impl<'a> RecordView<'a> {
    /// The text block, or the compact head.
    fn text(&self) -> Result<&'a str, compact::Head<'a>> {
        match self.headers {
            Block::Text(text) => Ok(text),
            Block::Checked(bytes) => {
                Ok(std::str::from_utf8(bytes).expect("checked to be UTF-8 when the view was made"))
            }
            Block::Compact(bytes) => {
                Err(compact::read(bytes).expect("checked to read when the view was made"))
            }
        }
    }

    /// The header block as text: as it travelled, or (a compact head) the `Bus-Event` line
    /// the head stands for and the lines after it. Its headers, in the order they were
    /// written, are [`header_pairs`](super::header_pairs) of it.
    pub fn header_block(&self) -> Cow<'a, str> {
        match self.text() {
            Ok(text) => Cow::Borrowed(text),
            Err(head) => Cow::Owned(head.text()),
        }
    }

    /// The record as an owned [`Record`].
    pub fn record(&self) -> Record {
        Record {
            headers: match self.header_block() {
                Cow::Borrowed(text) => {
                    bytestring::ByteString::try_from(self.body.slice_ref(text.as_bytes()))
                        .expect("text")
                }
                Cow::Owned(text) => bytestring::ByteString::from(text),
            },
            payload: self.payload(),
        }
    }

    /// The payload, sharing the batch's memory.
    pub fn payload(&self) -> Bytes {
        self.span.payload(self.body)
    }

    /// Where the record lies in the batch's body.
    pub fn span(&self) -> RecordSpan {
        self.span
    }

    /// The text the record's envelope has as its aggregate ID, read without decoding the
    /// record, when its header block starts as this library writes it: a compact head's
    /// aggregate ID, or `Bus-Event: ` then anything but a space up to the next space on that
    /// line. `None` otherwise. A record that decodes has this aggregate ID (one that does not
    /// may have read anything here): a consumer can route the record by it and decode it
    /// later, elsewhere.
    pub fn aggregate_id_str(&self) -> Option<&'a str> {
        // A run of a UTF-8 block between ASCII bytes (the prefix, a space).
        std::str::from_utf8(self.aggregate_id_bytes()?).ok()
    }

    /// [`RecordView::aggregate_id_str`] as bytes, not checked again to be UTF-8: printable
    /// ASCII in a compact head (checked when the view was made), and in a text one a run of a
    /// UTF-8 block between two ASCII bytes. What a consumer that routes by the bytes
    /// themselves needs, at no cost per byte beyond finding where it ends.
    pub fn aggregate_id_bytes(&self) -> Option<&'a [u8]> {
        let bytes = match self.headers {
            Block::Text(text) => text.as_bytes(),
            Block::Checked(bytes) => bytes,
            Block::Compact(bytes) => return compact::aggregate_bytes(bytes),
        };
        let line = bytes.strip_prefix(b"Bus-Event: ")?;
        let end = memchr::memchr2(b' ', b'\r', line)?;
        if end == 0 || line[end] != b' ' {
            return None;
        }
        Some(&line[..end])
    }

    /// The record as an envelope ([`Record::decode`]).
    pub fn decode(&self) -> Result<Envelope, DecodeError> {
        match self.text() {
            Ok(text) => decode_block(text, self.payload(), None),
            Err(head) => head.decode(self.payload(), None),
        }
    }

    /// [`RecordView::decode`], sharing aggregate IDs and event types through `ids`
    /// ([`Record::decode_with`]).
    #[inline]
    pub fn decode_with(&self, ids: &mut AggregateIds) -> Result<Envelope, DecodeError> {
        match self.text() {
            Ok(text) => decode_block(text, self.payload(), Some(ids)),
            Err(head) => head.decode(self.payload(), Some(ids)),
        }
    }
}

/// The number of events a `Bus-Batch` header value announces: a decimal integer of at least 2.
pub fn batch_count(value: &str) -> Result<usize, DecodeError> {
    match parse_decimal(value) {
        Some(n) if n >= 2 && n <= u32::MAX as u64 => Ok(n as usize),
        _ => Err(DecodeError::InvalidHeader {
            name: BATCH,
            value: value.to_owned(),
            reason: "the number of events must be a decimal integer of at least 2".to_owned(),
        }),
    }
}

/// The bytes one envelope takes as a record in a batch body, with a compact head: counted, not
/// formatted (it runs on every publish).
pub fn record_len(envelope: &Envelope) -> usize {
    8 + compact::head_len(envelope) + other_lines_len(envelope) + envelope.payload.len()
}

/// The bytes of the envelope's header lines as text (`Name: value` ended by CR LF each,
/// `Bus-Event` first): the header block of a text record, and of a single-event message less
/// its first and last lines.
pub fn header_lines_len(envelope: &Envelope) -> usize {
    EVENT.len() + 2 + event_value_len(envelope) + 2 + other_lines_len(envelope)
}

/// The bytes of every header line but `Bus-Event`.
fn other_lines_len(envelope: &Envelope) -> usize {
    let line = |name: &str, value: usize| name.len() + 2 + value + 2;
    let mut headers = 0;
    if envelope.content_type != ContentType::Bytes {
        headers += line(CONTENT_TYPE, envelope.content_type.as_str().len());
    }
    if envelope.schema_version.get() != 1 {
        headers += line(SCHEMA, digits(u64::from(envelope.schema_version.get())));
    }
    if let Some(context) = envelope.context.as_deref() {
        for (name, value) in [
            (TRACE_ID, &context.trace_id),
            (CORRELATION_ID, &context.correlation_id),
            (TENANT_ID, &context.tenant_id),
        ] {
            if let Some(value) = value {
                headers += line(name, value.len());
            }
        }
        for (name, value) in &context.headers {
            headers += line(name, value.len());
        }
    }
    headers
}

/// Appends `envelope` to a batch body as one record, with a compact head.
pub fn encode_record(envelope: &Envelope, body: &mut Vec<u8>) {
    encode_with(envelope, body, compact::write_head);
}

/// Appends `envelope` to a batch body as one record with a text head, as versions before
/// compact heads wrote every record: what a reader must still take from a stream they wrote
/// to (for tools and tests; the publisher writes compact heads).
pub fn encode_text_record(envelope: &Envelope, body: &mut Vec<u8>) {
    encode_with(envelope, body, |envelope, body| {
        body.extend_from_slice(EVENT.as_bytes());
        body.extend_from_slice(b": ");
        push_event_value(envelope, |part| body.extend_from_slice(part.as_bytes()));
        body.extend_from_slice(b"\r\n");
    });
}

/// Appends one record: its header block (the `Bus-Event` part as `head` writes it, then the
/// other headers' lines) and its payload, each after its length.
#[inline]
fn encode_with(
    envelope: &Envelope,
    body: &mut Vec<u8>,
    head: impl FnOnce(&Envelope, &mut Vec<u8>),
) {
    let at = body.len();
    body.extend_from_slice(&[0; 4]);
    head(envelope, body);
    encode_other_headers(envelope, |name, value| {
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(b": ");
        body.extend_from_slice(value.as_bytes());
        body.extend_from_slice(b"\r\n");
    });
    let headers = (body.len() - at - 4) as u32;
    body[at..at + 4].copy_from_slice(&headers.to_be_bytes());
    body.extend_from_slice(&(envelope.payload.len() as u32).to_be_bytes());
    body.extend_from_slice(&envelope.payload);
}

/// The records of a batch whose `Bus-Batch` header is `count`. The body must hold exactly that
/// many well-formed records and nothing after them; each record's header block must be UTF-8
/// `Name: value` lines, each ended by `\r\n`, or a compact head that reads, followed by such
/// lines. Whether a record is a valid envelope is [`Record::decode`]'s business: one bad
/// record does not make the others unreadable.
pub fn decode_batch(count: &str, body: &Bytes) -> Result<Vec<Record>, DecodeError> {
    let (_, records) = split_batch(count, body, |record| record.record())?;
    Ok(records)
}

/// [`decode_batch`] without a `Record` per record: `each` is given every record, in order,
/// borrowed from the body as soon as it is checked, and the records' spans are returned with
/// what `each` made of them. A consumer decodes each record where it is split, or routes it by
/// [`RecordView::aggregate_id_str`] and decodes it later from its span
/// ([`RecordSpan::view`]), and keeps only the spans (say, to dead-letter one record later).
/// The body is refused as [`decode_batch`] refuses it, whatever `each` was given before the
/// fault was found.
pub fn split_batch<T>(
    count: &str,
    body: &Bytes,
    mut each: impl FnMut(RecordView<'_>) -> T,
) -> Result<(Vec<RecordSpan>, Vec<T>), DecodeError> {
    let count = batch_count(count)?;
    // Every record takes at least 8 bytes: a count the body cannot hold allocates nothing.
    if count > body.len() / 8 {
        return Err(malformed(format!(
            "{count} records announced, but the body has only {} bytes",
            body.len()
        )));
    }
    if u32::try_from(body.len()).is_err() {
        return Err(malformed(format!(
            "the body is {} bytes, more than a batch may hold (4 GiB)",
            body.len()
        )));
    }
    let mut spans = Vec::with_capacity(count);
    let mut made = Vec::with_capacity(count);
    let mut at = 0usize;
    let take = |at: &mut usize, what: &str, i: usize| -> Result<(u32, u32), DecodeError> {
        let rest = body.len() - *at;
        if rest < 4 {
            return Err(malformed(format!(
                "record {i}: the body ends before the length of its {what}"
            )));
        }
        let len = u32::from_be_bytes(body[*at..*at + 4].try_into().expect("4 bytes")) as usize;
        if rest - 4 < len {
            return Err(malformed(format!(
                "record {i}: its {what} is {len} bytes, but only {} remain",
                rest - 4
            )));
        }
        // Within the body, which is under 4 GiB.
        let part = ((*at + 4) as u32, (*at + 4 + len) as u32);
        *at += 4 + len;
        Ok(part)
    };
    for i in 0..count {
        let headers = take(&mut at, "header block", i)?;
        let block = &body[headers.0 as usize..headers.1 as usize];
        let checked = if block.first() == Some(&COMPACT) {
            compact::check(block).map_err(|why| compact::refused(i, why))?;
            Block::Compact(block)
        } else {
            if !block.is_ascii() {
                std::str::from_utf8(block).map_err(|e| {
                    malformed(format!("record {i}: its header block is not UTF-8 ({e})"))
                })?;
            }
            if !block.is_empty() && !block.ends_with(b"\r\n") {
                return Err(malformed(format!(
                    "record {i}: its header block does not end with CR LF"
                )));
            }
            // Every line ends with CR LF (a bare LF would be a line break no NATS header
            // holds) and holds a `:`.
            if !well_formed_block(block) {
                let text = std::str::from_utf8(block).expect("checked above");
                if let Some(line) = ill_formed_line(text) {
                    return Err(malformed(format!(
                        "record {i}: header line `{}` is not `Name: value`",
                        line.escape_debug()
                    )));
                }
            }
            Block::Checked(block)
        };
        let payload = take(&mut at, "payload", i)?;
        let span = RecordSpan { headers, payload };
        spans.push(span);
        made.push(each(RecordView {
            headers: checked,
            body,
            span,
        }));
    }
    if at != body.len() {
        return Err(malformed(format!(
            "{} bytes follow the last of its {count} records",
            body.len() - at
        )));
    }
    Ok((spans, made))
}
