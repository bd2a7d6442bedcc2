//! Validated names. Each type can only hold a value that passed validation, so code that takes
//! one never checks it again.

use std::fmt;
use std::sync::Arc;

use crate::error::ValidationError;

/// The longest aggregate ID accepted, in bytes.
///
/// Aggregate IDs travel in a message header on every event and are hashed on every delivery;
/// 256 bytes holds any UUID, URN or composite key while keeping headers small.
pub const MAX_AGGREGATE_ID_LEN: usize = 256;

/// The longest topic, event type or event ID accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Inlined where a name is checked, on every event it is read: the error is made apart.
#[inline]
fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.is_empty() || value.len() > max {
        return Err(len_error(field, value, max));
    }
    Ok(())
}

#[cold]
#[inline(never)]
fn len_error(field: &'static str, value: &str, max: usize) -> ValidationError {
    if value.is_empty() {
        ValidationError::new(field, value, "must not be empty")
    } else {
        ValidationError::new(
            field,
            value,
            format!("is {} bytes long, the limit is {max}", value.len()),
        )
    }
}

/// The bytes a name may hold: a flag per byte value, looked up once per byte.
type Allowed = [bool; 256];

/// ASCII letters and digits (or every printable ASCII character but space, `graphic`), and
/// `extra`.
const fn allowed(extra: &[u8], graphic: bool) -> Allowed {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        table[b] = if graphic {
            c.is_ascii_graphic()
        } else {
            c.is_ascii_alphanumeric()
        };
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
}

const TOPIC_CHARS: Allowed = allowed(b"-_.", false);
const AGGREGATE_ID_CHARS: Allowed = allowed(b"-_.:@/+=~#", false);
const EVENT_TYPE_CHARS: Allowed = allowed(b"-_.:/", false);
const EVENT_ID_CHARS: Allowed = allowed(b"", true);

#[inline]
fn check_chars(
    field: &'static str,
    value: &str,
    allowed: &Allowed,
    allowed_text: &str,
) -> Result<(), ValidationError> {
    // Every allowed character is ASCII: check bytes (names are checked on every delivery), and
    // decode characters only to name the first bad one, apart.
    if value.bytes().all(|b| allowed[usize::from(b)]) {
        return Ok(());
    }
    chars_error(field, value, allowed, allowed_text)
}

#[cold]
#[inline(never)]
fn chars_error(
    field: &'static str,
    value: &str,
    allowed: &Allowed,
    allowed_text: &str,
) -> Result<(), ValidationError> {
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii() && allowed[*c as usize]))
    {
        return Err(ValidationError::new(
            field,
            value,
            format!("contains {bad:?}; allowed are {allowed_text}"),
        ));
    }
    Ok(())
}

/// Whether every byte of `bytes` is printable ASCII other than space (`0x21..=0x7E`), eight
/// bytes at a time: an event ID is read on every delivery, and a generated one is 36 bytes;
/// a record's compact head has its three names checked at once (`wire::compact`).
pub(crate) fn all_graphic(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("eight bytes"));
        // With every high bit clear, no byte carries into the next in the additions: a byte
        // of 0x21 or more gets its high bit from adding 0x5F, one of 0x7F gets it from 0x01.
        if word & HIGH != 0
            || word.wrapping_add(ONES * 0x5F) & HIGH != HIGH
            || word.wrapping_add(ONES) & HIGH != 0
        {
            return false;
        }
    }
    chunks.remainder().iter().all(u8::is_ascii_graphic)
}

/// A validated name's text: kept in place, without an allocation of its own, when it is at most
/// `N` bytes long, and shared between clones otherwise.
#[derive(Clone)]
enum Text<const N: usize> {
    Inline(arrayvec::ArrayString<N>),
    Shared(Arc<str>),
}

impl<const N: usize> Text<N> {
    fn new(value: impl AsRef<str> + Into<Arc<str>>) -> Self {
        match arrayvec::ArrayString::from(value.as_ref()) {
            Ok(text) => Self::Inline(text),
            Err(_) => Self::Shared(value.into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Self::Inline(text) => text,
            Self::Shared(text) => text,
        }
    }
}

/// Equality, order and hash of a name with `as_str`: those of its text, however it is kept
/// (and so the same as a `str`'s, which `Borrow<str>` needs).
macro_rules! ordered_as_text {
    ($name:ident) => {
        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.as_str() == other.as_str()
            }
        }

