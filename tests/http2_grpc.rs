//! The HTTP/2 transport against a real gRPC server that no one here wrote: Python's grpcio with
//! its standard health service (`tests/peers/grpc_health_server.py`), called through tonic's
//! generated health client over the reconnecting channel, and beside it through tonic's own
//! `Channel`.
//!
//! The peer is installed by `bash .ci/install-peers` (into `.peers/grpc`); without it these
//! tests say so and pass, except under `CI=true`, where a missing peer fails them.
#![cfg(feature = "http2")]

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower_epoch::http2::{self, H2Connection, H2Connector};
use tower_epoch::{Epoch, Handle, Reconnect, State};

/// Every wait of these tests.
const WAIT: Duration = Duration::from_secs(15);

type Channel = Reconnect<H2Connection<tonic::body::Body>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Why the peer cannot run, if it cannot.
fn missing() -> Option<String> {
    let package = root().join(".peers/grpc/grpc/__init__.py");
    (!package.is_file()).then(|| format!("{} not found", package.display()))
}

/// Whether the test can run; a missing peer fails it under `CI=true`.
fn peer_ready(test: &str) -> bool {
    let Some(why) = missing() else { return true };
    let how = "install it with `bash .ci/install-peers`";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("http2_grpc::{test}: the grpcio peer is missing ({why}); {how}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "http2_grpc::{test}: SKIPPED, the grpcio peer is not installed ({why}); {how}"
    );
    false
}

