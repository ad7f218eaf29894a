//! iperf3 TCP streams between namespaces: a one-shot server in one, a client in another, and
//! the receiver's throughput from the client's JSON report.

use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::Error;

/// iperf3's own default port.
pub const DEFAULT_PORT: u16 = 5201;

/// A stream to start: who talks to whom, where, for how long.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    client_netns: &'a str,
    server_netns: &'a str,
    server_ip: Ipv4Addr,
    connect: Ipv4Addr,
    port: u16,
    seconds: u32,
    client_args: &'a [&'a str],
}

impl<'a> Flow<'a> {
    /// A stream from `client_netns` to a server bound to `server_ip` in `server_netns`.
    pub fn new(
        client_netns: &'a str,
        server_netns: &'a str,
        server_ip: Ipv4Addr,
        seconds: u32,
    ) -> Self {
        Self {
            client_netns,
            server_netns,
            server_ip,
            connect: server_ip,
            port: DEFAULT_PORT,
            seconds,
            client_args: &[],
        }
    }

    /// The client connects to `connect` (a Service IP DNATed to the server) instead.
    #[must_use]
    pub fn via(self, connect: Ipv4Addr) -> Self {
        Self { connect, ..self }
    }

    /// Another port (several streams to one server namespace).
    #[must_use]
    pub fn port(self, port: u16) -> Self {
        Self { port, ..self }
    }

    /// More arguments for the client (`-P 100`, `-b 1G`).
    #[must_use]
    pub fn client_args(self, client_args: &'a [&'a str]) -> Self {
        Self {
            client_args,
            ..self
        }
    }

    /// Starts the server, waits until it listens, then starts the client.
    pub fn start(self) -> Result<Stream, Error> {
        let port = self.port.to_string();
        let mut server = Command::new("iperf3");
        server
            .args(["-s", "-1", "-B", &self.server_ip.to_string(), "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut server = crate::spawn_in(self.server_netns, server).map_err(not_installed)?;
        // The client fails at once if the server does not listen yet. A probe connection would
        // be taken as the one test `-1` serves, so watch the socket table instead.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !listening(self.server_netns, self.port)? {
            if Instant::now() > deadline {
                let _ = server.kill();
                let _ = server.wait();
                return Err(Error::Invalid(format!(
                    "iperf3 server in {} did not start listening",
                    self.server_netns
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut client = Command::new("iperf3");
        client
            .args(["-c", &self.connect.to_string(), "-p", &port])
            .args(["-t", &self.seconds.to_string(), "-J"])
            .args(self.client_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let client = match crate::spawn_in(self.client_netns, client) {
            Ok(client) => client,
            Err(e) => {
                let _ = server.kill();
                let _ = server.wait();
                return Err(e);
            }
        };
        Ok(Stream {
            server,
            client: Some(client),
        })
    }
}

fn not_installed(e: Error) -> Error {
    match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::Invalid("iperf3 is not installed (apt install iperf3)".to_owned())
        }
        other => other,
    }
}

/// A running iperf3 pair. Dropping it kills both ends.
pub struct Stream {
    server: std::process::Child,
    client: Option<std::process::Child>,
}

impl Stream {
    /// A stream on the default port with no extra arguments.
    pub fn start(
        client_netns: &str,
        server_netns: &str,
        server_ip: Ipv4Addr,
        seconds: u32,
    ) -> Result<Self, Error> {
        Flow::new(client_netns, server_netns, server_ip, seconds).start()
    }

    /// Waits for the client and returns the receiver's throughput in Gbit/s.
    pub fn finish(mut self) -> Result<f64, Error> {
        let output = self
            .client
            .take()
            .expect("a stream is finished once")
            .wait_with_output()
            .map_err(|e| Error::io("wait for iperf3", e))?;
        let _ = self.server.kill();
        let _ = self.server.wait();
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|e| {
            Error::Invalid(format!(
                "iperf3 printed no JSON ({e}): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        })?;
        if let Some(error) = json.get("error").and_then(|e| e.as_str()) {
            return Err(Error::Invalid(format!("iperf3: {error}")));
        }
        json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|bps| bps / 1e9)
            .ok_or_else(|| Error::Invalid("iperf3 JSON has no end.sum_received".to_owned()))
    }
}

/// Whether a TCP socket listens on `port` in the namespace (its /proc/net/tcp).
fn listening(netns_name: &str, port: u16) -> Result<bool, Error> {
    let needle = format!(":{port:04X} ");
    crate::run_in(netns_name, move || {
        // thread-self: /proc/net follows the process's namespace, not this thread's.
        let table = std::fs::read_to_string("/proc/thread-self/net/tcp")
            .map_err(|e| Error::io("read /proc/thread-self/net/tcp", e))?;
        Ok(table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && format!("{} ", fields[1]).ends_with(&needle) && fields[3] == "0A"
        }))
    })
    .join()
    .map_err(|_| Error::Invalid("socket table thread panicked".to_owned()))?
}

impl Drop for Stream {
    fn drop(&mut self) {
        for child in self.client.iter_mut().chain([&mut self.server]) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
