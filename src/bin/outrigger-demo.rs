//! `outrigger-demo`: the tiny service that the compose mesh and the tests put
//! behind sidecars (A calls B, B calls C).
//!
//! It knows nothing about the mesh, on purpose: like any real service, it
//! calls its peers by plain name (`http://b/`) through whatever `HTTP_PROXY`
//! says, which in the mesh is its sidecar's outbound listener. That keeps the
//! demo honest — if the mesh needs the service to change, the mesh is wrong.
//!
//! # Endpoints
//! - `GET /`: `{"service","instance","calls":[{"service","status","body"}]}`,
//!   after calling every `--calls` peer (concurrently, in the given order).
//!   `status` is `null` when no HTTP response arrived (connect error,
//!   timeout); `body` is then the error text. A failed call still gives 200,
//!   unless `--strict`, which turns it into 502.
//! - `GET /healthz`: `ok`.
//! - `POST /admin/fail`, `POST /admin/slow?ms=N`, `POST /admin/recover`: the
//!   fault switch for demos (`/` and `/healthz` answer 500 while failing;
//!   `/` waits N ms while slow). `GET /admin/state` shows it.
//!
//! # Layout
//! - [`Args`]: the command line (every flag has a `DEMO_*` env twin).
//! - [`Faults`]: the fault switch, shared by all connections.
//! - [`Demo`]: one instance's identity, peers and HTTP client; routes requests.
//! - [`ProxyConnector`]: sends every outbound connection to the HTTP proxy.
//! - [`serve`]: the accept loop with graceful shutdown.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Headers copied from the incoming request to every outgoing call, so one
/// request can be followed across A → B → C in logs and traces.
const PROPAGATED: [HeaderName; 2] = [
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("traceparent"),
];

/// Largest peer response body we read, in bytes. A peer is untrusted input;
/// the demo's own answers are a few hundred bytes, so 1 MiB is generous.
const MAX_PEER_BODY: usize = 1024 * 1024;

/// How long in-flight requests may take to finish after SIGTERM/SIGINT before
/// the process exits anyway. Below Docker's default 10 s stop grace period,
/// so we exit on our own terms rather than being SIGKILLed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. EMFILE) so a persistent error does not
/// spin the CPU; the connections already open keep being served meanwhile.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// A tiny HTTP service for the outrigger mesh demo: it answers `GET /` with
/// its identity and the answers of the peers it calls.
#[derive(Debug, Parser)]
#[command(name = "outrigger-demo", version)]
struct Args {
    /// Service name reported in responses (e.g. `a`).
    #[arg(long, env = "DEMO_NAME")]
    name: String,

    /// Address to listen on.
    #[arg(long, env = "DEMO_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,

    /// Peers to call on `GET /`, comma-separated (e.g. `b,c`). Each is
    /// called as `GET http://<name>/` through `HTTP_PROXY` when it is set.
    #[arg(long, env = "DEMO_CALLS", value_delimiter = ',')]
    calls: Vec<String>,

    /// Instance id reported in responses [default: $HOSTNAME, else the
    /// kernel's hostname].
    #[arg(long, env = "DEMO_INSTANCE")]
    instance: Option<String>,

    /// Answer 502 on `GET /` when any peer call fails (default: still 200,
    /// with the error in that call's entry).
    #[arg(long, env = "DEMO_STRICT", value_parser = clap::builder::BoolishValueParser::new())]
    strict: bool,

    /// Start in the failing state (`/` and `/healthz` answer 500).
    #[arg(long, env = "DEMO_FAIL", value_parser = clap::builder::BoolishValueParser::new())]
    fail: bool,

    /// Start with this much added latency on `GET /`, in milliseconds.
    #[arg(long, env = "DEMO_SLOW_MS", default_value_t = 0)]
    slow_ms: u64,

    /// Timeout for each peer call, in milliseconds.
    #[arg(long, env = "DEMO_CALL_TIMEOUT_MS", default_value_t = 5000)]
    call_timeout_ms: u64,
}

