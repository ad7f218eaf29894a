//! The agent's accept loop: HTTP/1.1, optionally over TLS (rustls), with a header-read
//! timeout (which also ends idle keep-alive connections and bounds the TLS handshake), a cap on
//! connections overall and per client address, and a graceful shutdown. `axum::serve` has none of these limits, and a privileged agent on every
//! node must not let slow or numerous clients hold its file descriptors until `/healthz` fails.

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// A client must send a request's whole header within this time, and an idle
    /// keep-alive connection is closed after it.
    pub header_read_timeout: Duration,
    /// Connections open at once, over all clients.
    pub max_connections: usize,
    /// Connections open at once from one address, so that one client cannot take them all
    /// (the kubelet's probes come from the node's own address).
    pub max_connections_per_client: usize,
    /// How long a shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 256,
            max_connections_per_client: 32,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Open connections per client address, and in all.
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
    fn take(
        connections: &Arc<Mutex<Connections>>,
        client: IpAddr,
        limits: &ServeLimits,
    ) -> Option<Self> {
        let mut open = connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = open.per_client.get(&client).copied().unwrap_or(0);
        if open.total >= limits.max_connections || mine >= limits.max_connections_per_client {
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

/// The agent's certificate and key, from PEM files.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, crate::Error> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let bad = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        crate::Error::InvalidArgument(format!("{what} {}: {e}", path.display()))
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
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key_der))
    .map_err(|e| {
        bad(
            "the certificate and key do not make a TLS configuration:",
            cert,
            &e,
        )
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown` completes, then waits
/// up to `limits.shutdown_grace` for the connections in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let connections = Arc::new(Mutex::new(Connections::default()));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024);
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
        let Some(slot) = Slot::take(&connections, peer.ip(), &limits) else {
            tracing::debug!("refusing a connection from {peer}: too many open");
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), service))
                        .await
                }
                Some(acceptor) => {
                    // A client that never finishes its handshake is cut off like one that never
                    // finishes its headers.
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            watcher
                                .watch(builder.serve_connection(TokioIo::new(stream), service))
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!("TLS handshake with {peer}: {e}");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake with {peer} timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!("connection from {peer}: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still running after {} s; stopping anyway",
            limits.shutdown_grace.as_secs()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpSocket, TcpStream},
    };

    use super::*;

    const LIMITS: ServeLimits = ServeLimits {
        header_read_timeout: Duration::from_secs(1),
        max_connections: 8,
        max_connections_per_client: 3,
        shutdown_grace: Duration::from_secs(1),
    };

    async fn start() -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = Router::new().route("/healthz", get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            serve(listener, router, LIMITS, None, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        (address, stop, server)
    }

    /// Connects from a chosen loopback address, so tests can be several clients.
    async fn connect_from(client: [u8; 4], server: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((client, 0))).unwrap();
        socket.connect(server).await.unwrap()
    }

    /// Whether the server closed the connection (EOF or reset) within `wait`.
    async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(wait, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn healthz(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("no answer within 5 s")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn slow_clients_are_cut_off_and_cannot_starve_others() {
        let (address, stop, server) = start().await;
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
        assert!(closed_within(&mut extra, Duration::from_millis(500)).await);
        // ... while another client (the kubelet, say) is served.
        let mut other = connect_from([127, 0, 0, 2], address).await;
        assert!(healthz(&mut other).await.starts_with("HTTP/1.1 200"));
        // The slow ones are closed after the header-read timeout.
        for stream in &mut slow {
            assert!(closed_within(stream, LIMITS.header_read_timeout * 3).await);
        }
        // Their slots are free again.
        let mut again = connect_from([127, 0, 0, 1], address).await;
        assert!(healthz(&mut again).await.starts_with("HTTP/1.1 200"));
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn idle_keep_alive_connections_are_closed() {
        let (address, stop, server) = start().await;
        let mut stream = connect_from([127, 0, 0, 1], address).await;
        assert!(healthz(&mut stream).await.starts_with("HTTP/1.1 200"));
        assert!(
            closed_within(&mut stream, LIMITS.header_read_timeout * 3).await,
            "an idle keep-alive connection stays open"
        );
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_connection_cap_holds_over_all_clients() {
        let (address, stop, server) = start().await;
        let mut held = Vec::new();
        for client in 1..=LIMITS.max_connections as u8 {
            let mut stream = connect_from([127, 0, 1, client], address).await;
            stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            held.push(stream);
        }
        let mut over = connect_from([127, 0, 2, 1], address).await;
        assert!(closed_within(&mut over, Duration::from_millis(500)).await);
        drop(held);
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
