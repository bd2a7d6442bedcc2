//! Typed events: publish any serialisable struct under its event type, and subscribe with one
//! handler per event type that receives the decoded struct and the delivery's context.
//!
//! ```
//! use bus_core::{Event, EventContext, EventHandlers, HandlerError};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Deposited { cents: u64 }
//! impl Event for Deposited { const TYPE: &'static str = "Deposited"; }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Withdrawn { cents: u64 }
//! impl Event for Withdrawn { const TYPE: &'static str = "Withdrawn"; }
//!
//! let handlers = EventHandlers::new()
//!     .on(|e: Deposited, cx: EventContext| async move {
//!         println!("{} +{} (v{}, attempt {})", cx.aggregate_id(), e.cents, cx.version(), cx.attempt());
//!         Ok(())
//!     })
//!     .on(|e: Withdrawn, cx: EventContext| async move {
//!         println!("{} -{}", cx.aggregate_id(), e.cents);
//!         Ok::<_, HandlerError>(())
//!     });
//! // bus.subscribe(&topic, std::sync::Arc::new(handlers)).await?;
//! # let _ = handlers;
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{de::DeserializeOwned, Serialize};

use crate::codec::Codec;
use crate::delivery::{current_delivery, Cancellation, Delivery};
use crate::envelope::{Envelope, EnvelopeBuilder};
use crate::error::{CodecError, HandlerError, PublishError, PublishErrorKind};
use crate::names::{AggregateId, EventId, Topic};
use crate::traits::{Handler, Publisher, Receipt};

/// An event struct with its event type, the name written on the wire and matched by
/// [`EventHandlers`]. Keep `TYPE` stable once events of it are stored.
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The event type, as in [`Envelope::event_type`].
    const TYPE: &'static str;
    /// How the struct is written into the payload; readers decode by the envelope's content
    /// type, so changing it later does not break stored events.
    const CODEC: Codec = Codec::MessagePack;
    /// The version of the struct's shape (default 1), written with every event
    /// ([`Envelope::schema_version`]). Raise it when stored payloads would no longer decode into
    /// the struct, and register an upcaster from the previous version
    /// ([`EventHandlers::upcast`]): older events are turned into the current shape before the
    /// handler sees them, and an event newer than the code is refused, never misread.
    const VERSION: u32 = 1;
}

impl Envelope {
    /// An envelope builder for `event` of `aggregate_id` at `version`, its payload encoded with
    /// `E::CODEC`; add metadata (correlation ID, trace ID, headers) and `build()`.
    pub fn for_event<E: Event>(
        aggregate_id: impl AsRef<str>,
        version: u64,
        event: &E,
    ) -> Result<EnvelopeBuilder, CodecError> {
        Envelope::builder(aggregate_id, E::TYPE, version)
            .schema_version(E::VERSION)
            .typed_payload(event, E::CODEC)
    }
}

/// Publishing typed events through any [`Publisher`].
#[async_trait]
pub trait PublishEvent: Publisher {
    /// Publishes `event` of `aggregate_id` at `version` (the aggregate's version after it) on
    /// `topic`, like [`Publisher::publish`]. For metadata, build the envelope with
    /// [`Envelope::for_event`] and publish it.
    async fn publish_event<E: Event>(
        &self,
        topic: &Topic,
        aggregate_id: &str,
        version: u64,
        event: &E,
    ) -> Result<Receipt, PublishError> {
        let envelope = Envelope::for_event(aggregate_id, version, event)
            .map_err(|e| {
                PublishError::with_source(
                    PublishErrorKind::Invalid,
                    format!("event `{}` could not be encoded", E::TYPE),
                    e,
                )
            })?
            .build()?;
        self.publish(topic, envelope).await
    }
}

impl<P: Publisher + ?Sized> PublishEvent for P {}

/// What a typed handler is told besides the event: the envelope it came in (aggregate,
/// version, IDs, headers) and the [`Delivery`] (attempt, stream position, partition,
/// cancellation).
#[derive(Debug, Clone)]
pub struct EventContext {
    envelope: Envelope,
    delivery: Delivery,
}

impl EventContext {
    /// The envelope the event came in, payload included.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The aggregate the event belongs to.
    pub fn aggregate_id(&self) -> &AggregateId {
        self.envelope.aggregate_id()
    }

    /// The aggregate's version after this event.
    pub fn version(&self) -> u64 {
        self.envelope.event_version()
    }

    /// The event's ID.
    pub fn event_id(&self) -> &EventId {
        self.envelope.event_id()
    }