/// The demo's fault switch. Atomics, not a lock: every request reads it and
/// only the admin endpoints write it.
#[derive(Debug, Default)]
struct Faults {
    /// While set, `/` and `/healthz` answer 500 (as a crashed-but-listening
    /// service would), so the sidecar's probe withdraws the registration.
    fail: AtomicBool,
    /// Latency added to `GET /`, in milliseconds; 0 = none.
    slow_ms: AtomicU64,
}

/// Where outbound calls go: straight to the peer, or through an HTTP proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// No proxy configured: dial `<name>:80` itself.
    Direct,
    /// `host:port` of the proxy; requests are sent in absolute form.
    Proxy(String),
}

/// Connects every outbound call either to the proxy (marking the connection
/// as proxied, which makes hyper send absolute-form `GET http://b/`) or, with
/// no proxy, to the URI's own host.
#[derive(Debug, Clone)]
struct ProxyConnector {
    route: Route,
    http: HttpConnector,
}

/// A TCP connection that remembers whether it leads to a proxy.
struct DemoStream {
    io: TokioIo<TcpStream>,
    /// Reported to hyper through [`Connection`]; selects absolute-form.
    proxied: bool,
}

/// The answer to `GET /`. A struct rather than `json!` so the keys keep
/// this order (identity first), which is what a person reading curl expects.
#[derive(Debug, Serialize)]
struct RootBody<'a> {
    service: &'a str,
    instance: &'a str,
    calls: Vec<CallResult>,
}

/// The outcome of one peer call, as it appears in `calls[]`.
#[derive(Debug, Serialize)]
struct CallResult {
    service: String,
    /// `None` when no HTTP response arrived.
    status: Option<u16>,
    /// The peer's JSON, its body as text if it is not JSON, or the error.
    body: Value,
}

/// One demo instance: who it is, whom it calls, and how.
struct Demo {
    /// Service name, reported so a caller sees which service answered.
    name: String,
    /// Replica id, reported so load balancing across replicas is visible.
    instance: String,
    /// Peers called on every `GET /`, in report order; empty for a leaf.
    calls: Vec<String>,
    /// Whether a failed peer call fails our own answer (502).
    strict: bool,
    /// Bound on each peer call, connect included, so `/` never hangs.
    call_timeout: Duration,
    /// The fault switch; lives as long as the process.
    faults: Faults,
    /// One pooled client for all peers: keep-alive connections to the proxy
    /// (or to each peer) are reused across requests.
    client: Client<ProxyConnector, Full<Bytes>>,
}

/// Everything the demo can answer with.
type Body = Full<Bytes>;

// === impl Route ===

impl Route {
    /// Reads the proxy as Go's net/http does: `HTTP_PROXY`, else
    /// `http_proxy`; an empty value means none. (curl reads only the
    /// lowercase one, which matters for `curl` healthchecks in containers.)
    fn from_env() -> Result<Self, String> {
        let value = ["HTTP_PROXY", "http_proxy"]
            .iter()
            .filter_map(|k| std::env::var(k).ok())
            .find(|v| !v.trim().is_empty());
        match value {
            None => Ok(Route::Direct),
            Some(v) => Self::parse(&v),
        }
    }

    /// Accepts `http://host:port[/]`, `host:port` and `http://host` (port 80).
    fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        let with_scheme = if value.contains("://") {
            value.to_string()
        } else {
            format!("http://{value}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| format!("invalid proxy URL {value:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "proxy URL {value:?}: only http:// proxies are supported"
            ));
        }
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("proxy URL {value:?} has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        Ok(Route::Proxy(format!("{host}:{port}")))
    }
}

// === impl ProxyConnector ===

impl tower::Service<Uri> for ProxyConnector {
    type Response = DemoStream;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<DemoStream, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (target, proxied) = match &self.route {
            Route::Direct => (Ok(uri), false),
            Route::Proxy(addr) => (format!("http://{addr}").parse::<Uri>(), true),
        };
        let mut http = self.http.clone();
        Box::pin(async move {
            let io = http.call(target?).await?;
            Ok(DemoStream { io, proxied })
        })
    }
}

// === impl DemoStream ===

impl Connection for DemoStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for DemoStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for DemoStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

// === impl CallResult ===

