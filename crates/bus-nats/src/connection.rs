//! Connections: one per topic (or one shared), each with its stream provisioned, a topic's
//! publishes on a connection of their own, and what the transport's parts share.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream;
use bus_core::Topic;
use tokio::sync::watch;

use crate::broker::Violation;
use crate::config::{self, ConnectionEvent, NatsConfig};
use crate::{provision, NatsError};

/// A topic's connection, with its stream provisioned. Shared behind an `Arc`: the publish
/// path looks it up per message and must not clone its strings.
#[derive(Debug)]
pub(crate) struct TopicConnection {
    /// The topic as a subject, built once.
    pub(crate) subject: async_nats::Subject,
    /// For a partitioned topic, the subject of each partition (`<topic>.<p>`); empty otherwise.
    pub(crate) partitions: Vec<async_nats::Subject>,
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: jetstream::Context,
    pub(crate) stream: String,
    /// The server's `max_payload`, read once: `server_info()` clones a large struct.
    pub(crate) max_payload: usize,
    /// Counts the connection's re-connections: a change means the socket was replaced, and
    /// whatever the broker wrote to the old one is gone.
    pub(crate) reconnects: watch::Receiver<u64>,
    /// The last permissions violation the server reported on this connection.
    pub(crate) violations: watch::Receiver<Option<Violation>>,
    /// The server's version, as it reported it when this connection was made.
    pub(crate) server_version: String,
    /// The group's consumers are owned through a priority group whose client the server pins
    /// (2.14+ with `consumer.ownership` Auto): one subscription of a group consumes, the others
    /// wait as standbys. Otherwise a lease in `BUS_OWNERS` does it.
    pub(crate) pinned: bool,
    /// The server resets a consumer to a sequence (the consumer reset API, 2.14+): delivery
    /// restarts without deleting the consumer, whichever way it is owned. Before 2.14 a restart
    /// deletes and recreates it.
    pub(crate) can_reset: bool,
    /// How the topic's stream keeps its events.
    pub(crate) retention: config::Retention,
}

/// What a connection tells the parts that use it.
pub(crate) struct Signals {
    pub(crate) reconnects: watch::Receiver<u64>,
    pub(crate) violations: watch::Receiver<Option<Violation>>,
}

/// What a bus's publishers and subscriptions share: the configuration and the connections.
pub(crate) struct Shared {
    pub(crate) config: NatsConfig,
    pub(crate) connections: RwLock<HashMap<Topic, Arc<TopicConnection>>>,
    /// Each topic's publishing connection, when publishes have their own
    /// ([`NatsConfig::separate_publish_connection`]).
    pub(crate) publishing: RwLock<HashMap<Topic, Arc<TopicConnection>>>,
    pub(crate) connecting: tokio::sync::Mutex<()>,
    /// Set by `NatsBus::close`: every later operation fails at once with `Closed`.
    pub(crate) closed: std::sync::atomic::AtomicBool,
    /// The connection of ownership leases and group membership (KV buckets): its own, so that
    /// renewing a lease never waits behind a topic's deliveries (a topic connection's reader
    /// blocks while a full pull inbox drains, and a lease not renewed in time is given up).
    pub(crate) coordination: tokio::sync::OnceCell<Coordination>,
    /// The runtime the bus was connected on: every connection the bus keeps runs there,
    /// whichever runtime first used it (a subscription's own thread, a handler on it, another
    /// runtime's task), so that none ends with a runtime that ends before the bus.
    pub(crate) home: tokio::runtime::Handle,
}

/// Where a new connection's task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum On {
    /// The bus's runtime ([`Shared::home`]): a connection the bus keeps.
    Home,
    /// The caller's runtime: a connection of a publisher made for another runtime, which
    /// ends with it.
    Caller,
}

/// See [`Shared::coordination`].
pub(crate) struct Coordination {
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: jetstream::Context,
    pub(crate) violations: watch::Receiver<Option<Violation>>,
}

impl Shared {
    /// The coordination connection, connected on first use.
    pub(crate) async fn coordination(&self) -> Result<&Coordination, NatsError> {
        self.check_open()?;
        self.coordination
            .get_or_try_init(|| async {
                let name = Topic::new("bus-coordination").expect("a valid topic");
                let (client, signals) = self.connect(&name, Role::Topic, On::Home).await?;
                Ok(Coordination {
                    jetstream: jetstream::new(client.clone()),
                    client,
                    violations: signals.violations,
                })
            })
            .await
    }

