//! Typed errors. Messages are lowercase, have no trailing period and name the input at fault.

use std::fmt;

/// A boxed error that can cross tasks and threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A value refused at construction: says which field, which value and why.
///
/// Display: ``{field} `{value}` is invalid: {reason}`` (values over 80 characters are cut).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    field: &'static str,
    value: String,
    reason: String,
}

impl ValidationError {
    /// A new validation error for `field` holding `value`.
    pub fn new(field: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field,
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// The field that was refused, such as `aggregate_id`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// The refused value.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Why it was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 80;
        // Control characters are escaped (`\r`, `\n`, `\0`, ...): a refused value must not
        // forge lines in the log that prints the error.
        let shown: String = self
            .value
            .chars()
            .take(SHOWN)
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect();
        let cut = if self.value.chars().count() > SHOWN {
            "…"
        } else {
            ""
        };
        write!(
            f,
            "{} `{shown}{cut}` is invalid: {}",
            self.field, self.reason
        )
    }
}

impl std::error::Error for ValidationError {}

/// A payload could not be encoded or decoded with a [`Codec`](crate::Codec).
#[derive(Debug)]
pub struct CodecError {
    message: String,
    source: Option<BoxError>,
}

impl CodecError {
    pub(crate) fn new(message: impl Into<String>, source: Option<BoxError>) -> Self {
        Self {
            message: message.into(),
            source,
        }
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// A message could not be read as an envelope (see [`wire`](crate::wire)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A required header is absent.
    MissingHeader(&'static str),
    /// A header is present but its value is not of the documented form.
    InvalidHeader {
        /// The header's name.
        name: &'static str,
        /// Its value as received.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A header carried a value the envelope refuses.
    Invalid(ValidationError),
    /// A record batch whose body is not of the documented form (see
    /// [`wire::decode_batch`](crate::wire::decode_batch)).
    MalformedBatch(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::MissingHeader(name) => write!(f, "header `{name}` is missing"),
            DecodeError::InvalidHeader {
                name,
                value,
                reason,
            } => write!(f, "header `{name}` value `{value}` is invalid: {reason}"),
            DecodeError::Invalid(err) => err.fmt(f),
            DecodeError::MalformedBatch(why) => write!(f, "malformed record batch: {why}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl From<ValidationError> for DecodeError {
    fn from(value: ValidationError) -> Self {
        DecodeError::Invalid(value)
    }
}

/// What a [`Handler`](crate::Handler) returns when it could not handle an event.
///
/// The error says whether trying again can help: a *retryable* error (a database timeout) is
/// retried in place, holding back the aggregate's later events; a *permanent* one (a payload
/// the handler can never accept) goes to the transport's failure policy at once.
#[derive(Debug)]
pub struct HandlerError {
    retryable: bool,
    source: BoxError,
}

impl HandlerError {
    /// An error that may go away if the same event is handled again.
    pub fn retryable(source: impl Into<BoxError>) -> Self {
        Self {
            retryable: true,
            source: source.into(),
        }
    }

    /// An error that handling the same event again cannot fix.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            retryable: false,
            source: source.into(),
        }
    }

    /// Whether retrying can help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The underlying error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable {
            "retryable"
        } else {
            "permanent"
        };
        write!(f, "handler failed ({kind}): {}", self.source)
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// The kinds of [`PublishError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// The publisher was closed before the message could be sent.
    Closed,
    /// The message is larger than the transport accepts.
    PayloadTooLarge,
    /// The message or its topic was refused before sending.
    Invalid,
    /// No acknowledgement arrived in time; the message may or may not be stored.
    /// Publishing the same envelope again is safe: the transport de-duplicates by event ID.
    TimedOut,
    /// The broker refused the message (no stream for the subject, limits, ...).
    Rejected,
    /// The connection failed while the message was in flight.
    Connection,
    /// An earlier message of the same publisher failed, so this one was not sent, to keep order.
    Aborted,
}

/// An error of the bus's operations: a kind (how it failed, for callers that decide by kind),
/// a message naming the input at fault, and the error that caused it, if any.
/// [`PublishError`] and [`SubscribeError`] are this with their kinds.
#[derive(Debug)]
pub struct BusError<K> {
    kind: K,
    message: String,
    source: Option<BoxError>,
}

impl<K: Copy> BusError<K> {
    /// A new error of `kind` with a message naming the input.
    pub fn new(kind: K, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A new error of `kind` caused by `source`.
    pub fn with_source(kind: K, message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// How it failed.
    pub fn kind(&self) -> K {
        self.kind
    }
}

impl<K> fmt::Display for BusError<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl<K: fmt::Debug> std::error::Error for BusError<K> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// A publish failed. [`kind`](BusError::kind) says how; the message says with what.
pub type PublishError = BusError<PublishErrorKind>;

impl PublishError {
    /// Whether publishing the same envelope again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            PublishErrorKind::TimedOut | PublishErrorKind::Connection | PublishErrorKind::Aborted
        )
    }
}

impl From<ValidationError> for PublishError {
    fn from(value: ValidationError) -> Self {
        PublishError::with_source(PublishErrorKind::Invalid, "invalid input", value)
    }
}

/// The kinds of [`SubscribeError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SubscribeErrorKind {
    /// The subscriber or transport was closed.
    Closed,
    /// The topic already has an active subscription on this transport (one fetcher per topic).
    AlreadySubscribed,
    /// The broker-side configuration is missing or differs from what was asked for.
    Configuration,
    /// The broker refused this client an operation it needs (a subject it may not publish or
    /// subscribe to); the message names the subject.
    PermissionDenied,
    /// The connection failed.
    Connection,
    /// Shutdown did not finish within its deadline.
    ShutdownTimedOut,
    /// The aggregate named in an operator call is not halted.
    NotHalted,
    /// The operator call needs the subscription that consumes the topic, and this one is a
    /// standby.
    NotOwner,
    /// The transport (or its server) cannot do what was asked.
    Unsupported,
}

/// Subscribing or closing a subscription failed. [`kind`](BusError::kind) says what.
pub type SubscribeError = BusError<SubscribeErrorKind>;
