//! A projection: keeps each account's balance in an embedded database (redb), with the version
//! of the last event applied to it in the same row. The database is the group's store of
//! handled versions (`HandledVersions`): `HandledOnce` skips a delivery at or below the stored
//! version (a replay after a crash between the commit and the acknowledgement), and the
//! handler writes the new version with the balance, in one transaction, so every event's
//! effect happens once. Events written as version 1 of `AccountOpened` (before it had a
//! currency) are brought to version 2 by an upcaster. `--rebuild` empties the database and
//! moves the group back to the topic's start, to rebuild every balance from the history.
//! Serves Prometheus metrics on `/metrics` and the bus's health on `/health` (200 when healthy,
//! 503 otherwise) at `--listen`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use bus_core::{
    AggregateId, EventContext, EventHandlers, HandledOnce, HandledVersions, HandlerError,
    Subscriber,
};
use bus_examples::{accounts, Connection, Deposited, Opened, Withdrawn, GROUP};
use bus_nats::{HealthStatus, HealthThresholds, NatsBus, NatsErrorKind, ResetTo};
use clap::Parser;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Account → (balance in cents, version of the last event applied).
const BALANCES: TableDefinition<'_, &str, (i64, u64)> = TableDefinition::new("balances");

#[derive(Debug, Parser)]
#[command(about = "Project account events into an embedded database")]
struct Args {
    #[command(flatten)]
    connection: Connection,
    /// The database file.
    #[arg(long, default_value = "balances.redb")]
    db: PathBuf,
    /// Where to serve /metrics and /health.
    #[arg(long, default_value = "127.0.0.1:9898")]
    listen: String,
    /// Empty the database and rebuild it from the topic's start.
    #[arg(long)]
    rebuild: bool,
    /// Exit once the group has handled everything on the topic (for scripts and tests).
    #[arg(long)]
    exit_when_idle: bool,
    /// Exit when standard input closes (for scripts and tests); otherwise at Ctrl-C.
    #[arg(long)]
    stop_on_eof: bool,
}

/// The balances, and with them the version of each account's last event applied.
struct Balances(Arc<Database>);

#[async_trait]
impl HandledVersions for Balances {
    async fn last_handled(&self, account: &AggregateId) -> Result<Option<u64>, HandlerError> {
        let (db, account) = (self.0.clone(), account.to_string());
        tokio::task::spawn_blocking(move || -> Result<Option<u64>, Box<redb::Error>> {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = match txn.open_table(BALANCES) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(Box::new(e.into())),
            };
            let row = table.get(account.as_str()).map_err(redb::Error::from)?;
            Ok(row.map(|row| row.value().1))
        })
        .await
        .map_err(HandlerError::permanent)?
        .map_err(HandlerError::retryable)
    }

    /// Written by `apply`, in the transaction that changes the balance.
    async fn record_handled(&self, _: &AggregateId, _: u64) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Applies `change` to the account's balance and stores `cx`'s version with it.
async fn apply(db: Arc<Database>, cx: EventContext, change: i64) -> Result<(), HandlerError> {
    let account = cx.aggregate_id().to_string();
    let version = cx.version();
    tokio::task::spawn_blocking(move || -> Result<(), Box<redb::Error>> {
        let txn = db.begin_write().map_err(redb::Error::from)?;
        {
            let mut table = txn.open_table(BALANCES).map_err(redb::Error::from)?;
            let (balance, applied) = table
                .get(account.as_str())
                .map_err(redb::Error::from)?
                .map_or((0, 0), |stored| stored.value());
            // HandledOnce skipped replays already; this check fences off a subscription that
            // lost the topic while its handler ran (the new owner may have moved on).
            if version <= applied {
                return Ok(());
            }
            table
                .insert(account.as_str(), (balance + change, version))
                .map_err(redb::Error::from)?;
        }
        txn.commit().map_err(redb::Error::from)?;
        Ok(())
    })
    .await
    .map_err(HandlerError::permanent)?
    // A database error may pass (disk full, lock): retried in place, the account's later
    // events waiting.
    .map_err(HandlerError::retryable)
}