    /// Which attempt at handling this event this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.delivery.attempt
    }

    /// The event's position in its stream, when the transport has one.
    pub fn stream_sequence(&self) -> Option<u64> {
        self.delivery.stream_sequence
    }

    /// The event's index in its record batch, if it travelled in one (see
    /// [`Delivery::batch_index`]).
    pub fn batch_index(&self) -> Option<u32> {
        self.delivery.batch_index
    }

    /// The event's partition, on a partitioned topic.
    pub fn partition(&self) -> Option<u32> {
        self.delivery.partition
    }

    /// Fires when the subscription is closing or lost its topic; see [`Cancellation`].
    pub fn cancellation(&self) -> &Cancellation {
        &self.delivery.cancellation
    }

    /// The delivery as the transport described it.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }
}

/// What [`EventHandlers`] does with an event whose type has no handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownEvents {
    /// Fail it as a permanent error, so the transport's failure policy applies (by default it
    /// is dead-lettered with reason `permanent`, and can be replayed once a handler exists;
    /// under `HaltAggregate` its aggregate halts). Nothing is dropped unseen. The default.
    #[default]
    Fail,
    /// Acknowledge it without handling it: for a service that reads only some of a topic's
    /// event types. Counted in [`EventHandlers::unknown_acknowledged`].
    Acknowledge,
}

type Call = dyn Fn(
        Envelope,
        Delivery,
        &Upcasters,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>
    + Send
    + Sync;

/// Turns a payload of one schema version into the next, as a JSON value.
type Upcaster = dyn Fn(serde_json::Value) -> Result<serde_json::Value, HandlerError> + Send + Sync;

/// One event type's upcasters, by the schema version each reads.
type Upcasters = std::collections::BTreeMap<u32, Box<Upcaster>>;

/// A [`Handler`] that decodes each event into the struct registered for its event type and
/// calls that type's handler. Calls for one aggregate still never overlap and come in version
/// order, whatever their types.
///
/// A payload that does not decode into the registered struct is a permanent error (the
/// transport's failure policy applies); an event type with no handler is dealt with by
/// [`UnknownEvents`]. A payload of an older schema version goes through the type's upcasters,
/// one version at a time, before it is decoded; one of a newer version than `E::VERSION` is a
/// permanent error (by default dead-lettered, to be replayed once the code is updated).
pub struct EventHandlers {
    calls: HashMap<&'static str, Arc<Call>>,
    upcasters: HashMap<&'static str, Upcasters>,
    unknown: UnknownEvents,
    unknown_acknowledged: AtomicU64,
}

impl EventHandlers {
    /// No handlers; unknown event types fail.
    pub fn new() -> Self {
        Self {
            calls: HashMap::new(),
            upcasters: HashMap::new(),
            unknown: UnknownEvents::default(),
            unknown_acknowledged: AtomicU64::new(0),
        }
    }

    /// Handles events of type `E::TYPE` with `handler`.
    ///
    /// # Panics
    ///
    /// If `E::TYPE` already has a handler: two handlers for one type is a programming error.
    pub fn on<E, F, Fut>(mut self, handler: F) -> Self
    where
        E: Event,
        F: Fn(E, EventContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let call: Arc<Call> = Arc::new(
            move |envelope: Envelope, delivery: Delivery, upcasters: &Upcasters| {
                let decoded = decode_event::<E>(&envelope, upcasters);
                let handler = handler.clone();
                Box::pin(
                    async move { handler(decoded?, EventContext { envelope, delivery }).await },
                )
            },
        );
        if self.calls.insert(E::TYPE, call).is_some() {
            panic!("event type `{}` has two handlers", E::TYPE);
        }
        self
    }

    /// Turns a payload of `E::TYPE` written at schema version `from` into the shape of version
    /// `from + 1`, as a JSON value (the payload decoded whatever its codec: a MessagePack map
    /// becomes a JSON object). A payload written at version `v` below `E::VERSION` goes through
    /// the upcasters of `v`, `v + 1`, ..., `E::VERSION - 1` in that order and is then decoded
    /// into `E`; one that lacks an upcaster on the way is a permanent error naming it. An
    /// upcaster's error is the handler's error.
    ///
    /// ```
    /// use bus_core::{Event, EventHandlers};
    /// use serde::{Deserialize, Serialize};
    ///
    /// /// Version 2: version 1 had `amount` in whole units.
    /// #[derive(Serialize, Deserialize)]
    /// struct Deposited { cents: u64 }
    /// impl Event for Deposited {
    ///     const TYPE: &'static str = "Deposited";
    ///     const VERSION: u32 = 2;
    /// }
    ///
    /// let handlers = EventHandlers::new()
    ///     .on(|e: Deposited, _cx| async move { Ok(()) })
    ///     .upcast::<Deposited>(1, |mut v| {
    ///         let units = v["amount"].as_u64().unwrap_or(0);
    ///         v["cents"] = (units * 100).into();
    ///         Ok(v)
    ///     });
    /// # let _ = handlers;
    /// ```
    ///
    /// # Panics
    ///
    /// If `from` is 0 or not below `E::VERSION`, or `from` of `E::TYPE` already has an upcaster.
    pub fn upcast<E: Event>(
        mut self,
        from: u32,
        upcaster: impl Fn(serde_json::Value) -> Result<serde_json::Value, HandlerError>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        assert!(
            from >= 1 && from < E::VERSION,
            "an upcaster of event type `{}` reads a version from 1 to {} (Event::VERSION - 1), not {from}",
            E::TYPE,
            E::VERSION.saturating_sub(1)
        );
        let previous = self
            .upcasters
            .entry(E::TYPE)
            .or_default()
            .insert(from, Box::new(upcaster));
        assert!(
            previous.is_none(),
            "event type `{}` has two upcasters from version {from}",
            E::TYPE
        );
        self
    }

    /// What to do with event types that have no handler.
    pub fn unknown(mut self, policy: UnknownEvents) -> Self {
        self.unknown = policy;
        self
    }

    /// The event types that have a handler, in no particular order.
    pub fn event_types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.calls.keys().copied()
    }

    /// Events acknowledged unhandled under [`UnknownEvents::Acknowledge`].
    pub fn unknown_acknowledged(&self) -> u64 {
        self.unknown_acknowledged.load(Ordering::Relaxed)
    }
}

