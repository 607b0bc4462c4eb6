//! The `outrigger` binary under test.
//!
//! Tests run the real binary (`CARGO_BIN_EXE_outrigger`) as a child process,
//! because the behaviours that matter most (signals, draining, crash and
//! lease expiry, restart with a state file) only exist for a process. A
//! [`Sidecar`] writes its TOML to a temp dir, logs stdout + stderr to a
//! file, and talks to the admin API (`/live`, `/ready`, `/metrics`,
//! `/routes`) on the address the TOML's `[listeners]` section names.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use http::Request;
use tempfile::TempDir;

use super::client::{empty, try_get, try_request, BoxError};
use super::metrics::parse_metric;
use super::ports::{free_port, loopback};
use super::process::ChildProcess;
use super::wait::wait_for;

/// How long [`Sidecar::wait_live`] and [`Sidecar::wait_ready`] wait.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The sidecar's `RUST_LOG` unless `OUTRIGGER_TEST_RUST_LOG` or
/// [`SidecarOptions::env`] says otherwise.
pub const DEFAULT_RUST_LOG: &str = "outrigger=debug,info";
/// Per-attempt timeout of admin polls, so a hung sidecar cannot stall a wait.
const POLL_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Free ports for a sidecar's three listeners, rendered as its
/// `[listeners]` section by [`SidecarPorts::listeners_toml`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SidecarPorts {
    /// Outbound listener port (the local service's entry).
    pub outbound: u16,
    /// Inbound listener port (peer sidecars' entry).
    pub inbound: u16,
    /// Admin API port.
    pub admin: u16,
}

impl Default for SidecarPorts {
    fn default() -> Self {
        Self::new()
    }
}

impl SidecarPorts {
    /// Three fresh [`free_port`]s.
    pub fn new() -> SidecarPorts {
        SidecarPorts {
            outbound: free_port(),
            inbound: free_port(),
            admin: free_port(),
        }
    }

    /// `127.0.0.1:<outbound>`.
    pub fn outbound_addr(&self) -> SocketAddr {
        loopback(self.outbound)
    }

    /// `127.0.0.1:<inbound>` (also what peers should dial: `advertise`).
    pub fn inbound_addr(&self) -> SocketAddr {
        loopback(self.inbound)
    }

    /// `127.0.0.1:<admin>`.
    pub fn admin_addr(&self) -> SocketAddr {
        loopback(self.admin)
    }

    /// The `[listeners]` TOML section, all on loopback.
    pub fn listeners_toml(&self) -> String {
        format!(
            "[listeners]\noutbound = \"{}\"\ninbound = \"{}\"\nadmin = \"{}\"\n",
            self.outbound_addr(),
            self.inbound_addr(),
            self.admin_addr()
        )
    }
}

/// Extra settings for [`Sidecar::start_with`].
#[derive(Debug, Clone, Default)]
pub struct SidecarOptions {
    /// Environment for the child (applied last, so `RUST_LOG` here wins).
    pub env: Vec<(String, String)>,
    /// Program to run instead of the outrigger binary (harness self-tests).
    pub program: Option<PathBuf>,
    /// Arguments instead of `run --config {config}`; `{config}` is replaced
    /// by the config file path.
    pub args: Option<Vec<String>>,
}

/// A running sidecar process. Dropping it resumes (SIGCONT), kills
/// (SIGKILL) and reaps it; if the test is panicking, the log tail is
/// printed.
#[derive(Debug)]
pub struct Sidecar {
    process: ChildProcess,
    dir: TempDir,
    name: String,
    config: PathBuf,
    options: SidecarOptions,
    /// The admin listener (from `[listeners] admin`).
    pub admin: SocketAddr,
    /// The outbound listener, if the TOML names one.
    pub outbound: Option<SocketAddr>,
    /// The inbound listener, if the TOML names one.
    pub inbound: Option<SocketAddr>,
}

impl Sidecar {
    /// The outrigger binary cargo built for this test target.
    pub fn binary() -> PathBuf {
        PathBuf::from(env!("CARGO_BIN_EXE_outrigger"))
    }

