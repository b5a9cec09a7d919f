//! The shortest tour: a TCP connector, the layer in a `ServiceBuilder` stack, connect, a
//! request, a server restart, disconnect. Run with `cargo run --example quick_start`.
//! (`examples/custom_transport.rs` is the tour of every feature.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_epoch::{BoxError, ReconnectLayer, State};

/// An echo server; shutting the set down stops it and its connections.
fn serve(listener: TcpListener) -> JoinSet<()> {
    let mut server = JoinSet::new();
    server.spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            connections.spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    server
}

type Lines = BoxCloneSyncService<String, String, BoxError>;

/// The connector: a TCP connection to `addr`, as a service of one line out, one line back.
/// (A line protocol has no request ids: a request cut halfway would leave its reply to the
/// next one. `examples/custom_transport.rs` shows a connection that guards against it.)
async fn connect(addr: SocketAddr) -> std::io::Result<Lines> {
    let stream = Arc::new(Mutex::new(BufReader::new(TcpStream::connect(addr).await?)));
    Ok(BoxCloneSyncService::new(service_fn(move |line: String| {
        let stream = Arc::clone(&stream);
        async move {
            let mut io = stream.lock().await;
            io.write_all(format!("{line}\n").as_bytes()).await?;
            let mut reply = String::new();
            match io.read_line(&mut reply).await? {
                0 => Err::<String, BoxError>("the server closed the connection".into()),
                _ => Ok(reply.trim_end().to_string()),
            }
        }
    })))
}

/// How long the example waits for the reconnect.
const WAIT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut server = serve(listener);

    let reconnect = ReconnectLayer::new(addr) // the target each attempt connects to
        .with_connect_timeout(Duration::from_secs(2))
        .with_failure_predicate(|_| true); // a failed request means a dead connection here
    let handle = reconnect.handle(); // take it before the layer goes into the stack
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(5)) // bounds each request, and with the buffer
        .buffer(16) // its wait for a connection too
        .layer(reconnect)
        .service(service_fn(connect));

    handle.connect()?;
    let reply = svc.ready().await?.call("hello".into()).await?;
    println!("{reply} (epoch {})", handle.epoch());

    server.shutdown().await; // the server goes away...
    let failed = svc.ready().await?.call("anyone?".into()).await;
    println!("while it is down: {}", failed.unwrap_err());
    let _server = serve(TcpListener::bind(addr).await?); // ...and comes back on the same port
    handle.wait_for(WAIT, State::is_connected).await?;
    let reply = svc.ready().await?.call("hello again".into()).await?;
    let (epoch, attempts) = (handle.epoch(), handle.ledger().attempts);
    println!("{reply} (epoch {epoch}, {attempts} attempts)");

    handle.disconnect().await; // resolves once the connection is closed
    assert!(matches!(handle.state(), State::Idle));
    println!("disconnected: {}", handle.state());
    Ok(())
}
