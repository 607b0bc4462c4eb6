//! End-to-end test of the compose mesh: `docker-compose.yml` at the repo
//! root, as a user runs it, with Docker Compose v2.
//!
//! The scenario: bring the A → B → C mesh up from the offline images, wait
//! for every sidecar's healthcheck, check that `GET localhost:8080/` walks
//! the whole chain and that both replicas of b and of c serve; then, under
//! steady load on the published ingress, SIGKILL b1's sidecar (`docker
//! kill`), require zero failed requests and b1's registration to leave etcd
//! within its lease TTL + 1 s; restart the sidecar (`docker start`) and
//! require b1 to get traffic again within seconds; finally `docker compose
//! down -v` and require that nothing of the project is left behind.
//!
//! The mesh runs on mTLS (the one-shot `certs` service must complete
//! first): the test checks that b1's sidecar counted mTLS handshakes, that
//! plaintext to its inbound listener gets no answer, and that c's allow list
//! (only b) refuses a with 403.
//!
//! Every app runs with `DEMO_STRICT=true` (set in docker-compose.yml), so a
//! failed hop anywhere in the chain turns into a non-2xx at the top; on top
//! of that, every answer's JSON must show a complete, successful a → b → c
//! chain, so the test fails if failover ever breaks.
//!
//! Requirements (the test never skips; it fails and says how to fix):
//! - Docker Engine and the Compose v2 plugin (`scripts/install-deps.sh`);
//! - the images, `OUTRIGGER_IMAGE` / `ETCD_IMAGE` (default `outrigger:local`
//!   / `outrigger-etcd:local`, built by `scripts/offline-images.sh`, which
//!   `scripts/test.sh` runs before the tests);
//! - host port 8080 free.
//!
//! Run alone with `cargo test --test compose -- --nocapture` to see timings.

// The shared harness: only its clients and waits are used here, so its
// re-exports for the other suites would warn as unused imports.
#[allow(unused_imports)]
#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinSet;
use tokio::time::Instant;

use support::client::{collect, dial_client, get, DialConnector, HttpClient};

/// One-shot services: they must run to completion with exit code 0.
const ONE_SHOT: [&str; 1] = ["certs"];
/// Every long-running service in docker-compose.yml.
const SERVICES: [&str; 11] = [
    "etcd",
    "a",
    "b1",
    "b2",
    "c1",
    "c2",
    "a-sidecar",
    "b1-sidecar",
    "b2-sidecar",
    "c1-sidecar",
    "c2-sidecar",
];
/// The services with a healthcheck, which must all report `healthy`.
const HEALTHCHECKED: [&str; 6] = [
    "etcd",
    "a-sidecar",
    "b1-sidecar",
    "b2-sidecar",
    "c1-sidecar",
    "c2-sidecar",
];
/// The ingress as published on the host (`ports: 8080:8080` on service a).
const HOST_PORT: u16 = 8080;
const URL: &str = "http://localhost:8080/";
/// `[registry] ttl` in config/b.toml.
const TTL: Duration = Duration::from_secs(5);
/// Requests per second of the steady load.
const RATE: u32 = 80;
/// Latency added to every b replica's `GET /` during the load (the demo's
/// fault switch), so that requests are in flight on b1 when its sidecar dies:
/// they must be retried on b2 too, not only new connections refused by b1.
const B_SLOW_MS: u32 = 50;
/// `docker compose up` until every healthcheck passes.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one request through the mesh may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After `docker start`, b1 must answer again within this.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Where b1's sidecar registers (prefix `/outrigger`, service b, instance b1).
const B_PREFIX: &str = "/outrigger/services/b/";
const B1_KEY: &str = "/outrigger/services/b/b1";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn image_env() -> Vec<(&'static str, String)> {
    let pick = |var: &str, default: &str| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| default.to_string())
    };
    vec![
        (
            "OUTRIGGER_IMAGE",
            pick("OUTRIGGER_IMAGE", "outrigger:local"),
        ),
        ("ETCD_IMAGE", pick("ETCD_IMAGE", "outrigger-etcd:local")),
    ]
}

// === running commands =================================================================

