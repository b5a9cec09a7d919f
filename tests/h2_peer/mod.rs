//! A server for the HTTP/2 tests that speaks HTTP/2 frame by frame (RFC 9113), written here so
//! that a test can send exactly the frames it means: the preface and SETTINGS, HEADERS with
//! HPACK static-table entries, DATA, RST_STREAM and GOAWAY.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The longest wait for the client to close a connection.
const WAIT: Duration = Duration::from_secs(10);

/// What a client sends first (RFC 9113, 3.4).
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types and flags (RFC 9113, 6).
pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
pub(crate) const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
pub(crate) const MAX_CONCURRENT_STREAMS: u16 = 0x3;

// Error codes (RFC 9113, 7).
pub(crate) const NO_ERROR: u32 = 0x0;
pub(crate) const REFUSED_STREAM: u32 = 0x7;
pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// `:status: 200` in HPACK (RFC 7541): entry 8 of the static table.
pub(crate) const STATUS_200: u8 = 0x88;

/// The server's side of one HTTP/2 connection, frame by frame.
pub(crate) struct Peer {
    socket: TcpStream,
    /// Bytes read and not yet taken as frames.
    read: Vec<u8>,
}

/// A frame the client sent.
pub(crate) struct Frame {
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
    pub(crate) payload: Vec<u8>,
}

impl Peer {
    /// Takes the client's preface on `socket`, and sends the server's SETTINGS.
    pub(crate) async fn handshake(socket: TcpStream, settings: &[(u16, u32)]) -> io::Result<Peer> {
        let mut peer = Peer {
            socket,
            read: Vec::new(),
        };
        let mut preface = [0; 24];
        peer.socket.read_exact(&mut preface).await?;
        if &preface != PREFACE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a preface"));
        }
        let payload: Vec<u8> = settings
            .iter()
            .flat_map(|(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes()))
            .collect();
        peer.send(SETTINGS, 0, 0, &payload).await?;
        Ok(peer)
    }

    pub(crate) async fn send(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut frame = Vec::with_capacity(9 + payload.len());
        frame.extend_from_slice(&length[1..]);
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.socket.write_all(&frame).await
    }

    /// The next frame the client sent, or `None` once it has closed the socket. Cancel-safe:
    /// the bytes read stay in the buffer until a whole frame is there.
    pub(crate) async fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let [l0, l1, l2, kind, flags, s0, s1, s2, s3, ..] = self.read[..] {
                let length = u32::from_be_bytes([0, l0, l1, l2]) as usize;
                if self.read.len() >= 9 + length {
                    let payload = self.read[9..9 + length].to_vec();
                    self.read.drain(..9 + length);
                    let stream = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
                    return Ok(Some(Frame {
                        kind,
                        flags,
                        stream,
                        payload,
                    }));
                }
            }
            match self.socket.read_buf(&mut self.read).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// What a server must answer to `frame`: an acknowledgement of SETTINGS and PING. DATA,
    /// WINDOW_UPDATE, acknowledgements and the client's own RST_STREAM or GOAWAY need none.
    pub(crate) async fn acknowledge(&mut self, frame: &Frame) -> io::Result<()> {
        match frame.kind {
            SETTINGS if frame.flags & ACK == 0 => self.send(SETTINGS, ACK, 0, &[]).await,
            PING if frame.flags & ACK == 0 => self.send(PING, ACK, 0, &frame.payload).await,
            _ => Ok(()),
        }
    }

    /// Reads frames until the client opens a stream (a HEADERS frame), acknowledging on the
    /// way: the stream's id, or `None` once the client has closed the socket.
    pub(crate) async fn next_stream(&mut self) -> io::Result<Option<u32>> {
        while let Some(frame) = self.next_frame().await? {
            if frame.kind == HEADERS {
                return Ok(Some(frame.stream));
            }
            self.acknowledge(&frame).await?;
        }
        Ok(None)
    }

    /// A request the test counts on.
    pub(crate) async fn request(&mut self) -> io::Result<u32> {
        self.next_stream()
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no request came"))
    }

    /// Answers `stream` with 200 and no body.
    pub(crate) async fn respond(&mut self, stream: u32) -> io::Result<()> {
        self.send(HEADERS, END_HEADERS | END_STREAM, stream, &[STATUS_200])
            .await
    }

    pub(crate) async fn reset(&mut self, stream: u32, code: u32) -> io::Result<()> {
        self.send(RST_STREAM, 0, stream, &code.to_be_bytes()).await
    }

    pub(crate) async fn goaway(&mut self, last_stream: u32, code: u32) -> io::Result<()> {
        let mut payload = last_stream.to_be_bytes().to_vec();
        payload.extend_from_slice(&code.to_be_bytes());
        self.send(GOAWAY, 0, 0, &payload).await
    }

    /// Reads what the client sends, answering nothing, until it closes the socket.
    pub(crate) async fn closed(mut self) -> io::Result<()> {
        while self.next_stream().await?.is_some() {}
        Ok(())
    }

    /// Answers every stream the client opens, until it closes the socket.
    pub(crate) async fn answer_all(mut self) -> io::Result<()> {
        while let Some(stream) = self.next_stream().await? {
            self.respond(stream).await?;
        }
        Ok(())
    }
}

/// A server on 127.0.0.1 whose first connection (with `settings`) follows `script`, and whose
/// later ones answer every request. The handle ends with the script: once the client has
/// closed that first connection, as each script waits for.
pub(crate) async fn serve<S, F>(
    settings: &'static [(u16, u32)],
    script: S,
) -> (SocketAddr, JoinHandle<io::Result<()>>)
where
    S: FnOnce(Peer) -> F + Send + 'static,
    F: Future<Output = io::Result<()>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = tokio::spawn(async move {
        let (socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(async move { Peer::handshake(socket, &[]).await?.answer_all().await });
            }
        });
        script(Peer::handshake(socket, settings).await?).await
    });
    (addr, first)
}

/// Waits for the script's end: the client closed the connection, and the script did all it
/// was told.
pub(crate) async fn script_done(script: JoinHandle<io::Result<()>>) {
    timeout(WAIT, script)
        .await
        .expect("the client closes the connection")
        .unwrap()
        .expect("the peer's script ran");
}