        impl Eq for $name {}

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.as_str().hash(state);
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.as_str().cmp(other.as_str())
            }
        }
    };
}

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// The validated value.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        string_impls!($name);
    };
}

/// Display, Debug, `AsRef<str>` and parsing from strings, for a name with `as_str` and `new`.
macro_rules! string_impls {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.as_str())
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl TryFrom<&str> for $name {
            type Error = ValidationError;
            fn try_from(value: &str) -> Result<Self, ValidationError> {
                Self::new(value)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(value: String) -> Result<Self, ValidationError> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ValidationError;
            fn from_str(value: &str) -> Result<Self, ValidationError> {
                Self::new(value)
            }
        }
    };
}

string_newtype!(
    /// A topic: the unit of ordering scope and of isolation between event kinds.
    ///
    /// A topic is one or more tokens separated by `.`; each token is non-empty and made of ASCII
    /// letters, digits, `-` and `_`. Wildcards (`*`, `>`) and white space are refused, so a topic
    /// is always a valid literal subject on brokers that use dotted subjects. At most
    /// [`MAX_NAME_LEN`] bytes.
    ///
    /// ```
    /// use bus_core::Topic;
    /// assert!(Topic::new("orders.v1").is_ok());
    /// let err = Topic::new("orders v1").unwrap_err();
    /// assert_eq!(err.to_string(), "topic `orders v1` is invalid: contains ' '; allowed are tokens of ASCII letters, digits, '-' and '_' separated by '.'");
    /// ```
    Topic
);

impl Topic {
    /// Validates `value` as a topic.
    pub fn new(value: impl AsRef<str> + Into<Arc<str>>) -> Result<Self, ValidationError> {
        let text = value.as_ref();
        const ALLOWED: &str = "tokens of ASCII letters, digits, '-' and '_' separated by '.'";
        check_len("topic", text, MAX_NAME_LEN)?;
        check_chars("topic", text, &TOPIC_CHARS, ALLOWED)?;
        if text.split('.').any(str::is_empty) {
            return Err(ValidationError::new(
                "topic",
                text,
                format!("has an empty token; allowed are {ALLOWED}"),
            ));
        }
        Ok(Self(value.into()))
    }
}

/// Characters allowed in an aggregate ID besides ASCII letters and digits (`AggregateId::new`
/// matches them one by one; a test checks the two agree).
#[cfg(test)]
const AGGREGATE_ID_PUNCTUATION: &str = "-_.:@/+=~#";

/// The identity of an aggregate: events with the same ID on the same topic are delivered
/// and handled strictly in order.
///
/// Non-empty, at most [`MAX_AGGREGATE_ID_LEN`] bytes, made of ASCII letters, digits and
/// `- _ . : @ / + = ~ #`. White space and control characters are refused because the ID
/// travels in a message header.
///
/// Every event has one, read on every delivery: an ID of up to 38 bytes (a UUID is 36) is kept
/// in place, without an allocation of its own; a longer one is shared between its clones.
///
/// ```
/// use bus_core::AggregateId;
/// assert!(AggregateId::new("order-2024/17").is_ok());
/// assert!(AggregateId::new("").is_err());
/// ```
#[derive(Clone, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct AggregateId(Text<AGGREGATE_ID_INLINE>);

/// The longest aggregate ID kept in place rather than in a shared allocation: as much as the
/// room a shared one takes holds beside the length.
const AGGREGATE_ID_INLINE: usize = 38;

impl AggregateId {
    /// The ID as a shared string, as keys are kept: cloning that copies no bytes. An ID kept in
    /// place is copied into a new allocation here; a longer one is shared as it is.
    pub fn shared(&self) -> Arc<str> {
        match &self.0 {
            Text::Inline(text) => Arc::from(text.as_str()),
            Text::Shared(text) => Arc::clone(text),
        }
    }

    /// Validates `value` as an aggregate ID.
    pub fn new(value: impl AsRef<str> + Into<Arc<str>>) -> Result<Self, ValidationError> {
        let text = value.as_ref();
        check_len("aggregate_id", text, MAX_AGGREGATE_ID_LEN)?;
        check_chars(
            "aggregate_id",
            text,
            &AGGREGATE_ID_CHARS,
            "ASCII letters, digits and \"-_.:@/+=~#\"",
        )?;
        Ok(Self(Text::new(value)))
    }