impl CallResult {
    /// A call failed if no response came or the peer did not answer 2xx.
    fn failed(&self) -> bool {
        !matches!(self.status, Some(s) if (200..300).contains(&s))
    }
}

// === impl Demo ===

impl Demo {
    fn new(args: &Args, route: Route) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(args.call_timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(ProxyConnector { route, http });
        Demo {
            name: args.name.clone(),
            instance: args.instance.clone().unwrap_or_else(default_instance),
            calls: args
                .calls
                .iter()
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect(),
            strict: args.strict,
            call_timeout: Duration::from_millis(args.call_timeout_ms),
            faults: Faults {
                fail: AtomicBool::new(args.fail),
                slow_ms: AtomicU64::new(args.slow_ms),
            },
            client,
        }
    }

    /// Routes one request, then logs it in one line.
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let request_id = header_str(&req, "x-request-id").to_string();
        let res = self.route(req).await;
        info!(
            %method,
            %path,
            status = res.status().as_u16(),
            duration_ms = format_args!("{:.1}", start.elapsed().as_secs_f64() * 1000.0),
            request_id,
            "request"
        );
        Ok(res)
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let failing = self.faults.fail.load(Ordering::Relaxed);
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") if failing => {
                text(StatusCode::INTERNAL_SERVER_ERROR, "failing\n")
            }
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET | &Method::HEAD, "/") => self.root(&req).await,
            (&Method::POST, "/admin/fail") => {
                self.faults.fail.store(true, Ordering::Relaxed);
                warn!(service = %self.name, "fault switch: failing");
                self.state()
            }
            (&Method::POST, "/admin/slow") => match query_ms(req.uri().query()) {
                Some(ms) => {
                    self.faults.slow_ms.store(ms, Ordering::Relaxed);
                    warn!(service = %self.name, ms, "fault switch: slow");
                    self.state()
                }
                None => text(StatusCode::BAD_REQUEST, "expected ?ms=<milliseconds>\n"),
            },
            (&Method::POST, "/admin/recover") => {
                self.faults.fail.store(false, Ordering::Relaxed);
                self.faults.slow_ms.store(0, Ordering::Relaxed);
                info!(service = %self.name, "fault switch: recovered");
                self.state()
            }
            (&Method::GET, "/admin/state") => self.state(),
            (_, "/" | "/healthz" | "/admin/state") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            (_, "/admin/fail" | "/admin/slow" | "/admin/recover") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// `GET /`: call every peer, then report who we are and what they said.
    async fn root(&self, req: &Request<Incoming>) -> Response<Body> {
        let slow = self.faults.slow_ms.load(Ordering::Relaxed);
        if slow > 0 {
            tokio::time::sleep(Duration::from_millis(slow)).await;
        }
        // Checked after the delay, so a switch flipped meanwhile is honoured.
        if self.faults.fail.load(Ordering::Relaxed) {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "failing\n");
        }

        let propagated: Vec<(HeaderName, HeaderValue)> = PROPAGATED
            .iter()
            .filter_map(|name| Some((name.clone(), req.headers().get(name)?.clone())))
            .collect();
        let results = futures_util::future::join_all(
            self.calls.iter().map(|peer| self.call(peer, &propagated)),
        )
        .await;

        let status = if self.strict && results.iter().any(CallResult::failed) {
            StatusCode::BAD_GATEWAY
        } else {
            StatusCode::OK
        };
        let body = RootBody {
            service: &self.name,
            instance: &self.instance,
            calls: results,
        };
        let mut res = json_response(status, &body);
        // Echo the request id so a client can match its answer to the logs.
        for (name, value) in propagated.iter().filter(|(n, _)| n == PROPAGATED[0]) {
            res.headers_mut().insert(name.clone(), value.clone());
        }
        res
    }

    /// `GET http://<peer>/`, bounded in time and in body size; never panics
    /// on what the peer (or the proxy) sends back.
    async fn call(&self, peer: &str, headers: &[(HeaderName, HeaderValue)]) -> CallResult {
        let outcome = tokio::time::timeout(self.call_timeout, self.fetch(peer, headers)).await;
        let (status, body) = match outcome {
            Ok(Ok((status, body))) => (Some(status.as_u16()), body),
            Ok(Err(e)) => (None, Value::String(e)),
            Err(_) => (
                None,
                Value::String(format!(
                    "timed out after {} ms",
                    self.call_timeout.as_millis()
                )),
            ),
        };
        CallResult {
            service: peer.to_string(),
            status,
            body,
        }
    }

    async fn fetch(
        &self,
        peer: &str,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<(StatusCode, Value), String> {
        let uri: Uri = format!("http://{peer}/")
            .parse()
            .map_err(|e| format!("invalid peer name {peer:?}: {e}"))?;
        let mut req = Request::get(uri);
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("building request: {e}"))?;
        let res = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("calling {peer}: {}", error_chain(&e)))?;
        let status = res.status();
        let bytes = Limited::new(res.into_body(), MAX_PEER_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading {peer}'s response: {e}"))?
            .to_bytes();
        Ok((status, parse_body(&bytes)))
    }

    fn state(&self) -> Response<Body> {
        json_response(
            StatusCode::OK,
            &json!({
                "fail": self.faults.fail.load(Ordering::Relaxed),
                "slow_ms": self.faults.slow_ms.load(Ordering::Relaxed),
            }),
        )
    }
}

