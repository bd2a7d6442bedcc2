//! Handled once per aggregate version: a store of the last version of each aggregate a
//! consumer group handled, and [`HandledOnce`], a handler that skips every delivery at or below
//! it and records the version once its handler succeeded.
//!
//! After a crash or a takeover the bus hands the successor what the dead owner had not
//! acknowledged, in order; some of it was handled already. With the store, the handler is not
//! called again for a version the store holds. What that makes exact depends on where the store
//! lives: kept in the same transaction as the handler's own writes (a database the handler
//! writes to), every version's effect happens once; kept apart (a key-value store, the bus's
//! default on NATS), a crash between the handler's success and the record's write still calls
//! the handler again for that one version. See docs/guarantees.md.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::{AggregateId, Envelope, Handler, HandlerError};

/// The last version of each aggregate one consumer group handled on one topic.
///
/// Versions are the envelopes' `event_version`s, which grow per aggregate. A store is for one
/// (group, topic); the bus's own (`bus_nats::NatsHandledVersions`) keeps it in a KV bucket,
/// [`MemoryHandledVersions`] in memory (tests), and a service with a database keeps it next to
/// its own rows, so that the version and the handler's writes commit together.
#[async_trait]
pub trait HandledVersions: Send + Sync + 'static {
    /// The last version of `aggregate` recorded as handled, if any.
    ///
    /// An error fails the delivery as the error says (a retryable one is retried in place, the
    /// aggregate's later events waiting).
    async fn last_handled(&self, aggregate: &AggregateId) -> Result<Option<u64>, HandlerError>;

    /// Records that `version` of `aggregate` was handled, after its handler succeeded. A store
    /// whose handler writes the version in its own transaction (with its changes) records
    /// nothing here.
    async fn record_handled(
        &self,
        aggregate: &AggregateId,
        version: u64,
    ) -> Result<(), HandlerError>;
}

#[async_trait]
impl<S: HandledVersions + ?Sized> HandledVersions for Arc<S> {
    async fn last_handled(&self, aggregate: &AggregateId) -> Result<Option<u64>, HandlerError> {
        (**self).last_handled(aggregate).await
    }

    async fn record_handled(
        &self,
        aggregate: &AggregateId,
        version: u64,
    ) -> Result<(), HandlerError> {
        (**self).record_handled(aggregate, version).await
    }
}

/// A [`HandledVersions`] in memory: for tests, and for handlers whose effects live in the same
/// process (gone with it).
#[derive(Debug, Default)]
pub struct MemoryHandledVersions {
    versions: Mutex<HashMap<AggregateId, u64>>,
}

impl MemoryHandledVersions {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl HandledVersions for MemoryHandledVersions {
    async fn last_handled(&self, aggregate: &AggregateId) -> Result<Option<u64>, HandlerError> {
        Ok(self.versions.lock().unwrap().get(aggregate).copied())
    }

