//! Waiting for state that has no event to wait on (a subscription's metrics, the broker's
//! counters): polled, with a deadline that fails the test saying what it waited for.

use std::future::Future;
use std::time::Duration;

/// Waits until `condition` holds, checking every 10 ms, for at most `timeout`; panics with
/// `what` after that.
pub async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    wait_for_async(what, timeout, || std::future::ready(condition())).await
}

/// [`wait_for`] with a condition that has to ask someone (the broker): every 10 ms, at most
/// `timeout`.
pub async fn wait_for_async<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(what, timeout, || {
        let asked = condition();
        async move { asked.await.then_some(()) }
    })
    .await
}

/// Asks `poll` every 10 ms until it gives a value, for at most `timeout`, and returns that
/// value; panics with `what` after that.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = poll().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
