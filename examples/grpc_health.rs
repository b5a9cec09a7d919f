//! gRPC health checks through the reconnecting HTTP/2 channel, across a server crash and a
//! graceful restart, with the timeline of the connection's epochs.
//!
//! The server is Python's grpcio with its standard health service when `.peers/grpc` has it
//! (`bash .ci/install-peers`), or else tonic-health's service on hyper, in this process. The
//! client is tonic-health's generated `HealthClient`, unchanged, over `tower_epoch::http2`.
//!
//! Run with `cargo run --example grpc_health --features http2`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower_epoch::events::Transition;
use tower_epoch::http2::{self, H2Connector};
use tower_epoch::{BoxError, State};

/// Every wait of the example.
const WAIT: Duration = Duration::from_secs(10);

/// The gRPC server: grpcio in a child process, or tonic-health in this one.
enum Server {
    Python(tokio::process::Child),
    InProcess(JoinSet<()>),
}

impl Server {
    async fn start(port: u16) -> Result<(Server, u16), BoxError> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        if root.join(".peers/grpc/grpc/__init__.py").is_file() {
            let mut child = tokio::process::Command::new("python3")
                .arg(root.join("tests/peers/grpc_health_server.py"))
                .arg(port.to_string())
                .env("PYTHONPATH", root.join(".peers/grpc"))
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
            let line = timeout(WAIT, lines.next_line()).await??.ok_or("no port")?;
            let port = line.trim_start_matches("listening ").parse()?;
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok((Server::Python(child), port));
        }
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((socket, _)) = listener.accept().await {
                let service = hyper_util::service::TowerToHyperService::new(health.clone());
                connections.spawn(async move {
                    let builder = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let io = hyper_util::rt::TokioIo::new(socket);
                    let _ = builder.serve_connection(io, service).await;
                });
            }
        });
        Ok((Server::InProcess(tasks), port))
    }

    fn name(&self) -> &'static str {
        match self {
            Server::Python(_) => "Python grpcio",
            Server::InProcess(_) => "tonic-health in this process",
        }
    }

    /// The crash: SIGKILL, or every connection dropped at once.
    async fn kill(self) {
        match self {
            Server::Python(mut child) => {
                let _ = child.kill().await;
            }
            Server::InProcess(mut tasks) => tasks.shutdown().await,
        }
    }

    /// A graceful stop where the server has one (grpcio's `server.stop(grace)`: GOAWAY).
    async fn stop(self) -> Result<(), BoxError> {
        match self {
            Server::Python(mut child) => {
                let pid = child.id().ok_or("exited")?.to_string();
                std::process::Command::new("kill")
                    .args(["-TERM", &pid])
                    .status()?;
                timeout(WAIT, child.wait()).await??;
            }
            Server::InProcess(mut tasks) => tasks.shutdown().await,
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let started = Instant::now();
    let (server, port) = Server::start(0).await?;
    println!("server: {} on 127.0.0.1:{port}", server.name());

    let reconnect = http2::layer(&format!("http://127.0.0.1:{port}"))?
        .with_connect_timeout(Duration::from_secs(2))
        .with_stable_after(Duration::from_millis(200));
    let handle = reconnect.handle();
    let mut events = handle.events();
    let channel = ServiceBuilder::new()
        .timeout(WAIT)
        .buffer(64)
        .layer(reconnect)
        .service(H2Connector::<tonic::body::Body>::new());
    let health = HealthClient::new(channel);

    handle.connect()?;
    println!(
        "check: {} (epoch {})",
        check(health.clone()).await?,
        handle.epoch()
    );

    server.kill().await;
    println!("server killed; a check waits for the connection to come back");
    let waiting = tokio::spawn(check(health.clone()));
    sleep(Duration::from_millis(300)).await;
    let (server, _) = Server::start(port).await?;
    println!("server restarted on its port");
    println!("check: {} (epoch {})", waiting.await??, handle.epoch());

    sleep(Duration::from_millis(300)).await; // up for the stable period
    server.stop().await?;
    println!("server stopped gracefully");
    let (server, _) = Server::start(port).await?;
    handle.wait_for(WAIT, State::is_connected).await?;
    println!(
        "check: {} (epoch {})",
        check(health.clone()).await?,
        handle.epoch()
    );

    handle.disconnect().await;
    println!("disconnected: {}\n\ntimeline:", handle.state());
    while let Ok(Some(Ok(t))) = timeout(Duration::from_millis(100), events.recv()).await {
        print_transition(&t, started);
    }
    let ledger = handle.ledger();
    println!(
        "\n{} attempts, {} installed, {} failures, {} ended by the server, {} closed",
        ledger.attempts, ledger.installed, ledger.failures, ledger.ended, ledger.closed
    );
    drop(server);
    Ok(())
}

/// One health check of the server as a whole.
async fn check<T>(mut health: HealthClient<T>) -> Result<String, BoxError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    let reply = health.check(HealthCheckRequest::default()).await?;
    Ok(format!("{:?}", reply.into_inner().status()))
}

fn print_transition(t: &Transition, started: Instant) {
    let at = t.at.duration_since(started).as_secs_f64() * 1000.0;
    println!("  {at:8.1} ms  {:?}: {} -> {}", t.cause, t.from, t.to);
}