    async fn record_handled(
        &self,
        aggregate: &AggregateId,
        version: u64,
    ) -> Result<(), HandlerError> {
        let mut versions = self.versions.lock().unwrap();
        let last = versions.entry(aggregate.clone()).or_default();
        *last = (*last).max(version);
        Ok(())
    }
}

/// A [`Handler`] that calls its inner handler at most once per aggregate version as far as
/// its store knows: a delivery at or below the version the store holds for its aggregate is
/// skipped (acknowledged without a call), and a version is recorded once the inner handler
/// succeeded.
///
/// A record that fails after the handler succeeded is tried again on the delivery's next
/// attempt without calling the handler again. Events of one aggregate must carry growing
/// versions: an event at or below one already handled is taken for a replay.
///
/// The store is read once per aggregate and ownership term
/// ([`Delivery::ownership_term`](crate::Delivery::ownership_term)): while the subscription
/// keeps its topic no one else handles its aggregates, so the version it read or recorded
/// stays the last one, and the next deliveries of the aggregate are decided without asking the
/// store (a transport without terms asks it for every delivery). Use one per topic, as the
/// store is.
///
/// Resetting a group to an earlier point (`NatsBus::reset_group` in bus-nats) replays versions
/// the store holds: they are skipped, unless the store is emptied for the rebuild.
pub struct HandledOnce<S> {
    store: S,
    handler: Arc<dyn Handler>,
    /// Versions handled whose record failed: (aggregate → version).
    unrecorded: Mutex<HashMap<AggregateId, u64>>,
    /// The last version handled per aggregate as read or recorded under an ownership term:
    /// (term, version). Emptied when it holds `KNOWN_CAPACITY` aggregates.
    known: Mutex<HashMap<AggregateId, (u64, Option<u64>)>>,
    skipped: AtomicU64,
    reads: AtomicU64,
}

/// How many aggregates' versions a [`HandledOnce`] keeps at most (a few MiB); beyond, it
/// starts again from the store.
const KNOWN_CAPACITY: usize = 65_536;

impl<S: HandledVersions> HandledOnce<S> {
    /// `handler`, called at most once per aggregate version `store` knows of.
    pub fn new(store: S, handler: Arc<dyn Handler>) -> Self {
        Self {
            store,
            handler,
            unrecorded: Mutex::default(),
            known: Mutex::default(),
            skipped: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    /// Times the store was asked for an aggregate's version so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The last version handled of `aggregate`, as known under `term` or read from the store.
    async fn last_handled(
        &self,
        aggregate: &AggregateId,
        term: Option<u64>,
    ) -> Result<Option<u64>, HandlerError> {
        if let Some(term) = term {
            if let Some((known_term, last)) = self.known.lock().unwrap().get(aggregate) {
                if *known_term == term {
                    return Ok(*last);
                }
            }
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        let last = self.store.last_handled(aggregate).await?;
        if let Some(term) = term {
            self.remember(aggregate, term, last);
        }
        Ok(last)
    }

    fn remember(&self, aggregate: &AggregateId, term: u64, last: Option<u64>) {
        let mut known = self.known.lock().unwrap();
        if known.len() >= KNOWN_CAPACITY && !known.contains_key(aggregate) {
            known.clear();
        }
        known.insert(aggregate.clone(), (term, last));
    }

    /// Deliveries skipped so far because the store had their version.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }
}

impl<S> std::fmt::Debug for HandledOnce<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandledOnce")
            .field("skipped", &self.skipped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<S: HandledVersions> Handler for HandledOnce<S> {
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError> {
        let aggregate = envelope.aggregate_id().clone();
        let version = envelope.event_version();
        let term = crate::current_delivery().and_then(|d| d.ownership_term);
        let handled = self.unrecorded.lock().unwrap().get(&aggregate) == Some(&version);
        if !handled {
            if let Some(last) = self.last_handled(&aggregate, term).await? {
                if version <= last {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            }
            self.handler.handle(envelope).await?;
        }
        match self.store.record_handled(&aggregate, version).await {
            Ok(()) => {
                if handled {
                    self.unrecorded.lock().unwrap().remove(&aggregate);
                }
                if let Some(term) = term {
                    self.remember(&aggregate, term, Some(version));
                }
                Ok(())
            }
            Err(error) => {
                self.unrecorded.lock().unwrap().insert(aggregate, version);
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::handler_fn;

    fn event(aggregate: &str, version: u64) -> Envelope {
        Envelope::builder(aggregate, "Tested", version)
            .build()
            .unwrap()
    }

    /// A handler that records (aggregate, version) of each call and fails while `failing`.
    fn recording(
        calls: Arc<Mutex<Vec<(String, u64)>>>,
        failing: Arc<AtomicBool>,
    ) -> Arc<dyn Handler> {
        Arc::new(handler_fn(move |e: Envelope| {
            let (calls, failing) = (calls.clone(), failing.clone());
            async move {
                if failing.load(Ordering::Relaxed) {
                    return Err(HandlerError::retryable("down"));
                }
                calls
                    .lock()
                    .unwrap()
                    .push((e.aggregate_id().to_string(), e.event_version()));
                Ok(())
            }
        }))
    }

    #[tokio::test]
    async fn versions_at_or_below_the_last_handled_are_skipped() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let once = HandledOnce::new(
            MemoryHandledVersions::new(),
            recording(calls.clone(), Arc::default()),
        );
        for v in [1, 2, 3, 2, 3, 4, 1, 4, 5] {
            once.handle(event("a", v)).await.unwrap();
        }
        once.handle(event("b", 2)).await.unwrap();
        once.handle(event("b", 1)).await.unwrap();
        assert_eq!(
            *calls.lock().unwrap(),
            [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("a", 5), ("b", 2)]
                .map(|(a, v)| (a.to_owned(), v))
        );
        assert_eq!(once.skipped(), 5);
        let a = AggregateId::new("a").unwrap();
        assert_eq!(once.store().last_handled(&a).await.unwrap(), Some(5));
    }

    #[tokio::test]
    async fn a_failed_handler_records_nothing() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(true));
        let once = HandledOnce::new(
            MemoryHandledVersions::new(),
            recording(calls.clone(), failing.clone()),
        );
        assert!(once.handle(event("a", 1)).await.is_err());
        let a = AggregateId::new("a").unwrap();
        assert_eq!(once.store().last_handled(&a).await.unwrap(), None);
        failing.store(false, Ordering::Relaxed);
        once.handle(event("a", 1)).await.unwrap();
        assert_eq!(calls.lock().unwrap().len(), 1);
        assert_eq!(once.store().last_handled(&a).await.unwrap(), Some(1));
    }

    /// Under one ownership term the store is read once per aggregate; a new term reads it
    /// again (another owner may have handled more meanwhile); without a term every delivery
    /// reads it.
    #[tokio::test]
    async fn the_store_is_read_once_per_aggregate_and_term() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let store = Arc::new(MemoryHandledVersions::new());
        let once = HandledOnce::new(store.clone(), recording(calls.clone(), Arc::default()));
        let under = |term: u64, e: Envelope| {
            let delivery = crate::Delivery {
                ownership_term: Some(term),
                ..crate::Delivery::new(1)
            };
            crate::with_delivery(delivery, once.handle(e))
        };
        for v in 1..=3 {
            under(1, event("a", v)).await.unwrap();
        }
        under(1, event("b", 1)).await.unwrap();
        under(1, event("a", 2)).await.unwrap(); // a copy: skipped from what is known
        assert_eq!(once.reads(), 2, "a and b, once each");
        assert_eq!(once.skipped(), 1);
        // Another owner handled a up to 10 while this one did not hold the topic.
        let a = AggregateId::new("a").unwrap();
        store.record_handled(&a, 10).await.unwrap();
        under(2, event("a", 9)).await.unwrap();
        assert_eq!(once.reads(), 3);
        assert_eq!(once.skipped(), 2, "9 was handled by the other owner");
        under(2, event("a", 11)).await.unwrap();
        assert_eq!(once.reads(), 3);
        // No term: the store every time.
        once.handle(event("a", 11)).await.unwrap();
        once.handle(event("a", 12)).await.unwrap();
        assert_eq!(once.reads(), 5);
        let seen: Vec<u64> = calls.lock().unwrap().iter().map(|c| c.1).collect();
        assert_eq!(seen, [1, 2, 3, 1, 11, 12]);
    }

    /// A store whose writes fail while `down`.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryHandledVersions,
        down: AtomicBool,
        writes: AtomicU64,
    }

    #[async_trait]
    impl HandledVersions for Flaky {
        async fn last_handled(&self, aggregate: &AggregateId) -> Result<Option<u64>, HandlerError> {
            self.inner.last_handled(aggregate).await
        }

        async fn record_handled(
            &self,
            aggregate: &AggregateId,
            version: u64,
        ) -> Result<(), HandlerError> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if self.down.load(Ordering::Relaxed) {
                return Err(HandlerError::retryable("store down"));
            }
            self.inner.record_handled(aggregate, version).await
        }
    }

    /// The handler succeeded and the record failed: the retry records without calling the
    /// handler again.
    #[tokio::test]
    async fn a_failed_record_is_retried_without_calling_the_handler_again() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let store = Arc::new(Flaky::default());
        store.down.store(true, Ordering::Relaxed);
        let once = HandledOnce::new(store.clone(), recording(calls.clone(), Arc::default()));
        let error = once.handle(event("a", 1)).await.unwrap_err();
        assert!(error.is_retryable(), "{error}");
        assert!(once.handle(event("a", 1)).await.is_err());
        store.down.store(false, Ordering::Relaxed);
        once.handle(event("a", 1)).await.unwrap();
        assert_eq!(
            calls.lock().unwrap().len(),
            1,
            "one call for three attempts"
        );
        assert_eq!(store.writes.load(Ordering::Relaxed), 3);
        let a = AggregateId::new("a").unwrap();
        assert_eq!(store.last_handled(&a).await.unwrap(), Some(1));
        // The next version goes through the handler again.
        once.handle(event("a", 2)).await.unwrap();
        assert_eq!(calls.lock().unwrap().len(), 2);
    }
}
