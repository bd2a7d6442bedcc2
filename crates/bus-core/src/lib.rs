//! The transport-independent core of the ordered event bus.
//!
//! This crate holds the [`Envelope`] every event travels in, the validated names it is built
//! from ([`Topic`], [`AggregateId`], [`EventType`]), the [wire format](wire) that maps an
//! envelope onto message headers and a body, typed payload [codecs](Codec), and the traits a
//! transport implements ([`Publisher`], [`Subscriber`]) and a user implements ([`Handler`]).
//!
//! It knows nothing about NATS or any other broker and starts no runtime: transports live in
//! their own crates (`bus-nats`, `bus-memory`).
//!
//! ```
//! use bus_core::{Codec, Envelope};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct Deposited { cents: u64 }
//!
//! let envelope = Envelope::builder("account-42", "Deposited", 7)
//!     .typed_payload(&Deposited { cents: 1_250 }, Codec::MessagePack)?
//!     .correlation_id("req-9")
//!     .build()?;
//! assert_eq!(envelope.event_version(), 7);
//! assert_eq!(envelope.decode_payload::<Deposited>()?, Deposited { cents: 1_250 });
//! # Ok(())
//! # }
//! ```
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![forbid(unsafe_code)]

mod codec;
mod delivery;
mod dispatch;
mod envelope;
mod error;
mod handled;
mod names;
mod policy;
mod trace;
mod traits;
mod typed;
pub mod wire;

pub use codec::{Codec, ContentType};
pub use delivery::{
    continue_trace, current_delivery, with_current_delivery, with_delivery, CancelSource,
    Cancellation, Delivery,
};
pub use dispatch::{prepare, prepare_record, Prepared, Unhandleable};
pub use envelope::{Envelope, EnvelopeBuilder};
pub use error::{
    BoxError, BusError, CodecError, DecodeError, HandlerError, PublishError, PublishErrorKind,
    SubscribeError, SubscribeErrorKind, ValidationError,
};
pub use handled::{HandledOnce, HandledVersions, MemoryHandledVersions};
pub use names::{
    AggregateId, AggregateIds, EventId, EventType, Topic, MAX_AGGREGATE_ID_LEN, MAX_NAME_LEN,
};
pub use policy::{jitter, run_with_retry, FailurePolicy, FailureReason, RetryOutcome, RetryPolicy};
pub use trace::{new_parent_id, TraceParent, TRACEPARENT};
pub use traits::{
    handler_fn, raw_handler_fn, AggregateControl, CloseReport, HaltedAggregate, Handler, HandlerFn,
    KeyExtractor, PublishOutcome, Published, Publisher, RawHandler, RawHandlerFn, RawKey,
    RawMessage, Receipt, Subscriber, Subscription, SubscriptionHandle, SubscriptionMetrics,
};
pub use typed::{Event, EventContext, EventHandlers, PublishEvent, UnknownEvents};