    /// The validated value.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

string_impls!(AggregateId);
ordered_as_text!(AggregateId);

impl std::borrow::Borrow<str> for AggregateId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// Aggregate IDs one decoder read recently, and the event types, copied or shared rather than
/// validated (and, if longer than an ID kept in place, allocated) again: an aggregate's events
/// arrive many times over, with the same ID every time, and a topic carries a few event types.
///
/// Holds at most its capacity of IDs and forgets them all when full, so its memory stays
/// bounded (about 60 bytes an ID, and a longer ID's own text) whatever the number of
/// aggregates; with more aggregates in turn than it holds, it finds few and costs a lookup per
/// event. A longer ID it holds is its own small allocation, never a part of a larger message.
/// Of event types it keeps the [`AggregateIds::EVENT_TYPES`] read last.
///
/// ```
/// let mut ids = bus_core::AggregateIds::new(2);
/// let long = "tenant-7/region-eu-west/orders/2024-000017";
/// let first = ids.get(long).unwrap();
/// assert!(std::ptr::eq(first.as_str(), ids.get(long).unwrap().as_str()));
/// assert_eq!(ids.get("order-1").unwrap(), ids.get("order-1").unwrap());
/// assert!(ids.get("not valid").is_err());
/// let placed = ids.event_type("OrderPlaced").unwrap();
/// assert!(std::ptr::eq(placed.as_str(), ids.event_type("OrderPlaced").unwrap().as_str()));
/// ```
#[derive(Debug)]
pub struct AggregateIds {
    known: std::collections::HashSet<AggregateId, ahash::RandomState>,
    capacity: usize,
    /// Event types read, at most [`AggregateIds::EVENT_TYPES`].
    types: Vec<EventType>,
    /// Where the next type not kept goes once `types` is full.
    next_type: usize,
}

impl AggregateIds {
    /// What a subscription's decoder keeps: under 1.5 MB of UUIDs at most.
    pub const DEFAULT_CAPACITY: usize = 16 * 1024;

    /// The most event types kept: looked through one by one, as a topic carries a few.
    pub const EVENT_TYPES: usize = 16;

    /// Keeps up to `capacity` IDs. With 0 it keeps none: every ID is validated and made anew
    /// (for a decoder that reads IDs in no useful order), and only event types are kept.
    pub fn new(capacity: usize) -> Self {
        Self {
            known: std::collections::HashSet::default(),
            capacity,
            types: Vec::new(),
            next_type: 0,
        }
    }

    /// `text` as an event type: the one kept if it was read lately, validated otherwise (and
    /// kept in place of the oldest once [`AggregateIds::EVENT_TYPES`] are).
    pub fn event_type(&mut self, text: &str) -> Result<EventType, ValidationError> {
        if let Some(kept) = self.types.iter().find(|t| t.as_str() == text) {
            return Ok(kept.clone());
        }
        let kind = EventType::new(text)?;
        if self.types.len() < Self::EVENT_TYPES {
            self.types.push(kind.clone());
        } else {
            self.types[self.next_type] = kind.clone();
            self.next_type = (self.next_type + 1) % Self::EVENT_TYPES;
        }
        Ok(kind)
    }

    /// `text` as an aggregate ID: the one kept if it was read before, validated otherwise.
    pub fn get(&mut self, text: &str) -> Result<AggregateId, ValidationError> {
        if self.capacity == 0 {
            return AggregateId::new(text);
        }
        if let Some(id) = self.known.get(text) {
            return Ok(id.clone());
        }
        let id = AggregateId::new(text)?;
        if self.known.len() >= self.capacity {
            self.known.clear();
        }
        self.known.insert(id.clone());
        Ok(id)
    }

