//! The agent's accept loop: HTTP/1.1, optionally over TLS (rustls), with a header-read
//! timeout (which also ends idle keep-alive connections and bounds the TLS handshake), a write
//! deadline (a peer that stops reading its answers, e.g. one that pipelines requests and never
//! reads, is cut off), a cap on a connection's age and on the requests it carries, a cap on
//! connections overall and per client (IPv4 address or IPv6 /64), a few slots that only this
//! host itself may take (so the kubelet's probes get through however many clients hold the
//! rest), and a graceful shutdown. `axum::serve` has none of these limits, and a privileged
//! agent on every node must not let slow or numerous clients hold its file descriptors until
//! `/healthz` fails.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    http::{HeaderValue, Request, Response, header},
};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use rustls::sign::CertifiedKey;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::{Instant, Sleep},
};

/// Addresses that may always take the reserved slots, besides the connection's own local
/// address (see [`ServeLimits::reserved_clients`]).
const LOOPBACK: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// A client must send a request's whole header within this time, and an idle
    /// keep-alive connection is closed after it.
    pub header_read_timeout: Duration,
    /// Connections open at once, over all clients.
    pub max_connections: usize,
    /// Connections open at once from one client (an IPv4 address, or an IPv6 /64, which one
    /// host usually owns whole), so that one client cannot take them all.
    pub max_connections_per_client: usize,
    /// How long a shutdown waits for requests in flight; also how long a connection that
    /// reached `max_connection_age` has to finish its answer.
    pub shutdown_grace: Duration,
    /// A write that the peer leaves blocked (it does not read) this long closes the
    /// connection: otherwise a client that pipelines requests and never reads the answers
    /// holds its connection forever, since no header is then being read.
    pub write_timeout: Duration,
    /// A connection is closed (after the answer in flight) once this old, so that one that
    /// reads just fast enough to pass `write_timeout` still gives its slot back.
    pub max_connection_age: Duration,
    /// Requests served on one connection; the last answer carries `Connection: close`.
    pub max_requests_per_connection: usize,
    /// The last this many of `max_connections` (at most half of them) only go to this host
    /// itself: a connection whose peer address is its own local address (the kubelet probing
    /// a host-network pod through the node's address, or any local client), or one of
    /// `reserved_clients`.
    pub reserved_connections: usize,
    /// Further client addresses the reserved slots are for: loopback by default; add the
    /// kubelet's source address where it is not the agent's own (no host network).
    pub reserved_clients: &'static [IpAddr],
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 256,
            max_connections_per_client: 32,
            shutdown_grace: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_mins(5),
            max_requests_per_connection: 1000,
            reserved_connections: 8,
            reserved_clients: LOOPBACK,
        }
    }
}

impl ServeLimits {
    /// Slots any client may take; the rest are reserved. At most half are reserved, so a
    /// small `max_connections` still serves remote clients.
    fn open_to_all(&self) -> usize {
        self.max_connections - self.reserved_connections.min(self.max_connections / 2)
    }

    /// Whether a connection from `peer` to `local` may take a reserved slot.
    fn is_reserved_for(&self, peer: IpAddr, local: Option<IpAddr>) -> bool {
        // A pod cannot complete a handshake from the node's address (the answer would go to
        // the node), so matching it is proof enough that the peer is this host.
        let peer = peer.to_canonical();
        local.is_some_and(|local| local.to_canonical() == peer)
            || self
                .reserved_clients
                .iter()
                .any(|reserved| reserved.to_canonical() == peer)
    }
}

/// The client a connection is counted against: IPv4 addresses one by one, IPv6 by /64 (a
/// host usually has a whole /64 and can pick any address in it), IPv4-mapped IPv6 as IPv4.
fn client_group(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & (u128::MAX << 64))),
    }
}

/// Open connections per client, and in all.
#[derive(Default)]
struct Connections {
    per_client: HashMap<IpAddr, usize>,
    total: usize,
}

/// A connection's place in [`Connections`], given back when the connection ends.
struct Slot {
    connections: Arc<Mutex<Connections>>,
    client: IpAddr,
}