    /// Writes `toml` to `<tempdir>/<name>.toml` and runs
    /// `outrigger run --config <file>`. Does not wait for anything.
    ///
    /// # Panics
    /// If the TOML has no `[listeners] admin = "..."` line.
    pub fn start(name: &str, toml: &str) -> Sidecar {
        Self::start_with(name, toml, SidecarOptions::default())
    }

    /// [`Sidecar::start`] with extra environment or another command line.
    pub fn start_with(name: &str, toml: &str, options: SidecarOptions) -> Sidecar {
        let admin = listener_addr(toml, "admin").unwrap_or_else(|| {
            panic!("sidecar {name}: the TOML must set [listeners] admin = \"ip:port\"")
        });
        let dir = tempfile::Builder::new()
            .prefix("outrigger-sidecar-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, toml).expect("write sidecar config");
        let process = spawn(name, dir.path(), &config, &options);
        Sidecar {
            process,
            dir,
            name: name.to_string(),
            config,
            options,
            admin,
            outbound: listener_addr(toml, "outbound"),
            inbound: listener_addr(toml, "inbound"),
        }
    }

    /// Kills the process if it is running and starts it again with the same
    /// config file, temp dir (state files survive) and options; the log is
    /// appended to.
    pub fn restart(&mut self) {
        self.process.kill_and_reap();
        self.process = spawn(&self.name, self.dir.path(), &self.config, &self.options);
    }

    /// The config file path.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The sidecar's temp dir (config, log; a good place for state files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until `GET /live` returns 200.
    ///
    /// # Panics
    /// After [`READY_TIMEOUT`] or if the process exits, with the log tail.
    pub async fn wait_live(&mut self) {
        self.wait_admin_ok("/live").await;
    }

    /// Waits until `GET /ready` returns 200 (registered, first table loaded).
    ///
    /// # Panics
    /// After [`READY_TIMEOUT`] or if the process exits, with the last 60
    /// lines of the log.
    pub async fn wait_ready(&mut self) {
        self.wait_admin_ok("/ready").await;
    }

    /// `GET <path>` on the admin listener.
    pub async fn try_admin_get(&self, path: &str) -> Result<(u16, String), BoxError> {
        try_get(self.admin, path).await
    }

    /// `GET <path>` on the admin listener: (status, body).
    ///
    /// # Panics
    /// If the request fails.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        self.try_admin_get(path).await.unwrap_or_else(|e| {
            panic!(
                "sidecar {}: GET {path} on admin {}: {e:?}",
                self.name, self.admin
            )
        })
    }

    /// `POST <path>` (empty body) on the admin listener, e.g. `/drain`.
    ///
    /// # Panics
    /// If the request fails.
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        let req = Request::post(path).body(empty()).expect("valid request");
        let resp = try_request(self.admin, req).await.unwrap_or_else(|e| {
            panic!(
                "sidecar {}: POST {path} on admin {}: {e:?}",
                self.name, self.admin
            )
        });
        (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body()).into_owned(),
        )
    }

    /// The Prometheus text of `GET /metrics`.
    ///
    /// # Panics
    /// If the request fails or is not 200.
    pub async fn metrics(&self) -> String {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "sidecar {}: GET /metrics: {body}", self.name);
        body
    }

    /// The sum of the samples whose line starts with `series_prefix` (see
    /// [`parse_metric`]), or `None` if there are none.
    pub async fn metric_value(&self, series_prefix: &str) -> Option<f64> {
        parse_metric(&self.metrics().await, series_prefix)
    }

    /// `GET /routes` parsed as JSON.
    ///
    /// # Panics
    /// If the request fails, is not 200 or is not JSON.
    pub async fn routes_json(&self) -> serde_json::Value {
        let (status, body) = self.admin_get("/routes").await;
        assert_eq!(status, 200, "sidecar {}: GET /routes: {body}", self.name);
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("sidecar {}: /routes is not JSON ({e}): {body}", self.name))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill9(&mut self) {
        self.process.kill_and_reap();
    }

    /// SIGTERM (graceful shutdown: deregister, then drain).
    pub fn sigterm(&mut self) {
        self.process.signal(libc::SIGTERM);
    }

    /// SIGSTOP (a hung process that keeps its sockets open).
    pub fn sigstop(&mut self) {
        self.process.signal(libc::SIGSTOP);
    }

    /// SIGCONT (resume after [`Sidecar::sigstop`]).
    pub fn sigcont(&mut self) {
        self.process.signal(libc::SIGCONT);
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.process.try_status()
    }

    /// Waits for the process to exit.
    ///
    /// # Panics
    /// After `timeout`, with the log tail.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.process.wait_exit(timeout).await
    }

    /// Everything logged so far (all runs).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        self.process.log_tail(n)
    }

    /// Runs the outrigger binary with `args` (e.g. `["check-config", f]`)
    /// to completion, with the default `RUST_LOG`.
    pub fn run_cli(args: &[&str]) -> Output {
        Command::new(Self::binary())
            .args(args)
            .env("RUST_LOG", rust_log())
            .output()
            .unwrap_or_else(|e| panic!("cannot run outrigger {args:?}: {e}"))
    }

    async fn wait_admin_ok(&mut self, path: &str) {
        let admin = self.admin;
        let what = format!("sidecar {} GET {path} on {admin} to return 200", self.name);
        let process = &mut self.process;
        let result = wait_for(&what, READY_TIMEOUT, || {
            let exited = process.try_status();
            async move {
                if let Some(status) = exited {
                    return Ok(Err(status));
                }
                match tokio::time::timeout(POLL_REQUEST_TIMEOUT, try_get(admin, path)).await {
                    Ok(Ok((200, _))) => Ok(Ok(())),
                    Ok(Ok((code, body))) => Err(format!("{code} {body}")),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no response within {POLL_REQUEST_TIMEOUT:?}")),
                }
            }
        })
        .await;
        let failure = match result {
            Ok(Ok(())) => return,
            Ok(Err(status)) => format!(
                "sidecar {} exited ({status}) before GET {path} returned 200",
                self.name
            ),
            Err(timeout) => timeout.to_string(),
        };
        panic!(
            "{failure}\n--- last 60 lines of the {} log ---\n{}",
            self.name,
            self.log_tail(60)
        );
    }
}