impl Default for EventHandlers {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for EventHandlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<_> = self.calls.keys().collect();
        types.sort();
        f.debug_struct("EventHandlers")
            .field("event_types", &types)
            .field("unknown", &self.unknown)
            .finish()
    }
}

#[async_trait]
impl Handler for EventHandlers {
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError> {
        let delivery = current_delivery().unwrap_or_else(|| Delivery::new(1));
        let event_type = envelope.event_type().as_str();
        match self.calls.get(event_type) {
            Some(call) => {
                let upcasters = self.upcasters.get(event_type).unwrap_or(&NO_UPCASTERS);
                call(envelope, delivery, upcasters).await
            }
            None => match self.unknown {
                UnknownEvents::Fail => Err(HandlerError::permanent(format!(
                    "no handler for event type `{}` (v{} of `{}`); register one with EventHandlers::on, or acknowledge unknown types with UnknownEvents::Acknowledge",
                    envelope.event_type(),
                    envelope.event_version(),
                    envelope.aggregate_id()
                ))),
                UnknownEvents::Acknowledge => {
                    self.unknown_acknowledged.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            },
        }
    }
}

static NO_UPCASTERS: Upcasters = Upcasters::new();

/// The event in `envelope` as an `E`: decoded as it is when it was written at `E::VERSION`,
/// through the upcasters from its version when it is older, refused when it is newer.
fn decode_event<E: Event>(envelope: &Envelope, upcasters: &Upcasters) -> Result<E, HandlerError> {
    let written = envelope.schema_version();
    let what = || {
        format!(
            "event `{}` v{} of `{}` (schema version {written})",
            E::TYPE,
            envelope.event_version(),
            envelope.aggregate_id()
        )
    };
    let undecodable = |e: &dyn fmt::Display| {
        HandlerError::permanent(format!(
            "{} does not decode into {}: {e}",
            what(),
            std::any::type_name::<E>()
        ))
    };
    if written == E::VERSION {
        return envelope.decode_payload::<E>().map_err(|e| undecodable(&e));
    }
    if written > E::VERSION {
        return Err(HandlerError::permanent(format!(
            "{} was written by newer code: this code reads `{}` up to schema version {}; update it, then replay the event",
            what(),
            E::TYPE,
            E::VERSION
        )));
    }
    let mut value = envelope
        .decode_payload::<serde_json::Value>()
        .map_err(|e| undecodable(&e))?;
    for from in written..E::VERSION {
        let upcaster = upcasters.get(&from).ok_or_else(|| {
            HandlerError::permanent(format!(
                "{}: no upcaster of `{}` from schema version {from} to {}; register one with EventHandlers::upcast",
                what(),
                E::TYPE,
                from + 1
            ))
        })?;
        value = upcaster(value)?;
    }
    serde_json::from_value(value).map_err(|e| undecodable(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{with_delivery, CancelSource};
    use serde::Deserialize;
    use std::sync::Mutex;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Deposited {
        cents: u64,
    }
    impl Event for Deposited {
        const TYPE: &'static str = "Deposited";
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Renamed {
        name: String,
    }
    impl Event for Renamed {
        const TYPE: &'static str = "Renamed";
        const CODEC: Codec = Codec::Json;
    }

    fn envelope<E: Event>(version: u64, event: &E) -> Envelope {
        Envelope::for_event("acc-1", version, event)
            .unwrap()
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn each_type_reaches_its_handler_decoded_with_its_context() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (seen.clone(), seen.clone());
        let handlers = EventHandlers::new()
            .on(move |e: Deposited, cx: EventContext| {
                let a = a.clone();
                async move {
                    a.lock().unwrap().push(format!(
                        "dep {} v{} attempt {} seq {:?} part {:?} cancelled {}",
                        e.cents,
                        cx.version(),
                        cx.attempt(),
                        cx.stream_sequence(),
                        cx.partition(),
                        cx.cancellation().is_cancelled()
                    ));
                    Ok(())
                }
            })
            .on(move |e: Renamed, cx: EventContext| {
                let b = b.clone();
                async move {
                    b.lock()
                        .unwrap()
                        .push(format!("ren {} v{}", e.name, cx.version()));
                    Ok(())
                }
            });
        let renamed = envelope(2, &Renamed { name: "x".into() });
        assert_eq!(renamed.content_type().as_str(), "application/json");
        let source = CancelSource::new();
        source.close();
        let delivery = Delivery {
            attempt: 2,
            stream_sequence: Some(9),
            batch_index: None,
            partition: Some(1),
            cancellation: source.signal(),
            traceparent: None,
            stored_at: None,
            received_at: None,
            ownership_term: None,
        };
        with_delivery(
            delivery,
            handlers.handle(envelope(1, &Deposited { cents: 5 })),
        )
        .await
        .unwrap();
        handlers.handle(renamed).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "dep 5 v1 attempt 2 seq Some(9) part Some(1) cancelled true",
                "ren x v2"
            ]
        );
    }

    #[tokio::test]
    async fn unknown_types_fail_unless_acknowledged_and_bad_payloads_fail_for_good() {
        let handlers = EventHandlers::new().on(|_: Deposited, _| async { Ok(()) });
        let other = Envelope::builder("acc-1", "Closed", 3).build().unwrap();
        let err = handlers.handle(other.clone()).await.unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.to_string()
                .contains("no handler for event type `Closed`"),
            "{err}"
        );
        assert_eq!(handlers.unknown_acknowledged(), 0);

        let lenient = EventHandlers::new()
            .on(|_: Deposited, _| async { Ok(()) })
            .unknown(UnknownEvents::Acknowledge);
        lenient.handle(other).await.unwrap();
        assert_eq!(lenient.unknown_acknowledged(), 1);

        // A `Deposited` whose body is some other struct.
        let wrong = Envelope::builder("acc-1", "Deposited", 4)
            .typed_payload(&Renamed { name: "y".into() }, Codec::MessagePack)
            .unwrap()
            .build()
            .unwrap();
        let err = lenient.handle(wrong).await.unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("does not decode into"), "{err}");
    }

