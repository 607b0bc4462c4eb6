//! The sidecar's CPU scheduling policy (`src/scheduling.rs`): `SCHED_BATCH`
//! by default, the normal policy when configured, and back to the normal
//! policy while CPU-bound neighbours would make a batch task wait for the
//! scheduler tick. The policy is read from the kernel, per thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::client::{self, get};
use crate::support::mesh::{static_registry, SidecarSpec, StaticPair};
use crate::support::procfs::stat_field;
use crate::support::{exclusive, shared, wait_until, FileDir, Sidecar, Upstream};

const SCHED_OTHER: u64 = 0;
const SCHED_BATCH: u64 = 3;

/// The policy of every thread of `pid`: field 41 of
/// `/proc/PID/task/TID/stat`.
fn thread_policies(pid: u32) -> Result<Vec<u64>, String> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let path = entry.map_err(|e| e.to_string())?.path().join("stat");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // the thread exited
        };
        out.push(stat_field(&text, 41).map_err(|e| format!("{path:?}: {e}: {text}"))?);
    }
    Ok(out)
}

/// Wait until every thread of `sidecar` runs under `policy` and its gauge
/// says so.
async fn wait_policy(sidecar: &Sidecar, name: &str, policy: u64, timeout: Duration) {
    let pid = sidecar.pid();
    let gauge = f64::from(u8::from(policy == SCHED_BATCH));
    wait_until(
        &format!("{name}'s threads under policy {policy}"),
        timeout,
        || async move {
            let policies = thread_policies(pid)?;
            let metric = sidecar.metric_value("outrigger_sched_batch").await;
            match policies.iter().all(|p| *p == policy) && metric == Some(gauge) {
                true => Ok(()),
                false => Err(format!("threads {policies:?}, gauge {metric:?}")),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn batch_by_default_and_normal_when_configured() {
    let _shared = shared().await;
    let mesh = StaticPair::start().await;
    wait_policy(&mesh.a, "a", SCHED_BATCH, Duration::from_secs(10)).await;
    wait_policy(&mesh.b, "b", SCHED_BATCH, Duration::from_secs(10)).await;
    let res = client::request(mesh.outbound(), get("http://b/")).await;
    assert_eq!(res.status(), 200);

    let files = FileDir::new();
    let svc = Upstream::start("n1").await;
    let spec = SidecarSpec::new("n", "n-1", &svc, static_registry(&files.file("e.toml")));
    files.write_atomic("e.toml", "");
    let toml = spec
        .toml()
        .replace("[runtime]\n", "[runtime]\nscheduling = \"normal\"\n");
    let mut normal = Sidecar::start("n-1", &toml);
    normal.wait_ready().await;
    wait_policy(&normal, "n", SCHED_OTHER, Duration::from_secs(10)).await;
    let (_, config) = normal.admin_get("/config").await;
    let config: serde_json::Value = serde_json::from_str(&config).expect("/config is JSON");
    assert_eq!(config["runtime"]["scheduling"], "normal");
}

/// With more busy loops than CPUs, a batch task waits for the tick after
/// every wake-up: the sidecars must notice, go back to the normal policy,
/// and return to batch once the busy loops stop.
#[tokio::test]
async fn cpu_bound_neighbours_send_it_back_to_the_normal_policy() {
    let _alone = exclusive().await;
    let mesh = StaticPair::start().await;
    wait_policy(&mesh.a, "a", SCHED_BATCH, Duration::from_secs(10)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs: Vec<_> = (0..cpus * 2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        })
        .collect();
    // Traffic gives the sidecars wake-ups to be judged on.
    let outbound = mesh.outbound();
    let traffic_stop = stop.clone();
    let traffic = tokio::spawn(async move {
        while !traffic_stop.load(Ordering::Relaxed) {
            let _ = client::try_request(outbound, get("http://b/")).await;
        }
    });
    let fell_back = wait_until(
        "a sidecar to leave SCHED_BATCH under CPU-bound neighbours",
        Duration::from_secs(60),
        || async {
            let a = mesh.a.metric_value("outrigger_sched_fallbacks_total").await;
            let b = mesh.b.metric_value("outrigger_sched_fallbacks_total").await;
            match (a, b) {
                (Some(a), _) if a >= 1.0 => Ok("a"),
                (_, Some(b)) if b >= 1.0 => Ok("b"),
                other => Err(format!("fallbacks (a, b) = {other:?}")),
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().expect("busy loop");
    }
    let _ = traffic.await;

    // The hold-off after the first fallbacks is seconds, and the probe that
    // follows now sees a quiet box.
    let sidecar = if fell_back == "a" { &mesh.a } else { &mesh.b };
    wait_policy(sidecar, fell_back, SCHED_BATCH, Duration::from_secs(30)).await;
    let res = client::request(mesh.outbound(), get("http://b/")).await;
    assert_eq!(res.status(), 200);
}
