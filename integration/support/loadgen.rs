//! An open-loop load generator with a per-request record.
//!
//! Failover and balancing tests need steady traffic while something breaks
//! (an upstream dies, etcd restarts, a sidecar is SIGSTOPped), then ask
//! questions about *when* requests failed or slowed down. [`LoadGen`] sends
//! requests on a fixed schedule (request `i` at `start + i / rate`, without
//! waiting for earlier responses, so a stall shows up as latency and not as
//! a lower rate) over pooled keep-alive connections, and records every
//! request. [`LoadReport`] summarises the record and can be sliced by time:
//! `report.window(3s, 2s).p99()` is the p99 of requests sent in [3s, 5s).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::header::HOST;
use http::Request;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::client::{collect, dial_client, dial_h2c_client, empty, proxy_client};

/// How requests reach the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// HTTP/1.1, origin form, `Host: <host>`.
    HostHeader,
    /// HTTP/1.1 absolute form (`GET http://<host><path>`), as via `HTTP_PROXY`.
    Proxy,
    /// h2c with `:authority = <host>`.
    H2c,
}

/// Configuration of one load run; build with [`LoadGen::new`] and the
/// chained setters, then [`LoadGen::run`].
#[derive(Debug, Clone)]
pub struct LoadGen {
    target: SocketAddr,
    rate: u32,
    duration: Duration,
    host: String,
    path: String,
    mode: LoadMode,
    request_timeout: Duration,
    method: http::Method,
    body: bytes::Bytes,
}

/// One request's record.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent, relative to the start of the run.
    pub sent_at: Duration,
    /// Time until the whole response was read (or the error/timeout).
    pub latency: Duration,
    /// The response status, if a response arrived.
    pub status: Option<u16>,
    /// The error, if no complete response arrived (`"timeout"` on timeout).
    pub error: Option<String>,
    /// The `name` field of a JSON response body (the upstream that answered).
    pub upstream: Option<String>,
}

impl Sample {
    /// An error, a timeout or a non-2xx status.
    pub fn is_failure(&self) -> bool {
        !matches!(self.status, Some(200..=299)) || self.error.is_some()
    }
}

impl LoadGen {
    /// 200 req/s for 1 s of `GET /` with `Host: b` to `target`, 5 s
    /// per-request timeout.
    pub fn new(target: SocketAddr) -> LoadGen {
        LoadGen {
            target,
            rate: 200,
            duration: Duration::from_secs(1),
            host: "b".to_string(),
            path: "/".to_string(),
            mode: LoadMode::HostHeader,
            request_timeout: Duration::from_secs(5),
            method: http::Method::GET,
            body: bytes::Bytes::new(),
        }
    }

    /// The request method (GET by default) and body (empty by default).
    pub fn method(mut self, method: http::Method, body: &[u8]) -> Self {
        self.method = method;
        self.body = bytes::Bytes::copy_from_slice(body);
        self
    }

    /// Requests per second (at least 1).
    pub fn rate(mut self, per_second: u32) -> Self {
        self.rate = per_second.max(1);
        self
    }

    /// How long to keep sending; `rate * duration` requests are sent.
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// The logical host (service name) requests are addressed to.
    pub fn host(mut self, host: &str) -> Self {
        self.host = host.to_string();
        self
    }

    /// The path and query of every request.
    pub fn path(mut self, path: &str) -> Self {
        self.path = path.to_string();
        self
    }

    /// How requests are addressed; see [`LoadMode`].
    pub fn mode(mut self, mode: LoadMode) -> Self {
        self.mode = mode;
        self
    }