impl Slot {
    /// A slot for a connection from `client` (a [`client_group`]), from the reserved ones too
    /// if `reserved`.
    fn take(
        connections: &Arc<Mutex<Connections>>,
        client: IpAddr,
        reserved: bool,
        limits: &ServeLimits,
    ) -> Option<Self> {
        let mut open = connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = open.per_client.get(&client).copied().unwrap_or(0);
        let room = if reserved {
            limits.max_connections
        } else {
            limits.open_to_all()
        };
        if open.total >= room || mine >= limits.max_connections_per_client {
            return None;
        }
        open.total += 1;
        open.per_client.insert(client, mine + 1);
        Some(Self {
            connections: Arc::clone(connections),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.total -= 1;
        if let Some(n) = open.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.per_client.remove(&self.client);
            }
        }
    }
}

/// Why a write failed in [`WriteDeadline`].
#[derive(Debug, thiserror::Error)]
#[error("the peer read nothing for {0:?}")]
struct WriteStalled(Duration);

/// A stream whose writes (and flushes) fail with `TimedOut` once they have been blocked for
/// `limit` without progress. Reads pass through: their timeouts are hyper's.
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Created on the first blocked write, re-armed on each one after progress.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            armed: false,
        }
    }

    /// `attempt` as it is, unless it is still pending after `limit`.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        attempt: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if attempt.is_ready() {
            self.armed = false;
            return attempt;
        }
        if !self.armed {
            let at = Instant::now() + self.limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.armed = true;
        }
        match self.timer.as_mut().map(|timer| timer.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                WriteStalled(self.limit),
            ))),
            _ => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let attempt = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.deadline(cx, attempt)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let attempt = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.deadline(cx, attempt)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let attempt = Pin::new(&mut this.inner).poll_flush(cx);
        this.deadline(cx, attempt)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let attempt = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.deadline(cx, attempt)
    }
}

/// How often, at most, a handshake looks at the certificate files for a change.
const TLS_RECHECK: Duration = Duration::from_secs(1);

/// A file's identity as far as a change goes: modification time, size and inode, through
/// symlinks (a Secret volume swaps a symlink to a new directory, which changes all three as
/// seen through the path); `None` when it cannot be read.
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// The certificate chain and key in PEM files, checked to belong together; the error says
/// what is wrong with which file.
fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        format!("{what} {}: {e}", path.display())
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| bad("cannot read the certificate chain", cert, &e))?;
    if chain.is_empty() {
        return Err(bad(
            "no certificate in",
            cert,
            &"PEM CERTIFICATE block expected",
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad("cannot read the private key", key, &e))?;
    CertifiedKey::from_der(chain, key_der, provider).map_err(|e| {
        bad(
            &format!(
                "cannot use the private key {} with the certificate",
                key.display()
            ),
            cert,
            &e,
        )
    })
}

/// The certificate every handshake presents: read from its files at start, and again when
/// they change (cert-manager renews a Secret in place and the kubelet swaps the mounted files),
/// so a rotated certificate is in force without a restart. At most once every
/// [`TLS_RECHECK`], a handshake compares the files' [`Stamp`]s with those last read; a new
/// pair that cannot be read or does not match leaves the previous one in force, with a warning
/// once per change of the files.
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    state: Mutex<CertState>,
}

struct CertState {
    current: Arc<CertifiedKey>,
    /// The files' stamps when last read, whether that worked or not.
    seen: (Stamp, Stamp),
    checked: std::time::Instant,
}

