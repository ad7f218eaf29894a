//! `cnitrace collect`: one window across several agents (sender and receiver of an inter-host
//! benchmark, as a cross-host flow needs), and the sum of their breakdowns.

use std::{fmt::Write as _, time::Duration};

use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use serde::{Deserialize, Serialize};

use crate::{
    components::COMPONENTS,
    contract::{Breakdown, SessionView},
};

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("{url}: {detail}")]
    Agent { url: String, detail: String },
    #[error("invalid agent URL `{0}`: expected http://HOST:PORT or https://HOST:PORT")]
    BadUrl(String),
    #[error("{0}")]
    Tls(String),
}

/// Expands the agent list: `dns+http://HOST:PORT` (a headless Service) becomes one
/// `http://ADDRESS:PORT` per address HOST resolves to (`dns+https://` likewise, so the
/// agents' certificates must then name their addresses); other URLs pass through.
pub fn discover(urls: &[String]) -> Result<Vec<String>, CollectError> {
    let mut agents = Vec::new();
    for url in urls {
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("dns+http://") {
            ("http", rest)
        } else if let Some(rest) = url.strip_prefix("dns+https://") {
            ("https", rest)
        } else {
            agents.push(normalise(url)?);
            continue;
        };
        let host_port = rest.trim_end_matches('/');
        let bad = || CollectError::BadUrl(url.clone());
        let (_, port) = host_port.rsplit_once(':').ok_or_else(bad)?;
        port.parse::<u16>().map_err(|_| bad())?;
        let mut addresses: Vec<std::net::SocketAddr> =
            std::net::ToSocketAddrs::to_socket_addrs(host_port)
                .map_err(|e| CollectError::Agent {
                    url: url.clone(),
                    detail: format!("cannot resolve: {e}"),
                })?
                .collect();
        addresses.sort_unstable();
        addresses.dedup();
        if addresses.is_empty() {
            return Err(CollectError::Agent {
                url: url.clone(),
                detail: "resolves to no address".to_owned(),
            });
        }
        agents.extend(addresses.into_iter().map(|a| format!("{scheme}://{a}")));
    }
    Ok(agents)
}

/// An agent's base URL, normalised (no trailing slash).
pub fn normalise(url: &str) -> Result<String, CollectError> {
    let trimmed = url.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or_else(|| CollectError::BadUrl(url.to_owned()))?;
    if rest.is_empty() || rest.contains('/') {
        return Err(CollectError::BadUrl(url.to_owned()));
    }
    Ok(trimmed.to_owned())
}

/// A blocking client for one agent.
pub struct AgentClient {
    pub url: String,
    token: Option<String>,
    agent: ureq::Agent,
}

fn error_text(url: &str, e: &ureq::Error) -> CollectError {
    CollectError::Agent {
        url: url.to_owned(),
        detail: e.to_string(),
    }
}

/// Certificates to trust for `https://` agents, from a PEM file (a private CA, or the agents'
/// self-signed certificates).
pub fn read_ca_file(
    path: &std::path::Path,
) -> Result<Vec<ureq::tls::Certificate<'static>>, CollectError> {
    let bad = |detail: String| CollectError::Tls(format!("{}: {detail}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(cert) = item.map_err(|e| bad(e.to_string()))? {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        return Err(bad("no PEM CERTIFICATE in it".to_owned()));
    }
    Ok(certs)
}

