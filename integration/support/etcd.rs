//! A throwaway single-node etcd for registry tests.
//!
//! The sidecar's etcd registry (lease-bound keys, watch from `revision + 1`,
//! re-read after compaction, reconnect after an outage) is tested against
//! the real `etcd` binary rather than a mock: the behaviour under test is
//! exactly etcd's. Each [`Etcd`] gets its own loopback ports and a temporary
//! data dir, can be stopped, killed and started again on the same data, and
//! is inspected and mutated through `etcdctl` (API v3).

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use tempfile::TempDir;

use super::client::try_get;
use super::ports::{free_port, loopback};
use super::process::{find_program, ChildProcess};
use super::wait::wait_for;

/// The panic message when the `etcd` binary cannot be found.
pub const ETCD_NOT_FOUND: &str =
    "etcd not found: install it with 'apt-get install etcd-server' (Debian) or run .ci/run";
/// The panic message when the `etcdctl` binary cannot be found.
pub const ETCDCTL_NOT_FOUND: &str =
    "etcdctl not found: install it with 'apt-get install etcd-client' (Debian) or run .ci/run";

/// How long a start (or restart) may take to report healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Finds `etcd` in the `PATH`-style `path_var`, then at `fallbacks`.
/// The error is [`ETCD_NOT_FOUND`].
pub fn locate_etcd(path_var: Option<&OsStr>, fallbacks: &[&Path]) -> Result<PathBuf, String> {
    find_program("etcd", path_var, fallbacks).ok_or_else(|| ETCD_NOT_FOUND.to_string())
}

/// The `etcd` binary from `$PATH` or `/usr/bin/etcd`.
///
/// # Panics
/// With [`ETCD_NOT_FOUND`] if there is none.
pub fn etcd_binary() -> PathBuf {
    let path = std::env::var_os("PATH");
    locate_etcd(path.as_deref(), &[Path::new("/usr/bin/etcd")])
        .unwrap_or_else(|msg| panic!("{msg}"))
}

/// The `etcdctl` binary from `$PATH` or `/usr/bin/etcdctl`.
///
/// # Panics
/// With [`ETCDCTL_NOT_FOUND`] if there is none.
pub fn etcdctl_binary() -> PathBuf {
    let path = std::env::var_os("PATH");
    find_program("etcdctl", path.as_deref(), &[Path::new("/usr/bin/etcdctl")])
        .unwrap_or_else(|| panic!("{ETCDCTL_NOT_FOUND}"))
}