    /// IDs kept now.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

impl Default for AggregateIds {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

string_newtype!(
    /// The type of an event, such as `OrderPlaced` or `billing.invoice.issued`.
    ///
    /// Non-empty, at most [`MAX_NAME_LEN`] bytes, made of ASCII letters, digits and `- _ . : /`.
    EventType
);

impl EventType {
    /// Validates `value` as an event type.
    ///
    /// A service has few event types and reads one on every event it decodes: the last few
    /// validated on this thread are kept, and one of them is shared rather than validated and
    /// copied again.
    pub fn new(value: impl AsRef<str> + Into<Arc<str>>) -> Result<Self, ValidationError> {
        use std::cell::RefCell;
        const KEPT: usize = 4;
        thread_local! {
            static RECENT: RefCell<(usize, [Option<EventType>; KEPT])> =
                const { RefCell::new((0, [None, None, None, None])) };
        }
        let text = value.as_ref();
        let known = RECENT.with(|recent| {
            let recent = recent.borrow();
            recent
                .1
                .iter()
                .flatten()
                .find(|kept| kept.as_str() == text)
                .cloned()
        });
        if let Some(kept) = known {
            return Ok(kept);
        }
        check_len("event_type", text, MAX_NAME_LEN)?;
        check_chars(
            "event_type",
            text,
            &EVENT_TYPE_CHARS,
            "ASCII letters, digits and \"-_.:/\"",
        )?;
        let new = Self(value.into());
        RECENT.with(|recent| {
            let (next, kept) = &mut *recent.borrow_mut();
            kept[*next] = Some(new.clone());
            *next = (*next + 1) % KEPT;
        });
        Ok(new)
    }
}

/// The unique identity of one event. Transports use it to recognise a retried publish
/// (on NATS it becomes `Nats-Msg-Id`).
///
/// Non-empty, at most [`MAX_NAME_LEN`] bytes of printable ASCII without spaces. Every event has
/// one, generated on publish and read on every delivery: an ID of up to 38 bytes (a generated
/// one is 36) is kept in place, without an allocation of its own.
#[derive(Clone, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct EventId(Text<EVENT_ID_INLINE>);

/// The longest event ID kept in place rather than in a shared allocation.
const EVENT_ID_INLINE: usize = 38;

impl EventId {
    /// Validates `value` as an event ID.
    pub fn new(value: impl AsRef<str> + Into<Arc<str>>) -> Result<Self, ValidationError> {
        let text = value.as_ref();
        check_len("event_id", text, MAX_NAME_LEN)?;
        if !all_graphic(text.as_bytes()) {
            // Names the first character at fault.
            check_chars(
                "event_id",
                text,
                &EVENT_ID_CHARS,
                "printable ASCII without spaces",
            )?;
        }
        Ok(Self(Text::new(value)))
    }

    /// `value` as an event ID when its bytes are known to be printable ASCII without spaces (a
    /// compact head's names, checked together when the head was read): only its length is
    /// checked here.
    pub(crate) fn from_graphic(value: &str) -> Result<Self, ValidationError> {
        debug_assert!(all_graphic(value.as_bytes()), "{value:?} was checked");
        check_len("event_id", value, MAX_NAME_LEN)?;
        Ok(Self(Text::new(value)))
    }

    /// The validated value.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// A new time-ordered unique ID: a UUID version 7 (48 bits of Unix milliseconds, 74 random
    /// bits), formatted `xxxxxxxx-xxxx-7xxx-yxxx-xxxxxxxxxxxx`. Its random bits come from the
    /// `uuid` crate's per-thread generator (`fast-rng`), so generating one costs no system call;
    /// without a shared counter, no lock is taken either.
    pub fn generate() -> Self {
        Self::generate_at(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        )
    }