/// Empties the database and moves the group back to the topic's start (with no subscription
/// of the group running, its consumer itself is moved). A group that never subscribed starts
/// there anyway.
async fn rebuild(bus: &NatsBus, db: &Database) -> Result<()> {
    let txn = db.begin_write()?;
    txn.delete_table(BALANCES)?;
    txn.commit()?;
    match bus
        .reset_group(&accounts(), ResetTo::Start, Duration::from_secs(10))
        .await
    {
        Ok(reset) => println!("rebuilding from sequence {}", reset.sequence),
        Err(e) if e.kind() == NatsErrorKind::NotFound => println!("rebuilding from the start"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let db = Arc::new(Database::create(&args.db)?);
    let bus = NatsBus::connect(args.connection.config(GROUP)?).await?;
    let topic = accounts();

    if args.rebuild {
        rebuild(&bus, &db).await?;
    }

    let handlers = {
        let (a, b, c) = (db.clone(), db.clone(), db.clone());
        EventHandlers::new()
            .on(move |_: Opened, cx: EventContext| apply(a.clone(), cx, 0))
            .on(move |e: Deposited, cx: EventContext| apply(b.clone(), cx, e.cents))
            .on(move |e: Withdrawn, cx: EventContext| apply(c.clone(), cx, -e.cents))
            // Version 1 of AccountOpened had no currency: those accounts were all in euros.
            .upcast::<Opened>(1, |mut v| {
                v["currency"] = "EUR".into();
                Ok(v)
            })
    };
    let handler = HandledOnce::new(Balances(db.clone()), Arc::new(handlers));
    let subscription = bus.subscribe(&topic, Arc::new(handler)).await?;

    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!(
        "serving /metrics and /health on http://{}",
        listener.local_addr()?
    );
    let server = {
        let bus = bus.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let n = socket.read(&mut request).await.unwrap_or(0);
                let path = String::from_utf8_lossy(&request[..n])
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .to_owned();
                let (status, body) = match path.as_str() {
                    "/metrics" => ("200 OK", prometheus.render()),
                    "/health" => {
                        let health = bus.health(&HealthThresholds::default()).await;
                        let status = if health.status == HealthStatus::Healthy {
                            "200 OK"
                        } else {
                            "503 Service Unavailable"
                        };
                        let problems: Vec<String> = health
                            .problems()
                            .map(|(t, p)| format!("{t}: {p}\n"))
                            .collect();
                        (
                            status,
                            format!("{:?}\n{}", health.status, problems.concat()),
                        )
                    }
                    _ => ("404 Not Found", String::new()),
                };
                let response = format!(
                    "HTTP/1.0 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            }
        })
    };

    if args.exit_when_idle {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let lag = bus.lag(&topic).await?;
            let handled = subscription.control().map_or(0, |c| c.metrics().handled);
            if handled > 0 && lag.undelivered == 0 && lag.unacknowledged == 0 {
                break;
            }
        }
    } else if args.stop_on_eof {
        let mut stdin = tokio::io::stdin();
        let mut buffer = [0u8; 64];
        while stdin.read(&mut buffer).await? > 0 {}
    } else {
        tokio::signal::ctrl_c().await?;
    }
    server.abort();
    let report = subscription.close().await?;
    bus.close().await?;

    let txn = db.begin_read()?;
    let table = txn.open_table(BALANCES)?;
    let mut accounts = 0;
    let mut total = 0;
    for entry in table.iter()? {
        let (_, value) = entry?;
        accounts += 1;
        total += value.value().0;
    }
    println!(
        "handled {} events; {accounts} accounts, total balance {total} cents",
        report.handled
    );
    Ok(())
}
