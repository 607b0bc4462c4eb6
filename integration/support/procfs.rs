//! What a process costs, read from `/proc/<pid>`: resident memory, CPU time
//! and open file descriptors.
//!
//! Hardening tests bound a sidecar's resources while it is attacked or
//! overloaded. CPU *time* (user + system) rather than wall-clock is what
//! they compare, because the machine is shared and wall-clock latency moves
//! with everyone else's load, while the CPU a sidecar burns per attack
//! request does not. [`PeakSampler`] samples RSS in the background, so a
//! test sees the peak during a transfer, not just the value at its end.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One reading of a process's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStats {
    /// Resident set size in bytes (`VmRSS`).
    pub rss_bytes: u64,
    /// User + system CPU time consumed so far.
    pub cpu: Duration,
    /// Entries in `/proc/<pid>/fd`.
    pub open_fds: usize,
}

impl ProcStats {
    /// RSS in MiB, for messages.
    pub fn rss_mib(&self) -> f64 {
        self.rss_bytes as f64 / (1024.0 * 1024.0)
    }
}

/// Reads `/proc/<pid>`.
///
/// # Panics
/// If the process does not exist or `/proc` is not Linux's.
pub fn stats(pid: u32) -> ProcStats {
    try_stats(pid).unwrap_or_else(|e| panic!("reading /proc/{pid}: {e}"))
}

/// [`stats`], or why it could not be read (e.g. the process exited).
pub fn try_stats(pid: u32) -> Result<ProcStats, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmRSS line")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // utime and stime are fields 14 and 15 of stat(5).
    let cpu_ticks = stat_field(&stat, 14)? + stat_field(&stat, 15)?;
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| e.to_string())?
        .count();
    Ok(ProcStats {
        rss_bytes: rss_kib * 1024,
        cpu: Duration::from_secs_f64(cpu_ticks as f64 / clock_ticks_per_second()),
        open_fds,
    })
}

/// Field `n` (1-based, as numbered in proc_pid_stat(5)) of a `stat` file's
/// text, counted after the command name, which may itself contain spaces
/// and ')'.
pub fn stat_field(stat: &str, n: usize) -> Result<u64, String> {
    let after = stat.rsplit_once(')').ok_or("malformed stat")?.1;
    // `after` starts at field 3 (state).
    n.checked_sub(3)
        .and_then(|i| after.split_whitespace().nth(i))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("stat field {n} missing"))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Samples the peak RSS and open-FD count of some processes every
/// `interval` until [`PeakSampler::stop`].
#[derive(Debug)]
pub struct PeakSampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<Peak>>,
}

/// The highest values one process reached while sampled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peak {
    /// Highest RSS seen, bytes.
    pub rss_bytes: u64,
    /// Most open file descriptors seen.
    pub open_fds: usize,
    /// Number of samples taken.
    pub samples: usize,
}

impl Peak {
    /// Peak RSS in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.rss_bytes as f64 / (1024.0 * 1024.0)
    }
}

impl PeakSampler {
    /// Starts sampling `pids`.
    pub fn start(pids: Vec<u32>, interval: Duration) -> PeakSampler {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut peaks = vec![Peak::default(); pids.len()];
            loop {
                for (pid, peak) in pids.iter().zip(peaks.iter_mut()) {
                    if let Ok(s) = try_stats(*pid) {
                        peak.rss_bytes = peak.rss_bytes.max(s.rss_bytes);
                        peak.open_fds = peak.open_fds.max(s.open_fds);
                        peak.samples += 1;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = rx.changed() => return peaks,
                }
            }
        });
        PeakSampler { stop, task }
    }

    /// Stops sampling; the peaks, in the order of the pids given.
    pub async fn stop(self) -> Vec<Peak> {
        let _ = self.stop.send(true);
        self.task.await.expect("sampler task")
    }
}
