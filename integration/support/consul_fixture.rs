//! A **Consul HTTP API fixture**: an in-process fake of the subset of a
//! Consul agent's HTTP API that outrigger uses. It is *not* Consul.
//!
//! No Consul binary or image can be had on the development machine, so the
//! Consul backend is tested against this fixture, which implements the
//! documented semantics of each endpoint it serves (the doc link for each
//! behaviour is on the code that implements it):
//!
//! - `PUT /v1/agent/service/register`, `PUT /v1/agent/service/deregister/:id`
//!   (<https://developer.hashicorp.com/consul/api-docs/agent/service>);
//! - `PUT /v1/agent/check/update/:id`, `/pass/:id`, `/fail/:id`: TTL checks
//!   that start critical, turn critical when not updated within their TTL,
//!   and are reaped after `DeregisterCriticalServiceAfter`
//!   (<https://developer.hashicorp.com/consul/api-docs/agent/check>);
//! - `GET /v1/catalog/services`
//!   (<https://developer.hashicorp.com/consul/api-docs/catalog#list-services>);
//! - `GET /v1/health/service/:name` with the `passing` filter
//!   (<https://developer.hashicorp.com/consul/api-docs/health#list-service-instances-for-service>);
//! - blocking queries (`index`, `wait`, `X-Consul-Index`) on both reads
//!   (<https://developer.hashicorp.com/consul/api-docs/features/blocking>);
//! - `stale` consistency mode: accepted and counted; the fixture is its own
//!   leader, so every read is what `stale` would give
//!   (<https://developer.hashicorp.com/consul/api-docs/features/consistency>);
//! - ACL tokens in `X-Consul-Token`: with a required token set, any other
//!   token gets `403 Permission denied`
//!   (<https://developer.hashicorp.com/consul/api-docs/api-structure#authentication>).
//!
//! Test controls simulate what a real agent does under faults: stop and
//! start listening (agent down), lose every registration (an agent restart
//! without its data dir), force the index backwards or to 0, churn the
//! index, and advance a virtual clock (TTL expiry and reaping without
//! waiting minutes). Requests are counted per endpoint.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::ports::{free_port, loopback};

/// Consul's default blocking wait when the query gives none (5 minutes).
/// <https://developer.hashicorp.com/consul/api-docs/features/blocking>
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Consul caps `wait` at 10 minutes (same page).
const MAX_WAIT: Duration = Duration::from_secs(600);
/// `DeregisterCriticalServiceAfter` below one minute is raised to one
/// minute: "the minimum timeout is 1 minute" (agent/check docs).
const MIN_REAP: Duration = Duration::from_secs(60);
/// How often the fixture expires TTL checks and reaps critical services.
const SWEEP: Duration = Duration::from_millis(20);

/// One TTL check's state.
#[derive(Debug, Clone)]
pub struct CheckState {
    /// `CheckID`.
    pub id: String,
    /// `passing`, `warning` or `critical`.
    pub status: String,
    /// The last `Output` set.
    pub output: String,
    /// The TTL.
    pub ttl: Option<Duration>,
    /// When the TTL runs out (virtual clock).
    expires_at: Option<Instant>,
    /// `DeregisterCriticalServiceAfter`, raised to [`MIN_REAP`].
    pub deregister_after: Option<Duration>,
    /// Since when the check has been critical (virtual clock).
    critical_since: Option<Instant>,
}

/// One registered service instance.
#[derive(Debug, Clone)]
pub struct ServiceState {
    /// The instance as it appears in `Service` of health answers.
    pub service: Value,
    /// Its TTL check, if registered with one.
    pub check: Option<CheckState>,
}

