//! One subscription per topic and consumer group in a process: the registry of the claims.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use bus_core::{SubscribeError, SubscribeErrorKind, Topic};

/// Subscriptions live in this process, by servers, stream and consumer: a second subscription
/// of one topic and group in one process is refused, whichever `NatsBus` it comes through.
fn registry() -> &'static Mutex<HashSet<String>> {
    static ACTIVE: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    ACTIVE.get_or_init(|| Mutex::new(HashSet::new()))
}

/// This process's claim on one topic and group; dropping it releases the claim.
#[derive(Debug)]
pub(crate) struct Registration(String);

impl Registration {
    pub(crate) fn claim(
        servers: &[String],
        stream: &str,
        consumer: &str,
        topic: &Topic,
    ) -> Result<Self, SubscribeError> {
        let mut servers = servers.to_vec();
        servers.sort();
        let key = format!("{}|{stream}|{consumer}", servers.join(","));
        if registry().lock().unwrap().insert(key.clone()) {
            Ok(Self(key))
        } else {
            Err(SubscribeError::new(
                SubscribeErrorKind::AlreadySubscribed,
                format!(
                    "topic `{topic}` already has a subscription of consumer `{consumer}` in this process; \
                     one per process is enough (one consumes, the others of other processes wait as standbys)"
                ),
            ))
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        registry().lock().unwrap().remove(&self.0);
    }
}
