//! Permission violations: the server's `-ERR` reports of them, read in one place, and the
//! guard that fails a broker request at once with `PermissionDenied` when one is reported
//! while it runs (the server answers a refused publish or subscription with nothing else).

use crate::NatsError;

/// Runs `operation`, failing it at once with `PermissionDenied` if the server reports a
/// permissions violation on the connection meanwhile: the server answers a refused publish or
/// subscription only with that report, so the operation itself would wait for its timeout.
pub(crate) async fn guarded<T>(
    violations: &tokio::sync::watch::Receiver<Option<Violation>>,
    what: impl FnOnce() -> String,
    operation: impl std::future::Future<Output = Result<T, NatsError>>,
) -> Result<T, NatsError> {
    guarded_on(violations, None, what, operation).await
}

/// [`guarded`] for an operation that uses a second connection too (`also`): a violation
/// reported on either fails it.
pub(crate) async fn guarded_on<T>(
    violations: &tokio::sync::watch::Receiver<Option<Violation>>,
    also: Option<&tokio::sync::watch::Receiver<Option<Violation>>>,
    what: impl FnOnce() -> String,
    operation: impl std::future::Future<Output = Result<T, NatsError>>,
) -> Result<T, NatsError> {
    let mut violations = violations.clone();
    violations.mark_unchanged();
    let mut also = also.cloned();
    if let Some(also) = &mut also {
        also.mark_unchanged();
    }
    let also_changed = async {
        match &mut also {
            Some(also) => also.changed().await.map(|()| also.borrow().clone()),
            None => std::future::pending().await,
        }
    };
    let violation = tokio::select! {
        result = operation => return result,
        Ok(()) = violations.changed() => violations.borrow().clone(),
        Ok(violation) = also_changed => violation,
    };
    let violation = violation
        .as_ref()
        .map_or_else(String::new, ToString::to_string);
    Err(NatsError::PermissionDenied(format!(
        "{}: the server refused it for this user ({violation}); see docs/permissions.md for the subjects each role needs",
        what()
    )))
}

/// What a client was refused: the server's `-ERR` report of a permissions violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `Permissions Violation for Publish to "<subject>"` (also `Publish with Reply of`).
    Publish,
    /// `Permissions Violation for Subscription to "<subject>"` (with or without a queue).
    Subscription,
    /// Any other permissions violation the server reports.
    Other,
}

/// A permissions violation the server reported on a connection. The protocol carries it only
/// as words after `-ERR`: this is the one place that reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub(crate) refused: Refused,
    /// The subject it names, when it names one.
    pub(crate) subject: Option<String>,
    /// The server's words, for messages.
    pub(crate) text: String,
}

impl Violation {
    /// Reads a server error report; `None` when it is not a permissions violation.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        const PREFIX: &str = "permissions violation for ";
        let head = text.get(..PREFIX.len())?;
        if !head.eq_ignore_ascii_case(PREFIX) {
            return None;
        }
        let rest = &text[PREFIX.len()..];
        let starts = |word: &str| {
            rest.get(..word.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(word))
        };
        let refused = if starts("publish ") {
            Refused::Publish
        } else if starts("subscription ") {
            Refused::Subscription
        } else {
            Refused::Other
        };
        let subject = rest
            .split_once('"')
            .and_then(|(_, quoted)| quoted.split_once('"'))
            .map(|(subject, _)| subject.to_owned());
        Some(Self {
            refused,
            subject,
            text: text.to_owned(),
        })
    }

    /// Whether it refused a publish to `subject` or to a subject below it.
    pub(crate) fn refuses_publish_to(&self, subject: &str) -> bool {
        self.refused == Refused::Publish
            && self.subject.as_deref().is_some_and(|s| {
                s == subject
                    || s.strip_prefix(subject)
                        .is_some_and(|below| below.starts_with('.'))
            })
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod violation_tests {
    use super::*;

    #[test]
    fn reads_the_servers_reports() {
        let publish =
            Violation::parse(r#"Permissions Violation for Publish to "orders.3""#).unwrap();
        assert_eq!(publish.refused, Refused::Publish);
        assert_eq!(publish.subject.as_deref(), Some("orders.3"));
        assert!(publish.refuses_publish_to("orders"));
        assert!(publish.refuses_publish_to("orders.3"));
        assert!(!publish.refuses_publish_to("order"));
        assert!(!publish.refuses_publish_to("orders.3.x"));

        let queue = Violation::parse(
            r#"permissions violation for subscription to "_INBOX.x" using queue "q""#,
        )
        .unwrap();
        assert_eq!(queue.refused, Refused::Subscription);
        assert_eq!(queue.subject.as_deref(), Some("_INBOX.x"));
        assert!(!queue.refuses_publish_to("_INBOX.x"));

        let reply =
            Violation::parse(r#"Permissions Violation for Publish with Reply of "_INBOX.r""#)
                .unwrap();
        assert_eq!(reply.refused, Refused::Publish);
        assert_eq!(
            reply.to_string(),
            r#"Permissions Violation for Publish with Reply of "_INBOX.r""#
        );

        assert_eq!(
            Violation::parse("Permissions Violation for x")
                .unwrap()
                .refused,
            Refused::Other
        );
        assert_eq!(
            Violation::parse("Permissions Violation for x")
                .unwrap()
                .subject,
            None
        );
        assert!(Violation::parse("Authorization Violation").is_none());
        assert!(Violation::parse("Maximum Payload Violation").is_none());
        assert!(Violation::parse("").is_none());
    }
}