/// Everything the fixture knows.
#[derive(Debug, Default)]
struct State {
    /// The Raft-like index: every write bumps it.
    index: u64,
    /// Instances by ID.
    services: BTreeMap<String, ServiceState>,
    /// Every register body received, in order.
    registrations: Vec<Value>,
    /// Requests per endpoint (`register`, `deregister`, `check_update`,
    /// `catalog`, `health`, `other`).
    requests: HashMap<&'static str, u64>,
    /// Reads that asked for `stale`.
    stale_reads: u64,
    /// Tokens seen (`X-Consul-Token`), in order.
    tokens: Vec<Option<String>>,
    /// With `Some`, only this token is allowed.
    required_token: Option<String>,
    /// While set, answers carry `X-Consul-Index: 0` and never block (the
    /// Consul bug the blocking docs warn of).
    zero_index: bool,
    /// Virtual clock offset added to `Instant::now()`.
    offset: Duration,
}

/// The accept loop and the connection tasks of a listening fixture.
type Server = (JoinHandle<()>, Arc<Mutex<JoinSet<()>>>);

/// A running fixture; dropping it stops everything.
pub struct ConsulFixture {
    state: Arc<Mutex<State>>,
    /// Bumped on every change, so blocked queries re-check.
    changed: watch::Sender<u64>,
    addr: SocketAddr,
    server: Option<Server>,
    sweeper: JoinHandle<()>,
    churn: Option<JoinHandle<()>>,
}

impl ConsulFixture {
    /// Start on a free loopback port.
    pub async fn start() -> ConsulFixture {
        let state = Arc::new(Mutex::new(State {
            // A fresh Consul cluster is never at index 0.
            index: 10,
            ..State::default()
        }));
        let (changed, _) = watch::channel(10);
        let sweeper = tokio::spawn(sweep(state.clone(), changed.clone()));
        let mut f = ConsulFixture {
            state,
            changed,
            addr: loopback(free_port()),
            server: None,
            sweeper,
            churn: None,
        };
        f.listen().await;
        f
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop listening and drop every connection (the agent is down).
    pub fn stop(&mut self) {
        if let Some((accept, conns)) = self.server.take() {
            accept.abort();
            conns.lock().unwrap().abort_all();
        }
    }

    /// Listen again on the same port.
    pub async fn listen(&mut self) {
        if self.server.is_some() {
            return;
        }
        let listener = bind_retrying(self.addr).await;
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let (state, changed, c) = (self.state.clone(), self.changed.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, changed) = (state.clone(), changed.clone());
                let service = service_fn(move |req| {
                    let (state, changed) = (state.clone(), changed.clone());
                    async move { Ok::<_, Infallible>(handle(state, changed, req).await) }
                });
                let mut set = c.lock().unwrap();
                while set.try_join_next().is_some() {}
                set.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        self.server = Some((accept, conns));
    }

    /// An agent restart that lost its data dir: down, every registration
    /// gone, the index back to `index` (lower than before, as a new dev
    /// agent's would be), then up again.
    pub async fn restart_losing_registrations(&mut self, index: u64) {
        self.stop();
        {
            let mut s = self.state.lock().unwrap();
            s.services.clear();
            s.index = index;
        }
        self.changed.send_replace(index);
        self.listen().await;
    }

    /// Force the index (e.g. backwards); blocked queries see it.
    pub fn set_index(&self, index: u64) {
        self.state.lock().unwrap().index = index;
        self.changed.send_replace(index);
    }

    /// The current index.
    pub fn index(&self) -> u64 {
        self.state.lock().unwrap().index
    }

    /// Answer with index 0 and never block (on) or behave (off).
    pub fn set_zero_index(&self, on: bool) {
        self.state.lock().unwrap().zero_index = on;
        let i = self.index();
        self.changed.send_replace(i);
    }

    /// Bump the index every `every` without changing any data (a busy
    /// cluster: other services' writes move the shared index), until
    /// [`ConsulFixture::stop_churn`].
    pub fn churn(&mut self, every: Duration) {
        self.stop_churn();
        let (state, changed) = (self.state.clone(), self.changed.clone());
        self.churn = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let i = {
                    let mut s = state.lock().unwrap();
                    s.index += 1;
                    s.index
                };
                changed.send_replace(i);
            }
        }));
    }

    /// Stop [`ConsulFixture::churn`].
    pub fn stop_churn(&mut self) {
        if let Some(t) = self.churn.take() {
            t.abort();
        }
    }

    /// Require this ACL token on every request (`None`: no ACLs).
    pub fn require_token(&self, token: Option<&str>) {
        self.state.lock().unwrap().required_token = token.map(String::from);
    }

    /// Every `X-Consul-Token` seen, in request order.
    pub fn tokens(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().tokens.clone()
    }

    /// Move the virtual clock forwards (TTL expiry, reaping).
    pub fn advance(&self, by: Duration) {
        self.state.lock().unwrap().offset += by;
    }

    /// Requests received on `endpoint` so far.
    pub fn requests(&self, endpoint: &str) -> u64 {
        let s = self.state.lock().unwrap();
        s.requests.get(endpoint).copied().unwrap_or(0)
    }

    /// Reads that asked for `stale`.
    pub fn stale_reads(&self) -> u64 {
        self.state.lock().unwrap().stale_reads
    }

    /// Every register body received.
    pub fn registrations(&self) -> Vec<Value> {
        self.state.lock().unwrap().registrations.clone()
    }

    /// The instance `id`, if registered.
    pub fn service(&self, id: &str) -> Option<ServiceState> {
        self.state.lock().unwrap().services.get(id).cloned()
    }

    /// The check status of instance `id` (`None` if not registered).
    pub fn check_status(&self, id: &str) -> Option<String> {
        self.service(id).and_then(|s| s.check.map(|c| c.status))
    }

    /// Register an instance directly (a peer the tests fake), with a
    /// passing check that never expires.
    pub fn put_passing(&self, body: Value) {
        let mut s = self.state.lock().unwrap();
        let id = body["ID"].as_str().unwrap_or_default().to_string();
        let check = CheckState {
            id: format!("fixture:{id}"),
            status: "passing".into(),
            output: String::new(),
            ttl: None,
            expires_at: None,
            deregister_after: None,
            critical_since: None,
        };
        s.services.insert(
            id,
            ServiceState {
                service: service_view(&body),
                check: Some(check),
            },
        );
        s.index += 1;
        let i = s.index;
        drop(s);
        self.changed.send_replace(i);
    }

    /// Remove an instance directly.
    pub fn remove(&self, id: &str) {
        let mut s = self.state.lock().unwrap();
        s.services.remove(id);
        s.index += 1;
        let i = s.index;
        drop(s);
        self.changed.send_replace(i);
    }
}

