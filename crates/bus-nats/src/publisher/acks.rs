//! Sending a flight with a reply subject on the publisher's ack inbox, reading the broker's
//! acks, and the ack task that settles them.

use super::*;

/// How often the ack task looks for publishes past `NatsConfig::publish_ack_timeout`.
pub(super) const TIMEOUT_CHECK: Duration = Duration::from_millis(100);

/// The broker's answer to one publish: its stream sequence and whether it was a duplicate.
pub(super) type AckResult = Result<(u64, bool), PublishError>;

/// Sent publishes awaiting their ack, by ID, with when they were sent.
#[derive(Default)]
pub(super) struct Awaiting {
    by_id: HashMap<u64, (Instant, Flight), ahash::RandomState>,
}

impl Awaiting {
    /// The publishes to `topic`, taken out.
    pub(super) fn of_topic(&mut self, topic: &Topic) -> Vec<Flight> {
        let ids: Vec<u64> = self
            .by_id
            .iter()
            .filter(|(_, (_, f))| f.topic() == topic)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.by_id.remove(&id).map(|(_, m)| m))
            .collect()
    }

    /// The publishes sent at least `timeout` ago, taken out.
    pub(super) fn expired(&mut self, timeout: Duration) -> Vec<Flight> {
        let now = Instant::now();
        let ids: Vec<u64> = self
            .by_id
            .iter()
            .filter(|(_, (sent, _))| now.duration_since(*sent) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.by_id.remove(&id).map(|(_, m)| m))
            .collect()
    }
}

/// Writes `message` to its topic's connection now (so publishes leave in call order), with a
/// reply subject of the publisher's ack inbox, and leaves it awaiting its ack. A message that
/// could not be written comes back with why.
pub(super) async fn transmit(
    state: &State,
    route: &Route,
    mut flight: Flight,
) -> Result<(), (Flight, PublishError)> {
    let now = Instant::now();
    let (subject, headers, payload) = match &mut flight {
        Flight::Raw(message) => {
            let (headers, payload) = {
                let mut held = message.held();
                if let Some(span) = &held.span {
                    span.record("attempt", 1u32);
                }
                *held
                    .raw
                    .take()
                    .expect("only raw publishes fly alone, and are sent once")
            };
            (route.connection.subject.clone(), headers, payload)
        }
        Flight::Batch(batch) => {
            if batch.first_sent.is_none() && batch.lane.limits.enabled() {
                if let Some(first) = batch.messages.first() {
                    first
                        .metrics
                        .batch_events
                        .record(batch.messages.len() as f64);
                }
            }
            batch.first_sent.get_or_insert(now);
            batch.sends += 1;
            for message in batch.messages.iter().filter(|m| m.traced) {
                if let Some(span) = &message.held().span {
                    span.record("attempt", batch.sends);
                }
            }
            let headers = batch_headers(&batch.messages);
            let payload = batch
                .body
                .get_or_insert_with(|| batch_body(&batch.messages))
                .clone();
            (batch.lane.subject.clone(), headers, payload)
        }
    };
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let reply = Subject::from(format!("{}{id}", route.reply_prefix));
    // In the map before it is written: the ack may come back before the write returns.
    state
        .awaiting
        .lock()
        .unwrap()
        .by_id
        .insert(id, (now, flight));
    let written = route
        .connection
        .client
        .publish_with_reply_and_headers(subject, reply, headers, payload)
        .await;
    match written {
        Ok(()) => Ok(()),
        Err(error) => match state.awaiting.lock().unwrap().by_id.remove(&id) {
            Some((_, flight)) => {
                // Too large is final: sending it again cannot help.
                let kind = match error.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                        PublishErrorKind::PayloadTooLarge
                    }
                    _ => PublishErrorKind::Connection,
                };
                let error = PublishError::with_source(
                    kind,
                    format!("publish on topic `{}` could not be written", flight.topic()),
                    error,
                );
                Err((flight, error))
            }
            None => Ok(()),
        },
    }
}

/// The publish ID an ack's subject (`<inbox>.<id>`) carries.
pub(super) fn ack_id(subject: &str) -> Option<u64> {
    subject.rsplit('.').next()?.parse().ok()
}

/// JetStream error codes of a publish that say "not now" rather than "no": the cluster is
/// unavailable (10008), this server is not the leader (10009), JetStream is not enabled yet
/// (10076, while a server starts), a per-subject sequence is not ready (10163).
pub(super) const TRANSIENT_ERR_CODES: [u64; 4] = [10008, 10009, 10076, 10163];

