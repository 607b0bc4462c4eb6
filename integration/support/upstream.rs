//! An in-process upstream service: the thing behind a sidecar.
//!
//! Relay tests need a real HTTP server whose behaviour they control and
//! whose traffic they can inspect: which instance answered, what headers
//! arrived (hop-by-hop stripped? `x-request-id` added?), with which
//! protocol version. [`Upstream`] is a hyper server (HTTP/1.1 and h2c on the
//! same port, with upgrades) on a free loopback port that records every
//! request and can be told to fail ([`Upstream::set_status`]), slow down
//! ([`Upstream::set_delay`]), fail its health check
//! ([`Upstream::set_health`]), or vanish and come back on the same port
//! ([`Upstream::stop`], [`Upstream::restart`]). Its routes are described in
//! [`routes`].

mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::ports::{free_port, loopback};
use super::wait::wait_until;

/// One request as the upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target as received: origin form (`/a?b`) or, for an
    /// absolute-form HTTP/1.1 request line and for HTTP/2, the full URI.
    pub uri: String,
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub version: String,
    /// Header fields in arrival order (names lowercase).
    pub headers: Vec<(String, String)>,
    /// Request body bytes read.
    pub body_len: u64,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Shared control and recording state of one upstream.
#[derive(Debug)]
struct State {
    name: String,
    recorded: Mutex<Vec<RecordedRequest>>,
    health_checks: AtomicU64,
    status: AtomicU16,
    health: AtomicU16,
    delay_ms: AtomicU64,
    /// Speak HTTP/1.x only, as most web frameworks do (hyper's server
    /// then closes a connection that starts with the HTTP/2 preface).
    http1_only: bool,
    /// Every task of the server (connections, h2 streams, WebSockets), so
    /// that [`Upstream::stop`] can end them all.
    tasks: Mutex<JoinSet<()>>,
}

impl State {
    fn record(&self, request: RecordedRequest) {
        self.recorded.lock().unwrap().push(request);
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap();
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::Relaxed))
    }
}

/// A hyper executor that runs h2 stream tasks in the upstream's task set.
#[derive(Clone)]
struct StateExecutor(Arc<State>);

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for StateExecutor {
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

#[derive(Debug)]
struct Running {
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

/// A recording HTTP/1.1 + h2c + WebSocket test server on `127.0.0.1`.
/// Dropping it aborts the listener and every connection.
#[derive(Debug)]
pub struct Upstream {
    state: Arc<State>,
    addr: SocketAddr,
    running: Option<Running>,
}

impl Upstream {
    /// Starts an upstream called `name` (the `name` of its JSON responses)
    /// on a free port.
    pub async fn start(name: &str) -> Upstream {
        Self::start_on(name, free_port()).await
    }

    /// Starts an upstream that speaks HTTP/1.x only, on a free port.
    pub async fn start_http1_only(name: &str) -> Upstream {
        Self::start_inner(name, free_port(), true).await
    }

    /// Starts an upstream on a given loopback port.
    pub async fn start_on(name: &str, port: u16) -> Upstream {
        Self::start_inner(name, port, false).await
    }

    async fn start_inner(name: &str, port: u16, http1_only: bool) -> Upstream {
        let state = Arc::new(State {
            name: name.to_string(),
            recorded: Mutex::new(Vec::new()),
            health_checks: AtomicU64::new(0),
            status: AtomicU16::new(200),
            health: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            http1_only,
            tasks: Mutex::new(JoinSet::new()),
        });
        let mut upstream = Upstream {
            state,
            addr: loopback(port),
            running: None,
        };
        upstream.listen().await;
        upstream
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests received, `/healthz` excluded. A request counts once its
    /// body has been read (for `/echo`: once the echo ends), before the
    /// response completes.
    pub fn requests(&self) -> u64 {
        self.state.recorded.lock().unwrap().len() as u64
    }

    /// Every request received so far, `/healthz` excluded.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.state.recorded.lock().unwrap().clone()
    }

    /// The most recent request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.state.recorded.lock().unwrap().last().cloned()
    }

    /// Forgets recorded requests (the count restarts at 0).
    pub fn clear(&self) {
        self.state.recorded.lock().unwrap().clear();
    }

    /// `/healthz` requests received (a sidecar's health probes).
    pub fn health_checks(&self) -> u64 {
        self.state.health_checks.load(Ordering::Relaxed)
    }

    /// Answer every route that would return 200 with `status` instead
    /// (`/healthz`, `/ws`, `/status/<code>`, `/204`, `/304` unaffected).
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::Relaxed);
    }

    /// Wait this long before sending each response head (after reading the
    /// request body; `/healthz` and `/ws` unaffected).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// The status `/healthz` returns (default 200).
    pub fn set_health(&self, status: u16) {
        self.state.health.store(status, Ordering::Relaxed);
    }

    /// Whether the listener is open.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Closes the listener and every open connection (including WebSockets
    /// and in-flight requests). When it returns, connects are refused.
    pub async fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        let _ = running.shutdown.send(true);
        let _ = running.accept.await;
        loop {
            let mut tasks = std::mem::take(&mut *self.state.tasks.lock().unwrap());
            if tasks.is_empty() {
                break;
            }
            tasks.shutdown().await;
        }
    }

    /// Listens again on the same port, with the same state and settings.
    /// A no-op while running.
    pub async fn restart(&mut self) {
        if self.running.is_none() {
            self.listen().await;
        }
    }

    async fn listen(&mut self) {
        let addr = self.addr;
        let what = format!("upstream {} to bind {addr}", self.state.name);
        let listener = wait_until(&what, Duration::from_secs(5), || TcpListener::bind(addr)).await;
        let (shutdown, rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, self.state.clone(), rx));
        self.running = Some(Running { shutdown, accept });
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.accept.abort();
        }
        self.state.tasks.lock().unwrap().abort_all();
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    state.spawn(serve_connection(stream, state.clone()));
                }
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    let _ = stream.set_nodelay(true);
    let executor = StateExecutor(state.clone());
    let http1_only = state.http1_only;
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(routes::handle(state, req).await) }
    });
    if http1_only {
        // hyper-util's `auto` ignores `http1_only` when upgrades are on.
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await;
        return;
    }
    let _ = auto::Builder::new(executor)
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}