impl Drop for ConsulFixture {
    fn drop(&mut self) {
        self.stop();
        self.stop_churn();
        self.sweeper.abort();
    }
}

async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    // The old listener's socket may take a moment to close after abort.
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("consul fixture: cannot bind {addr} again");
}

fn now(s: &State) -> Instant {
    Instant::now() + s.offset
}

/// Expire TTL checks and reap services critical for too long.
///
/// TTL: "If the check is not set to passing within the TTL, the check is
/// set to critical" and `DeregisterCriticalServiceAfter`: "If a check is in
/// the critical state for more than this configured value, then its
/// associated service (and all of its associated checks) will automatically
/// be deregistered" (<https://developer.hashicorp.com/consul/api-docs/agent/check>).
async fn sweep(state: Arc<Mutex<State>>, changed: watch::Sender<u64>) {
    let mut tick = tokio::time::interval(SWEEP);
    loop {
        tick.tick().await;
        let mut s = state.lock().unwrap();
        let t = now(&s);
        let mut bumped = false;
        let mut reap = Vec::new();
        for (id, svc) in s.services.iter_mut() {
            let Some(c) = svc.check.as_mut() else {
                continue;
            };
            if c.status != "critical" && c.expires_at.is_some_and(|e| t >= e) {
                c.status = "critical".into();
                c.output = "TTL expired".into();
                c.critical_since = Some(t);
                bumped = true;
            }
            if let (Some(since), Some(after)) = (c.critical_since, c.deregister_after) {
                if c.status == "critical" && t >= since + after {
                    reap.push(id.clone());
                }
            }
        }
        for id in reap {
            s.services.remove(&id);
            bumped = true;
        }
        if bumped {
            s.index += 1;
            let i = s.index;
            drop(s);
            changed.send_replace(i);
        }
    }
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// Parses Go durations as Consul accepts them (`"5s"`, `"1500ms"`, `"1m"`,
/// `"1m30s"`); `None` if malformed.
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        let n: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let secs = match unit {
            "ns" => n / 1e9,
            "us" | "µs" => n / 1e6,
            "ms" => n / 1e3,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(secs);
        rest = tail;
    }
    Some(total)
}

