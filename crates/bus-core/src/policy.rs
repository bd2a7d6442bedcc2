//! Policies for handler failures, shared by every transport.

use std::time::Duration;

/// How a retryable handler error is retried: in place, inside the aggregate's worker, so the
/// aggregate's later events wait while other aggregates keep flowing.
///
/// Deserialises (any serde format) with every field optional; durations are written as
/// `"50ms"`, `"5s"`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 5). 1 means no retry.
    pub max_attempts: u32,
    /// Delay before the second attempt (default 50 ms).
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Upper bound of any delay (default 5 s).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Growth factor between attempts (default 2).
    pub multiplier: f64,
    /// Fraction of each delay that is randomised, 0 to 1 (default 0.2): spreads the retries of
    /// many aggregates that failed together.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// No retries: the first failure goes straight to the failure policy.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Whether another attempt follows failed attempt number `attempt` (counted from 1).
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay after failed attempt number `attempt` (counted from 1); `random_unit` is a
    /// random number in `[0, 1)` supplied by the caller, so this crate needs no random source.
    ///
    /// ```
    /// use bus_core::RetryPolicy;
    /// use std::time::Duration;
    /// let policy = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
    /// assert_eq!(policy.backoff(1, 0.5), Duration::from_millis(50));
    /// assert_eq!(policy.backoff(3, 0.5), Duration::from_millis(200));
    /// assert_eq!(policy.backoff(30, 0.5), Duration::from_secs(5));
    /// ```
    pub fn backoff(&self, attempt: u32, random_unit: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(63) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        // Spread the delay over [capped × (1 − jitter), capped].
        let factor = 1.0 - jitter * random_unit.clamp(0.0, 1.0);
        Duration::from_secs_f64((capped * factor).max(0.0))
    }
}

/// The end of [`run_with_retry`]: success, or the last failure and how many attempts it took.
#[derive(Debug)]
pub enum RetryOutcome {
    /// The handler succeeded on attempt number `attempts`.
    Succeeded {
        /// Attempts made, the successful one included.
        attempts: u32,
    },
    /// The handler failed permanently, panicked, or ran out of attempts.
    Failed {
        /// Attempts made.
        attempts: u32,
        /// Why the last attempt failed.
        reason: FailureReason,
    },
}

/// A number in `[0, 1)` for backoff jitter (`run_with_retry`'s `random`): a randomly keyed
/// hash of the clock's nanoseconds, so retries of different events spread out without a
/// random-number dependency. Not for anything that needs real randomness.
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(nanos);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// What happens to an event once its handler has failed for good (retries exhausted, a
/// permanent error, or a panic).
///
/// In configuration files: `"dead-letter"` or `"halt-aggregate"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Store it as a dead letter with the reason, terminate it at the broker, and go on with
    /// the aggregate's next event. Other aggregates never wait.
    #[default]
    DeadLetter,
    /// Keep it unacknowledged and hold the aggregate's later events behind it, until an
    /// operator resumes or skips the aggregate through
    /// [`AggregateControl`](crate::AggregateControl). Other aggregates keep flowing; held
    /// events count against the consumer's MaxAckPending.
    HaltAggregate,
}

/// Why handling an event finally failed.
#[derive(Debug)]
pub enum FailureReason {
    /// The handler returned an error (permanent, or retryable with no attempts left).
    Handler(crate::HandlerError),
    /// The handler panicked; the panic message.
    Panicked(String),
}

impl FailureReason {
    /// A short machine-readable word: `permanent`, `retries-exhausted` or `panic`.
    pub fn code(&self) -> &'static str {
        match self {
            FailureReason::Handler(e) if e.is_retryable() => "retries-exhausted",
            FailureReason::Handler(_) => "permanent",
            FailureReason::Panicked(_) => "panic",
        }
    }

    /// Whether the last error was retryable (the attempts ran out).
    pub fn is_retryable(&self) -> bool {
        matches!(self, FailureReason::Handler(e) if e.is_retryable())
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureReason::Handler(e) => e.fmt(f),
            FailureReason::Panicked(m) => write!(f, "handler panicked: {m}"),
        }
    }
}

