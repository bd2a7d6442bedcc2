//! The topic's single fetcher: pull requests in stream order, each message to its key's worker.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Subject;
use bus_core::Topic;
use futures::StreamExt;
use keyed_pool::KeyedPool;
use tokio::sync::{mpsc, watch};

use super::acker::Acker;
use super::copies::{ack_info, Copies, Seen};
use super::runner::{prepare, Counters, Job, Work};
use super::Dispatch;
use crate::NatsError;

/// What the fetcher needs besides its pool.
pub(crate) struct FetchPlan {
    pub(crate) client: async_nats::Client,
    pub(crate) next_subject: String,
    pub(crate) batch: usize,
    pub(crate) expires: Duration,
    pub(crate) topic: Topic,
    pub(crate) dispatch: Dispatch,
    pub(crate) copies: Arc<Mutex<Copies>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) acker: Arc<Acker>,
}

/// The topic's single fetcher. It keeps up to two pull requests outstanding (so the next batch
/// is on its way while this one is dispatched), reads the replies in stream order, and gives
/// each message to the worker of its key. On stop it sends no new request and returns once
/// every outstanding request is complete or expired, so no message is left delivered-but-unseen.
pub(crate) async fn fetch(
    plan: FetchPlan,
    pool: KeyedPool<Work>,
    mut stop: watch::Receiver<bool>,
    mut control: mpsc::UnboundedReceiver<(String, bool)>,
) -> Result<KeyedPool<Work>, NatsError> {
    let inbox = Subject::from(plan.client.new_inbox());
    let mut replies = plan.client.subscribe(inbox.clone()).await.map_err(|e| {
        NatsError::api(
            format!("subscribing to the pull inbox of topic `{}`", plan.topic),
            e,
        )
    })?;
    let request = bytes::Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "batch": plan.batch,
            "expires": plan.expires.as_nanos() as u64,
        }))
        .expect("pull request serialises"),
    );
    // Messages asked for and neither delivered nor expired yet.
    let mut credit: usize = 0;
    let mut stopping = false;
    let mut last_reply = Instant::now();
    // A request the server forgot (a reconnect, a restart) never reports; after this much
    // silence its credit is written off so the fetcher asks again.
    let forget_after = plan.expires + Duration::from_secs(2);
    let mut watchdog = tokio::time::interval(plan.expires.max(Duration::from_millis(50)));
    loop {
        if !stopping && credit < plan.batch {
            match plan
                .client
                .publish_with_reply(plan.next_subject.clone(), inbox.clone(), request.clone())
                .await
            {
                Ok(()) => credit += plan.batch,
                Err(e) => tracing::warn!(topic = %plan.topic, error = %e, "pull request not sent"),
            }
            last_reply = Instant::now();
        }
        if stopping && credit == 0 {
            break;
        }
        tokio::select! {
            biased;
            // Any change, or the sender going away, means stop.
            _ = stop.changed(), if !stopping => stopping = true,
            message = replies.next() => {
                let Some(message) = message else { break };
                last_reply = Instant::now();
                match message.status {
                    None => {
                        credit = credit.saturating_sub(1);
                        let sequence = message.reply.as_deref().and_then(ack_info).map(|i| i.stream_sequence);
                        let seen = sequence.map_or(Seen::New, |s| plan.copies.lock().unwrap().admit(s, message.reply.clone()));
                        if seen != Seen::New {
                            plan.counters.copies_skipped.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(topic = %plan.topic, ?sequence, ?seen, "redelivered copy recognised; not handled again");
                            if seen == Seen::Finished {
                                // Its first ack was lost: acknowledge the copy.
                                if let Some(reply) = message.reply.clone() {
                                    plan.acker.ack(reply);
                                }
                            }
                            continue;
                        }
                        let (key, input) = prepare(&plan.topic, &plan.dispatch, &message);
                        let job = Box::new(Job { key: key.clone(), sequence, message, input });
                        if pool.submit(&key, Work::Message(job)).await.is_err() {
                            break;
                        }
                    }
                    Some(status) if status.as_u16() == 100 => {} // idle heartbeat
                    Some(status) => {
                        // 408 (expired), 404 (nothing), 409 (limits, leadership change): the
                        // request is over; its undelivered part is in Nats-Pending-Messages.
                        let pending = message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Pending-Messages"))
                            .and_then(|v| v.as_str().parse::<usize>().ok())
                            .unwrap_or(plan.batch);
                        credit = credit.saturating_sub(pending);
                        if status.as_u16() == 409 {
                            tracing::warn!(topic = %plan.topic, description = ?message.description, "pull request refused");
                        }
                    }
                }
            }
            Some((key, skip)) = control.recv(), if !stopping => {
                // Routed like the aggregate's messages: it runs after what is queued before it.
                if pool.submit(&key, Work::Resume { key: key.clone(), skip }).await.is_err() {
                    break;
                }
            }
            _ = watchdog.tick() => {
                if credit > 0 && last_reply.elapsed() > forget_after {
                    tracing::debug!(topic = %plan.topic, credit, "pull requests went unanswered; asking again");
                    credit = 0;
                }
            }
        }
    }
    let _ = replies.unsubscribe().await;
    Ok(pool)
}
