//! A JetStream cluster of real `nats-server` processes on loopback, for fail-over tests.

use std::fmt;
use std::time::{Duration, Instant};

use crate::server::{find_nats_server, NatsServer, NatsServerError};

/// How long a new cluster may take until it accepts a stream with a replica on every node.
const FORMING_TIMEOUT: Duration = Duration::from_secs(60);

/// A cluster of `nats-server` processes on `127.0.0.1` (server names `n1`, `n2`, ...), each with
/// its own store, routes to all the others and JetStream on. Each node keeps its client and
/// cluster ports across kills and restarts. Killed and removed on drop.
///
/// ```no_run
/// # async fn run() {
/// let mut cluster = bus_testkit::NatsCluster::start(3).await;
/// println!("{}", cluster.urls());
/// cluster.kill(0);
/// cluster.restart(0);
/// # }
/// ```
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    /// The nodes' configuration files.
    _config_dir: tempfile::TempDir,
}

impl fmt::Debug for NatsCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsCluster")
            .field("urls", &self.urls())
            .finish()
    }
}

/// A port the OS says is free now (bound and released).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl NatsCluster {
    /// Starts a cluster of `size` nodes and waits until it stores a stream replicated on every
    /// node; panics (with the install command if there is no binary) otherwise.
    pub async fn start(size: usize) -> Self {
        Self::try_start(size)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a cluster of `size` nodes; see [`start`](Self::start).
    pub async fn try_start(size: usize) -> Result<Self, NatsServerError> {
        let binary = find_nats_server()?;
        let config_dir = tempfile::Builder::new()
            .prefix("bus-nats-cluster-")
            .tempdir()
            .map_err(NatsServerError::Spawn)?;
        let cluster_ports = (0..size)
            .map(|_| free_port())
            .collect::<Result<Vec<_>, _>>()
            .map_err(NatsServerError::Spawn)?;
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let mut nodes = Vec::with_capacity(size);
        for (i, port) in cluster_ports.iter().enumerate() {
            let file = config_dir.path().join(format!("n{}.conf", i + 1));
            let config = format!(
                "server_name: n{}\ncluster {{\n  name: bus-test\n  listen: 127.0.0.1:{port}\n  routes: [{}]\n}}\n{}",
                i + 1,
                routes.join(", "),
                crate::server::JETSTREAM_LIMITS
            );
            std::fs::write(&file, config).map_err(NatsServerError::Spawn)?;
            let file = file.to_string_lossy().into_owned();
            nodes.push(NatsServer::try_start_binary(
                binary.clone(),
                &["-c", &file],
            )?);
        }
        let cluster = Self {
            nodes,
            _config_dir: config_dir,
        };
        cluster.wait_until_formed().await?;
        Ok(cluster)
    }

    /// Waits until a stream with a replica on every node can be created (and deletes it).
    async fn wait_until_formed(&self) -> Result<(), NatsServerError> {
        let deadline = Instant::now() + FORMING_TIMEOUT;
        let not_formed = |why: String| {
            let logs: Vec<String> = self
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| format!("n{}:\n{}", i + 1, n.log().join("\n")))
                .collect();
            NatsServerError::NotReady(format!("{why}\n{}", logs.join("\n")))
        };
        let client = loop {
            match async_nats::connect(self.nodes[0].url()).await {
                Ok(client) => break client,
                Err(e) if Instant::now() > deadline => {
                    return Err(not_formed(format!("cannot connect: {e}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let config = serde_json::json!({
            "name": "BUS_CLUSTER_PROBE",
            "subjects": ["bus-cluster-probe"],
            "num_replicas": self.nodes.len(),
            "storage": "memory",
        })
        .to_string();
        loop {
            let reply = client
                .request(
                    "$JS.API.STREAM.CREATE.BUS_CLUSTER_PROBE",
                    config.clone().into(),
                )
                .await;
            let answer = match reply {
                Ok(reply) => String::from_utf8_lossy(&reply.payload).into_owned(),
                Err(e) => e.to_string(),
            };
            if answer.contains("\"config\"") && !answer.contains("\"error\"") {
                let _ = client
                    .request("$JS.API.STREAM.DELETE.BUS_CLUSTER_PROBE", "".into())
                    .await;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(not_formed(format!(
                    "no replicated stream after {FORMING_TIMEOUT:?}: {answer}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The client URLs of every node, comma-separated (what `NatsConfig::new` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i` (0-based; its server name is `n{i+1}`).
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// The index of the node named `server_name` (`n1` is 0).
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        let i: usize = server_name.strip_prefix('n')?.parse().ok()?;
        (1..=self.nodes.len()).contains(&i).then(|| i - 1)
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) -> Result<(), NatsServerError> {
        self.nodes[i].restart()
    }

    /// Every log line of every node containing `text`, with the node's index.
    pub fn log_lines(&self, text: &str) -> Vec<(usize, String)> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                n.log()
                    .into_iter()
                    .filter(|l| l.contains(text))
                    .map(move |l| (i, l))
            })
            .collect()
    }
}
