//! W3C Trace Context (`traceparent`) carried in an event's headers, so that a trace continues
//! from the service that published an event to the services that handle it, and on to what
//! their handlers publish.
//!
//! A transport reads the `traceparent` header of each delivery into [`Delivery::traceparent`]
//! (crate::Delivery); a publisher gives every envelope published without one a `traceparent`
//! that continues the trace of the event being handled (or starts from the envelope's trace
//! ID, when that is a W3C trace ID), with a fresh parent ID.

use std::fmt;

/// The header name, as the W3C recommendation writes it.
pub const TRACEPARENT: &str = "traceparent";

/// A parsed `traceparent` value: `00-<trace-id>-<parent-id>-<flags>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: String,
    parent_id: String,
    flags: u8,
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_zero(s: &str) -> bool {
    s.bytes().all(|b| b == b'0')
}

impl TraceParent {
    /// Parses a header value; `None` unless it is a valid version-00 (or later-version,
    /// read as 00) `traceparent` with non-zero IDs.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let parent_id = parts.next()?;
        let flags = parts.next()?;
        let valid = is_lower_hex(version, 2)
            && version != "ff"
            && (version != "00" || parts.next().is_none())
            && is_lower_hex(trace_id, 32)
            && !is_zero(trace_id)
            && is_lower_hex(parent_id, 16)
            && !is_zero(parent_id)
            && is_lower_hex(flags, 2);
        valid.then(|| Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).unwrap_or(0),
        })
    }

    /// A context in trace `trace_id` (32 lower-case hex digits, not all zero) with parent
    /// `parent_id`, sampled; `None` if `trace_id` is not a W3C trace ID.
    pub fn new(trace_id: &str, parent_id: u64) -> Option<Self> {
        (is_lower_hex(trace_id, 32) && !is_zero(trace_id)).then(|| Self {
            trace_id: trace_id.to_owned(),
            parent_id: format!("{:016x}", parent_id.max(1)),
            flags: 1,
        })
    }

    /// The same trace and flags, under a new parent (the publish that carries it).
    pub fn child(&self, parent_id: u64) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            parent_id: format!("{:016x}", parent_id.max(1)),
            flags: self.flags,
        }
    }

    /// The trace ID, 32 lower-case hex digits.
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// The parent (span) ID, 16 lower-case hex digits.
    pub fn parent_id(&self) -> &str {
        &self.parent_id
    }

    /// Whether the caller sampled the trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// A new random parent (span) ID for a publish that continues a trace: from the standard
/// library's per-hasher random keys and the clock, so no random-number crate is needed.
pub fn new_parent_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_writes_the_recommendations_example() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(text).unwrap();
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.parent_id(), "00f067aa0ba902b7");
        assert!(parsed.sampled());
        assert_eq!(parsed.to_string(), text);
        let child = parsed.child(0xabc);
        assert_eq!(
            child.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000abc-01"
        );
    }

    #[test]
    fn refuses_what_the_recommendation_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version may add fields; its first four are read.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
        assert!(TraceParent::new("not-a-trace-id", 1).is_none());
    }
}
