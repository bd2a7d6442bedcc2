//! A subscription on a thread of its own ([`crate::SubscriptionRuntime::OwnThread`]): a
//! current-thread runtime that runs its fetcher, its workers and their handlers, and ends with
//! the subscription.

use std::time::Duration;

use async_trait::async_trait;
use bus_core::{
    AggregateControl, CloseReport, SubscribeError, SubscribeErrorKind, Subscription,
    SubscriptionHandle, Topic,
};
use tokio::sync::oneshot;

/// The thread and its runtime. Dropped, it lets the runtime end: the thread stops driving the
/// tasks left on it and drops them.
pub(crate) struct OwnThread {
    handle: tokio::runtime::Handle,
    /// Sent (or dropped) to end the thread.
    stop: Option<oneshot::Sender<()>>,
}

impl OwnThread {
    /// Starts the thread of `topic`'s subscription, named `bus:<topic>` (the system shows the
    /// first 15 bytes).
    pub(crate) async fn start(topic: &Topic) -> Result<Self, SubscribeError> {
        // The system refused a thread or its runtime (their resources): nothing of the
        // subscription was made.
        let failed = |what: &str, error: std::io::Error| {
            SubscribeError::with_source(
                SubscribeErrorKind::Unsupported,
                format!("subscribing to topic `{topic}`: {what}"),
                error,
            )
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (started, handle) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("bus:{topic}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = started.send(Err(error));
                        return;
                    }
                };
                if started.send(Ok(runtime.handle().clone())).is_err() {
                    return;
                }
                // Its tasks run while this waits; a dropped sender ends it as well.
                let _ = runtime.block_on(stopped);
            })
            .map_err(|e| failed("the subscription's thread could not be started", e))?;
        let handle = handle
            .await
            .map_err(|_| {
                SubscribeError::new(
                    SubscribeErrorKind::Unsupported,
                    format!("subscribing to topic `{topic}`: the subscription's thread ended before its runtime started"),
                )
            })?
            .map_err(|e| failed("the subscription's runtime could not be built", e))?;
        Ok(Self {
            handle,
            stop: Some(stop),
        })
    }

    /// Runs `task` on the thread, to its end.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        what: &str,
        task: impl std::future::Future<Output = Result<T, SubscribeError>> + Send + 'static,
    ) -> Result<T, SubscribeError> {
        self.handle.spawn(task).await.map_err(|join| {
            SubscribeError::with_source(
                SubscribeErrorKind::Closed,
                format!("{what} on the subscription's thread failed"),
                join,
            )
        })?
    }
}

impl Drop for OwnThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A subscription made on its own thread: closed there, and the thread ended after it.
pub(crate) struct OnOwnThread {
    /// Taken by `close`.
    pub(crate) inner: Option<Subscription>,
    pub(crate) thread: OwnThread,
}

#[async_trait]
impl SubscriptionHandle for OnOwnThread {
    async fn close(mut self: Box<Self>, deadline: Duration) -> Result<CloseReport, SubscribeError> {
        let inner = self.inner.take().expect("closed once");
        // Where its tasks run: a close waits on them, and on timers of its own.
        self.thread
            .run("closing", inner.close_within(deadline))
            .await
    }

    fn control(&self) -> Option<std::sync::Arc<dyn AggregateControl>> {
        self.inner.as_ref().and_then(Subscription::control)
    }
}