/// A running (or stopped) single-node etcd. Dropping it kills the process
/// and deletes its data.
#[derive(Debug)]
pub struct Etcd {
    process: Option<ChildProcess>,
    dir: TempDir,
    name: String,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd on free loopback ports and waits until `/health` reports
    /// `"health":"true"`. Retries with new ports if the first ones were
    /// taken by another process meanwhile.
    ///
    /// # Panics
    /// If etcd is not installed, or not healthy within [`START_TIMEOUT`].
    pub async fn start() -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("outrigger-etcd-")
            .tempdir()
            .expect("temp dir");
        let mut etcd = Etcd {
            process: None,
            dir,
            name: String::new(),
            client_port: 0,
            peer_port: 0,
        };
        for attempt in 1..=3 {
            etcd.client_port = free_port();
            etcd.peer_port = free_port();
            etcd.name = format!("etcd-{}", etcd.client_port);
            etcd.spawn();
            if etcd.wait_healthy_or_exit().await || attempt == 3 {
                break;
            }
            // Exited early: most likely another process took a port. Drop
            // any partly initialised member data and retry on new ports.
            let _ = std::fs::remove_dir_all(etcd.data_dir());
        }
        etcd.assert_running("start");
        etcd
    }

    /// `http://127.0.0.1:<client port>`, for `--endpoints` and config files.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client_addr())
    }

    /// The client listener address.
    pub fn client_addr(&self) -> SocketAddr {
        loopback(self.client_port)
    }

    /// The data directory (kept across [`Etcd::start_again`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The etcd process id, while running.
    pub fn pid(&mut self) -> Option<u32> {
        self.is_running()
            .then(|| self.process.as_ref().expect("process").pid())
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|p| p.try_status().is_none())
    }

    /// Graceful stop: SIGTERM, then wait (10 s) for the exit.
    pub async fn stop(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.signal(libc::SIGTERM);
            p.wait_exit(Duration::from_secs(10)).await;
        }
    }

    /// Crash: SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.kill_and_reap();
        }
    }

    /// Starts etcd again on the same ports and data dir, and waits until
    /// healthy.
    ///
    /// # Panics
    /// If it is still running, or not healthy within [`START_TIMEOUT`].
    pub async fn start_again(&mut self) {
        assert!(
            !self.is_running(),
            "Etcd::start_again: etcd is still running; stop() or kill() it first"
        );
        self.spawn();
        self.wait_healthy_or_exit().await;
        self.assert_running("restart");
    }

    /// Everything etcd logged so far (all runs).
    pub fn log(&self) -> String {
        super::process::read_lossy(&self.log_path())
    }

    /// Runs `etcdctl --endpoints=<this> <args>` (API v3).
    ///
    /// # Panics
    /// If it fails, with its stderr.
    pub async fn etcdctl(&self, args: &[&str]) -> String {
        self.try_etcdctl(args)
            .await
            .unwrap_or_else(|stderr| panic!("etcdctl {args:?} failed: {stderr}"))
    }

    /// Runs `etcdctl`; `Ok(stdout)` on success, else `Err(stderr)`.
    pub async fn try_etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let output = tokio::process::Command::new(etcdctl_binary())
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(["--dial-timeout=2s", "--command-timeout=5s"])
            .args(args)
            .output()
            .await
            .map_err(|e| format!("cannot run etcdctl: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// All keys under `prefix` with their values, in key order.
    pub async fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self
            .etcdctl(&["get", "--prefix", "-w", "json", "--", prefix])
            .await;
        decode_kvs(&out)
    }

    /// The value of `key`, if present.
    pub async fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", "-w", "json", "--", key]).await;
        decode_kvs(&out).into_iter().next().map(|(_, v)| v)
    }

    /// Puts `key = value` (without a lease).
    pub async fn put(&self, key: &str, value: &str) {
        self.etcdctl(&["put", "--", key, value]).await;
    }

    /// Deletes `key`; returns how many keys were deleted.
    pub async fn del(&self, key: &str) -> u64 {
        let out = self.etcdctl(&["del", "--", key]).await;
        out.trim().parse().unwrap_or(0)
    }

    /// The store's current revision.
    pub async fn revision(&self) -> i64 {
        let out = self
            .etcdctl(&[
                "get",
                "-w",
                "json",
                "--",
                "outrigger-harness/revision-probe",
            ])
            .await;
        let value: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        lenient_i64(&value["header"]["revision"]).unwrap_or_else(|| panic!("no revision in {out}"))
    }

    /// Compacts (physically) up to the current revision and returns it. A
    /// revision that is already compacted is not an error.
    pub async fn compact_to_latest(&self) -> i64 {
        let rev = self.revision().await;
        match self
            .try_etcdctl(&["compact", &rev.to_string(), "--physical"])
            .await
        {
            Ok(_) => rev,
            Err(e) if e.contains("compacted") => rev,
            Err(e) => panic!("etcdctl compact {rev} failed: {e}"),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://{}", loopback(self.peer_port));
        let mut cmd = Command::new(etcd_binary());
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("{}={peer}", self.name)])
            .args([
                "--initial-cluster-token",
                &self.name,
                "--initial-cluster-state",
                "new",
            ])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        let mut process = ChildProcess::spawn(&self.name, cmd, &self.log_path());
        process.dump_log_on_panic = false;
        self.process = Some(process);
    }

    /// Polls `/health` until healthy (true) or the process exits (false).
    async fn wait_healthy_or_exit(&mut self) -> bool {
        let addr = self.client_addr();
        let what = format!("etcd at {addr} to be healthy");
        let process = self.process.as_mut().expect("spawned");
        let result = wait_for(&what, START_TIMEOUT, || {
            let exited = process.try_status();
            async move {
                if exited.is_some() {
                    return Ok(false);
                }
                match try_get(addr, "/health").await {
                    Ok((200, body)) if body.replace(' ', "").contains(r#""health":"true""#) => {
                        Ok(true)
                    }
                    Ok((code, body)) => Err(format!("{code} {body}")),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await;
        match result {
            Ok(healthy) => healthy,
            Err(t) => panic!(
                "{t}\n--- etcd log (last 40 lines) ---\n{}",
                super::process::tail(&self.log(), 40)
            ),
        }
    }

    fn assert_running(&mut self, what: &str) {
        if !self.is_running() {
            panic!(
                "etcd {what} failed: the process exited\n--- etcd log (last 40 lines) ---\n{}",
                super::process::tail(&self.log(), 40)
            );
        }
    }
}

/// Decodes `etcdctl get -w json` output into (key, value) pairs.
pub fn decode_kvs(json: &str) -> Vec<(String, String)> {
    let value: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("etcdctl json ({e}): {json}"));
    let kvs = value["kvs"].as_array().cloned().unwrap_or_default();
    kvs.iter()
        .map(|kv| (b64_field(kv, "key"), b64_field(kv, "value")))
        .collect()
}

fn b64_field(kv: &serde_json::Value, field: &str) -> String {
    let encoded = kv[field].as_str().unwrap_or_default();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap_or_else(|e| panic!("etcdctl {field} {encoded:?} is not base64: {e}"));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An integer that etcdctl may print as a JSON number or string.
fn lenient_i64(value: &serde_json::Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_str()?.parse().ok())
}