    /// [`EventId::generate`] with the time already read, as the time since the Unix epoch (the
    /// builder reads the clock once for the timestamp and the ID; a clock before the epoch
    /// counts as the epoch).
    ///
    /// A random UUID (version 4: 122 random bits, the variant set) with the milliseconds
    /// written over its first 48 bits and its version made 7 is a version 7 UUID with 74
    /// random bits, as `Uuid::new_v7` makes one without a counter; made and written here
    /// directly, it costs about 330 instructions where that and the crate's formatting cost
    /// about 370 (callgrind, `--quick --row default`: 18.4 -> 16.5 M for 50 000 IDs).
    pub(crate) fn generate_at(since: std::time::Duration) -> Self {
        const MILLIS_SHIFT: u32 = 128 - 48;
        const VERSION: u128 = 0xF << 76;
        let millis = since.as_millis() as u64 & ((1 << 48) - 1);
        let random = uuid::Uuid::new_v4().as_u128();
        let id = (random & !(u128::MAX << MILLIS_SHIFT) & !VERSION)
            | (u128::from(millis) << MILLIS_SHIFT)
            | (7 << 76);
        Self(Text::Inline(hyphenated(id)))
    }
}

/// Eight hexadecimal digits (lower case) of `x`, most significant first, computed a word at a
/// time: each nibble spread to a byte of its own, then turned into its digit.
fn hex8(x: u32) -> [u8; 8] {
    const LOW: u64 = u64::from_ne_bytes([0x0F; 8]);
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    let mut x = u64::from(x);
    x = (x | (x << 16)) & 0x0000_FFFF_0000_FFFF;
    x = (x | (x << 8)) & 0x00FF_00FF_00FF_00FF;
    x = (x | (x << 4)) & LOW;
    // Each byte now holds one nibble, the most significant in the highest byte. A nibble of
    // 10 or more gets a 1 from adding 6 (no byte carries: each is under 16); digits past 9
    // are letters, 'a' being 39 places after '9' + 1.
    let letters = ((x + ONES * 6) >> 4) & ONES;
    (x + ONES * u64::from(b'0') + letters * 39).to_be_bytes()
}

/// `id` as a UUID is written: `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lower case.
fn hyphenated(id: u128) -> arrayvec::ArrayString<EVENT_ID_INLINE> {
    let words = [
        (id >> 96) as u32,
        (id >> 64) as u32,
        (id >> 32) as u32,
        id as u32,
    ];
    let [a, b, c, d] = words.map(hex8);
    let mut text = [b'-'; EVENT_ID_INLINE];
    text[..8].copy_from_slice(&a);
    text[9..13].copy_from_slice(&b[..4]);
    text[14..18].copy_from_slice(&b[4..]);
    text[19..23].copy_from_slice(&c[..4]);
    text[24..28].copy_from_slice(&c[4..]);
    text[28..36].copy_from_slice(&d);
    let mut text = arrayvec::ArrayString::from_byte_string(&text)
        .expect("hexadecimal digits and hyphens are ASCII");
    text.truncate(36);
    text
}

string_impls!(EventId);
ordered_as_text!(EventId);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Short event and aggregate IDs are kept in place, long ones shared; both read, compare,
    /// hash and print by their text alone.
    #[test]
    fn ids_of_every_length_behave_as_their_text() {
        use std::hash::{BuildHasher, RandomState};
        let hasher = RandomState::new();
        for len in [
            1,
            36,
            EVENT_ID_INLINE,
            EVENT_ID_INLINE + 1,
            MAX_NAME_LEN - 1,
        ] {
            let text = "e".repeat(len - 1) + "Z";
            let id = EventId::new(text.as_str()).unwrap();
            let again = EventId::new(text.clone()).unwrap();
            assert_eq!(id.as_str(), text);
            assert_eq!(id.to_string(), text);
            assert_eq!(format!("{id:?}"), format!("EventId({text:?})"));
            assert_eq!(id, again);
            assert_eq!(hasher.hash_one(&id), hasher.hash_one(&again));
            assert_eq!(matches!(id.0, Text::Inline(_)), len <= EVENT_ID_INLINE);
            let longer = EventId::new(text.clone() + "a").unwrap();
            assert!(id < longer && longer != id, "{len}");
        }
        for len in [
            1,
            36,
            AGGREGATE_ID_INLINE,
            AGGREGATE_ID_INLINE + 1,
            MAX_AGGREGATE_ID_LEN,
        ] {
            let text = "a".repeat(len - 1) + "Z";
            let id = AggregateId::new(text.as_str()).unwrap();
            let again = AggregateId::new(text.clone()).unwrap();
            assert_eq!(id.as_str(), text);
            assert_eq!(&*id.shared(), text);
            assert_eq!(id.to_string(), text);
            assert_eq!(format!("{id:?}"), format!("AggregateId({text:?})"));
            assert_eq!(id, again);
            assert_eq!(hasher.hash_one(&id), hasher.hash_one(&again));
            assert_eq!(hasher.hash_one(&id), hasher.hash_one(text.as_str()));
            assert_eq!(matches!(id.0, Text::Inline(_)), len <= AGGREGATE_ID_INLINE);
            let parsed: AggregateId = serde_json::from_str(&format!("{text:?}")).unwrap();
            assert_eq!(parsed, id);
            if len < MAX_AGGREGATE_ID_LEN {
                let longer = AggregateId::new(text.clone() + "a").unwrap();
                assert!(id < longer && longer != id, "{len}");
            }
        }
        let generated = EventId::generate();
        assert!(matches!(&generated.0, Text::Inline(text) if text.len() == 36));
        let parsed: EventId = serde_json::from_str(&format!("{:?}", generated.as_str())).unwrap();
        assert_eq!(parsed, generated);
    }