/// The `Service` object health answers show, from a register body.
fn service_view(body: &Value) -> Value {
    let id = body["ID"]
        .as_str()
        .or(body["Name"].as_str())
        .unwrap_or_default();
    json!({
        "ID": id,
        "Service": body["Name"],
        "Tags": body.get("Tags").cloned().unwrap_or(json!([])),
        "Address": body.get("Address").cloned().unwrap_or(json!("")),
        "Port": body.get("Port").cloned().unwrap_or(json!(0)),
        "Meta": body.get("Meta").cloned().unwrap_or(json!({})),
        "Weights": body.get("Weights").cloned().unwrap_or(json!({"Passing": 1, "Warning": 1})),
    })
}

fn query_params(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

async fn handle(
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let endpoint: &'static str = match (&method, path.as_str()) {
        (&Method::PUT, "/v1/agent/service/register") => "register",
        (&Method::PUT, p) if p.starts_with("/v1/agent/service/deregister/") => "deregister",
        (&Method::PUT, p) if p.starts_with("/v1/agent/check/") => "check_update",
        (&Method::GET, "/v1/catalog/services") => "catalog",
        (&Method::GET, p) if p.starts_with("/v1/health/service/") => "health",
        _ => "other",
    };
    let token = req
        .headers()
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    {
        let mut s = state.lock().unwrap();
        *s.requests.entry(endpoint).or_default() += 1;
        s.tokens.push(token.clone());
        if let Some(required) = &s.required_token {
            if token.as_ref() != Some(required) {
                return respond(StatusCode::FORBIDDEN, "Permission denied");
            }
        }
    }
    let params = query_params(&req);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return respond(StatusCode::BAD_REQUEST, "bad body"),
    };
    match endpoint {
        "register" => register(&state, &changed, &body),
        "deregister" => {
            let id = percent_decode(path.trim_start_matches("/v1/agent/service/deregister/"));
            let mut s = state.lock().unwrap();
            // "Unknown service ID" is a 404 in the agent.
            if s.services.remove(&id).is_none() {
                return respond(StatusCode::NOT_FOUND, format!("Unknown service ID {id:?}"));
            }
            s.index += 1;
            let i = s.index;
            drop(s);
            changed.send_replace(i);
            respond(StatusCode::OK, "")
        }
        "check_update" => check_update(&state, &changed, &path, &params, &body),
        "catalog" | "health" => blocking_read(&state, &changed, endpoint, &path, &params).await,
        _ => respond(
            StatusCode::NOT_FOUND,
            "not implemented by the consul fixture",
        ),
    }
}