impl ReloadingCert {
    fn new(
        cert: &Path,
        key: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, crate::Error> {
        // Stamped before reading: a change during the read is read again at the next check.
        let seen = (stamp(cert), stamp(key));
        let current =
            Arc::new(load_pair(cert, key, &provider).map_err(crate::Error::InvalidArgument)?);
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            state: Mutex::new(CertState {
                current,
                seen,
                checked: std::time::Instant::now(),
            }),
        })
    }

    /// The pair in force, read again first if the files changed (checked at most once every
    /// [`TLS_RECHECK`]).
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.checked.elapsed() >= TLS_RECHECK {
            state.checked = std::time::Instant::now();
            let now = (stamp(&self.cert), stamp(&self.key));
            if now != state.seen {
                // Recorded whatever the outcome: a broken pair is reported once, and read
                // again only when the files change again.
                state.seen = now;
                match load_pair(&self.cert, &self.key, &self.provider) {
                    Ok(pair) => {
                        tracing::info!(
                            "TLS certificate {} changed: the new one is in force",
                            self.cert.display()
                        );
                        state.current = Arc::new(pair);
                    }
                    Err(e) => {
                        tracing::warn!("{e}; the previous TLS certificate stays in force");
                    }
                }
            }
        }
        Arc::clone(&state.current)
    }
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The agent's certificate and key, from PEM files; read again when they change (see
/// [`ReloadingCert`]). Fails if they cannot be read or do not match now.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, crate::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ReloadingCert::new(cert, key, Arc::clone(&provider))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::Error::InvalidArgument(format!("TLS configuration: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown` completes, then waits
/// up to `limits.shutdown_grace` for the connections in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let server = Server::new(router, limits, tls);
    server.run(listener, Arc::default(), shutdown).await;
    Ok(())
}

/// What every connection's task shares.
struct Server {
    builder: http1::Builder,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ServeLimits,
}

impl Server {
    fn new(
        router: Router,
        limits: ServeLimits,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Arc<Self> {
        let mut builder = http1::Builder::new();
        // The read buffer also bounds how many pipelined requests are taken in ahead of their
        // answers; the rest wait in the kernel, and a peer that does not read its answers
        // meets the write deadline.
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(64 * 1024);
        Arc::new(Self {
            builder,
            router,
            tls,
            limits,
        })
    }

    /// The accept loop, counting connections in `connections`.
    async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        connections: Arc<Mutex<Connections>>,
        shutdown: impl Future<Output = ()>,
    ) {
        // Every connection holds a receiver: a send asks them to finish, and the channel's
        // closing (the last receiver dropped) says they did.
        let (stop, _) = watch::channel(());
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let Some(slot) = self.slot_for(&connections, &stream, peer) else {
                tracing::debug!("refusing a connection from {peer}: too many open");
                drop(stream);
                continue;
            };
            let (server, stop) = (Arc::clone(&self), stop.subscribe());
            tokio::spawn(async move {
                server.connection(stream, peer, stop).await;
                drop(slot);
            });
        }
        drop(listener);
        let _ = stop.send(());
        let grace = self.limits.shutdown_grace;
        if tokio::time::timeout(grace, stop.closed()).await.is_err() {
            tracing::warn!(
                "requests still running after {} s; stopping anyway",
                grace.as_secs()
            );
        }
    }

    fn slot_for(
        &self,
        connections: &Arc<Mutex<Connections>>,
        stream: &TcpStream,
        peer: SocketAddr,
    ) -> Option<Slot> {
        let local = stream.local_addr().ok().map(|local| local.ip());
        let reserved = self.limits.is_reserved_for(peer.ip(), local);
        Slot::take(connections, client_group(peer.ip()), reserved, &self.limits)
    }

    /// Serves one connection (after the TLS handshake, with TLS) until it ends.
    async fn connection(&self, stream: TcpStream, peer: SocketAddr, stop: watch::Receiver<()>) {
        // Under TLS too, so that the handshake's writes have the deadline as well.
        let stream = WriteDeadline::new(stream, self.limits.write_timeout);
        let result = match &self.tls {
            None => self.drive(stream, stop).await,
            Some(acceptor) => match self.handshake(acceptor, stream, peer).await {
                Some(stream) => self.drive(stream, stop).await,
                None => Ok(()),
            },
        };
        if let Err(e) = result {
            tracing::debug!("connection from {peer}: {e}");
        }
    }

    async fn handshake<S>(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        stream: S,
        peer: SocketAddr,
    ) -> Option<tokio_rustls::server::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // A client that never finishes its handshake is cut off like one that never finishes
        // its headers.
        let handshake =
            tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(stream));
        match handshake.await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!("TLS handshake with {peer}: {e}");
                None
            }
            Err(_) => {
                tracing::debug!("TLS handshake with {peer} timed out");
                None
            }
        }
    }

    /// Runs HTTP on `io` until the peer is done, the agent stops or the connection is too
    /// old; in the last two cases the answer in flight gets `shutdown_grace` to finish.
    async fn drive<I>(&self, io: I, mut stop: watch::Receiver<()>) -> hyper::Result<()>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = Capped::new(self.router.clone(), self.limits.max_requests_per_connection);
        let connection = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => return result,
            _ = stop.changed() => {}
            () = tokio::time::sleep(self.limits.max_connection_age) => {}
        }
        connection.as_mut().graceful_shutdown();
        tokio::time::timeout(self.limits.shutdown_grace, connection)
            .await
            .unwrap_or(Ok(()))
    }
}