    #[test]
    fn kept_aggregate_ids_are_shared_and_forgotten_when_full() {
        // Longer than an ID kept in place: kept ones are shared, not allocated again.
        let [a, b, c] = ["a", "b", "c"].map(|n| n.repeat(AGGREGATE_ID_INLINE + 1));
        let shared = |id: &AggregateId| match &id.0 {
            Text::Shared(text) => Arc::clone(text),
            Text::Inline(_) => panic!("{id:?} is longer than an ID kept in place"),
        };
        let mut ids = AggregateIds::new(2);
        let first = ids.get(&a).unwrap();
        assert!(Arc::ptr_eq(&shared(&first), &shared(&ids.get(&a).unwrap())));
        ids.get(&b).unwrap();
        assert_eq!(ids.len(), 2);
        // Full: all are forgotten, and the new one kept.
        ids.get(&c).unwrap();
        assert_eq!(ids.len(), 1);
        assert!(!Arc::ptr_eq(
            &shared(&first),
            &shared(&ids.get(&a).unwrap())
        ));
        // Refused IDs are never kept.
        assert!(ids.get("a b").is_err());
        assert_eq!(ids.len(), 2);
        // Short ones are kept too, in place.
        let short = ids.get("order-1").unwrap();
        assert!(matches!(short.0, Text::Inline(_)));
        assert_eq!(ids.len(), 1);
        assert_eq!(ids.get("order-1").unwrap(), short);
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn with_no_capacity_ids_are_made_anew_and_event_types_kept() {
        let mut ids = AggregateIds::new(0);
        let long = "a".repeat(AGGREGATE_ID_INLINE + 1);
        let a = ids.get(&long).unwrap();
        let again = ids.get(&long).unwrap();
        assert_eq!(a, again);
        assert!(!std::ptr::eq(a.as_str(), again.as_str()));
        assert!(ids.is_empty());
        assert!(ids.get("a b").is_err());
        let placed = ids.event_type("Placed").unwrap();
        assert!(Arc::ptr_eq(&placed.0, &ids.event_type("Placed").unwrap().0));
    }

    /// The word-at-a-time check agrees with the byte rule for every byte value, at every
    /// position of a word and of the remainder after the words.
    #[test]
    fn all_graphic_agrees_with_the_byte_rule() {
        for len in [1, 7, 8, 9, 17, 36] {
            for at in 0..len {
                for b in 0..=u8::MAX {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    assert_eq!(
                        all_graphic(&bytes),
                        b.is_ascii_graphic(),
                        "{b:#x} at {at} of {len}"
                    );
                }
            }
        }
        assert!(all_graphic(b""));
        assert!(all_graphic(b"!~!~!~!~!~!~!~!~"));
    }

    /// Each table admits exactly the characters its rule names.
    #[test]
    fn the_character_tables_follow_their_rules() {
        for c in (0u32..0x250).filter_map(char::from_u32) {
            let admits = |table: &Allowed| c.is_ascii() && table[c as usize];
            let alnum = c.is_ascii_alphanumeric();
            assert_eq!(admits(&TOPIC_CHARS), alnum || "-_.".contains(c), "{c:?}");
            assert_eq!(
                admits(&AGGREGATE_ID_CHARS),
                alnum || "-_.:@/+=~#".contains(c),
                "{c:?}"
            );
            assert_eq!(
                admits(&EVENT_TYPE_CHARS),
                alnum || "-_.:/".contains(c),
                "{c:?}"
            );
            assert_eq!(admits(&EVENT_ID_CHARS), c.is_ascii_graphic(), "{c:?}");
        }
    }

    #[test]
    fn aggregate_id_limits() {
        assert!(AggregateId::new("a".repeat(MAX_AGGREGATE_ID_LEN)).is_ok());
        let err = AggregateId::new("a".repeat(MAX_AGGREGATE_ID_LEN + 1)).unwrap_err();
        assert_eq!(err.field(), "aggregate_id");
        assert!(err.to_string().contains("257 bytes long"), "{err}");
        let err = AggregateId::new("a b").unwrap_err();
        assert!(err.to_string().contains("contains ' '"), "{err}");
        assert!(AggregateId::new("tenant:7/order#3").is_ok());
    }

    #[test]
    fn topic_rules() {
        for bad in ["", ".", "a.", ".a", "a..b", "a.*", "a.>", "a b", "ä"] {
            assert!(Topic::new(bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["a", "orders.v1", "A-b_c.D9"] {
            assert!(Topic::new(good).is_ok(), "{good:?} was refused");
        }
    }

    #[test]
    fn a_recent_event_type_is_shared_and_invalid_ones_stay_refused() {
        let first = EventType::new("Deposited").unwrap();
        let again = EventType::new(String::from("Deposited")).unwrap();
        assert!(
            Arc::ptr_eq(&first.0, &again.0),
            "validated and copied again"
        );
        for name in ["A", "B", "C", "D", "E"] {
            EventType::new(name).unwrap();
        }
        // Pushed out by five others: validated anew, equal all the same.
        let later = EventType::new("Deposited").unwrap();
        assert!(!Arc::ptr_eq(&first.0, &later.0));
        assert_eq!(first, later);
        assert!(EventType::new("Deposited ").is_err());
        assert!(EventType::new("").is_err());
    }

    #[test]
    fn generated_event_ids_are_valid_distinct_uuid_v7() {
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|_| EventId::generate().to_string())
            .collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(50) {
            assert!(EventId::new(id.as_str()).is_ok());
            let parts: Vec<&str> = id.split('-').collect();
            assert_eq!(
                parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12],
                "{id}"
            );
            assert!(parts[2].starts_with('7'), "version 7: {id}");
            let parsed = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(parsed.get_version_num(), 7, "{id}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert!(
                matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
                "variant: {id}"
            );
        }
        // Time-ordered: the millisecond prefix never goes backwards.
        let first = EventId::generate().to_string();
        let later = EventId::generate().to_string();
        assert!(first[..13] <= later[..13]);
    }

    #[test]
    fn event_types_read_lately_are_shared_and_the_oldest_makes_room() {
        let mut ids = AggregateIds::new(4);
        let first = ids.event_type("T0").unwrap();
        assert!(ids.event_type("not valid").is_err());
        for n in 1..AggregateIds::EVENT_TYPES {
            ids.event_type(&format!("T{n}")).unwrap();
        }
        let again = ids.event_type("T0").unwrap();
        assert!(std::ptr::eq(first.as_str(), again.as_str()), "kept");
        // One more type takes the oldest's place: T1 is still kept, T0 is read anew.
        let t1 = ids.event_type("T1").unwrap();
        ids.event_type("Newer").unwrap();
        assert_eq!(ids.types.len(), AggregateIds::EVENT_TYPES);
        assert!(std::ptr::eq(
            t1.as_str(),
            ids.event_type("T1").unwrap().as_str()
        ));
        let anew = ids.event_type("T0").unwrap();
        assert!(!std::ptr::eq(first.as_str(), anew.as_str()));
        assert_eq!(anew, first);
    }

    proptest! {
        /// Written as the `uuid` crate writes it, whatever the bits.
        #[test]
        fn ids_are_written_as_the_uuid_crate_writes_them(id in any::<u128>()) {
            let ours = hyphenated(id);
            prop_assert_eq!(ours.as_str(), uuid::Uuid::from_u128(id).hyphenated().to_string());
        }
    }

    proptest! {
        #[test]
        fn aggregate_id_accepts_exactly_its_alphabet(s in "\\PC{0,300}") {
            let expected = !s.is_empty()
                && s.len() <= MAX_AGGREGATE_ID_LEN
                && s.chars().all(|c| c.is_ascii_alphanumeric() || AGGREGATE_ID_PUNCTUATION.contains(c));
            prop_assert_eq!(AggregateId::new(s.as_str()).is_ok(), expected);
        }

        #[test]
        fn valid_topics_round_trip(tokens in proptest::collection::vec("[A-Za-z0-9_-]{1,8}", 1..6)) {
            let text = tokens.join(".");
            let topic = Topic::new(text.as_str()).unwrap();
            prop_assert_eq!(topic.as_str(), text.as_str());
        }
    }
}
