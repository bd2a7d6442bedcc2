//! The transport's error type.

use std::fmt;

use bus_core::ValidationError;

/// What kind of failure a [`NatsError`] is, for callers that decide by kind, not by text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NatsErrorKind {
    /// The configuration was refused before anything was sent.
    Invalid,
    /// No connection could be made.
    Connect,
    /// A stream or consumer is missing or differs from the configuration, or the broker refused
    /// what the configuration asks for.
    Configuration,
    /// A JetStream API call failed or went unanswered.
    Api,
    /// The server lacks a feature the configuration needs.
    Unsupported,
    /// Another subscription owns the topic's consumer group and this server cannot hold a
    /// standby (servers before 2.14).
    Owned,
    /// The bus was closed.
    Closed,
    /// The server refused this user a subject the operation needs.
    PermissionDenied,
    /// What an operator asked about does not exist: no stream stores the topic, or the consumer
    /// group never subscribed to it.
    NotFound,
    /// No live subscription of the group answered a remote-control request in time.
    Unanswered,
    /// Every subscription that answered a remote-control request refused it (for a resume or a
    /// skip: none holds the aggregate halted).
    Refused,
}

/// Errors of the NATS transport.
#[derive(Debug)]
#[non_exhaustive]
pub enum NatsError {
    /// The configuration was refused before anything was sent.
    Invalid(ValidationError),
    /// Connecting failed.
    Connect {
        /// The servers tried, credentials removed.
        servers: Vec<String>,
        /// Why.
        source: async_nats::ConnectError,
    },
    /// A stream or consumer is missing or differs from the configuration.
    Configuration(String),
    /// A JetStream API call failed.
    Api {
        /// What was being done.
        what: String,
        /// The error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server lacks a feature the configuration needs.
    Unsupported(String),
    /// Another process owns the consumer group of a topic, and the server cannot keep this
    /// one as a standby.
    Owned(String),
    /// The bus was closed; nothing more can be done with it.
    Closed(String),
    /// The server refused this user a subject the operation needs (its permissions); says
    /// which operation and which subject.
    PermissionDenied(String),
    /// What an operator asked about does not exist (a topic no stream stores, a group that never
    /// subscribed to it); says which.
    NotFound(String),
    /// No live subscription of the group answered a remote-control request in time; says which
    /// group, topic and wait.
    Unanswered(String),
    /// Every subscription that answered a remote-control request refused it.
    Refused {
        /// What was asked.
        what: String,
        /// Each member that answered, and why it refused.
        refusals: Vec<MemberRefusal>,
    },
}

/// One subscription's refusal of a remote-control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRefusal {
    /// The member that answered (`<host>:<pid>:<n>`).
    pub member: String,
    /// Why it refused (for a resume or a skip: the aggregate is not halted there).
    pub reason: String,
}

impl NatsError {
    pub(crate) fn api(
        what: String,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        NatsError::Api {
            what,
            source: source.into(),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> NatsErrorKind {
        match self {
            NatsError::Invalid(_) => NatsErrorKind::Invalid,
            NatsError::Connect { .. } => NatsErrorKind::Connect,
            NatsError::Configuration(_) => NatsErrorKind::Configuration,
            NatsError::Api { .. } => NatsErrorKind::Api,
            NatsError::Unsupported(_) => NatsErrorKind::Unsupported,
            NatsError::Owned(_) => NatsErrorKind::Owned,
            NatsError::Closed(_) => NatsErrorKind::Closed,
            NatsError::PermissionDenied(_) => NatsErrorKind::PermissionDenied,
            NatsError::NotFound(_) => NatsErrorKind::NotFound,
            NatsError::Unanswered(_) => NatsErrorKind::Unanswered,
            NatsError::Refused { .. } => NatsErrorKind::Refused,
        }
    }
}

impl fmt::Display for NatsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsError::Invalid(e) => write!(f, "invalid configuration: {e}"),
            NatsError::Connect { servers, source } => {
                write!(f, "could not connect to {}: {source}", servers.join(", "))
            }
            NatsError::Configuration(m)
            | NatsError::Unsupported(m)
            | NatsError::Owned(m)
            | NatsError::Closed(m)
            | NatsError::PermissionDenied(m)
            | NatsError::NotFound(m)
            | NatsError::Unanswered(m) => f.write_str(m),
            NatsError::Refused { what, refusals } => {
                write!(f, "no subscription could {what} (")?;
                for (i, r) in refusals.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}{}: {}", r.member, r.reason)?;
                }
                f.write_str(")")
            }
            NatsError::Api { what, source } => write!(f, "{what} failed: {source}"),
        }
    }
}

impl std::error::Error for NatsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NatsError::Invalid(e) => Some(e),
            NatsError::Connect { source, .. } => Some(source),
            NatsError::Api { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

impl From<ValidationError> for NatsError {
    fn from(value: ValidationError) -> Self {
        NatsError::Invalid(value)
    }
}
