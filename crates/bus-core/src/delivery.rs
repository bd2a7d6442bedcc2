//! What a handler can learn about the delivery it runs for: which attempt this is, where the
//! event sits in the broker's log, its partition, and a signal that the subscription is going.
//!
//! A transport runs each handler call inside [`with_delivery`]; the handler (or anything it
//! calls on the same task) reads it with [`current_delivery`].

use std::fmt;
use std::future::Future;

use tokio::sync::watch;

/// Where and how the event a handler is running for was delivered.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Which attempt this is at handling the event, counted from 1. Retries in place count up;
    /// a redelivery after a crash or a resumed halt starts again at 1.
    pub attempt: u32,
    /// The event's position in its stream or log, when the transport has one. Within one
    /// partition (or one unpartitioned topic) positions only grow, so it serves as a fencing
    /// token for the handler's own writes: a store that refuses a write older than the last it
    /// accepted for the partition never takes one from an owner that lost the partition while
    /// it was running.
    pub stream_sequence: Option<u64>,
    /// The partition of a partitioned topic, `None` otherwise.
    pub partition: Option<u32>,
    /// Fires when the subscription stops waiting for this call's outcome to matter.
    pub cancellation: Cancellation,
}

impl Delivery {
    /// A first attempt with no position, no partition and a signal that never fires.
    pub fn new(attempt: u32) -> Self {
        Self {
            attempt,
            stream_sequence: None,
            partition: None,
            cancellation: Cancellation::never(),
        }
    }
}

tokio::task_local! {
    static DELIVERY: Delivery;
}

/// Inside a handler call: where the event being handled was delivered from. `None` outside one
/// (and on tasks the handler spawned).
pub fn current_delivery() -> Option<Delivery> {
    DELIVERY.try_with(Delivery::clone).ok()
}

/// Runs `call` (a handler call) with `delivery` readable through [`current_delivery`]. For
/// transports.
pub async fn with_delivery<F: Future>(delivery: Delivery, call: F) -> F::Output {
    DELIVERY.scope(delivery, call).await
}

/// A signal that a subscription no longer waits for a handler's outcome, or will not
/// acknowledge it: the subscription is closing, or it lost its topic to another subscription of
/// its group (which gets the event again). A handler doing long work can stop early when it
/// fires; returning an error then is safe (the event is not acknowledged, so it comes again).
#[derive(Clone)]
pub struct Cancellation(Option<watch::Receiver<bool>>);

impl Cancellation {
    /// A signal that never fires.
    pub fn never() -> Self {
        Self(None)
    }

    /// Whether it has fired.
    pub fn is_cancelled(&self) -> bool {
        self.0.as_ref().is_some_and(|rx| *rx.borrow())
    }

    /// Resolves when it fires (never, for [`Cancellation::never`]).
    pub async fn cancelled(&self) {
        match &self.0 {
            Some(rx) => {
                let mut rx = rx.clone();
                // An error means the source is gone without firing: it never will.
                if rx.wait_for(|fired| *fired).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl fmt::Debug for Cancellation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Cancellation")
            .field(&self.is_cancelled())
            .finish()
    }
}

/// The sending side of [`Cancellation`], kept by a transport.
#[derive(Debug)]
pub struct CancelSource(watch::Sender<bool>);

impl CancelSource {
    /// A source that has not fired.
    pub fn new() -> Self {
        Self(watch::channel(false).0)
    }

    /// A signal that fires when [`CancelSource::cancel`] is called.
    pub fn signal(&self) -> Cancellation {
        Cancellation(Some(self.0.subscribe()))
    }

    /// Fires every signal it gave out.
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }
}

impl Default for CancelSource {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_sees_its_delivery_and_its_signal_fires() {
        assert!(current_delivery().is_none());
        let source = CancelSource::new();
        let delivery = Delivery {
            attempt: 3,
            stream_sequence: Some(17),
            partition: Some(2),
            cancellation: source.signal(),
        };
        let seen = with_delivery(delivery, async {
            let d = current_delivery().expect("inside a call");
            assert!(!d.cancellation.is_cancelled());
            source.cancel();
            d.cancellation.cancelled().await;
            (
                d.attempt,
                d.stream_sequence,
                d.partition,
                d.cancellation.is_cancelled(),
            )
        })
        .await;
        assert_eq!(seen, (3, Some(17), Some(2), true));
        assert!(current_delivery().is_none());
        assert!(!Cancellation::never().is_cancelled());
    }
}