/// The command line, for messages.
fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// stdout if the command exits 0; otherwise what it said and how it ended.
fn check_output(what: &str, output: std::io::Result<Output>) -> Result<String, String> {
    match output {
        Err(e) => Err(format!("`{what}` could not run: {e}")),
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err(format!(
            "`{what}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// Runs `cmd` to completion, blocking (for preflight checks and `Drop`).
fn run_sync(mut cmd: Command) -> Result<String, String> {
    let what = show(&cmd);
    cmd.stdin(Stdio::null());
    check_output(&what, cmd.output())
}

/// Runs `cmd` to completion without blocking the runtime (the load keeps
/// running meanwhile), within `limit`.
async fn run_async(cmd: Command, limit: Duration) -> Result<String, String> {
    let what = show(&cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    match tokio::time::timeout(limit, cmd.output()).await {
        Ok(output) => check_output(&what, output),
        Err(_) => Err(format!("`{what}` did not finish within {limit:?}")),
    }
}

fn docker(args: &[&str]) -> Command {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    cmd
}

// === preflight ========================================================================

/// Panics, saying how to fix it, unless Docker, Compose v2, the images and
/// host port 8080 are all available.
fn preflight(images: &[(&str, String)]) {
    let server =
        run_sync(docker(&["version", "--format", "{{.Server.Version}}"])).unwrap_or_else(|e| {
            panic!(
                "compose e2e: Docker is not usable here.\n{e}\nHow to fix: install Docker \
                 Engine and start its daemon (`systemctl start docker` or `dockerd &`), as a \
                 user allowed to use /var/run/docker.sock; `docker version` must show a Server."
            )
        });
    let compose = run_sync(docker(&["compose", "version", "--short"])).unwrap_or_else(|e| {
        panic!(
            "compose e2e: `docker compose` (Compose v2, a Docker CLI plugin) is not available.\n\
             {e}\nHow to fix: run scripts/install-deps.sh as root (it installs the plugin into \
             ~/.docker/cli-plugins), then check `docker compose version`."
        )
    });
    println!(
        "docker engine {}, compose {}",
        server.trim(),
        compose.trim()
    );
    for (var, image) in images {
        if let Err(e) = run_sync(docker(&["image", "inspect", "--format", "{{.Id}}", image])) {
            panic!(
                "compose e2e: image {image} ({var}) is missing.\n{e}\nHow to fix: build the \
                 images with scripts/offline-images.sh (scripts/test.sh runs it before the \
                 tests), or set {var} to an image that exists."
            );
        }
    }
    check_port_free(HOST_PORT);
}

fn check_port_free(port: u16) {
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    let listening = TcpStream::connect_timeout(&loopback, Duration::from_millis(500)).is_ok();
    let bindable = TcpListener::bind(("0.0.0.0", port)).is_ok();
    if listening || !bindable {
        let holders = run_sync(docker(&[
            "ps",
            "--filter",
            &format!("publish={port}"),
            "--format",
            "{{.Names}}{{with .Label \"com.docker.compose.project\"}} (compose project {{.}}){{end}}",
        ]))
        .unwrap_or_default();
        let holders = if holders.trim().is_empty() {
            format!("no container publishes it; see `ss -ltnp 'sport = :{port}'`")
        } else {
            format!(
                "published by container(s): {}; stop them (`docker compose -p <project> down \
                 -v` for a compose project; an outrigger-e2e-<pid> project is left over from \
                 an interrupted run of this test)",
                holders.trim().replace('\n', ", ")
            )
        };
        panic!(
            "compose e2e: host port {port} is in use, but the mesh publishes a's ingress \
             there.\nHow to fix: free port {port}: {holders}."
        );
    }
}

// === the compose project ==============================================================

/// One `docker compose -p <project>` run of docker-compose.yml. Dropping it
/// (also while panicking) prints the logs if the test failed and runs
/// `down -v --remove-orphans`, so no run leaves containers behind.
struct Compose {
    project: String,
    file: PathBuf,
    images: Vec<(&'static str, String)>,
    /// Whether `down` is still owed.
    up: bool,
}

/// One container, from `docker compose ps --format json`.
#[derive(Debug, Clone)]
struct PsEntry {
    service: String,
    name: String,
    state: String,
    health: String,
    exit_code: i64,
}

impl Compose {
    fn new(images: Vec<(&'static str, String)>) -> Compose {
        Compose {
            project: format!("outrigger-e2e-{}", std::process::id()),
            file: repo().join("docker-compose.yml"),
            images,
            up: false,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("compose")
            .arg("-f")
            .arg(&self.file)
            .arg("-p")
            .arg(&self.project)
            .args(args)
            .current_dir(repo());
        for (var, value) in &self.images {
            cmd.env(var, value);
        }
        cmd
    }

    async fn run(&self, args: &[&str], limit: Duration) -> Result<String, String> {
        run_async(self.cmd(args), limit).await
    }

    async fn up(&mut self) {
        self.up = true;
        if let Err(e) = self
            .run(&["up", "-d", "--no-build"], Duration::from_secs(180))
            .await
        {
            panic!("docker compose up failed:\n{e}");
        }
    }

    async fn ps(&self) -> Result<Vec<PsEntry>, String> {
        let out = self
            .run(&["ps", "-a", "--format", "json"], Duration::from_secs(30))
            .await?;
        parse_ps(&out)
    }

    /// Polls `ps` until every service runs and every healthcheck passes;
    /// fails at once if a container exited.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let last = match self.ps().await {
                Err(e) => e,
                Ok(entries) => match readiness(&entries) {
                    Readiness::Ready => return Ok(()),
                    Readiness::Dead(why) => return Err(why),
                    Readiness::Waiting(why) => why,
                },
            };
            if started.elapsed() > timeout {
                return Err(format!(
                    "not ready after {timeout:?}; still waiting for: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The container name of `service`, e.g. `outrigger-e2e-42-b1-sidecar-1`.
    async fn container(&self, service: &str) -> String {
        let entries = self.ps().await.expect("docker compose ps");
        entries
            .into_iter()
            .find(|e| e.service == service)
            .map(|e| e.name)
            .unwrap_or_else(|| panic!("no container for service {service}"))
    }

    /// `etcdctl get --prefix <prefix> --keys-only`, run inside the etcd
    /// container.
    async fn etcd_keys(&self, prefix: &str) -> Result<Vec<String>, String> {
        let out = self
            .run(
                &[
                    "exec",
                    "-T",
                    "etcd",
                    "etcdctl",
                    "get",
                    "--prefix",
                    prefix,
                    "--keys-only",
                ],
                Duration::from_secs(15),
            )
            .await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// The etcd store's current revision.
    async fn etcd_revision(&self) -> Result<i64, String> {
        let out = self
            .run(
                &[
                    "exec", "-T", "etcd", "etcdctl", "get", "--prefix", B_PREFIX, "-w", "json",
                ],
                Duration::from_secs(15),
            )
            .await?;
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        v["header"]["revision"]
            .as_i64()
            .ok_or_else(|| format!("no header.revision in {out}"))
    }

    /// `etcdctl watch --prefix <prefix>` from `rev`, recording every event
    /// with the time it arrived. Starting at a past revision means nothing
    /// is missed even if the watch is slow to start.
    fn watch(&self, prefix: &str, rev: i64) -> EtcdWatch {
        let mut cmd = tokio::process::Command::from(self.cmd(&[
            "exec",
            "-T",
            "etcd",
            "etcdctl",
            "watch",
            "--prefix",
            prefix,
            "--rev",
            &rev.to_string(),
        ]));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn etcdctl watch");
        let stdout = child.stdout.take().expect("piped stdout");
        let events: Arc<Mutex<Vec<WatchEvent>>> = Arc::default();
        let sink = events.clone();
        tokio::spawn(async move {
            // etcdctl prints each event as its type, the key, then the value.
            let mut lines = BufReader::new(stdout).lines();
            let mut kind: Option<String> = None;
            while let Ok(Some(line)) = lines.next_line().await {
                let line = line.trim().to_string();
                match kind.take() {
                    None if line == "PUT" || line == "DELETE" => kind = Some(line),
                    None => {}
                    Some(kind) => sink.lock().unwrap().push(WatchEvent {
                        at: Instant::now(),
                        kind,
                        key: line,
                    }),
                }
            }
        });
        EtcdWatch {
            _child: child,
            events,
        }
    }

    /// `docker compose logs` of every service (the last lines of each).
    fn logs_sync(&self) -> String {
        let mut cmd = self.cmd(&["logs", "--no-color", "--tail", "60"]);
        cmd.stdin(Stdio::null());
        match cmd.output() {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("(docker compose logs failed: {e})"),
        }
    }

    fn down_sync(&mut self) -> Result<String, String> {
        let out = run_sync(self.cmd(&["down", "-v", "--remove-orphans", "--timeout", "10"]))?;
        self.up = false;
        Ok(out)
    }

    /// The project's containers, networks and volumes that still exist.
    fn leftovers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.project);
        let mut left = Vec::new();
        for (kind, args) in [
            ("container", vec!["ps", "-a", "-q", "--filter", &label]),
            ("network", vec!["network", "ls", "-q", "--filter", &label]),
            ("volume", vec!["volume", "ls", "-q", "--filter", &label]),
        ] {
            match run_sync(docker(&args)) {
                Ok(out) => left.extend(out.split_whitespace().map(|id| format!("{kind} {id}"))),
                Err(e) => left.push(format!("cannot list {kind}s: {e}")),
            }
        }
        left
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if !self.up {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "\n===== docker compose -p {} logs (last lines per container) =====\n{}\n===== end of logs =====",
                self.project,
                self.logs_sync()
            );
        }
        eprintln!("tearing down compose project {}", self.project);
        if let Err(e) = self.down_sync() {
            eprintln!("docker compose down failed: {e}");
        }
    }
}

fn parse_ps(out: &str) -> Result<Vec<PsEntry>, String> {
    // Compose ≥ 2.21 prints one JSON object per line; older v2 a JSON array.
    let values: Vec<Value> = if out.trim_start().starts_with('[') {
        serde_json::from_str(out).map_err(|e| format!("ps JSON: {e}: {out}"))?
    } else {
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("ps JSON: {e}: {l}")))
            .collect::<Result<_, _>>()?
    };
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    Ok(values
        .iter()
        .map(|v| PsEntry {
            service: s(v, "Service"),
            name: s(v, "Name"),
            state: s(v, "State"),
            health: s(v, "Health"),
            exit_code: v["ExitCode"].as_i64().unwrap_or(0),
        })
        .collect())
}

enum Readiness {
    Ready,
    Waiting(String),
    Dead(String),
}

fn readiness(entries: &[PsEntry]) -> Readiness {
    let mut waiting = Vec::new();
    for service in ONE_SHOT {
        match entries.iter().find(|e| e.service == service) {
            Some(e) if e.state == "exited" && e.exit_code == 0 => {}
            Some(e) if matches!(e.state.as_str(), "exited" | "dead") => {
                return Readiness::Dead(format!(
                    "one-shot {service} ({}) {} with code {}",
                    e.name, e.state, e.exit_code
                ))
            }
            Some(e) => waiting.push(format!("{service} ({}, must complete)", e.state)),
            None => waiting.push(format!("{service} (no container)")),
        }
    }
    for service in SERVICES {
        let Some(e) = entries.iter().find(|e| e.service == service) else {
            waiting.push(format!("{service} (no container)"));
            continue;
        };
        if matches!(e.state.as_str(), "exited" | "dead") {
            return Readiness::Dead(format!(
                "{service} ({}) {} with code {}",
                e.name, e.state, e.exit_code
            ));
        }
        if e.state != "running" {
            waiting.push(format!("{service} ({})", e.state));
        } else if HEALTHCHECKED.contains(&service) && e.health != "healthy" {
            waiting.push(format!("{service} (health: {})", e.health));
        }
    }
    if waiting.is_empty() {
        Readiness::Ready
    } else {
        Readiness::Waiting(waiting.join(", "))
    }
}

/// One registry event seen by [`Compose::watch`].
#[derive(Debug, Clone)]
struct WatchEvent {
    at: Instant,
    kind: String,
    key: String,
}

struct EtcdWatch {
    _child: tokio::process::Child,
    events: Arc<Mutex<Vec<WatchEvent>>>,
}

impl EtcdWatch {
    /// When the first `kind` event for `key` at or after `since` arrived.
    fn seen(&self, kind: &str, key: &str, since: Instant) -> Option<Instant> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.kind == kind && e.key == key && e.at >= since)
            .map(|e| e.at)
    }
}

// === requests through the mesh ========================================================

/// Who answered each hop of one `GET /`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chain {
    b: String,
    c: String,
}

/// Checks that one answer is a complete, successful a → b → c chain.
fn parse_chain(status: u16, body: &[u8]) -> Result<Chain, String> {
    let text = || String::from_utf8_lossy(body).into_owned();
    if status != 200 {
        return Err(format!("status {status}: {}", text()));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON ({e}): {}", text()))?;
    let hop = |node: &Value, service: &str, replicas: &[&str]| -> Result<String, String> {
        if node["service"] != service {
            return Err(format!("expected service {service}: {}", text()));
        }
        let instance = node["instance"].as_str().unwrap_or_default();
        if !replicas.contains(&instance) {
            return Err(format!(
                "{service} answered as instance {instance:?}, expected one of {replicas:?}: {}",
                text()
            ));
        }
        Ok(instance.to_string())
    };
    let call = |node: &Value, peer: &str| -> Result<Value, String> {
        let calls = node["calls"].as_array().cloned().unwrap_or_default();
        match calls.as_slice() {
            [call] if call["service"] == peer && call["status"] == 200 => Ok(call["body"].clone()),
            _ => Err(format!(
                "the call to {peer} failed or is missing: {}",
                text()
            )),
        }
    };
    hop(&v, "a", &["a"])?;
    let b_node = call(&v, "b")?;
    let b = hop(&b_node, "b", &["b1", "b2"])?;
    let c_node = call(&b_node, "c")?;
    let c = hop(&c_node, "c", &["c1", "c2"])?;
    if c_node["calls"]
        .as_array()
        .is_none_or(|calls| !calls.is_empty())
    {
        return Err(format!("c is a leaf but reports calls: {}", text()));
    }
    Ok(Chain { b, c })
}

type Client = HttpClient<DialConnector>;

fn ingress_client() -> Client {
    dial_client(SocketAddr::from(([127, 0, 0, 1], HOST_PORT)))
}

/// `GET localhost:8080/`, checked by [`parse_chain`].
async fn fetch(client: &Client) -> Result<Chain, String> {
    let attempt = async {
        let res = client
            .request(get(URL))
            .await
            .map_err(|e| format!("request failed: {e:?}"))?;
        collect(res)
            .await
            .map_err(|e| format!("reading the response: {e}"))
    };
    let res = tokio::time::timeout(REQUEST_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))??;
    parse_chain(res.status().as_u16(), res.body())
}

/// One request of the load.
#[derive(Debug, Clone)]
struct Shot {
    /// When it was sent, from the start of the load.
    sent_at: Duration,
    latency: Duration,
    outcome: Result<Chain, String>,
}

/// Open-loop load: request `i` is sent at `start + i / RATE` whether or not
/// earlier ones have been answered (a stall shows as latency, not as a lower
/// rate). Every answer is recorded as it arrives, so the test can watch
/// traffic move while the load runs.
struct Load {
    start: Instant,
    shots: Arc<Mutex<Vec<Shot>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(client: Client, rate: u32) -> Load {
        let start = Instant::now();
        let shots: Arc<Mutex<Vec<Shot>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (record, stopping) = (shots.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut in_flight = JoinSet::new();
            let mut i: u64 = 0;
            while !stopping.load(Ordering::Relaxed) {
                tokio::time::sleep_until(
                    start + Duration::from_secs_f64(i as f64 / f64::from(rate)),
                )
                .await;
                let (client, record) = (client.clone(), record.clone());
                in_flight.spawn(async move {
                    let sent = Instant::now();
                    let outcome = fetch(&client).await;
                    record.lock().unwrap().push(Shot {
                        sent_at: sent - start,
                        latency: sent.elapsed(),
                        outcome,
                    });
                });
                i += 1;
                // Reap finished requests so the set stays small.
                while in_flight.try_join_next().is_some() {}
            }
            while in_flight.join_next().await.is_some() {}
        });
        Load {
            start,
            shots,
            stop,
            task,
        }
    }

    /// Time since the load started.
    fn at(&self, t: Instant) -> Duration {
        t - self.start
    }

    /// Whether a request sent at or after `since` was answered by b `instance`.
    fn answered_by(&self, instance: &str, since: Duration) -> bool {
        self.shots
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.sent_at >= since && matches!(&s.outcome, Ok(c) if c.b == instance))
    }

    async fn finish(self) -> Vec<Shot> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load task");
        let mut shots = std::mem::take(&mut *self.shots.lock().unwrap());
        shots.sort_by_key(|s| s.sent_at);
        shots
    }
}