    /// The topic's connection, connecting and provisioning its stream on first use.
    pub(crate) async fn connection(
        &self,
        topic: &Topic,
    ) -> Result<Arc<TopicConnection>, NatsError> {
        self.check_open()?;
        if let Some(c) = self.connections.read().unwrap().get(topic) {
            return Ok(c.clone());
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.connections.read().unwrap().get(topic) {
            return Ok(c.clone());
        }
        let shared_client = if self.config.share_connection {
            self.connections.read().unwrap().values().next().map(|c| {
                (
                    c.client.clone(),
                    Signals {
                        reconnects: c.reconnects.clone(),
                        violations: c.violations.clone(),
                    },
                )
            })
        } else {
            None
        };
        let (client, signals) = match shared_client {
            Some(shared) => shared,
            None => self.connect(topic, Role::Topic, On::Home).await?,
        };
        let connection = Arc::new(self.provisioned(topic, client, signals).await?);
        self.connections
            .write()
            .unwrap()
            .insert(topic.clone(), connection.clone());
        Ok(connection)
    }

    /// A topic's connection on `client`, once the topic's stream is provisioned through it.
    async fn provisioned(
        &self,
        topic: &Topic,
        client: async_nats::Client,
        signals: Signals,
    ) -> Result<TopicConnection, NatsError> {
        let jetstream = self.jetstream(&client);
        let spec = self.config.stream_for(topic);
        crate::broker::guarded(
            &signals.violations,
            || format!("provisioning stream `{}` of topic `{topic}`", spec.name),
            provision::ensure_stream(&jetstream, &spec, self.config.provisioning),
        )
        .await?;
        let server_version = client.server_info().version;
        Ok(TopicConnection {
            subject: async_nats::Subject::from(topic.as_str()),
            partitions: if spec.partitions > 1 {
                provision::partition_subjects(topic.as_str(), spec.partitions)
                    .into_iter()
                    .map(async_nats::Subject::from)
                    .collect()
            } else {
                Vec::new()
            },
            max_payload: client.server_info().max_payload,
            client,
            jetstream,
            stream: spec.name,
            reconnects: signals.reconnects,
            violations: signals.violations,
            // Priority groups came in 2.11, the consumer reset API in 2.14: a standby that
            // takes over must restart delivery at the ack floor without deleting the consumer
            // under the others. Unless the group's ownership is a lease on every server; the
            // lease, too, restarts delivery by the reset API where the server has it.
            pinned: server_at_least(&server_version, (2, 14))
                && self.config.consumer.ownership == crate::Ownership::Auto,
            can_reset: server_at_least(&server_version, (2, 14)),
            server_version,
            retention: spec.retention,
        })
    }

    /// The connection a topic's publishes go out on: with
    /// [`NatsConfig::separate_publish_connection`] (and without `share_connection`) a
    /// connection of their own, connected on first use; otherwise the topic's connection.
    /// When the topic's connection is already there, it has provisioned the stream and the
    /// publishing connection only connects; otherwise the publishing connection provisions it,
    /// and a process that only publishes keeps one connection to the topic.
    ///
    /// Apart, a publisher's messages and the broker's acks of them do not queue behind the
    /// topic's deliveries and the subscriptions' acks on one socket, and the broker reads each
    /// socket in reads of similar sizes (it regrows its read buffer, and allocates, whenever a
    /// large publish follows a run of small acks).
    pub(crate) async fn publish_connection(
        &self,
        topic: &Topic,
    ) -> Result<Arc<TopicConnection>, NatsError> {
        if self.config.share_connection || !self.config.separate_publish_connection {
            return self.connection(topic).await;
        }
        self.check_open()?;
        if let Some(c) = self.publishing.read().unwrap().get(topic) {
            return Ok(c.clone());
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.publishing.read().unwrap().get(topic) {
            return Ok(c.clone());
        }
        let connection = Arc::new(self.new_publish_connection(topic, On::Home).await?);
        self.publishing
            .write()
            .unwrap()
            .insert(topic.clone(), connection.clone());
        Ok(connection)
    }

    /// A new connection for `topic`'s publishes, kept by nobody but the caller (the publishing
    /// connections above are kept by the bus). Its task runs on the runtime `on` says, and
    /// ends when the caller drops the connection.
    pub(crate) async fn new_publish_connection(
        &self,
        topic: &Topic,
        on: On,
    ) -> Result<TopicConnection, NatsError> {
        self.check_open()?;
        let consuming = self.connections.read().unwrap().get(topic).cloned();
        let (client, signals) = self.connect(topic, Role::Publishing, on).await?;
        Ok(match consuming {
            Some(consuming) => TopicConnection {
                subject: consuming.subject.clone(),
                partitions: consuming.partitions.clone(),
                max_payload: client.server_info().max_payload,
                jetstream: self.jetstream(&client),
                client,
                stream: consuming.stream.clone(),
                reconnects: signals.reconnects,
                violations: signals.violations,
                server_version: consuming.server_version.clone(),
                pinned: consuming.pinned,
                can_reset: consuming.can_reset,
                retention: consuming.retention,
            },
            None => self.provisioned(topic, client, signals).await?,
        })
    }

    /// A JetStream context on `client`. The ack window is ours (`max_in_flight`); the
    /// client's own is set to the same size and waits rather than failing at the bound.
    fn jetstream(&self, client: &async_nats::Client) -> jetstream::Context {
        jetstream::ContextBuilder::new()
            .max_ack_inflight(self.config.max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone())
    }

    /// Every topic connection and publishing connection, with its topic.
    pub(crate) fn all_connections(&self) -> Vec<(Topic, Arc<TopicConnection>)> {
        let mut all: Vec<_> = self
            .connections
            .read()
            .unwrap()
            .iter()
            .map(|(t, c)| (t.clone(), c.clone()))
            .collect();
        all.extend(
            self.publishing
                .read()
                .unwrap()
                .iter()
                .map(|(t, c)| (t.clone(), c.clone())),
        );
        all
    }

    /// Fails with `Closed` once the bus was closed.
    pub(crate) fn check_open(&self) -> Result<(), NatsError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            Err(NatsError::Closed("the bus is closed".into()))
        } else {
            Ok(())
        }
    }