/// `PUT /v1/agent/service/register`
/// (<https://developer.hashicorp.com/consul/api-docs/agent/service#register-service>).
/// A TTL check starts `critical` unless the body sets `Status`
/// (<https://developer.hashicorp.com/consul/api-docs/agent/check#status>:
/// "the initial status of the health check ... defaults to critical").
/// Re-registering an instance keeps its check's current status, as the
/// agent does when a definition is re-applied.
fn register(
    state: &Mutex<State>,
    changed: &watch::Sender<u64>,
    body: &Bytes,
) -> Response<Full<Bytes>> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return respond(StatusCode::BAD_REQUEST, "Request decode failed");
    };
    let Some(name) = v["Name"].as_str().filter(|n| !n.is_empty()) else {
        return respond(StatusCode::BAD_REQUEST, "Missing service name");
    };
    let id = v["ID"].as_str().unwrap_or(name).to_string();
    let mut s = state.lock().unwrap();
    s.registrations.push(v.clone());
    let t = now(&s);
    let check = match v.get("Check").filter(|c| c.is_object()) {
        Some(c) => {
            let ttl = c["TTL"].as_str().and_then(go_duration);
            if c["TTL"].is_string() && ttl.is_none() {
                return respond(StatusCode::BAD_REQUEST, "Invalid check TTL");
            }
            let deregister_after = c["DeregisterCriticalServiceAfter"]
                .as_str()
                .and_then(go_duration)
                .map(|d| d.max(MIN_REAP));
            let check_id = c["CheckID"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| format!("service:{id}"));
            let previous = s
                .services
                .get(&id)
                .and_then(|p| p.check.clone())
                .filter(|p| p.id == check_id);
            let status = c["Status"].as_str().map(String::from);
            Some(match previous {
                Some(mut p) => {
                    p.ttl = ttl;
                    p.deregister_after = deregister_after;
                    if let Some(st) = status {
                        p.status = st;
                    }
                    p
                }
                None => {
                    let status = status.unwrap_or_else(|| "critical".into());
                    CheckState {
                        id: check_id,
                        critical_since: (status == "critical").then_some(t),
                        status,
                        output: String::new(),
                        expires_at: ttl.map(|d| t + d),
                        ttl,
                        deregister_after,
                    }
                }
            })
        }
        None => None,
    };
    s.services.insert(
        id,
        ServiceState {
            service: service_view(&v),
            check,
        },
    );
    s.index += 1;
    let i = s.index;
    drop(s);
    changed.send_replace(i);
    respond(StatusCode::OK, "")
}

/// `PUT /v1/agent/check/update/:check_id` (body `{Status, Output}`),
/// `/pass/:check_id`, `/fail/:check_id` (`?note=`)
/// (<https://developer.hashicorp.com/consul/api-docs/agent/check#ttl-check-update>).
/// Any update of a TTL check restarts its TTL. An unknown check is a 404.
/// Only a *status* change bumps the index: the agent syncs output-only
/// changes to the servers lazily (`check_update_interval`), so a check
/// passed every few seconds does not wake every watcher.
fn check_update(
    state: &Mutex<State>,
    changed: &watch::Sender<u64>,
    path: &str,
    params: &HashMap<String, String>,
    body: &Bytes,
) -> Response<Full<Bytes>> {
    let rest = path.trim_start_matches("/v1/agent/check/");
    let Some((verb, id)) = rest.split_once('/') else {
        return respond(StatusCode::NOT_FOUND, "");
    };
    let id = percent_decode(id);
    let (status, output) = match verb {
        "update" => {
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return respond(StatusCode::BAD_REQUEST, "Request decode failed");
            };
            let Some(status) = v["Status"].as_str().map(String::from) else {
                return respond(StatusCode::BAD_REQUEST, "Invalid check status");
            };
            (status, v["Output"].as_str().unwrap_or("").to_string())
        }
        "pass" => (
            "passing".into(),
            params.get("note").cloned().unwrap_or_default(),
        ),
        "warn" => (
            "warning".into(),
            params.get("note").cloned().unwrap_or_default(),
        ),
        "fail" => (
            "critical".into(),
            params.get("note").cloned().unwrap_or_default(),
        ),
        _ => return respond(StatusCode::NOT_FOUND, ""),
    };
    if !matches!(status.as_str(), "passing" | "warning" | "critical") {
        return respond(StatusCode::BAD_REQUEST, "Invalid check status");
    }
    let mut s = state.lock().unwrap();
    let t = now(&s);
    let Some(check) = s
        .services
        .values_mut()
        .filter_map(|svc| svc.check.as_mut())
        .find(|c| c.id == id)
    else {
        return respond(StatusCode::NOT_FOUND, format!("Unknown check ID {id:?}"));
    };
    let status_changed = check.status != status;
    if status_changed {
        check.critical_since = (status == "critical").then_some(t);
    }
    check.status = status;
    check.output = output;
    check.expires_at = check.ttl.map(|d| t + d);
    if status_changed {
        s.index += 1;
        let i = s.index;
        drop(s);
        changed.send_replace(i);
    }
    respond(StatusCode::OK, "")
}