// === helpers ===

/// JSON if the peer sent JSON, else its body as (lossy) text.
fn parse_body(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).trim_end().to_string()))
}

/// `ms=300` out of a query string; `None` if absent or not a number.
fn query_ms(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "ms")
        .and_then(|(_, v)| v.parse().ok())
}

fn header_str<'a, B>(req: &'a Request<B>, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

/// An error with its causes, because hyper's top-level errors ("client
/// error (Connect)") hide the useful part ("Connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    // Serializing plain strings, numbers and `Value`s cannot fail; if it ever
    // did, an empty object is still valid JSON.
    let mut bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    let mut res = Response::new(Full::new(Bytes::from(bytes)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// `$HOSTNAME` (set by Docker and by login shells), else the kernel's.
fn default_instance() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

// === serve ===

/// Serves `demo` on `listener` (HTTP/1.1 and h2c) until `shutdown` resolves;
/// then stops accepting, asks every connection to finish its in-flight
/// requests, and waits for them up to [`DRAIN_TIMEOUT`].
async fn serve(listener: TcpListener, demo: Arc<Demo>, shutdown: impl Future<Output = ()>) {
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            // Reap finished connection tasks so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        let demo = demo.clone();
        let mut drain_rx = drain_rx.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| demo.clone().handle(req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                // The guard `wait_for` returns is not `Send`: drop it inside.
                () = async { let _ = drain_rx.wait_for(|d| *d).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // Clients that hang up mid-request are routine, not errors.
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        });
    }

    drop(listener);
    let _ = drain_tx.send(true);
    info!(
        connections = conns.len(),
        "shutting down: draining connections"
    );
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = conns.len(),
            "drain timed out; closing remaining connections"
        );
        conns.abort_all();
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("SIGINT received"),
        () = term => info!("SIGTERM received"),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in `docker logs` or CI.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let args = Args::parse();
    let route = match Route::from_env() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outrigger-demo: {e}");
            // EX_USAGE, as for any other bad configuration.
            return std::process::ExitCode::from(64);
        }
    };
    let demo = Arc::new(Demo::new(&args, route.clone()));
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("outrigger-demo: cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    info!(
        service = %demo.name,
        instance = %demo.instance,
        listen = %args.listen,
        calls = ?demo.calls,
        proxy = ?route,
        strict = demo.strict,
        "outrigger-demo listening"
    );
    serve(listener, demo, shutdown_signal()).await;
    info!("bye");
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use std::sync::Mutex;

    fn args(name: &str, calls: &[&str]) -> Args {
        Args {
            name: name.to_string(),
            listen: "127.0.0.1:0".parse().unwrap(),
            calls: calls.iter().map(|c| c.to_string()).collect(),
            instance: Some(format!("{name}-1")),
            strict: false,
            fail: false,
            slow_ms: 0,
            call_timeout_ms: 2000,
        }
    }

    /// Starts a demo on an ephemeral loopback port; returns its address and
    /// a sender that shuts it down.
    async fn start(demo: Demo) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, Arc::new(demo), async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    async fn send(
        addr: SocketAddr,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path_and_query}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = client
            .request(req.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    }

    async fn get_json(addr: SocketAddr, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let (status, _, body) = send(addr, Method::GET, "/", headers).await;
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// A stand-in for the sidecar's outbound listener: records each request
    /// line's target and headers, and answers by the `Host` it was asked for.
    async fn fake_proxy(
        seen: Arc<Mutex<Vec<(String, http::HeaderMap)>>>,
        answers: fn(&str) -> (StatusCode, &'static str),
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let target = req.uri().to_string();
                        seen.lock().unwrap().push((target, req.headers().clone()));
                        let host = req.uri().host().unwrap_or("").to_string();
                        let (status, body) = answers(&host);
                        let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                        *res.status_mut() = status;
                        async move { Ok::<_, Infallible>(res) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[test]
    fn proxy_env_values_parse() {
        let p = |s: &str| Route::parse(s);
        assert_eq!(
            p("http://127.0.0.1:15001"),
            Ok(Route::Proxy("127.0.0.1:15001".into()))
        );
        assert_eq!(
            p("http://127.0.0.1:15001/"),
            Ok(Route::Proxy("127.0.0.1:15001".into()))
        );
        assert_eq!(
            p("127.0.0.1:15001"),
            Ok(Route::Proxy("127.0.0.1:15001".into()))
        );
        assert_eq!(p("http://proxy"), Ok(Route::Proxy("proxy:80".into())));
        assert!(p("https://127.0.0.1:15001").is_err());
        assert!(p("http://").is_err());
    }

    #[test]
    fn slow_query_parses_ms_only() {
        assert_eq!(query_ms(Some("ms=300")), Some(300));
        assert_eq!(query_ms(Some("x=1&ms=5")), Some(5));
        assert_eq!(query_ms(Some("ms=abc")), None);
        assert_eq!(query_ms(Some("ms")), None);
        assert_eq!(query_ms(None), None);
    }

    #[test]
    fn peer_bodies_are_json_or_text() {
        assert_eq!(parse_body(br#"{"service":"b"}"#), json!({"service": "b"}));
        assert_eq!(parse_body(b"no route to c\n"), json!("no route to c"));
        assert_eq!(parse_body(b"\xff\xfe"), json!("\u{fffd}\u{fffd}"));
    }

    #[test]
    fn only_2xx_calls_succeed() {
        let r = |status| CallResult {
            service: "b".into(),
            status,
            body: Value::Null,
        };
        assert!(!r(Some(200)).failed());
        assert!(!r(Some(204)).failed());
        assert!(r(Some(503)).failed());
        assert!(r(None).failed());
    }

    #[test]
    fn cli_and_env_flags() {
        let a = Args::try_parse_from([
            "outrigger-demo",
            "--name",
            "a",
            "--calls",
            "b,c",
            "--strict",
        ])
        .unwrap();
        assert_eq!(a.calls, vec!["b", "c"]);
        assert!(a.strict);
        assert_eq!(a.listen, "0.0.0.0:8080".parse().unwrap());
    }

    #[tokio::test]
    async fn leaf_answers_identity_and_health() {
        let (addr, _stop) = start(Demo::new(&args("c", &[]), Route::Direct)).await;
        let (status, headers, raw) = send(addr, Method::GET, "/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "application/json");
        // Identity first, as documented, so it reads well in curl.
        assert_eq!(
            &raw[..],
            &b"{\"service\":\"c\",\"instance\":\"c-1\",\"calls\":[]}\n"[..]
        );
        let (status, _, body) = send(addr, Method::GET, "/healthz", &[]).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
        let (status, _, _) = send(addr, Method::GET, "/nope", &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) = send(addr, Method::GET, "/admin/fail", &[]).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn calls_go_through_the_proxy_in_absolute_form_with_trace_headers() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let proxy = fake_proxy(seen.clone(), |host| match host {
            "b" => (
                StatusCode::OK,
                r#"{"service":"b","instance":"b-1","calls":[]}"#,
            ),
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy endpoint for service c",
            ),
        })
        .await;
        let route = Route::Proxy(proxy.to_string());
        let (addr, _stop) = start(Demo::new(&args("a", &["b", "c"]), route)).await;

        let headers = [("x-request-id", "req-42"), ("traceparent", "00-abc-def-01")];
        let (status, body) = get_json(addr, &headers).await;
        assert_eq!(status, StatusCode::OK, "non-strict answers 200: {body}");
        assert_eq!(
            body,
            json!({
                "service": "a",
                "instance": "a-1",
                "calls": [
                    {"service": "b", "status": 200,
                     "body": {"service": "b", "instance": "b-1", "calls": []}},
                    {"service": "c", "status": 503,
                     "body": "no healthy endpoint for service c"},
                ],
            })
        );

        let seen = seen.lock().unwrap();
        let mut targets: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
        targets.sort();
        assert_eq!(targets, ["http://b/", "http://c/"]);
        for (_, h) in seen.iter() {
            assert_eq!(h["x-request-id"], "req-42");
            assert_eq!(h["traceparent"], "00-abc-def-01");
        }
    }

    #[tokio::test]
    async fn strict_turns_a_failed_call_into_502() {
        // Port 1 on loopback: nothing listens, so the connect is refused.
        let mut a = args("a", &["b"]);
        a.strict = true;
        let (addr, _stop) = start(Demo::new(&a, Route::Proxy("127.0.0.1:1".into()))).await;
        let (status, body) = get_json(addr, &[]).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(body["calls"][0]["service"], "b");
        assert_eq!(body["calls"][0]["status"], Value::Null);
        let err = body["calls"][0]["body"].as_str().unwrap();
        assert!(err.contains("calling b"), "{err}");
    }

    #[tokio::test]
    async fn direct_calls_reach_the_peer_without_a_proxy() {
        let (c, _stop_c) = start(Demo::new(&args("c", &[]), Route::Direct)).await;
        // With no proxy the peer "name" is dialled as-is, so use host:port.
        let peer = c.to_string();
        let (a, _stop_a) = start(Demo::new(&args("a", &[&peer]), Route::Direct)).await;
        let (status, body) = get_json(a, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["calls"][0]["status"], 200);
        assert_eq!(body["calls"][0]["body"]["service"], "c");
    }

    #[tokio::test]
    async fn fault_switch_fails_slows_and_recovers() {
        let (addr, _stop) = start(Demo::new(&args("b", &[]), Route::Direct)).await;

        let (status, _, _) = send(addr, Method::POST, "/admin/fail", &[]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = send(addr, Method::GET, "/healthz", &[]).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let (status, _, _) = send(addr, Method::GET, "/", &[]).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);

        let (status, _, _) = send(addr, Method::POST, "/admin/recover", &[]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = send(addr, Method::GET, "/healthz", &[]).await;
        assert_eq!(status, StatusCode::OK);

        let (status, _, _) = send(addr, Method::POST, "/admin/slow?ms=bad", &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _, body) = send(addr, Method::POST, "/admin/slow?ms=150", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"fail": false, "slow_ms": 150})
        );
        let started = Instant::now();
        let (status, _) = get_json(addr, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(150));
        // Health checks are never slowed: a slow service is still alive.
        let started = Instant::now();
        send(addr, Method::GET, "/healthz", &[]).await;
        assert!(started.elapsed() < Duration::from_millis(150));
    }

    #[tokio::test]
    async fn initial_state_comes_from_flags() {
        let mut a = args("b", &[]);
        a.fail = true;
        let (addr, _stop) = start(Demo::new(&a, Route::Direct)).await;
        let (status, _, _) = send(addr, Method::GET, "/healthz", &[]).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn shutdown_drains_and_returns() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut a = args("b", &[]);
        a.slow_ms = 200;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(Demo::new(&a, Route::Direct)),
            async {
                let _ = rx.await;
            },
        ));
        // A request in flight when shutdown starts still gets its answer.
        let in_flight = tokio::spawn(get_json(addr, &[]));
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(()).unwrap();
        let (status, _) = in_flight.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("serve returns after draining")
            .unwrap();
    }
}