/// Counts, failures, latency and which replicas answered, for one window.
fn summary(shots: &[Shot]) -> String {
    let failed: Vec<&Shot> = shots.iter().filter(|s| s.outcome.is_err()).collect();
    let mut by_b: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_c: BTreeMap<&str, usize> = BTreeMap::new();
    for chain in shots.iter().filter_map(|s| s.outcome.as_ref().ok()) {
        *by_b.entry(&chain.b).or_default() += 1;
        *by_c.entry(&chain.c).or_default() += 1;
    }
    let mut latencies: Vec<Duration> = shots.iter().map(|s| s.latency).collect();
    latencies.sort();
    let pct = |q: f64| {
        latencies
            .get(((q * latencies.len() as f64).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    format!(
        "{} requests, {} failed, p50 {:?}, p99 {:?}, max {:?}; b {:?}, c {:?}",
        shots.len(),
        failed.len(),
        pct(0.5),
        pct(0.99),
        latencies.last().copied().unwrap_or_default(),
        by_b,
        by_c
    )
}

fn window(shots: &[Shot], from: Duration, to: Duration) -> Vec<Shot> {
    shots
        .iter()
        .filter(|s| s.sent_at >= from && s.sent_at < to)
        .cloned()
        .collect()
}

// === the tests ========================================================================

/// The answer check accepts only a complete, successful chain: a failed hop
/// deep inside a 200 (the demo without `--strict`) counts as a failure.
#[test]
fn chain_check_rejects_any_failed_hop() {
    let ok = br#"{"service":"a","instance":"a","calls":[{"service":"b","status":200,"body":{"calls":[{"body":{"calls":[],"instance":"c1","service":"c"},"service":"c","status":200}],"instance":"b2","service":"b"}}]}"#;
    assert_eq!(
        parse_chain(200, ok),
        Ok(Chain {
            b: "b2".into(),
            c: "c1".into()
        })
    );
    let c_failed = br#"{"service":"a","instance":"a","calls":[{"service":"b","status":200,"body":{"calls":[{"body":"calling c: connection refused","service":"c","status":null}],"instance":"b2","service":"b"}}]}"#;
    let b_failed = br#"{"service":"a","instance":"a","calls":[{"service":"b","status":502,"body":"upstream reset"}]}"#;
    assert!(parse_chain(200, c_failed).is_err());
    assert!(parse_chain(200, b_failed).is_err());
    assert!(parse_chain(502, b_failed).is_err());
    assert!(parse_chain(200, b"not json").is_err());
    assert!(parse_chain(200, br#"{"service":"a","instance":"a","calls":[]}"#).is_err());
}

/// The configs the compose file mounts are valid, with the per-replica
/// overrides it sets (no Docker needed).
#[test]
fn compose_configs_pass_check_config() {
    // The certificates the compose `certs` service would write, made by the
    // same command, and pointed at with the usual environment overrides.
    let certs = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_outrigger"))
        .args(["certs", "--out"])
        .arg(certs.path())
        .args(["--trust-domain", "mesh.local", "a", "b", "c"])
        .output()
        .expect("run outrigger certs");
    assert!(
        out.status.success(),
        "outrigger certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = |f: &str| certs.path().join(f).display().to_string();
    for (file, instance, advertise) in [
        ("a.toml", "a", "a:15006"),
        ("b.toml", "b1", "b1:15006"),
        ("b.toml", "b2", "b2:15006"),
        ("c.toml", "c1", "c1:15006"),
        ("c.toml", "c2", "c2:15006"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_outrigger"))
            .arg("check-config")
            .arg(repo().join("config").join(file))
            .env("OUTRIGGER_SERVICE__INSTANCE_ID", instance)
            .env("OUTRIGGER_SERVICE__ADVERTISE", advertise)
            .env("OUTRIGGER_TLS__CA", path("ca.pem"))
            .env("OUTRIGGER_TLS__CERT", path(&format!("{}.pem", &file[..1])))
            .env(
                "OUTRIGGER_TLS__KEY",
                path(&format!("{}-key.pem", &file[..1])),
            )
            .output()
            .expect("run outrigger check-config");
        assert!(
            out.status.success(),
            "config/{file} ({instance}) is invalid:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_mesh_survives_a_sidecar_kill() {
    let images = image_env();
    preflight(&images);
    let mut mesh = Compose::new(images.clone());
    println!(
        "compose project {} with {}",
        mesh.project,
        images
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );

    // --- up, and wait for every healthcheck ---------------------------------------
    let t_up = Instant::now();
    mesh.up().await;
    let up_returned = t_up.elapsed();
    if let Err(e) = mesh.wait_ready(READY_TIMEOUT).await {
        panic!("the mesh did not become ready: {e}");
    }
    let ready = t_up.elapsed();
    println!("up: `docker compose up -d` returned after {up_returned:?}; all healthchecks passed after {ready:?}");

    // --- the chain, and both replicas of b and c -----------------------------------
    let client = ingress_client();
    let first = support::wait_until(
        "GET localhost:8080/ to walk a → b → c",
        Duration::from_secs(30),
        || async { fetch(&client).await },
    )
    .await;
    println!(
        "first answer after {:?}: a → {} → {}",
        t_up.elapsed(),
        first.b,
        first.c
    );
    // Waves of concurrent requests, as real traffic: p2c-ewma weighs in-flight
    // requests, so both replicas get a share. ~40 requests should show all four;
    // a few more waves are allowed before calling it a failure.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut sent = 0;
    let all_seen = |seen: &BTreeMap<String, usize>| {
        ["b1", "b2", "c1", "c2"]
            .iter()
            .all(|r| seen.contains_key(*r))
    };
    while sent < 120 && (sent < 40 || !all_seen(&seen)) {
        let wave: Vec<Result<Chain, String>> =
            futures_util::future::join_all((0..8).map(|_| fetch(&client))).await;
        for chain in wave {
            let chain = chain.unwrap_or_else(|e| panic!("GET {URL}: {e}"));
            *seen.entry(chain.b).or_default() += 1;
            *seen.entry(chain.c).or_default() += 1;
        }
        sent += 8;
    }
    println!("balance: {sent} requests answered by {seen:?}");
    assert!(
        all_seen(&seen),
        "after {sent} requests not every replica answered: {seen:?}"
    );

    // --- the mesh runs on mTLS ---------------------------------------------------------
    // b1's sidecar accepted mTLS handshakes (its admin listener is on loopback in
    // the namespace it shares with b1, where curl is).
    let metrics = mesh
        .run(
            &[
                "exec",
                "-T",
                "b1",
                "curl",
                "-fsS",
                "http://127.0.0.1:15000/metrics",
            ],
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("b1-sidecar's /metrics: {e}"));
    let handshakes = support::metrics::parse_metric(
        &metrics,
        "outrigger_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}",
    )
    .unwrap_or(0.0);
    println!("mTLS: b1-sidecar accepted {handshakes} inbound mTLS handshakes");
    assert!(
        handshakes >= 1.0,
        "b1-sidecar took no mTLS handshake:\n{metrics}"
    );
    // Plaintext straight to b1's inbound listener is refused (no HTTP answer).
    let plaintext = mesh
        .run(
            &[
                "exec",
                "-T",
                "a",
                "curl",
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "5",
                "http://b1:15006/",
            ],
            Duration::from_secs(30),
        )
        .await;
    println!("mTLS: plaintext to b1:15006 → {plaintext:?}");
    assert!(
        plaintext.is_err(),
        "plaintext to b1's inbound got an answer: {plaintext:?}"
    );
    // Authorization: c allows only b, so a's call to c (over a's sidecar, with
    // a's identity) is refused with 403.
    let code = mesh
        .run(
            &[
                "exec",
                "-T",
                "a",
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://c/",
            ],
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("a → c: {e}"));
    println!("mTLS: a → c (allow = [\"b\"]) answered {code}");
    assert_eq!(code.trim(), "403", "c must refuse a");

    // --- kill b1's sidecar under load ----------------------------------------------
    for app in ["b1", "b2"] {
        let url = format!("http://127.0.0.1:9000/admin/slow?ms={B_SLOW_MS}");
        mesh.run(
            &["exec", "-T", app, "curl", "-fsS", "-X", "POST", &url],
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("slowing {app} down with its fault switch: {e}"));
    }
    println!("b1 and b2 now take {B_SLOW_MS} ms more per request, so requests are in flight on b1 when its sidecar dies");
    let sidecar = mesh.container("b1-sidecar").await;
    let rev = mesh.etcd_revision().await.expect("etcd revision");
    let watch = mesh.watch(B_PREFIX, rev + 1);
    let load = Load::start(client.clone(), RATE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kill_sent = Instant::now();
    run_async(docker(&["kill", &sidecar]), Duration::from_secs(30))
        .await
        .expect("docker kill");
    // `docker kill` returns once the daemon has sent the signal: from here on the
    // sidecar is certainly dead (SIGKILL cannot be caught), so its lease runs out.
    let killed = Instant::now();
    let killed_at = load.at(kill_sent);
    println!(
        "docker kill {sidecar} (SIGKILL) at {killed_at:?} into the load, took {:?}",
        killed - kill_sent
    );

    // b1's key must leave etcd within the lease TTL + 1 s. The watch timestamps
    // the DELETE; `etcdctl get` (polled too, in case the watch is late) confirms.
    let deadline = killed + Duration::from_secs(20);
    let gone = loop {
        if let Some(at) = watch.seen("DELETE", B1_KEY, kill_sent) {
            break at;
        }
        let keys = mesh.etcd_keys(B_PREFIX).await.expect("etcdctl get");
        if !keys.iter().any(|k| k == B1_KEY) {
            break watch
                .seen("DELETE", B1_KEY, kill_sent)
                .unwrap_or_else(Instant::now);
        }
        assert!(
            Instant::now() < deadline,
            "{B1_KEY} still in etcd {:?} after the kill",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let key_gone_after = gone.saturating_duration_since(killed);
    let gone_at = load.at(gone);
    let keys = mesh.etcd_keys(B_PREFIX).await.expect("etcdctl get");
    println!("{B1_KEY} left etcd {key_gone_after:?} after the kill; keys now {keys:?}");
    assert_eq!(
        keys,
        ["/outrigger/services/b/b2"],
        "etcdctl get --prefix {B_PREFIX} --keys-only after the kill"
    );
    assert!(
        key_gone_after <= TTL + Duration::from_secs(1),
        "{B1_KEY} left etcd {key_gone_after:?} after the kill; the lease TTL is {TTL:?}"
    );

    // Keep the load on b2 alone for a moment, then bring the sidecar back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = Instant::now();
    run_async(docker(&["start", &sidecar]), Duration::from_secs(60))
        .await
        .expect("docker start");
    let restarted_at = load.at(restarted);
    println!(
        "docker start {sidecar} at {restarted_at:?}, took {:?}",
        restarted.elapsed()
    );
    let rejoin_deadline = restarted + REJOIN_TIMEOUT;
    while !load.answered_by("b1", restarted_at) {
        assert!(
            Instant::now() < rejoin_deadline,
            "b1 got no traffic within {REJOIN_TIMEOUT:?} of `docker start`; registry events: {:?}",
            watch.events.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rejoined = restarted.elapsed();
    let registered = watch
        .seen("PUT", B1_KEY, restarted)
        .map(|t| format!("{:?}", t - restarted))
        .unwrap_or_else(|| "?".into());
    println!("b1 re-registered {registered} and answered {rejoined:?} after `docker start`");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let shots = load.finish().await;
    let end = shots.last().map(|s| s.sent_at).unwrap_or_default() + Duration::from_millis(1);

    // --- what the load saw -----------------------------------------------------------
    let phases = [
        ("before the kill", Duration::ZERO, killed_at),
        ("kill → key gone", killed_at, gone_at),
        ("key gone → start", gone_at, restarted_at),
        ("after start", restarted_at, end),
    ];
    println!("load at {RATE} req/s on {URL}: {}", summary(&shots));
    for (name, from, to) in phases {
        println!(
            "  {name:>17} [{from:>8.2?}, {to:>8.2?}): {}",
            summary(&window(&shots, from, to))
        );
    }
    let in_flight = shots
        .iter()
        .filter(|s| s.sent_at <= killed_at && s.sent_at + s.latency > killed_at)
        .count();
    println!("  requests in flight at the kill: {in_flight}");
    let failures: Vec<&Shot> = shots.iter().filter(|s| s.outcome.is_err()).collect();
    for s in failures.iter().take(10) {
        println!(
            "  failed at {:?}: {}",
            s.sent_at,
            s.outcome.as_ref().unwrap_err()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed (first at {:?}; b1's sidecar was killed at {killed_at:?}, \
         restarted at {restarted_at:?}): {}",
        failures.len(),
        shots.len(),
        failures[0].sent_at,
        failures[0].outcome.as_ref().unwrap_err()
    );
    let expected = (end.as_secs_f64() * f64::from(RATE) * 0.95) as usize;
    assert!(
        shots.len() >= expected,
        "only {} requests were sent in {end:?} at {RATE}/s",
        shots.len()
    );
    // Once the key is gone, b1 cannot answer until its sidecar is back.
    let dark = window(&shots, gone_at, restarted_at);
    assert!(
        dark.iter()
            .all(|s| matches!(&s.outcome, Ok(c) if c.b == "b2")),
        "only b2 may answer while b1's sidecar is down: {}",
        summary(&dark)
    );

    // --- down, and nothing left behind ---------------------------------------------
    let t_down = Instant::now();
    if let Err(e) = mesh.down_sync() {
        panic!("docker compose down failed: {e}");
    }
    println!(
        "down: `docker compose down -v --remove-orphans` took {:?}",
        t_down.elapsed()
    );
    let left = mesh.leftovers();
    assert!(
        left.is_empty(),
        "compose project {} left behind: {left:?}",
        mesh.project
    );
}