/// A blocking read of the catalog or one service's health.
///
/// "A blocking query ... will wait until the `X-Consul-Index` would be
/// greater than the `index` given or `wait` passes; `wait` defaults to 5m,
/// at most 10m, and Consul adds a random jitter of up to wait/16"
/// (<https://developer.hashicorp.com/consul/api-docs/features/blocking>).
/// Without `index` (or with 0) the read returns at once. While the fixture
/// is forced to index 0, it answers at once with `X-Consul-Index: 0`.
async fn blocking_read(
    state: &Mutex<State>,
    changed: &watch::Sender<u64>,
    endpoint: &'static str,
    path: &str,
    params: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    let min_index: u64 = params
        .get("index")
        .and_then(|i| i.parse().ok())
        .unwrap_or(0);
    let wait = params
        .get("wait")
        .and_then(|w| go_duration(w))
        .unwrap_or(DEFAULT_WAIT)
        .min(MAX_WAIT);
    let jitter = wait.mul_f64(fastrand::f64() / 16.0);
    let deadline = Instant::now() + wait + jitter;
    if params.contains_key("stale") {
        state.lock().unwrap().stale_reads += 1;
    }
    let mut rx = changed.subscribe();
    loop {
        let (index, zero) = {
            let s = state.lock().unwrap();
            (s.index, s.zero_index)
        };
        if zero || min_index == 0 || index > min_index || Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { break },
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
    let s = state.lock().unwrap();
    let body = if endpoint == "catalog" {
        // "consul" is always in the catalog, as in a real cluster.
        let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
        services.insert("consul".into(), Vec::new());
        for svc in s.services.values() {
            let name = svc.service["Service"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let tags = services.entry(name).or_default();
            for t in svc.service["Tags"].as_array().into_iter().flatten() {
                if let Some(t) = t.as_str() {
                    if !tags.iter().any(|x| x == t) {
                        tags.push(t.to_string());
                    }
                }
            }
        }
        json!(services)
    } else {
        let name = percent_decode(path.trim_start_matches("/v1/health/service/"));
        // `passing`: "only nodes with all checks passing" (health docs).
        let passing_only = params.contains_key("passing");
        let entries: Vec<Value> = s
            .services
            .values()
            .filter(|svc| svc.service["Service"] == name.as_str())
            .filter(|svc| {
                !passing_only || svc.check.as_ref().is_none_or(|c| c.status == "passing")
            })
            .map(|svc| {
                let mut checks = vec![json!({
                    "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
                    "ServiceID": "", "Output": "Agent alive and reachable",
                })];
                if let Some(c) = &svc.check {
                    checks.push(json!({
                        "CheckID": c.id, "Status": c.status, "Output": c.output,
                        "ServiceID": svc.service["ID"], "ServiceName": svc.service["Service"],
                    }));
                }
                json!({
                    "Node": { "Node": "consul-fixture", "Address": "127.0.0.1", "Datacenter": "dc1" },
                    "Service": svc.service,
                    "Checks": checks,
                })
            })
            .collect();
        json!(entries)
    };
    let index = if s.zero_index { 0 } else { s.index };
    drop(s);
    let mut r = respond(StatusCode::OK, body.to_string());
    let h = r.headers_mut();
    h.insert("x-consul-index", index.into());
    h.insert(
        "x-consul-knownleader",
        http::HeaderValue::from_static("true"),
    );
    h.insert("x-consul-lastcontact", http::HeaderValue::from_static("0"));
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(go_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(go_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("x"), None);
        assert_eq!(percent_decode("outrigger%3Ab-1"), "outrigger:b-1");
    }
}