fn rust_log() -> String {
    std::env::var("OUTRIGGER_TEST_RUST_LOG").unwrap_or_else(|_| DEFAULT_RUST_LOG.to_string())
}

fn spawn(name: &str, dir: &Path, config: &Path, options: &SidecarOptions) -> ChildProcess {
    let program = options.program.clone().unwrap_or_else(Sidecar::binary);
    let default_args = ["run", "--config", "{config}"].map(String::from).to_vec();
    let args = options.args.clone().unwrap_or(default_args);
    let config = config.to_string_lossy();
    let mut cmd = Command::new(program);
    cmd.args(args.iter().map(|a| a.replace("{config}", &config)))
        .current_dir(dir)
        .env("RUST_LOG", rust_log())
        .envs(options.env.iter().map(|(k, v)| (k, v)));
    ChildProcess::spawn(
        &format!("sidecar {name}"),
        cmd,
        &dir.join(format!("{name}.log")),
    )
}

/// The address of `key` (`admin`, `outbound`, `inbound`) in the
/// `[listeners]` section of `toml`, found line by line so that even an
/// otherwise invalid config works. An unspecified IP (`0.0.0.0`) is
/// replaced by `127.0.0.1`, the address to connect to.
pub fn listener_addr(toml: &str, key: &str) -> Option<SocketAddr> {
    let mut in_listeners = false;
    for line in toml
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
    {
        if line.starts_with('[') {
            in_listeners = line == "[listeners]";
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if in_listeners && k.trim() == key {
            let mut addr: SocketAddr = v.trim().trim_matches('"').parse().ok()?;
            if addr.ip().is_unspecified() {
                addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
            }
            return Some(addr);
        }
    }
    None
}
