//! Where the servers are and how to reach them: URLs, authentication, TLS, connection events.

use super::*;

/// How the client authenticates.
///
/// In configuration files: `auth = "none"`, `auth = { token = "..." }`,
/// `auth = { user-password = { user = "...", password = "..." } }`, `auth = { nkey = "..." }`
/// or `auth = { credentials-file = "/path/to.creds" }`.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// A token.
    Token(String),
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// An NKey seed.
    #[serde(rename = "nkey")]
    NKey(String),
    /// A `.creds` file (JWT and NKey seed).
    CredentialsFile(PathBuf),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets are never printed.
        match self {
            Auth::None => f.write_str("None"),
            Auth::Token(_) => f.write_str("Token(***)"),
            Auth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            Auth::NKey(_) => f.write_str("NKey(***)"),
            Auth::CredentialsFile(p) => write!(f, "CredentialsFile({})", p.display()),
        }
    }
}

/// Credentials written into a server URL (`nats://user:password@host`, `nats://token@host`).
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
}

/// Splits the credentials out of a server URL: the URL without them, and them. The client
/// library ignores credentials in URLs, so the bus passes them on as `Auth`.
impl fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets are never printed.
        match self {
            UrlCredentials::UserPassword(user, _) => write!(f, "UserPassword({user}, ***)"),
            UrlCredentials::Token(_) => f.write_str("Token(***)"),
        }
    }
}

pub(crate) fn split_url_credentials(url: &str) -> (String, Option<UrlCredentials>) {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_owned(), None);
    };
    let userinfo = &rest[..at];
    let stripped = format!("{scheme}{}", &rest[at + 1..]);
    let credentials = match userinfo.split_once(':') {
        Some((user, password)) => {
            UrlCredentials::UserPassword(percent_decode(user), percent_decode(password))
        }
        None => UrlCredentials::Token(percent_decode(userinfo)),
    };
    (stripped, Some(credentials))
}

/// A server URL fit for logs and errors: any credentials in it replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match split_url_credentials(url) {
        (stripped, Some(_)) => match stripped.find("://") {
            Some(i) => format!("{}***@{}", &stripped[..i + 3], &stripped[i + 3..]),
            None => format!("***@{stripped}"),
        },
        (url, None) => url,
    }
}

fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// TLS settings.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM files of CA certificates to trust (besides the system's).
    pub ca_files: Vec<PathBuf>,
    /// A client certificate and its key, both PEM, for mutual TLS.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
    /// Refuse to connect without TLS.
    pub require_tls: bool,
}

/// Something that happened to a topic's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// Connected, or reconnected after a disconnection.
    Connected {
        /// The topic whose connection it is.
        topic: Topic,
    },
    /// The connection was lost; the client reconnects by itself.
    Disconnected {
        /// The topic whose connection it is.
        topic: Topic,
    },
    /// The connection was closed for good.
    Closed {
        /// The topic whose connection it is.
        topic: Topic,
    },
    /// The server or client reported a problem.
    Error {
        /// The topic whose connection it is.
        topic: Topic,
        /// The problem.
        message: String,
    },
}

/// A callback for [`ConnectionEvent`]s.
pub type ConnectionCallback = Arc<dyn Fn(ConnectionEvent) + Send + Sync>;

/// How to reach and authenticate with the NATS servers.
#[derive(Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Server URLs; the client picks one and fails over to the others (default
    /// `nats://127.0.0.1:4222`).
    pub servers: Vec<String>,
    /// Client name shown in server monitoring; the topic is appended (default `bus`).
    pub client_name: String,
    /// Credentials.
    pub auth: Auth,
    /// TLS, if any.
    pub tls: Option<TlsConfig>,
    /// Reconnect attempts before giving up; `None` (the default) retries for ever, so that a
    /// server restart never ends a long-running service.
    pub max_reconnects: Option<usize>,
    /// Timeout of one connection attempt (default 5 s).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Keep retrying the first connection instead of failing at once (default false: a
    /// misconfigured URL should fail loudly at start-up).
    pub retry_on_initial_connect: bool,
    /// Called on every connection event.
    #[serde(skip)]
    pub on_event: Option<ConnectionCallback>,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            client_name: "bus".into(),
            auth: Auth::None,
            tls: None,
            max_reconnects: None,
            connect_timeout: Duration::from_secs(5),
            retry_on_initial_connect: false,
            on_event: None,
        }
    }
}

impl fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field(
                "servers",
                &self
                    .servers
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("client_name", &self.client_name)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("max_reconnects", &self.max_reconnects)
            .field("connect_timeout", &self.connect_timeout)
            .field("retry_on_initial_connect", &self.retry_on_initial_connect)
            .field("on_event", &self.on_event.as_ref().map(|_| ".."))
            .finish()
    }
}
