//! Watching a sidecar *during* a fault: a background task polls its routing
//! table and its memory, so a test can assert what held the whole time
//! ("the table for `b` never emptied", "RSS never exceeded N"), not only
//! what is true after the fault is over.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::client::try_get;
use super::mesh::routed_instances;
use super::metrics::parse_metric;

/// How often the watchdog samples. Fast enough to catch a table that is
/// empty for a fraction of a second, slow enough to cost little.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// Resident set size of process `pid` in bytes (`VmRSS` in
/// `/proc/<pid>/status`, which is in KiB whatever the page size).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// What a [`TableWatch`] saw.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    /// Samples taken (table polls that answered).
    pub samples: usize,
    /// The fewest instances of the watched service in any sample.
    pub min_instances: usize,
    /// The largest RSS seen, in bytes.
    pub max_rss: u64,
    /// Admin polls that failed (the sidecar did not answer `/routes`).
    pub failed_polls: usize,
}

/// Polls one sidecar's `/routes` (instances of one service) and RSS until
/// stopped.
pub struct TableWatch {
    stop: Arc<AtomicBool>,
    samples: Arc<AtomicUsize>,
    min: Arc<AtomicUsize>,
    max_rss: Arc<AtomicU64>,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TableWatch {
    /// Starts watching `service` in the table (`/routes`) of the sidecar
    /// whose admin listener is `admin` and whose process is `pid`.
    pub fn start(admin: SocketAddr, pid: u32, service: &str) -> TableWatch {
        Self::spawn(admin, pid, service, false)
    }

    /// Like [`TableWatch::start`], but counts `service`'s endpoints from the
    /// `outrigger_endpoints` gauge on `/metrics`: for tables so large that
    /// rendering `/routes` every 50 ms would itself load the sidecar.
    pub fn start_by_metrics(admin: SocketAddr, pid: u32, service: &str) -> TableWatch {
        Self::spawn(admin, pid, service, true)
    }

    fn spawn(admin: SocketAddr, pid: u32, service: &str, by_metrics: bool) -> TableWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(AtomicUsize::new(0));
        let min = Arc::new(AtomicUsize::new(usize::MAX));
        let max_rss = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let service = service.to_string();
        let task = tokio::spawn({
            let (stop, samples, min, max_rss, failed) = (
                stop.clone(),
                samples.clone(),
                min.clone(),
                max_rss.clone(),
                failed.clone(),
            );
            async move {
                while !stop.load(Ordering::SeqCst) {
                    if let Some(rss) = rss_bytes(pid) {
                        max_rss.fetch_max(rss, Ordering::SeqCst);
                    }
                    let path = if by_metrics { "/metrics" } else { "/routes" };
                    let polled =
                        tokio::time::timeout(Duration::from_secs(2), try_get(admin, path)).await;
                    let count = match polled {
                        Ok(Ok((200, body))) if by_metrics => {
                            let series = format!("outrigger_endpoints{{service=\"{service}\"");
                            Some(parse_metric(&body, &series).unwrap_or(0.0) as usize)
                        }
                        Ok(Ok((200, body))) => serde_json::from_str(&body)
                            .ok()
                            .map(|routes| routed_instances(&routes, &service).len()),
                        _ => None,
                    };
                    match count {
                        Some(n) => {
                            min.fetch_min(n, Ordering::SeqCst);
                            samples.fetch_add(1, Ordering::SeqCst);
                        }
                        None => {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    tokio::time::sleep(SAMPLE_INTERVAL).await;
                }
            }
        });
        TableWatch {
            stop,
            samples,
            min,
            max_rss,
            failed,
            task,
        }
    }

    /// What was seen so far.
    pub fn observed(&self) -> Observed {
        let min = self.min.load(Ordering::SeqCst);
        Observed {
            samples: self.samples.load(Ordering::SeqCst),
            min_instances: if min == usize::MAX { 0 } else { min },
            max_rss: self.max_rss.load(Ordering::SeqCst),
            failed_polls: self.failed.load(Ordering::SeqCst),
        }
    }

    /// Stops watching and returns what was seen.
    pub async fn stop(self) -> Observed {
        self.stop.store(true, Ordering::SeqCst);
        let seen = self.observed();
        let _ = self.task.await;
        seen
    }
}