    /// Connects for `topic`, with a counter of the connection's re-connections. The client's
    /// task runs on the runtime `on` says: async-nats spawns it where the connection is made.
    pub(crate) async fn connect(
        &self,
        topic: &Topic,
        role: Role,
        on: On,
    ) -> Result<(async_nats::Client, Signals), NatsError> {
        let connecting = connect(
            self.config.connection.clone(),
            self.config.max_in_flight,
            topic.clone(),
            role,
        );
        match on {
            On::Caller => connecting.await,
            On::Home => self.home.spawn(connecting).await.map_err(|_| {
                NatsError::Closed("the tokio runtime the bus was connected on has shut down".into())
            })?,
        }
    }
}

/// [`Shared::connect`], on the runtime it is polled on.
async fn connect(
    c: config::ConnectionConfig,
    max_in_flight: usize,
    topic: Topic,
    role: Role,
) -> Result<(async_nats::Client, Signals), NatsError> {
    let topic = &topic;
    let c = &c;
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("{}:{topic}{}", c.client_name, role.suffix()))
        .connection_timeout(c.connect_timeout)
        .max_reconnects(c.max_reconnects)
        // A publisher's acks come back on one subscription, up to `max_in_flight` at a time;
        // a full subscription would drop them (and the publishes would time out).
        .subscription_capacity(max_in_flight.saturating_mul(2).max(65_536));
    // The client ignores credentials written into URLs: take them out (they must not be
    // printed either) and pass them on as the connection's authentication.
    let mut servers = Vec::with_capacity(c.servers.len());
    let mut from_urls: Option<config::UrlCredentials> = None;
    for url in &c.servers {
        let (stripped, credentials) = config::split_url_credentials(url);
        servers.push(stripped);
        if let Some(credentials) = credentials {
            if from_urls.as_ref().is_some_and(|seen| *seen != credentials) {
                return Err(NatsError::Configuration(
                        "connection.servers: the server URLs carry different credentials; give one set in `connection.auth`".into(),
                    ));
            }
            from_urls = Some(credentials);
        }
    }
    let auth = match (&c.auth, from_urls) {
            (auth, None) => auth.clone(),
            (config::Auth::None, Some(config::UrlCredentials::UserPassword(user, password))) => {
                config::Auth::UserPassword { user, password }
            }
            (config::Auth::None, Some(config::UrlCredentials::Token(token))) => {
                config::Auth::Token(token)
            }
            (_, Some(_)) => {
                return Err(NatsError::Configuration(
                    "connection.servers: credentials are given in a server URL and in `connection.auth`; keep one".into(),
                ))
            }
        };
    options = match &auth {
        config::Auth::None => options,
        config::Auth::Token(t) => options.token(t.clone()),
        config::Auth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        config::Auth::NKey(seed) => options.nkey(seed.clone()),
        config::Auth::CredentialsFile(path) => {
            options.credentials_file(path).await.map_err(|e| {
                NatsError::Configuration(format!(
                    "credentials file `{}` could not be read: {e}",
                    path.display()
                ))
            })?
        }
    };
    if let Some(tls) = &c.tls {
        // The client would skip a CA file it cannot read or parse, and fail later with a
        // handshake error that names no file.
        for ca in &tls.ca_files {
            check_pem(ca, "CA certificate", "CERTIFICATE")?;
        }
        if let Some((cert, key)) = &tls.client_certificate {
            check_pem(cert, "client certificate", "CERTIFICATE")?;
            check_pem(key, "client key", "PRIVATE KEY")?;
        }
        for ca in &tls.ca_files {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &tls.client_certificate {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options = options.require_tls(tls.require_tls);
    }
    if c.retry_on_initial_connect {
        options = options.retry_on_initial_connect();
    }
    let callback = c.on_event.clone();
    let event_topic = topic.clone();
    let (reconnected, reconnects) = watch::channel(0u64);
    let reconnected = Arc::new(reconnected);
    let (violated, violations) = watch::channel(None::<Violation>);
    let violated = Arc::new(violated);
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    options = options.event_callback(move |event| {
        let callback = callback.clone();
        let topic = event_topic.clone();
        let reconnected = reconnected.clone();
        let first = first.clone();
        let violated = violated.clone();
        async move {
            let event = match event {
                async_nats::Event::Connected => {
                    // The first event is the first connection; every later one replaced a
                    // lost socket.
                    if first.swap(false, std::sync::atomic::Ordering::AcqRel) {
                        tracing::debug!(%topic, role = role.suffix(), "connected");
                    } else {
                        reconnected.send_modify(|n| *n += 1);
                    }
                    ConnectionEvent::Connected { topic }
                }
                async_nats::Event::Disconnected => ConnectionEvent::Disconnected { topic },
                async_nats::Event::Closed => ConnectionEvent::Closed { topic },
                async_nats::Event::ServerError(async_nats::ServerError::Other(text)) => {
                    if let Some(violation) = Violation::parse(&text) {
                        violated.send_replace(Some(violation));
                    }
                    ConnectionEvent::Error {
                        topic,
                        message: text,
                    }
                }
                other => ConnectionEvent::Error {
                    topic,
                    message: other.to_string(),
                },
            };
            tracing::info!(?event, role = role.suffix(), "nats connection event");
            if let Some(callback) = callback {
                callback(event);
            }
        }
    });
    let client = options
        .connect(servers.clone())
        .await
        .map_err(|source| NatsError::Connect { servers, source })?;
    Ok((
        client,
        Signals {
            reconnects,
            violations,
        },
    ))
}

/// What a connection is for; its name on the server (`<client name>:<topic><suffix>`) says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A topic's connection: its stream, subscriptions, and publishes unless they have their own.
    Topic,
    /// A topic's publishes alone.
    Publishing,
}