/// Reads the broker's answer to a publish.
pub(super) fn read_ack(topic: &Topic, ack: &async_nats::Message) -> AckResult {
    #[derive(serde::Deserialize)]
    struct ApiError {
        code: Option<u64>,
        err_code: Option<u64>,
        description: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        seq: Option<u64>,
        #[serde(default)]
        duplicate: bool,
        error: Option<ApiError>,
    }
    match ack.status {
        None => {}
        Some(StatusCode::NO_RESPONDERS) => {
            // Nothing stores the subject right now: a stream leader is being elected, or the
            // server restarts. Transient: retried with the same Nats-Msg-Id within
            // `publish_retry_for`.
            return Err(PublishError::new(
                PublishErrorKind::Connection,
                format!("publish on topic `{topic}` failed: no responders (no stream leader stores its subject; an election or a restart is under way, or the stream is gone)"),
            ));
        }
        Some(status) => {
            return Err(PublishError::new(
                PublishErrorKind::Connection,
                format!(
                "publish on topic `{topic}` failed: the broker answered with status {status} ({})",
                ack.description.as_deref().unwrap_or("no description")
            ),
            ))
        }
    }
    match serde_json::from_slice::<Body>(&ack.payload) {
        Ok(Body {
            error: Some(error), ..
        }) => {
            let err_code = error.err_code.unwrap_or(0);
            // Errors that an election, a restart or a busy cluster cause; the publish is
            // retried. Every other refusal (a full stream, a wrong expectation) is final.
            let kind = if TRANSIENT_ERR_CODES.contains(&err_code) {
                PublishErrorKind::Connection
            } else {
                PublishErrorKind::Rejected
            };
            Err(PublishError::new(
                kind,
                format!(
                    "publish on topic `{topic}` refused by the broker: {} (code {}, error code {err_code})",
                    error.description.as_deref().unwrap_or("no description"),
                    error.code.unwrap_or(0),
                ),
            ))
        }
        Ok(Body {
            seq: Some(seq),
            duplicate,
            ..
        }) => Ok((seq, duplicate)),
        _ => Err(PublishError::new(
            PublishErrorKind::Connection,
            format!(
                "publish on topic `{topic}`: unreadable ack `{}`",
                String::from_utf8_lossy(&ack.payload)
            ),
        )),
    }
}

/// What the ack task waits for besides acks.
pub(super) enum Timer {
    /// A flight to send again after a transient failure.
    Resend(Box<Flight>),
    /// A lane whose pending publishes have lingered long enough.
    Linger(Topic, Arc<Lane>),
}

pub(super) type Timers = FuturesUnordered<Pin<Box<dyn Future<Output = Timer> + Send>>>;