    #[test]
    fn two_handlers_for_one_type_are_refused() {
        let twice = std::panic::catch_unwind(|| {
            EventHandlers::new()
                .on(|_: Deposited, _| async { Ok(()) })
                .on(|_: Deposited, _| async { Ok(()) })
        });
        let message = twice.expect_err("a second handler for one type panics");
        let text = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert_eq!(text, "event type `Deposited` has two handlers");
    }

    /// Version 1 of an account's opening: a single `name`.
    #[derive(Debug, Serialize, Deserialize)]
    struct OpenedV1 {
        name: String,
    }
    impl Event for OpenedV1 {
        const TYPE: &'static str = "Opened";
    }

    /// Version 3: the name split in two (v2), then a currency with a default (v3).
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Opened {
        first: String,
        last: String,
        currency: String,
    }
    impl Event for Opened {
        const TYPE: &'static str = "Opened";
        const CODEC: Codec = Codec::Json;
        const VERSION: u32 = 3;
    }

    /// Handlers for `Opened` v3 through two upcasters that record the order they ran in.
    fn opened_handlers(seen: Arc<Mutex<Vec<Opened>>>, ran: Arc<Mutex<Vec<u32>>>) -> EventHandlers {
        let (r1, r2) = (ran.clone(), ran);
        EventHandlers::new()
            .on(move |e: Opened, _cx: EventContext| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(e);
                    Ok(())
                }
            })
            .upcast::<Opened>(2, move |mut v| {
                r2.lock().unwrap().push(2);
                v["currency"] = "EUR".into();
                Ok(v)
            })
            .upcast::<Opened>(1, move |v| {
                r1.lock().unwrap().push(1);
                let name = v["name"].as_str().unwrap_or_default().to_owned();
                let (first, last) = name.split_once(' ').unwrap_or((&name, ""));
                Ok(serde_json::json!({ "first": first, "last": last }))
            })
    }

    #[tokio::test]
    async fn older_payloads_go_through_the_upcasters_in_order() {
        let (seen, ran) = (Arc::default(), Arc::default());
        let handlers = opened_handlers(Arc::clone(&seen), Arc::clone(&ran));
        // Written by the old code: MessagePack, no schema header (version 1).
        let old = envelope(
            1,
            &OpenedV1 {
                name: "Ada Lovelace".into(),
            },
        );
        assert_eq!(old.schema_version(), 1);
        handlers.handle(old).await.unwrap();
        assert_eq!(
            *ran.lock().unwrap(),
            vec![1, 2],
            "1 -> 2 -> 3, in that order"
        );
        // Written at version 2 by hand: only the second upcaster runs.
        let v2 = Envelope::builder("acc-1", "Opened", 2)
            .schema_version(2)
            .typed_payload(
                &serde_json::json!({ "first": "Grace", "last": "Hopper" }),
                Codec::MessagePack,
            )
            .unwrap()
            .build()
            .unwrap();
        handlers.handle(v2).await.unwrap();
        assert_eq!(*ran.lock().unwrap(), vec![1, 2, 2]);
        // Written by the current code: no upcaster runs.
        let current = Opened {
            first: "Alan".into(),
            last: "Turing".into(),
            currency: "GBP".into(),
        };
        let v3 = envelope(3, &current);
        assert_eq!(v3.schema_version(), 3);
        handlers.handle(v3).await.unwrap();
        assert_eq!(ran.lock().unwrap().len(), 3);
        let names: Vec<(String, String, String)> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|o| (o.first.clone(), o.last.clone(), o.currency.clone()))
            .collect();
        assert_eq!(
            names,
            [
                ("Ada".into(), "Lovelace".into(), "EUR".into()),
                ("Grace".into(), "Hopper".into(), "EUR".into()),
                ("Alan".into(), "Turing".into(), "GBP".into()),
            ]
        );
    }

    #[tokio::test]
    async fn newer_or_unbridged_payloads_are_permanent_errors() {
        let (seen, ran) = (Arc::default(), Arc::default());
        let handlers = opened_handlers(Arc::clone(&seen), ran);
        let newer = Envelope::builder("acc-1", "Opened", 4)
            .schema_version(4)
            .typed_payload(&serde_json::json!({ "first": "x" }), Codec::Json)
            .unwrap()
            .build()
            .unwrap();
        let err = handlers.handle(newer).await.unwrap_err();
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains("newer code"), "{err}");
        // A version 2 reader with no upcaster from 1: refused, naming the missing one.
        #[derive(Debug, Serialize, Deserialize)]
        struct Closed {
            reason: String,
        }
        impl Event for Closed {
            const TYPE: &'static str = "Closed";
            const VERSION: u32 = 2;
        }
        let closed = EventHandlers::new().on(|_: Closed, _| async { Ok(()) });
        let v1 = Envelope::builder("acc-1", "Closed", 5)
            .typed_payload(&serde_json::json!({ "why": "moved" }), Codec::MessagePack)
            .unwrap()
            .build()
            .unwrap();
        let err = closed.handle(v1).await.unwrap_err();
        assert!(!err.is_retryable(), "{err}");
        assert!(
            err.to_string()
                .contains("no upcaster of `Closed` from schema version 1"),
            "{err}"
        );
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    #[should_panic(expected = "reads a version from 1 to 2")]
    fn an_upcaster_to_the_current_version_or_beyond_is_refused() {
        let _ = EventHandlers::new().upcast::<Opened>(3, Ok);
    }
}