impl AgentClient {
    /// A client of one agent; `https://` agents are verified against `ca` when given, else
    /// against the public web roots.
    pub fn new(
        url: &str,
        token: Option<String>,
        ca: Option<&[ureq::tls::Certificate<'static>]>,
    ) -> Result<Self, CollectError> {
        let mut builder = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false);
        if let Some(ca) = ca {
            builder = builder.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(ca))
                    .build(),
            );
        }
        let config = builder.build();
        Ok(Self {
            url: normalise(url)?,
            token,
            agent: config.into(),
        })
    }

    /// The body of a successful response, or the agent's error.
    fn text(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<String, CollectError> {
        let mut response = response.map_err(|e| error_text(&self.url, &e))?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| error_text(&self.url, &e))?;
        if !status.is_success() {
            let detail = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(CollectError::Agent {
                url: self.url.clone(),
                detail: format!("{status}: {detail}"),
            });
        }
        Ok(text)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, text: &str) -> Result<T, CollectError> {
        serde_json::from_str(text).map_err(|e| CollectError::Agent {
            url: self.url.clone(),
            detail: format!("unexpected response: {e}"),
        })
    }

    fn post(&self, path: &str, body: &serde_json::Value) -> Result<SessionView, CollectError> {
        let mut request = self.agent.post(format!("{}{path}", self.url));
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let text = self.text(request.send_json(body))?;
        self.json(&text)
    }

    fn get(&self, path: &str) -> Result<String, CollectError> {
        let mut request = self.agent.get(format!("{}{path}", self.url));
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        self.text(request.call())
    }

    /// A stopped session's breakdown with its sampled stacks (from its folded stacks).
    pub fn session_with_stacks(&self, id: u64) -> Result<Breakdown, CollectError> {
        let view: SessionView = self.json(&self.get(&format!("/api/v1/sessions/{id}"))?)?;
        let mut breakdown = view.breakdown.ok_or_else(|| CollectError::Agent {
            url: self.url.clone(),
            detail: format!(
                "session {id} has no breakdown ({})",
                view.error
                    .unwrap_or_else(|| format!("{:?}", view.state).to_lowercase())
            ),
        })?;
        let folded = self.get(&format!("/api/v1/sessions/{id}/folded"))?;
        breakdown.stacks = Some(crate::flame::parse_folded(&folded));
        Ok(breakdown)
    }

    /// Opens a session (open until stopped).
    pub fn start(&self) -> Result<u64, CollectError> {
        Ok(self.post("/api/v1/sessions", &serde_json::json!({}))?.id)
    }

    /// Stops it and returns its breakdown.
    pub fn stop(&self, id: u64) -> Result<Breakdown, CollectError> {
        let view = self.post(
            &format!("/api/v1/sessions/{id}/stop"),
            &serde_json::json!({}),
        )?;
        view.breakdown.ok_or_else(|| CollectError::Agent {
            url: self.url.clone(),
            detail: view
                .error
                .unwrap_or_else(|| "session stopped without a breakdown".to_owned()),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SumComponent {
    pub name: String,
    pub cycles: u64,
    pub cpp: Option<f64>,
    pub share: f64,
}

/// Sender + receiver: cycles added over nodes, divided by the packets of the flow (the largest
/// count any node saw: both ends carry the same packets, counted once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sum {
    pub packets: u64,
    pub total_cycles: u64,
    pub total_cpp: Option<f64>,
    pub components: Vec<SumComponent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Collected {
    pub nodes: Vec<Breakdown>,
    pub sum: Sum,
}

pub fn sum(nodes: &[Breakdown]) -> Sum {
    let packets = nodes.iter().map(|b| b.packets.count).max().unwrap_or(0);
    let total_cycles: u64 = nodes.iter().map(|b| b.total.cycles).sum();
    let per_packet = |cycles: u64| (packets > 0).then(|| cycles as f64 / packets as f64);
    let components = COMPONENTS
        .iter()
        .map(|c| {
            let cycles = nodes
                .iter()
                .filter_map(|b| b.component(c.name))
                .map(|x| x.cycles)
                .sum();
            SumComponent {
                name: c.name.to_owned(),
                cycles,
                cpp: per_packet(cycles),
                share: if total_cycles == 0 {
                    0.0
                } else {
                    cycles as f64 / total_cycles as f64
                },
            }
        })
        .collect();
    Sum {
        packets,
        total_cycles,
        total_cpp: per_packet(total_cycles),
        components,
    }
}

fn cpp(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// Per-node CPP columns and the summed column.
pub fn table(collected: &Collected) -> String {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    let mut header = vec!["component (CPP)".to_owned()];
    header.extend(collected.nodes.iter().map(|b| b.node.clone()));
    header.push("sum".to_owned());
    table.set_header(header);
    for (index, c) in collected.sum.components.iter().enumerate() {
        let mut row = vec![Cell::new(&c.name)];
        for b in &collected.nodes {
            row.push(
                Cell::new(cpp(b.components.get(index).and_then(|x| x.cpp)))
                    .set_alignment(CellAlignment::Right),
            );
        }
        row.push(Cell::new(cpp(c.cpp)).set_alignment(CellAlignment::Right));
        table.add_row(row);
    }
    let mut total = vec![Cell::new("total")];
    for b in &collected.nodes {
        total.push(Cell::new(cpp(b.total.cpp)).set_alignment(CellAlignment::Right));
    }
    total.push(Cell::new(cpp(collected.sum.total_cpp)).set_alignment(CellAlignment::Right));
    table.add_row(total);
    let mut out = String::new();
    let _ = writeln!(out, "{table}");
    for b in &collected.nodes {
        let _ = writeln!(
            out,
            "{}: {} {}s from {}",
            b.node,
            b.packets.count,
            b.packets.unit.as_str(),
            b.packets.source
        );
    }
    let _ = writeln!(
        out,
        "sum: cycles of all nodes over {} packets (the largest count of any node)",
        collected.sum.packets
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_expands_dns_names_and_keeps_urls() {
        let agents = discover(&[
            "dns+http://localhost:9560".into(),
            "http://10.0.0.1:9560/".into(),
        ])
        .unwrap();
        assert!(
            agents.contains(&"http://127.0.0.1:9560".to_owned()),
            "{agents:?}"
        );
        assert_eq!(agents.last().unwrap(), "http://10.0.0.1:9560");
        assert!(discover(&["dns+http://localhost".into()]).is_err());
        assert!(discover(&["dns+http://localhost:http".into()]).is_err());
        assert!(discover(&["dns+http://no-such-host.invalid:9560".into()]).is_err());
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            normalise("http://10.0.0.1:9560/").unwrap(),
            "http://10.0.0.1:9560"
        );
        assert!(normalise("10.0.0.1:9560").is_err());
        assert!(normalise("http://host:1/path").is_err());
        assert!(normalise("http://").is_err());
    }
}