/// The router, with `Connection: close` on the last answer a connection may have.
struct Capped {
    router: TowerToHyperService<Router>,
    served: AtomicUsize,
    cap: usize,
}

impl Capped {
    fn new(router: Router, cap: usize) -> Self {
        Self {
            router: TowerToHyperService::new(router),
            served: AtomicUsize::new(0),
            cap,
        }
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<axum::body::Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Capped {
    type Response = Response<axum::body::Body>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, request: Request<Incoming>) -> Answer {
        let last = self.served.fetch_add(1, Ordering::Relaxed) + 1 >= self.cap;
        let answer = self.router.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if last {
                // hyper closes the connection after an answer that says so; requests
                // pipelined behind it are dropped unanswered.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpSocket, TcpStream},
        sync::oneshot,
        task::JoinHandle,
    };

    use super::*;

    /// Limits of the tests that predate the reserved slots: none reserved.
    const LIMITS: ServeLimits = ServeLimits {
        header_read_timeout: Duration::from_secs(1),
        max_connections: 8,
        max_connections_per_client: 3,
        shutdown_grace: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
        max_connection_age: Duration::from_mins(5),
        max_requests_per_connection: 1000,
        reserved_connections: 0,
        reserved_clients: LOOPBACK,
    };

    /// Limits under which only the limit a test is about ends a connection: every other
    /// timeout is far beyond the test's waits.
    const PATIENT: ServeLimits = ServeLimits {
        header_read_timeout: Duration::from_mins(1),
        write_timeout: Duration::from_mins(1),
        ..LIMITS
    };

    /// The size of `/big`'s answer: 50 of them are far more than loopback's socket buffers
    /// hold (a few MiB), so a peer that does not read blocks the server's writes.
    const BIG: usize = 1 << 20;
    static BIG_BODY: [u8; BIG] = [b'x'; BIG];

    /// A running server, stopped (and waited for) by [`Running::stop`].
    struct Running {
        address: SocketAddr,
        connections: Arc<Mutex<Connections>>,
        stop: oneshot::Sender<()>,
        server: JoinHandle<()>,
    }

    impl Running {
        fn open(&self) -> usize {
            self.connections.lock().unwrap().total
        }

        /// Waits up to `wait` for exactly `n` connections to be open.
        async fn wait_open(&self, n: usize, wait: Duration) -> bool {
            let until = Instant::now() + wait;
            while self.open() != n {
                if Instant::now() >= until {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            true
        }

        async fn stop(self) {
            self.stop.send(()).unwrap();
            self.server.await.unwrap();
        }
    }

    async fn start(limits: ServeLimits) -> Running {
        start_with(limits, None).await
    }

    async fn start_with(limits: ServeLimits, tls: Option<tokio_rustls::TlsAcceptor>) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/big", get(|| async { &BIG_BODY[..] }));
        let connections = Arc::new(Mutex::new(Connections::default()));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::new(router, limits, tls);
        let server = tokio::spawn(server.run(listener, Arc::clone(&connections), async {
            let _ = stopped.await;
        }));
        Running {
            address,
            connections,
            stop,
            server,
        }
    }

    /// Connects from a chosen loopback address, so tests can be several clients.
    async fn connect_from(client: [u8; 4], server: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((client, 0))).unwrap();
        socket.connect(server).await.unwrap()
    }

    /// Whether the server closed the connection (EOF or reset) within `wait`, and the bytes
    /// read until then.
    async fn closed_within(stream: &mut TcpStream, wait: Duration) -> (bool, usize) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0;
        let until = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
                Err(_) => return (false, read),
                Ok(Ok(0) | Err(_)) => return (true, read),
                Ok(Ok(n)) => read += n,
            }
        }
    }

    async fn closed(stream: &mut TcpStream, wait: Duration) -> bool {
        closed_within(stream, wait).await.0
    }

    /// `/healthz`'s answer, which must come within `wait`.
    async fn healthz_within(stream: &mut TcpStream, wait: Duration) -> String {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(wait, stream.read(&mut buf))
            .await
            .expect("no answer in time")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    async fn healthz(stream: &mut TcpStream) -> String {
        healthz_within(stream, Duration::from_secs(5)).await
    }

    /// Sends `n` requests for `path` in one write, reading no answer.
    async fn pipeline(stream: &mut TcpStream, path: &str, n: usize) {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream
            .write_all(request.repeat(n).as_bytes())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn slow_clients_are_cut_off_and_cannot_starve_others() {
        let server = start(LIMITS).await;
        let address = server.address;
        // One client opens its share of connections and sends half a header on each.
        let mut slow = Vec::new();
        for _ in 0..LIMITS.max_connections_per_client {
            let mut stream = connect_from([127, 0, 0, 1], address).await;
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\n")
                .await
                .unwrap();
            slow.push(stream);
        }
        // One more from the same client is closed at once ...
        let mut extra = connect_from([127, 0, 0, 1], address).await;
        assert!(closed(&mut extra, Duration::from_millis(500)).await);
        // ... while another client (the kubelet, say) is served.
        let mut other = connect_from([127, 0, 0, 2], address).await;
        assert!(healthz(&mut other).await.starts_with("HTTP/1.1 200"));
        // The slow ones are closed after the header-read timeout.
        for stream in &mut slow {
            assert!(closed(stream, LIMITS.header_read_timeout * 3).await);
        }
        // Their slots are free again.
        let mut again = connect_from([127, 0, 0, 1], address).await;
        assert!(healthz(&mut again).await.starts_with("HTTP/1.1 200"));
        server.stop().await;
    }

    #[tokio::test]
    async fn idle_keep_alive_connections_are_closed() {
        let server = start(LIMITS).await;
        let mut stream = connect_from([127, 0, 0, 1], server.address).await;
        assert!(healthz(&mut stream).await.starts_with("HTTP/1.1 200"));
        assert!(
            closed(&mut stream, LIMITS.header_read_timeout * 3).await,
            "an idle keep-alive connection stays open"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn the_connection_cap_holds_over_all_clients() {
        let server = start(LIMITS).await;
        let mut held = Vec::new();
        for client in 1..=LIMITS.max_connections as u8 {
            let mut stream = connect_from([127, 0, 1, client], server.address).await;
            stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            held.push(stream);
        }
        let mut over = connect_from([127, 0, 2, 1], server.address).await;
        assert!(closed(&mut over, Duration::from_millis(500)).await);
        drop(held);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_peer_that_pipelines_and_never_reads_is_cut_off_at_the_write_deadline() {
        let limits = ServeLimits {
            write_timeout: Duration::from_millis(300),
            ..PATIENT
        };
        let server = start(limits).await;
        let mut stream = connect_from([127, 0, 0, 2], server.address).await;
        let sent = Instant::now();
        pipeline(&mut stream, "/big", 50).await;
        assert!(server.wait_open(1, Duration::from_secs(10)).await);
        // Only the write deadline can end it: the header timeout and the age limit are far.
        assert!(
            server.wait_open(0, limits.write_timeout * 20).await,
            "a connection whose peer reads nothing stays open"
        );
        assert!(sent.elapsed() >= limits.write_timeout);
        // The peer sees the end after at most what the socket buffers held, not 50 answers.
        let (ended, read) = closed_within(&mut stream, Duration::from_secs(10)).await;
        assert!(ended);
        assert!(read < 50 * BIG, "read {read} bytes");
        server.stop().await;
    }

    #[tokio::test]
    async fn the_reserved_slots_keep_healthz_answering_for_this_host() {
        // Eight clients with 2 each fill the 16 slots open to all; 4 more are reserved.
        let limits = ServeLimits {
            max_connections: 20,
            max_connections_per_client: 2,
            reserved_connections: 4,
            ..PATIENT
        };
        let server = start(limits).await;
        let mut held = Vec::new();
        for client in 2..=9 {
            for slow in [true, false] {
                let mut stream = connect_from([127, 0, 0, client], server.address).await;
                if slow {
                    stream
                        .write_all(b"GET /healthz HTTP/1.1\r\n")
                        .await
                        .unwrap();
                } else {
                    pipeline(&mut stream, "/big", 50).await;
                }
                held.push(stream);
            }
        }
        assert!(server.wait_open(16, Duration::from_secs(10)).await);
        // A ninth client gets nothing (refused connections close at once; held ones would
        // stay open for the 60 s header timeout) ...
        let mut other = connect_from([127, 0, 0, 10], server.address).await;
        assert!(closed(&mut other, Duration::from_secs(10)).await);
        // ... while the host itself (the agent's own address) is answered.
        let mut kubelet = connect_from([127, 0, 0, 1], server.address).await;
        let answer = healthz_within(&mut kubelet, Duration::from_secs(1)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop((held, kubelet));
        assert!(server.wait_open(0, Duration::from_secs(10)).await);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_connection_carries_a_limited_number_of_requests() {
        let limits = ServeLimits {
            max_requests_per_connection: 3,
            ..PATIENT
        };
        let server = start(limits).await;
        let mut stream = connect_from([127, 0, 0, 2], server.address).await;
        pipeline(&mut stream, "/healthz", 5).await;
        let mut answers = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answers));
        read.await.expect("the connection stays open").unwrap();
        let answers = String::from_utf8_lossy(&answers);
        assert_eq!(answers.matches("HTTP/1.1 200").count(), 3, "{answers}");
        assert_eq!(answers.matches("connection: close").count(), 1, "{answers}");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_busy_connection_is_closed_when_too_old() {
        let limits = ServeLimits {
            max_connection_age: Duration::from_millis(500),
            ..PATIENT
        };
        let server = start(limits).await;
        let mut stream = connect_from([127, 0, 0, 2], server.address).await;
        let opened = Instant::now();
        // Never idle, never slow: only the age limit can end it.
        let ended = loop {
            assert!(
                opened.elapsed() < limits.max_connection_age * 20,
                "still open"
            );
            let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
            if stream.write_all(request).await.is_err() {
                break opened.elapsed();
            }
            let mut buf = [0u8; 1024];
            let answer = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf));
            match answer.await.expect("no answer within 5 s") {
                Ok(0) | Err(_) => break opened.elapsed(),
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        assert!(ended >= limits.max_connection_age);
        server.stop().await;
    }

    #[test]
    fn clients_are_ipv4_addresses_and_ipv6_slash_64s() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(client_group(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_ne!(client_group(ip("10.1.2.3")), client_group(ip("10.1.2.4")));
        assert_eq!(client_group(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(
            client_group(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            client_group(ip("2001:db8:1:2::1")),
            client_group(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            client_group(ip("2001:db8:1:2::1")),
            client_group(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn reserved_slots_are_for_this_host_only() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let limits = ServeLimits::default();
        // The node's address seen from itself, also through an IPv6 socket.
        assert!(limits.is_reserved_for(ip("10.0.0.5"), Some(ip("10.0.0.5"))));
        assert!(limits.is_reserved_for(ip("::ffff:10.0.0.5"), Some(ip("10.0.0.5"))));
        assert!(limits.is_reserved_for(ip("127.0.0.1"), Some(ip("10.0.0.5"))));
        assert!(limits.is_reserved_for(ip("::1"), None));
        // A pod, or another loopback address on a listener bound elsewhere.
        assert!(!limits.is_reserved_for(ip("10.244.1.7"), Some(ip("10.0.0.5"))));
        assert!(!limits.is_reserved_for(ip("127.0.0.2"), Some(ip("127.0.0.1"))));
        assert!(!limits.is_reserved_for(ip("10.244.1.7"), None));
        // At most half the slots are reserved.
        let small = ServeLimits {
            max_connections: 8,
            reserved_connections: 8,
            ..limits
        };
        assert_eq!(small.open_to_all(), 4);
        assert_eq!(limits.open_to_all(), 248);
    }

    /// A directory only this user can enter (0700), for the tests' private keys; removed
    /// when dropped.
    struct PrivateDir(PathBuf);

    impl PrivateDir {
        fn new(name: &str) -> Self {
            use std::os::unix::fs::DirBuilderExt as _;
            for attempt in 0u32.. {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos();
                let path = std::env::temp_dir().join(format!(
                    "cnitrace-{name}-{}-{nanos}-{attempt}",
                    std::process::id()
                ));
                // Never an existing directory (or a symlink someone planted): created here.
                match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                    Ok(()) => return Self(path),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => {}
                    Err(e) => panic!("{}: {e}", path.display()),
                }
            }
            unreachable!()
        }
    }

    impl Drop for PrivateDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A self-signed certificate for 127.0.0.1 with subject CN=`name`, and its P-256 key:
    /// (certificate file, key file) in `dir`.
    fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj"])
            .arg(format!("/CN={name}"))
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            // A leaf, not a CA: webpki refuses a CA certificate as a server's.
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (cert, key)
    }

    fn der_of(cert: &Path) -> rustls::pki_types::CertificateDer<'static> {
        use rustls::pki_types::{CertificateDer, pem::PemObject as _};
        CertificateDer::from_pem_file(cert).unwrap()
    }

    /// A Secret volume as the kubelet lays it out: `tls.crt` and `tls.key` are symlinks into
    /// `..data`, itself a symlink to a directory of the current version, which an update
    /// replaces at once by renaming a new symlink over it.
    struct SecretVolume {
        dir: PathBuf,
        version: u32,
    }

    impl SecretVolume {
        fn new(dir: PathBuf) -> Self {
            std::fs::create_dir(&dir).unwrap();
            for file in ["tls.crt", "tls.key"] {
                std::os::unix::fs::symlink(format!("..data/{file}"), dir.join(file)).unwrap();
            }
            Self { dir, version: 0 }
        }

        fn cert(&self) -> PathBuf {
            self.dir.join("tls.crt")
        }

        fn key(&self) -> PathBuf {
            self.dir.join("tls.key")
        }

        /// Publishes `cert` as tls.crt and `key` as tls.key, both at once.
        fn publish(&mut self, cert: &Path, key: &Path) {
            self.version += 1;
            let version = format!("..v{}", self.version);
            std::fs::create_dir(self.dir.join(&version)).unwrap();
            std::fs::copy(cert, self.dir.join(&version).join("tls.crt")).unwrap();
            std::fs::copy(key, self.dir.join(&version).join("tls.key")).unwrap();
            let next = self.dir.join("..data_tmp");
            std::os::unix::fs::symlink(&version, &next).unwrap();
            std::fs::rename(&next, self.dir.join("..data")).unwrap();
        }
    }

    /// The certificate `server` presents to a new connection, verified against `trusted` for
    /// 127.0.0.1 (and the connection answering HTTP over TLS).
    async fn presented(
        server: SocketAddr,
        trusted: &[rustls::pki_types::CertificateDer<'static>],
    ) -> rustls::pki_types::CertificateDer<'static> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in trusted {
            roots.add(cert.clone()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let tcp = TcpStream::connect(server).await.unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
        let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer));
        // rustls reports a peer that closes without close_notify as an error; the answer is in.
        let _ = read.await.expect("no answer in time");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        cert
    }

    #[tokio::test]
    async fn a_rotated_certificate_is_presented_without_a_restart_and_a_broken_one_is_not() {
        let dir = PrivateDir::new("tls-rotation");
        let (cert_a, key_a) = self_signed(&dir.0, "a");
        let (cert_b, key_b) = self_signed(&dir.0, "b");
        let (a, b) = (der_of(&cert_a), der_of(&cert_b));
        let trusted = [a.clone(), b.clone()];
        let mut secret = SecretVolume::new(dir.0.join("secret"));
        secret.publish(&cert_a, &key_a);
        let acceptor = tls_acceptor(&secret.cert(), &secret.key()).unwrap();
        let server = start_with(PATIENT, Some(acceptor)).await;
        assert!(presented(server.address, &trusted).await == a);
        let after_a_check = TLS_RECHECK + Duration::from_millis(200);

        // cert-manager renews the Secret; the kubelet swaps the files.
        secret.publish(&cert_b, &key_b);
        tokio::time::sleep(after_a_check).await;
        assert!(
            presented(server.address, &trusted).await == b,
            "the rotated certificate is not presented"
        );

        // A key that is not the certificate's, then files that are no PEM at all, then no
        // key: the last good pair stays in force.
        secret.publish(&cert_a, &key_b);
        tokio::time::sleep(after_a_check).await;
        assert!(presented(server.address, &trusted).await == b);
        let garbage = dir.0.join("garbage");
        std::fs::write(&garbage, "not PEM").unwrap();
        secret.publish(&garbage, &garbage);
        tokio::time::sleep(after_a_check).await;
        assert!(presented(server.address, &trusted).await == b);
        std::fs::remove_file(secret.dir.join(format!("..v{}/tls.key", secret.version))).unwrap();
        tokio::time::sleep(after_a_check).await;
        assert!(presented(server.address, &trusted).await == b);

        // A good pair again is taken up.
        secret.publish(&cert_a, &key_a);
        tokio::time::sleep(after_a_check).await;
        assert!(presented(server.address, &trusted).await == a);
        server.stop().await;
    }

    #[test]
    fn a_broken_pair_at_start_is_refused_and_one_later_is_read_once_per_change() {
        let dir = PrivateDir::new("tls-broken");
        let (cert_a, key_a) = self_signed(&dir.0, "a");
        let (cert_b, key_b) = self_signed(&dir.0, "b");
        let error = tls_acceptor(&cert_a, &key_b)
            .err()
            .expect("a mismatched pair is refused")
            .to_string();
        assert!(error.contains("cannot use the private key"), "{error}");
        assert!(tls_acceptor(&cert_a, &dir.0.join("missing")).is_err());

        let mut secret = SecretVolume::new(dir.0.join("secret"));
        secret.publish(&cert_a, &key_a);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = ReloadingCert::new(&secret.cert(), &secret.key(), provider).unwrap();
        let a = der_of(&cert_a);
        assert_eq!(resolver.current().cert[0], a);
        let state = |resolver: &ReloadingCert| {
            let state = resolver.state.lock().unwrap();
            (state.seen, state.checked)
        };
        // Checked at most once every TLS_RECHECK: a change right away is not seen yet.
        secret.publish(&cert_b, &key_a);
        let (seen, checked) = state(&resolver);
        assert_eq!(resolver.current().cert[0], a);
        assert_eq!(state(&resolver), (seen, checked));
        // Then it is read (and refused) once: its stamps are recorded, so the next checks
        // find nothing new to read or report.
        std::thread::sleep(TLS_RECHECK + Duration::from_millis(100));
        assert_eq!(resolver.current().cert[0], a);
        let (after, _) = state(&resolver);
        assert_ne!(after, seen);
        assert_eq!(after, (stamp(&secret.cert()), stamp(&secret.key())));
        std::thread::sleep(TLS_RECHECK + Duration::from_millis(100));
        assert_eq!(resolver.current().cert[0], a);
        assert_eq!(state(&resolver).0, after);
    }
}
