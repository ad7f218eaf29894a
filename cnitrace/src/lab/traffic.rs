//! Traffic between lab pods: an iperf3 TCP stream for throughput, and a request/response
//! test for latency (iperf3 has none and netperf is not in Debian): one byte each way over a
//! TCP connection with Nagle off, round trips back to back, as netperf's TCP_RR does.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{error::Error, netns};

/// The port of the request/response server (Calico's policy in the lab allows it).
pub const RR_PORT: u16 = 5299;
pub use cnitrace_netns::iperf3::{DEFAULT_PORT as IPERF3_PORT, Flow, Stream};

/// Round trips of a request/response run.
#[derive(Debug, Clone, Copy)]
pub struct RrResult {
    pub transactions: u64,
    pub mean_rtt_us: f64,
}

/// How long the request/response server waits for its client (which gives up connecting
/// after 5 s).
const ACCEPT_WAIT: Duration = Duration::from_secs(10);

/// The first connection within `wait`, else an error.
fn accept_within(listener: &TcpListener, wait: Duration) -> Result<TcpStream, Error> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("nonblocking", e))?;
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(|e| Error::io("blocking", e))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(Error::InvalidArgument(format!(
                    "request/response: no client connected within {} s",
                    wait.as_secs()
                )));
            }
            Err(e) => return Err(Error::io("accept", e)),
        }
    }
}

/// Request/response between two pods for `duration`.
pub fn request_response(
    client_netns: &str,
    server_netns: &str,
    server_ip: Ipv4Addr,
    duration: Duration,
) -> Result<RrResult, Error> {
    let address = SocketAddrV4::new(server_ip, RR_PORT);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = netns::run_in(server_netns, move || {
        let listener =
            TcpListener::bind(address).map_err(|e| Error::io(format!("bind {address}"), e))?;
        let _ = ready_tx.send(());
        // Never block for good: a client that fails to connect must not leave this thread
        // (and the caller joining it) waiting in accept() where Ctrl-C cannot end it.
        let mut stream = accept_within(&listener, ACCEPT_WAIT)?;
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io("nodelay", e))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| Error::io("timeout", e))?;
        let mut byte = [0u8; 1];
        // Echo until the client closes.
        while stream
            .read(&mut byte)
            .map_err(|e| Error::io("rr read", e))?
            == 1
        {
            stream
                .write_all(&byte)
                .map_err(|e| Error::io("rr write", e))?;
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| Error::InvalidArgument("request/response server did not start".to_owned()))?;
    let client = netns::run_in(client_netns, move || {
        let mut stream = TcpStream::connect_timeout(&address.into(), Duration::from_secs(5))
            .map_err(|e| Error::io(format!("connect to {address}"), e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io("nodelay", e))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| Error::io("timeout", e))?;
        let start = Instant::now();
        let mut transactions = 0u64;
        let mut byte = [1u8; 1];
        while start.elapsed() < duration {
            stream
                .write_all(&byte)
                .map_err(|e| Error::io("rr write", e))?;
            stream
                .read_exact(&mut byte)
                .map_err(|e| Error::io("rr read", e))?;
            transactions += 1;
        }
        let elapsed = start.elapsed();
        Ok(RrResult {
            transactions,
            mean_rtt_us: elapsed.as_secs_f64() * 1e6 / transactions.max(1) as f64,
        })
    });
    let result = client
        .join()
        .map_err(|_| Error::InvalidArgument("rr client panicked".to_owned()))?;
    let server_outcome = server
        .join()
        .map_err(|_| Error::InvalidArgument("rr server panicked".to_owned()))?;
    let result = result?;
    server_outcome?;
    Ok(result)
}

/// The port of the connect-request-response server.
pub const CRR_PORT: u16 = 5300;

/// A connect-request-response run: one new TCP connection per transaction, as netperf's
/// TCP_CRR, so the first-packet cost (conntrack, NAT, Service rules) is paid every time.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CrrResult {
    pub connections: u64,
    pub connections_per_s: f64,
    /// connect() until established, microseconds.
    pub setup_p50_us: f64,
    pub setup_p99_us: f64,
    /// connect, one byte each way, close.
    pub transaction_p50_us: f64,
    pub transaction_p99_us: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Connect-request-response from `client_netns` to `address` for `duration`, served by pods
/// in `server_netns` listening on `listen` (the address behind a Service, or `address`).
pub fn connect_request_response(
    client_netns: &str,
    server_netns: &str,
    listen: SocketAddrV4,
    address: SocketAddrV4,
    duration: Duration,
) -> Result<CrrResult, Error> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server_stop = std::sync::Arc::clone(&stop);
    let server = netns::run_in(server_netns, move || {
        let listener =
            TcpListener::bind(listen).map_err(|e| Error::io(format!("bind {listen}"), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("nonblocking", e))?;
        let _ = ready_tx.send(());
        let mut byte = [0u8; 1];
        while !server_stop.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    if stream.read_exact(&mut byte).is_ok() {
                        let _ = stream.write_all(&byte);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(Error::io("accept", e)),
            }
        }
        Ok(())
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).map_err(|_| {
        Error::InvalidArgument("connect-request-response server did not start".to_owned())
    })?;
    let client = netns::run_in(client_netns, move || {
        let start = Instant::now();
        let (mut setups, mut transactions) = (Vec::new(), Vec::new());
        let mut byte = [1u8; 1];
        while start.elapsed() < duration {
            let begun = Instant::now();
            let mut stream = TcpStream::connect_timeout(&address.into(), Duration::from_secs(2))
                .map_err(|e| Error::io(format!("connect to {address}"), e))?;
            setups.push(begun.elapsed().as_secs_f64() * 1e6);
            stream
                .set_nodelay(true)
                .map_err(|e| Error::io("nodelay", e))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| Error::io("timeout", e))?;
            stream
                .write_all(&byte)
                .map_err(|e| Error::io("crr write", e))?;
            stream
                .read_exact(&mut byte)
                .map_err(|e| Error::io("crr read", e))?;
            // Closed with a reset (linger 0): thousands of connections a second would
            // otherwise fill the client's ports with TIME_WAIT sockets.
            let _ = nix::sys::socket::setsockopt(
                &stream,
                nix::sys::socket::sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
            drop(stream);
            transactions.push(begun.elapsed().as_secs_f64() * 1e6);
        }
        let elapsed = start.elapsed().as_secs_f64();
        setups.sort_by(f64::total_cmp);
        transactions.sort_by(f64::total_cmp);
        Ok(CrrResult {
            connections: transactions.len() as u64,
            connections_per_s: transactions.len() as f64 / elapsed,
            setup_p50_us: percentile(&setups, 50.0),
            setup_p99_us: percentile(&setups, 99.0),
            transaction_p50_us: percentile(&transactions, 50.0),
            transaction_p99_us: percentile(&transactions, 99.0),
        })
    });
    let result = client
        .join()
        .map_err(|_| Error::InvalidArgument("crr client panicked".to_owned()))?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let server_outcome = server
        .join()
        .map_err(|_| Error::InvalidArgument("crr server panicked".to_owned()))?;
    let result = result?;
    server_outcome?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_sorted_samples() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&values, 50.0) - 51.0).abs() < f64::EPSILON);
        assert!((percentile(&values, 99.0) - 99.0).abs() < f64::EPSILON);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn accept_gives_up_when_nobody_connects() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let err = accept_within(&listener, Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("no client connected"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let address = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || TcpStream::connect(address).unwrap());
        assert!(accept_within(&listener, Duration::from_secs(5)).is_ok());
        drop(client.join());
    }
}