/// The Python gRPC server. Dropping it kills it.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Starts the server on `port` (0: any) and waits until it listens.
    async fn start(port: u16) -> Server {
        let mut child = Command::new("python3")
            .arg(root().join("tests/peers/grpc_health_server.py"))
            .arg(port.to_string())
            .arg("5")
            .env("PYTHONPATH", root().join(".peers/grpc"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = timeout(WAIT, lines.next_line())
            .await
            .expect("the server starts in time")
            .unwrap()
            .expect("the server says where it listens");
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        // Keep reading, so that the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { child, port }
    }

    /// SIGKILL: the crash. Waits until the process is gone.
    async fn kill(mut self) -> u16 {
        self.child.kill().await.expect("kill");
        self.port
    }

    /// SIGTERM: `server.stop(grace)`, which sends GOAWAY and lets the calls in flight finish.
    /// Waits until the process exited.
    async fn stop(mut self) -> u16 {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let exited = timeout(WAIT, self.child.wait())
            .await
            .expect("it stops")
            .unwrap();
        assert!(exited.success(), "{exited}");
        self.port
    }

    fn target(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A reconnecting channel to `server` and its handle, not yet connected.
fn channel(target: &str) -> (Channel, Handle) {
    let layer = http2::layer(target)
        .unwrap()
        .with_connect_timeout(Duration::from_secs(2))
        .with_close_timeout(Duration::from_secs(5))
        .with_stable_after(Duration::from_millis(200))
        .with_backoff(
            tower_epoch::backoff::Exponential::new(
                Duration::from_millis(20),
                Duration::from_millis(200),
            )
            .unwrap(),
        );
    let handle = layer.handle();
    let channel = ServiceBuilder::new()
        .layer(layer)
        .service(H2Connector::<tonic::body::Body>::new());
    (channel, handle)
}

async fn check<T>(
    client: &mut HealthClient<T>,
    service: &str,
) -> Result<ServingStatus, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tower_epoch::BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tower_epoch::BoxError> + Send,
{
    let request = HealthCheckRequest {
        service: service.to_string(),
    };
    let reply = timeout(WAIT, client.check(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("the test's wait"))??;
    Ok(reply.into_inner().status())
}

async fn connected_after(handle: &Handle, epoch: Epoch) -> Epoch {
    handle
        .wait_for(WAIT, |s| s.is_connected() && s.epoch() > Some(epoch))
        .await
        .expect("connected again")
        .epoch()
        .unwrap()
}

/// Sockets this process holds open to `port` on 127.0.0.1 (from `/proc`).
fn sockets_to(port: u16) -> usize {
    let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields[2].rsplit(':').next().unwrap();
            u16::from_str_radix(remote_port, 16).ok() == Some(port) && ours.contains(fields[9])
        })
        .count()
}

#[tokio::test]
async fn health_checks_flow_and_a_disconnect_leaves_no_socket() {
    if !peer_ready("health_checks_flow_and_a_disconnect_leaves_no_socket") {
        return;
    }
    let server = Server::start(0).await;
    let (channel, handle) = channel(&server.target());
    let mut health = HealthClient::new(channel);
    handle.connect().unwrap();
    for service in ["", "slow", ""] {
        assert_eq!(
            check(&mut health, service).await.unwrap(),
            ServingStatus::Serving
        );
    }
    let unknown = check(&mut health, "no-such-service").await.unwrap_err();
    assert_eq!(
        unknown.code(),
        tonic::Code::NotFound,
        "a gRPC error is the call's"
    );
    assert!(handle.state().is_connected(), "and not the connection's");
    assert_eq!(handle.ledger().failures, 0);
    assert_eq!(sockets_to(server.port), 1);

    timeout(WAIT, handle.disconnect()).await.unwrap();
    assert_eq!(
        sockets_to(server.port),
        0,
        "no socket left after disconnect().await"
    );
    assert!(matches!(handle.state(), State::Idle));
}

#[tokio::test]
async fn a_killed_server_restarted_on_its_port_is_called_again_with_a_new_epoch() {
    if !peer_ready("a_killed_server_restarted_on_its_port_is_called_again_with_a_new_epoch") {
        return;
    }
    let server = Server::start(0).await;
    let (channel, handle) = channel(&server.target());
    let mut health = HealthClient::new(channel);
    handle.connect().unwrap();
    check(&mut health, "").await.unwrap();
    let first = handle.epoch();

    let port = server.kill().await;
    // The monitor sees the socket close; the attempts that follow are refused.
    handle
        .wait_for(WAIT, |s| !s.is_connected())
        .await
        .expect("the crash is noticed");
    let server = Server::start(port).await;
    let second = connected_after(&handle, first).await;
    assert_eq!(
        check(&mut health, "").await.unwrap(),
        ServingStatus::Serving
    );
    assert!(handle.ledger().failures >= 1);
    assert_eq!(
        sockets_to(server.port),
        1,
        "the old socket is gone, one new one"
    );
    timeout(WAIT, handle.disconnect()).await.unwrap();
    assert_eq!(sockets_to(server.port), 0);
    assert!(second > first);
}

#[tokio::test]
async fn a_graceful_stop_lets_the_call_in_flight_finish_and_the_restart_is_called() {
    if !peer_ready("a_graceful_stop_lets_the_call_in_flight_finish_and_the_restart_is_called") {
        return;
    }
    let server = Server::start(0).await;
    let (channel, handle) = channel(&server.target());
    let mut health = HealthClient::new(channel.clone());
    handle.connect().unwrap();
    check(&mut health, "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // past the stable period
    let first = handle.epoch();

    // A call of half a second is in flight when the server is asked to stop.
    let slow = {
        let mut health = HealthClient::new(channel.clone());
        tokio::spawn(async move { check(&mut health, "slow").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let port = server.stop().await;
    assert_eq!(
        slow.await.unwrap().expect("the call in flight finishes"),
        ServingStatus::Serving
    );
    assert_eq!(handle.ledger().ended, 1, "GOAWAY is a normal end");

    let server = Server::start(port).await;
    connected_after(&handle, first).await;
    assert_eq!(
        check(&mut health, "").await.unwrap(),
        ServingStatus::Serving
    );
    timeout(WAIT, handle.disconnect()).await.unwrap();
    assert_eq!(sockets_to(server.port), 0);
}

/// What one client did through an outage: calls every 20 ms from before the kill until one
/// succeeds after the restart.
#[derive(Debug)]
struct Outage {
    failed: usize,
    first_success_after_restart: Duration,
}

async fn through_outage<T>(
    mut client: HealthClient<T>,
    restarted: tokio::sync::watch::Receiver<Option<Instant>>,
) -> Outage
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tower_epoch::BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tower_epoch::BoxError> + Send,
{
    let mut failed = 0;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        // A call may wait for a connection through the whole outage.
        let result = timeout(Duration::from_secs(5), check(&mut client, "")).await;
        match (result, *restarted.borrow()) {
            (Ok(Ok(_)), Some(at)) => {
                return Outage {
                    failed,
                    first_success_after_restart: at.elapsed(),
                };
            }
            (Ok(Ok(_)), None) => {}
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no call succeeded after the restart");
}

#[tokio::test]
async fn beside_tonics_channel_through_a_crash_and_a_restart() {
    if !peer_ready("beside_tonics_channel_through_a_crash_and_a_restart") {
        return;
    }
    let server = Server::start(0).await;
    let (ours, handle) = channel(&server.target());
    handle.connect().unwrap();
    let theirs = tonic::transport::Endpoint::from_shared(server.target())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let mut warm = (
        HealthClient::new(ours.clone()),
        HealthClient::new(theirs.clone()),
    );
    check(&mut warm.0, "").await.unwrap();
    check(&mut warm.1, "").await.unwrap();
    let first = handle.epoch();

    let (restarted_tx, restarted) = tokio::sync::watch::channel(None);
    let ours_run = tokio::spawn(through_outage(HealthClient::new(ours), restarted.clone()));
    let theirs_run = tokio::spawn(through_outage(HealthClient::new(theirs), restarted));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let port = server.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the outage
    let server = Server::start(port).await;
    restarted_tx.send_replace(Some(Instant::now()));
    let (ours, theirs) = (ours_run.await.unwrap(), theirs_run.await.unwrap());
    let epoch = handle.epoch();
    eprintln!(
        "through a 0.5 s crash: tower-epoch {ours:?} (epoch {first} -> {epoch}, {} attempts); \
         tonic Channel {theirs:?}",
        handle.ledger().attempts
    );
    assert!(epoch > first);
    // Only the calls on the wire at the crash fail; the others wait for the new connection.
    assert!(ours.failed <= 3, "{ours:?}");
    assert!(
        ours.first_success_after_restart < Duration::from_secs(2),
        "{ours:?}"
    );
    timeout(WAIT, handle.disconnect()).await.unwrap();
    drop(server);
}
