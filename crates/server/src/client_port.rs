//! One listener, two protocols, as etcd's client port has: each accepted
//! connection is handed to the gRPC server if it opens with HTTP/2's
//! preface (gRPC clients speak HTTP/2 from the first byte), and to the
//! JSON gateway (HTTP/1.1) otherwise.
//!
//! It only looks at the first bytes a client sends (without consuming
//! them); it never reads or writes a request itself. A connection that
//! sends nothing within `SNIFF_TIMEOUT` is closed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a new connection may stay silent before it is dropped.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// The start of HTTP/2's connection preface (`PRI * HTTP/2.0...`).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// The HTTP/1.1 connections of the client port, as an axum listener.
pub struct Http1Listener {
    rx: mpsc::Receiver<(TcpStream, SocketAddr)>,
    addr: SocketAddr,
}

impl axum::serve::Listener for Http1Listener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop stopped (the node is shutting down).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// The gRPC connections of the client port, for tonic.
pub type Http2Incoming = tokio_stream::wrappers::ReceiverStream<Result<TcpStream, std::io::Error>>;

/// Splits `listener` into its gRPC and HTTP/1.1 connections; the returned
/// future is the accept loop (run it as a task).
pub fn split(listener: TcpListener) -> (Http2Incoming, Http1Listener, impl std::future::Future<Output = ()>) {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (h2_tx, h2_rx) = mpsc::channel(64);
    let (h1_tx, h1_rx) = mpsc::channel(64);
    let accept = async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait, go on.
                    tracing::warn!(error = %e, "client port accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (h2, h1) = (h2_tx.clone(), h1_tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(SNIFF_TIMEOUT, is_http2(&stream)).await {
                    Ok(Ok(true)) => {
                        let _ = h2.send(Ok(stream)).await;
                    }
                    Ok(Ok(false)) => {
                        let _ = h1.send((stream, peer)).await;
                    }
                    Ok(Err(_)) | Err(_) => {}
                }
            });
        }
    };
    (
        tokio_stream::wrappers::ReceiverStream::new(h2_rx),
        Http1Listener { rx: h1_rx, addr },
        accept,
    )
}

/// Whether the connection opens with HTTP/2's preface, looking at no more
/// of it than it takes to tell.
async fn is_http2(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 14];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // A prefix of the preface so far: wait for more.
        stream.readable().await?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