/// Calls `attempt` (with the attempt's number, from 1) until it succeeds, fails permanently, panics or runs out of attempts,
/// sleeping `policy.backoff(..)` between attempts with the caller's `sleep`.
///
/// A panic inside `attempt` is caught and ends the loop as [`FailureReason::Panicked`]: a
/// handler that panics on an event will panic again, so retrying it only delays the aggregate.
/// `before_retry` runs before each backoff, with the attempt number that failed and the error
/// (a transport extends the broker's ack deadline and records metrics there).
pub async fn run_with_retry<A, AF, S, SF>(
    policy: &RetryPolicy,
    mut attempt: A,
    mut sleep: S,
    mut random_unit: impl FnMut() -> f64,
    mut before_retry: impl FnMut(u32, &crate::HandlerError),
) -> RetryOutcome
where
    A: FnMut(u32) -> AF,
    AF: std::future::Future<Output = Result<(), crate::HandlerError>>,
    S: FnMut(Duration) -> SF,
    SF: std::future::Future<Output = ()>,
{
    let mut attempts = 0;
    loop {
        attempts += 1;
        let call = std::pin::pin!(attempt(attempts));
        match (CatchUnwind { inner: call }).await {
            Ok(Ok(())) => return RetryOutcome::Succeeded { attempts },
            Ok(Err(error)) => {
                if !error.is_retryable() || !policy.should_retry(attempts) {
                    return RetryOutcome::Failed {
                        attempts,
                        reason: FailureReason::Handler(error),
                    };
                }
                before_retry(attempts, &error);
                sleep(policy.backoff(attempts, random_unit())).await;
            }
            Err(message) => {
                return RetryOutcome::Failed {
                    attempts,
                    reason: FailureReason::Panicked(message),
                }
            }
        }
    }
}

/// Polls a future, turning a panic into an error with the panic's message. It holds the
/// future pinned where its caller keeps it (`std::pin::pin!`): no `unsafe` pin projection, no
/// futures dependency, and no allocation per handler call (a boxed handler future is large, and
/// large allocations are the allocator's slow path).
struct CatchUnwind<'a, F> {
    inner: std::pin::Pin<&'a mut F>,
}

impl<F: std::future::Future> std::future::Future for CatchUnwind<'_, F> {
    type Output = Result<F::Output, String>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.inner.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll.map(Ok),
            Err(payload) => std::task::Poll::Ready(Err(keyed_pool::panic_message(&*payload))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HandlerError;
    use std::cell::Cell;

    #[test]
    fn jitter_stays_in_the_unit_interval_and_varies() {
        let values: Vec<f64> = (0..200).map(|_| jitter()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let distinct: std::collections::BTreeSet<u64> =
            values.iter().map(|v| (v * 1e6) as u64).collect();
        assert!(distinct.len() > 100, "{} distinct of 200", distinct.len());
    }

    fn run(policy: &RetryPolicy, script: &[Result<(), bool>]) -> (RetryOutcome, Vec<Duration>) {
        let calls = Cell::new(0usize);
        let slept = std::cell::RefCell::new(Vec::new());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let outcome = rt.block_on(run_with_retry(
            policy,
            |attempt| {
                let i = calls.get();
                assert_eq!(attempt as usize, i + 1, "attempts are numbered from 1");
                calls.set(i + 1);
                let step = script[i];
                async move {
                    match step {
                        Ok(()) => Ok(()),
                        Err(true) => Err(HandlerError::retryable("busy")),
                        Err(false) => Err(HandlerError::permanent("bad")),
                    }
                }
            },
            |d| {
                slept.borrow_mut().push(d);
                std::future::ready(())
            },
            || 0.0,
            |_, _| {},
        ));
        (outcome, slept.into_inner())
    }

    #[test]
    fn retryable_errors_are_retried_with_growing_backoff() {
        let policy = RetryPolicy::default();
        let (outcome, slept) = run(&policy, &[Err(true), Err(true), Ok(())]);
        assert!(matches!(outcome, RetryOutcome::Succeeded { attempts: 3 }));
        assert_eq!(
            slept,
            vec![Duration::from_millis(50), Duration::from_millis(100)]
        );
    }

    #[test]
    fn permanent_errors_stop_at_once() {
        let (outcome, slept) = run(&RetryPolicy::default(), &[Err(false)]);
        assert!(
            matches!(outcome, RetryOutcome::Failed { attempts: 1, reason: FailureReason::Handler(ref e) } if !e.is_retryable())
        );
        assert!(slept.is_empty());
    }

    #[test]
    fn attempts_are_bounded() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let (outcome, _) = run(&policy, &[Err(true), Err(true), Err(true), Ok(())]);
        match outcome {
            RetryOutcome::Failed { attempts, reason } => {
                assert_eq!(attempts, 3);
                assert_eq!(reason.code(), "retries-exhausted");
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[test]
    fn panics_are_caught() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let outcome = rt.block_on(run_with_retry(
            &RetryPolicy::default(),
            |_| async { panic!("boom") },
            |_| std::future::ready(()),
            || 0.0,
            |_, _| {},
        ));
        assert!(
            matches!(outcome, RetryOutcome::Failed { attempts: 1, reason: FailureReason::Panicked(ref m) } if m == "boom")
        );
    }

    #[test]
    fn jitter_only_shortens_within_its_fraction() {
        let policy = RetryPolicy::default();
        let d = policy.backoff(2, 0.999);
        assert!(
            d <= Duration::from_millis(100) && d >= Duration::from_millis(80),
            "{d:?}"
        );
    }
}
