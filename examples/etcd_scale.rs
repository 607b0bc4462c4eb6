//! Benchmark (not a test): how a sidecar copes with a large etcd registry.
//!
//! Loads `SERVICES` × `INSTANCES` registrations into a running etcd, starts
//! an outrigger sidecar against it, and reports:
//! - the initial load time (process start → every endpoint routable),
//! - the sidecar's RSS with that table,
//! - the time to apply one change (a put in etcd → the new service routable
//!   through the outbound listener), over several changes.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/etcd_scale --etcd http://127.0.0.1:2379 --sidecar target/release/outrigger
//! ```
//! `bench/etcd-scale.sh` starts a throwaway etcd and runs this.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use etcd_client::Client;

#[derive(Parser)]
struct Args {
    /// etcd client URL.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd: String,
    /// The outrigger binary.
    #[arg(long, default_value = "target/release/outrigger")]
    sidecar: PathBuf,
    /// Services to load.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Instances per service.
    #[arg(long, default_value_t = 3)]
    instances: usize,
    /// Changes to time after the initial load.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Base port for the sidecar's listeners.
    #[arg(long, default_value_t = 26000)]
    port: u16,
}

fn record(service: &str, instance: &str, port: u32) -> String {
    format!(
        r#"{{"service":"{service}","instance":"{instance}","address":"127.0.0.1:{port}","weight":100}}"#
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut etcd = Client::connect([args.etcd.as_str()], None).await?;
    etcd.delete(
        "/outrigger/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await?;
    let t = Instant::now();
    for s in 0..args.services {
        for i in 0..args.instances {
            let (svc, inst) = (format!("svc-{s}"), format!("svc-{s}-{i}"));
            let key = format!("/outrigger/services/{svc}/{inst}");
            etcd.put(key, record(&svc, &inst, 30000 + (s * 10 + i) as u32), None)
                .await?;
        }
    }
    let total = args.services * args.instances;
    println!(
        "loaded {total} registrations into etcd in {:?}",
        t.elapsed()
    );

    let dir = std::env::temp_dir().join(format!("outrigger-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (out, inb, admin) = (args.port, args.port + 1, args.port + 2);
    let config = format!(
        r#"[service]
name = "scale"
instance_id = "scale-1"
address = "127.0.0.1:{admin}"
[listeners]
outbound = "127.0.0.1:{out}"
inbound = "127.0.0.1:{inb}"
admin = "127.0.0.1:{admin}"
[registry]
kind = "etcd"
endpoints = ["{}"]
"#,
        args.etcd
    );
    let path = dir.join("scale.toml");
    std::fs::write(&path, config)?;
    let started = Instant::now();
    let mut child = std::process::Command::new(&args.sidecar)
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .spawn()?;
    let outbound: SocketAddr = format!("127.0.0.1:{out}").parse()?;
    // The last service loaded is routable once the whole initial read is in.
    let last = format!("svc-{}", args.services - 1);
    wait_routable(outbound, &last, Duration::from_secs(60)).await?;
    let load_time = started.elapsed();
    let rss = rss_kib(child.id()).unwrap_or(0);
    println!(
        "sidecar: every endpoint routable {load_time:?} after start; RSS {:.1} MiB",
        rss as f64 / 1024.0
    );

    let (mut delays, mut commits) = (Vec::new(), Vec::new());
    for n in 0..args.changes {
        let svc = format!("new-{n}");
        let key = format!("/outrigger/services/{svc}/{svc}-0");
        let t = Instant::now();
        let value = record(&svc, &format!("{svc}-0"), 40000 + n as u32);
        etcd.put(key, value, None).await?;
        // etcd's own commit (raft + fsync) is not the sidecar's doing.
        let committed = Instant::now();
        commits.push(committed - t);
        wait_routable(outbound, &svc, Duration::from_secs(10)).await?;
        delays.push(committed.elapsed());
    }
    delays.sort();
    commits.sort();
    println!(
        "one change, {} samples, {total} endpoints: etcd commit p50 {:?}; committed -> routable p50 {:?}, max {:?}",
        delays.len(),
        commits[commits.len() / 2],
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    let build = metric(outbound, args.port + 2).await.unwrap_or_default();
    println!("sidecar's own table rebuilds: {build}");
    println!(
        "RSS after changes: {:.1} MiB",
        rss_kib(child.id()).unwrap_or(0) as f64 / 1024.0
    );
    let _ = child.kill();
    let _ = child.wait();
    etcd.delete(
        "/outrigger/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await?;
    Ok(())
}

/// Routable = the outbound listener no longer answers 503 "no-route" for it
/// (the fake endpoints refuse connections, so a routable service gives 502).
async fn wait_routable(outbound: SocketAddr, service: &str, limit: Duration) -> Result<(), String> {
    let t = Instant::now();
    loop {
        if let Ok(kind) = error_kind(outbound, service).await {
            if kind != "no-route" {
                return Ok(());
            }
        }
        if t.elapsed() > limit {
            return Err(format!("{service} not routable after {limit:?}"));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

async fn error_kind(
    outbound: SocketAddr,
    service: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(outbound).await?;
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {service}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_lowercase();
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("x-outrigger-error: ").map(str::to_string))
        .unwrap_or_else(|| "none".into()))
}

/// The applier's rebuild-time histogram, summarised from `/metrics`.
async fn metric(_outbound: SocketAddr, admin_port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", admin_port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let (sum, count) = (
        value("outrigger_routing_table_build_seconds_sum")?,
        value("outrigger_routing_table_build_seconds_count")?,
    );
    Some(format!("{count} builds, mean {:.2} ms", sum / count * 1e3))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