    /// After this long a request counts as failed with error `"timeout"`.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sends the load and returns the record once every request has
    /// completed or timed out (so at most `duration + request_timeout`).
    pub async fn run(self) -> LoadReport {
        let client = match self.mode {
            LoadMode::HostHeader => dial_client(self.target),
            LoadMode::Proxy => proxy_client(self.target),
            LoadMode::H2c => dial_h2c_client(self.target),
        };
        let url = format!("http://{}{}", self.host, self.path);
        let count = (f64::from(self.rate) * self.duration.as_secs_f64()).round() as u64;
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for i in 0..count {
            tokio::time::sleep_until(
                start + Duration::from_secs_f64(i as f64 / f64::from(self.rate)),
            )
            .await;
            let mut builder = Request::builder()
                .method(self.method.clone())
                .uri(url.as_str());
            // Over h2c the URL's authority is sent as :authority instead.
            if self.mode != LoadMode::H2c {
                builder = builder.header(HOST, self.host.as_str());
            }
            let body = if self.body.is_empty() {
                empty()
            } else {
                super::client::full(self.body.clone())
            };
            let req = builder.body(body).expect("valid request");
            let client = client.clone();
            let timeout = self.request_timeout;
            tasks.spawn(async move {
                let sent = Instant::now();
                let result = tokio::time::timeout(timeout, async {
                    let resp = client.request(req).await?;
                    collect(resp).await
                })
                .await;
                let latency = sent.elapsed();
                let sent_at = sent - start;
                match result {
                    Ok(Ok(resp)) => Sample {
                        sent_at,
                        latency,
                        status: Some(resp.status().as_u16()),
                        error: None,
                        upstream: upstream_name(resp.body()),
                    },
                    Ok(Err(e)) => Sample {
                        sent_at,
                        latency,
                        status: None,
                        error: Some(e.to_string()),
                        upstream: None,
                    },
                    Err(_) => Sample {
                        sent_at,
                        latency,
                        status: None,
                        error: Some("timeout".to_string()),
                        upstream: None,
                    },
                }
            });
        }
        let mut samples = Vec::with_capacity(count as usize);
        while let Some(sample) = tasks.join_next().await {
            samples.push(sample.expect("load request task panicked"));
        }
        samples.sort_by_key(|s| s.sent_at);
        LoadReport { samples }
    }
}

fn upstream_name(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(value.get("name")?.as_str()?.to_string())
}

/// The record of a load run, ordered by send time.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Every request, ordered by [`Sample::sent_at`].
    pub samples: Vec<Sample>,
}

impl LoadReport {
    /// Number of requests.
    pub fn total(&self) -> usize {
        self.samples.len()
    }

    /// Requests that errored, timed out or got a non-2xx status.
    pub fn failures(&self) -> usize {
        self.samples.iter().filter(|s| s.is_failure()).count()
    }

    /// Requests with a 2xx response.
    pub fn successes(&self) -> usize {
        self.total() - self.failures()
    }

    /// The `q` quantile (0.0..=1.0, nearest rank) of all requests'
    /// latencies, failures included; zero for an empty report.
    pub fn percentile(&self, q: f64) -> Duration {
        let mut latencies: Vec<Duration> = self.samples.iter().map(|s| s.latency).collect();
        if latencies.is_empty() {
            return Duration::ZERO;
        }
        latencies.sort();
        let rank = (q.clamp(0.0, 1.0) * latencies.len() as f64).ceil() as usize;
        latencies[rank.saturating_sub(1).min(latencies.len() - 1)]
    }

    /// Median latency.
    pub fn p50(&self) -> Duration {
        self.percentile(0.50)
    }

    /// 99th percentile latency.
    pub fn p99(&self) -> Duration {
        self.percentile(0.99)
    }

    /// Requests per answering upstream (the JSON `name` field; responses
    /// without one are not counted).
    pub fn per_upstream(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for name in self.samples.iter().filter_map(|s| s.upstream.clone()) {
            *counts.entry(name).or_insert(0) += 1;
        }
        counts
    }

    /// Requests per outcome: the status code, or the error text.
    pub fn outcomes(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for s in &self.samples {
            let key = match (&s.status, &s.error) {
                (Some(code), _) => code.to_string(),
                (None, Some(e)) => e.clone(),
                (None, None) => "?".to_string(),
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }

    /// The requests sent in `[from, from + len)` after the start.
    pub fn window(&self, from: Duration, len: Duration) -> LoadReport {
        let samples = self
            .samples
            .iter()
            .filter(|s| s.sent_at >= from && s.sent_at < from + len)
            .cloned()
            .collect();
        LoadReport { samples }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests, {} failed, p50 {:?}, p99 {:?}, upstreams {:?}, outcomes {:?}",
            self.total(),
            self.failures(),
            self.p50(),
            self.p99(),
            self.per_upstream(),
            self.outcomes()
        )
    }
}