impl Role {
    fn suffix(self) -> &'static str {
        match self {
            Role::Topic => "",
            Role::Publishing => ":publish",
        }
    }
}

/// Checks that `path` is a readable PEM file holding a `label` block (`-----BEGIN <label>`,
/// any `... <label>` such as `RSA PRIVATE KEY` included).
fn check_pem(path: &std::path::Path, what: &str, label: &str) -> Result<(), NatsError> {
    let text = std::fs::read(path).map_err(|e| {
        NatsError::Configuration(format!(
            "TLS {what} file `{}` could not be read: {e}",
            path.display()
        ))
    })?;
    let text = String::from_utf8_lossy(&text);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")));
    if found {
        Ok(())
    } else {
        Err(NatsError::Configuration(format!(
            "TLS {what} file `{}` is not PEM: no `-----BEGIN ...{label}-----` line",
            path.display()
        )))
    }
}

/// Whether a server version string like `2.15.1` is at least `(major, minor)`.
pub(crate) fn server_at_least(version: &str, wanted: (u32, u32)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_compare() {
        assert!(server_at_least("2.15.1", (2, 14)));
        assert!(server_at_least("2.14.0", (2, 14)));
        assert!(!server_at_least("2.9.10", (2, 14)));
        assert!(!server_at_least("2.10.22", (2, 14)));
    }
}
