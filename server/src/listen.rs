//! The sockets `easel serve` accepts connections on: one per `--listen` address (IPv6 ones
//! IPv6-only, as asyncio binds them, so `0.0.0.0,::` can share a port), plain TCP or TLS with
//! `--tls-keyfile`/`--tls-certfile`, merged into one stream of connections for `axum::serve`.
//!
//! Each listening socket has its own accept task; TLS handshakes run in tasks of their own, so a
//! slow or silent client never holds up the others.

use anyhow::Context;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{crypto, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted connections waiting for the HTTP server to take them.
const PENDING_CONNECTIONS: usize = 256;

/// A byte stream to a client: plain TCP or TLS over TCP.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// The socket addresses of a `--listen` value: comma-separated IPs or host names (every address
/// a name resolves to), each with `port`.
pub fn addresses(listen: &str, port: u16) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addresses = Vec::new();
    for host in listen.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        let resolved: Vec<SocketAddr> = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => (host, port)
                .to_socket_addrs()
                .with_context(|| format!("cannot resolve the listen address {host}"))?
                .collect(),
        };
        for address in resolved {
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
    }
    anyhow::ensure!(!addresses.is_empty(), "--listen names no address");
    Ok(addresses)
}

/// The TLS settings of `--tls-keyfile` and `--tls-certfile` (PEM: a private key, and the
/// certificate chain, leaf first).
pub fn tls_acceptor(keyfile: &Path, certfile: &Path) -> anyhow::Result<TlsAcceptor> {
    let read = |path: &Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let key = PrivateKeyDer::from_pem_slice(&read(keyfile)?)
        .with_context(|| format!("{} holds no PEM private key", keyfile.display()))?;
    let chain = CertificateDer::pem_slice_iter(&read(certfile)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", certfile.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", certfile.display());
    let mut config = ServerConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS key does not fit the certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Every listening socket's connections, as one [`axum::serve::Listener`].
pub struct Incoming {
    connections: mpsc::Receiver<(Box<dyn Connection>, SocketAddr)>,
    local: Vec<SocketAddr>,
}

impl Incoming {
    /// Binds every address and starts accepting (within a tokio runtime).
    pub fn bind(addresses: &[SocketAddr], tls: Option<TlsAcceptor>) -> anyhow::Result<Self> {
        let (sender, connections) = mpsc::channel(PENDING_CONNECTIONS);
        let mut local = Vec::new();
        for address in addresses {
            let listener = bind(*address).with_context(|| format!("cannot listen on {address}"))?;
            local.push(listener.local_addr()?);
            tokio::spawn(accept_loop(listener, tls.clone(), sender.clone()));
        }
        Ok(Incoming { connections, local })
    }

    /// The bound addresses (with the ports the system chose for port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Box<dyn Connection>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // Every accept task has ended: nothing will connect any more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.local
            .first()
            .copied()
            .ok_or_else(|| std::io::Error::other("not listening"))
    }
}

/// A listening socket as asyncio makes one: address reuse, and IPv6-only for IPv6 addresses.
fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    sender: mpsc::Sender<(Box<dyn Connection>, SocketAddr)>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                wait_after(error).await;
                continue;
            }
        };
        // Small answers and WebSocket frames go out at once.
        let _ = stream.set_nodelay(true);
        match &tls {
            None => {
                if sender.send((Box::new(stream), peer)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                tokio::spawn(handshake(acceptor.clone(), stream, peer, sender.clone()));
            }
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    sender: mpsc::Sender<(Box<dyn Connection>, SocketAddr)>,
) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let _ = sender.send((Box::new(tls), peer)).await;
        }
        Ok(Err(error)) => tracing::debug!(%peer, "TLS handshake failed: {error}"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// After a failed accept: a connection that died before it was taken needs no pause; anything
/// else (out of file descriptors, say) gets a second's rest, as axum's own listener does.
async fn wait_after(error: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!("accept failed: {error}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