/// The publisher's ack task: reads acks from every topic's inbox, times out the ones that do not
/// come, retries what failed for a transient reason, sends the next publish of each aggregate
/// chain, resolves receipts and records failures. It ends once every handle of the publisher
/// is dropped and nothing is outstanding.
pub(super) async fn collect_acks(
    mut events: mpsc::UnboundedReceiver<Event>,
    state: Arc<State>,
    shared: Arc<Shared>,
) {
    let mut inboxes = SelectAll::new();
    let mut timers: Timers = FuturesUnordered::new();
    let mut tick = tokio::time::interval(TIMEOUT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut closing = false;
    let settler = Settler {
        state: &state,
        shared: &shared,
    };
    loop {
        if closing && state.outstanding.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut settled: Vec<(AckResult, Flight)> = Vec::new();
        tokio::select! {
            event = events.recv(), if !closing => match event {
                Some(Event::Inbox(subscriber)) => inboxes.push(subscriber),
                Some(Event::Failed(flight, error)) => settled.push((Err(error), *flight)),
                Some(Event::Linger(topic, lane, deadline)) => timers.push(Box::pin(async move {
                    tokio::time::sleep_until(deadline.into()).await;
                    Timer::Linger(topic, lane)
                })),
                None => closing = true,
            },
            Some(ack) = inboxes.next(), if !inboxes.is_empty() => {
                // A late ack of a publish that already timed out (and was sent again) is
                // no longer awaited: the retry's own ack settles it.
                let found = ack_id(ack.subject.as_str())
                    .and_then(|id| state.awaiting.lock().unwrap().by_id.remove(&id));
                if let Some((_, flight)) = found {
                    settled.push((read_ack(flight.topic(), &ack), flight));
                }
            }
            Some(timer) = timers.next(), if !timers.is_empty() => {
                let flights = match timer {
                    Timer::Resend(flight) => vec![*flight],
                    Timer::Linger(topic, lane) => {
                        lane.state.lock().unwrap().lingering = false;
                        settler.next_batches(&topic, &lane, &mut timers)
                    }
                };
                for flight in flights {
                    if let Err((flight, error)) = settler.transmit(flight).await {
                        settled.push((Err(error), flight));
                    }
                }
            }
            _ = tick.tick() => {
                // A re-connection: the acks of publishes sent before it may have been written
                // to the old socket. They are retried now (the same Nats-Msg-Id makes a stored
                // one a duplicate) instead of after the ack timeout.
                let routes: Vec<(Topic, Arc<Route>)> = state.routes.read().unwrap().iter().map(|(t, r)| (t.clone(), r.clone())).collect();
                for (topic, route) in routes {
                    // The server answers a publish this user may not make only with a
                    // permissions violation report; the ack never comes. Final, not retried.
                    let refused = {
                        let mut violations = route.violations.lock().unwrap();
                        match violations.has_changed() {
                            Ok(true) => violations
                                .borrow_and_update()
                                .clone()
                                .filter(|v| v.refuses_publish_to(route.connection.subject.as_str())),
                            _ => None,
                        }
                    };
                    if let Some(violation) = refused {
                        let lost = state.awaiting.lock().unwrap().of_topic(&topic);
                        for message in lost {
                            let error = PublishError::new(
                                PublishErrorKind::Rejected,
                                format!("publish on topic `{topic}` refused: the server does not let this user publish to `{topic}` ({violation})"),
                            );
                            settled.push((Err(error), message));
                        }
                    }
                    let now = *route.connection.reconnects.borrow();
                    if route.reconnects_seen.swap(now, Ordering::AcqRel) != now {
                        let lost = state.awaiting.lock().unwrap().of_topic(&topic);
                        for message in lost {
                            let error = PublishError::new(
                                PublishErrorKind::Connection,
                                format!("publish on topic `{topic}`: the connection was re-established before its ack arrived"),
                            );
                            settled.push((Err(error), message));
                        }
                    }
                }
                let timeout = shared.config.publish_ack_timeout;
                let expired = state.awaiting.lock().unwrap().expired(timeout);
                for message in expired {
                    let error = PublishError::new(
                        PublishErrorKind::TimedOut,
                        format!("publish on topic `{}`: no ack within {timeout:?}", message.topic()),
                    );
                    settled.push((Err(error), message));
                }
            }
        }
        settler.settle(settled, &mut timers).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::test_support::*;

    #[test]
    fn the_publish_id_is_the_last_token_of_the_ack_subject() {
        assert_eq!(ack_id("_INBOX.abc.42"), Some(42));
        assert_eq!(ack_id("_INBOX.abc.x"), None);
        assert_eq!(ack_id(""), None);
    }

    #[test]
    fn acks_are_read_as_sequence_duplicate_or_refusal() {
        let t = topic();
        assert_eq!(
            read_ack(&t, &ack(r#"{"stream":"S","seq":7}"#, None)).unwrap(),
            (7, false)
        );
        assert_eq!(
            read_ack(&t, &ack(r#"{"stream":"S","seq":7,"duplicate":true}"#, None)).unwrap(),
            (7, true)
        );
        let refused = read_ack(
            &t,
            &ack(
                r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
                None,
            ),
        )
        .unwrap_err();
        assert_eq!(refused.kind(), PublishErrorKind::Rejected);
        assert!(
            refused.to_string().contains("maximum messages exceeded"),
            "{refused}"
        );
        // No responders: a stream leader is being elected; retried, not refused.
        let no_stream = read_ack(&t, &ack("", Some(StatusCode::NO_RESPONDERS))).unwrap_err();
        assert_eq!(no_stream.kind(), PublishErrorKind::Connection);
        let electing = read_ack(
            &t,
            &ack(
                r#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#,
                None,
            ),
        )
        .unwrap_err();
        assert_eq!(electing.kind(), PublishErrorKind::Connection);
        // Anything else is not a refusal: it is retried with the same Nats-Msg-Id.
        let garbage = read_ack(&t, &ack("not json", None)).unwrap_err();
        assert_eq!(garbage.kind(), PublishErrorKind::Connection);
        let status = read_ack(&t, &ack("", Some(StatusCode::REQUEST_TERMINATED))).unwrap_err();
        assert_eq!(status.kind(), PublishErrorKind::Connection);
    }

    #[test]
    fn only_publishes_past_the_timeout_expire() {
        let mut awaiting = Awaiting::default();
        let now = Instant::now();
        awaiting
            .by_id
            .insert(1, (now - Duration::from_secs(6), Flight::Raw(message())));
        awaiting.by_id.insert(2, (now, Flight::Raw(message())));
        let expired = awaiting.expired(Duration::from_secs(5));
        assert_eq!(expired.len(), 1);
        assert_eq!(awaiting.by_id.keys().copied().collect::<Vec<_>>(), [2]);
        assert!(awaiting.expired(Duration::from_secs(5)).is_empty());
    }
}
