//! Halted aggregates (`FailurePolicy::HaltAggregate`): their failed event and the events behind
//! it wait in the subscription, not in a worker, until an operator resumes or skips them.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use bus_core::HaltedAggregate;

use super::job::{Action, Job, Outcome, Request};
use super::runner::{Failure, Runner, Stop};
use crate::dead_letters::DeadLetterReason;

/// A halted aggregate: its failed event first, then the events that arrived behind it.
pub(crate) struct Halt {
    pub(crate) jobs: VecDeque<Job>,
    pub(crate) since: std::time::SystemTime,
    pub(crate) failure: Failure,
}

impl Runner {
    /// Gives up every halted aggregate without acknowledging anything: the subscription lost
    /// the topic, and the new owner has their events delivered again.
    pub(crate) fn drop_halts(&self) {
        let halts: Vec<Halt> = self
            .halted
            .lock()
            .unwrap()
            .drain()
            .map(|(_, h)| h)
            .collect();
        self.halted_count.store(0, Ordering::Release);
        for halt in halts {
            for job in halt.jobs {
                self.settle(&job, Outcome::Returned);
            }
        }
    }

    /// At close: the halted aggregates' events are left to be delivered again, and a record
    /// batch among them remembers which of its events were handled. The halts stay listed.
    pub(crate) fn release_halted(&self) {
        let halted = self.halted.lock().unwrap();
        for halt in halted.values() {
            for job in &halt.jobs {
                self.settle(job, Outcome::Returned);
            }
        }
    }

    pub(crate) fn halt(&self, first: Job, failure: Failure, mut rest: VecDeque<Job>) {
        tracing::error!(
            topic = %self.topic,
            aggregate = %first.key(),
            version = ?first.event_version(),
            stream_sequence = ?first.sequence(),
            reason = failure.reason.as_str(),
            error = %failure.error,
            attempts = failure.attempts,
            "aggregate halted: its later events wait until an operator resumes or skips it"
        );
        if failure.reason == Stop::Cancelled {
            self.metrics.returned.increment(1);
        } else {
            self.metrics.halted.increment(1);
        }
        let key: std::sync::Arc<str> = first.key().into();
        rest.push_front(first);
        let halt = Halt {
            jobs: rest,
            since: std::time::SystemTime::now(),
            failure,
        };
        let mut halted = self.halted.lock().unwrap();
        if halted.insert(key, halt).is_none() {
            self.halted_count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Runs in the aggregate's worker, after everything queued there before the request.
    pub(crate) async fn resume(&self, request: Request) {
        let Request { key, action } = request;
        let skip = action == Action::Skip;
        let Some(halt) = self.halted.lock().unwrap().remove(&key) else {
            return;
        };
        self.halted_count.fetch_sub(1, Ordering::AcqRel);
        let Halt {
            mut jobs, failure, ..
        } = halt;
        tracing::warn!(topic = %self.topic, aggregate = %key, skip, waiting = jobs.len(), "operator resumes aggregate");
        if skip {
            if let Some(first) = jobs.pop_front() {
                let error = format!("skipped by an operator after: {}", failure.error);
                let outcome = self
                    .dead_letter_job(&first, &DeadLetterReason::Skipped, &error, failure.attempts)
                    .await;
                if outcome == Outcome::DeadLettered {
                    self.settle(&first, outcome);
                } else {
                    // Not stored anywhere: stay halted rather than lose it.
                    self.halt(first, failure, jobs);
                    return;
                }
            }
        }
        while let Some(job) = jobs.pop_front() {
            if let Err((job, failure)) = self.process(job).await {
                self.halt(job, failure, jobs);
                return;
            }
        }
    }

    pub(crate) fn halted_list(&self) -> Vec<HaltedAggregate> {
        self.halted
            .lock()
            .unwrap()
            .iter()
            .map(|(key, halt)| {
                let first = halt.jobs.front();
                HaltedAggregate {
                    key: key.to_string(),
                    waiting: halt.jobs.len(),
                    since: halt.since,
                    reason: halt.failure.reason.as_str().to_owned(),
                    error: halt.failure.error.clone(),
                    attempts: halt.failure.attempts,
                    event_version: first.and_then(|j| j.event_version()),
                    stream_sequence: first.and_then(|j| j.sequence()),
                }
            })
            .collect()
    }

    pub(crate) fn halted_events(&self) -> u64 {
        self.halted
            .lock()
            .unwrap()
            .values()
            .map(|h| h.jobs.len() as u64)
            .sum()
    }
}
