//! The sidecar's CPU scheduling policy: `SCHED_BATCH` unless CPU-bound
//! neighbours make it wait for the scheduler tick, the normal policy while
//! they do.
//!
//! Why batch. A sidecar runs in short bursts, each started by a socket
//! wake-up. Under the normal policy (`SCHED_OTHER`) a woken task preempts the
//! task running on its CPU, usually the very task that woke it and was about
//! to block anyway (a TCP wake-up is a synchronous one). That costs a pair of
//! context switches and, in a VM, an interrupt to a busy vCPU. A
//! `SCHED_BATCH` task does not preempt on wake-up: it runs when the current
//! task blocks, or at the next scheduler tick. On the two-hop bench chain at
//! 1000 req/s (2-vCPU VM, Linux 6.18) that cut the whole box's CPU per
//! request from 318-379 to 178-210 µs and halved the added p50; in quick
//! harness runs max RPS rose 2-9 % (README, Performance). Batching has a
//! price at light load: on a 2-vCPU AMD VM it saved 17-20 % of the CPU and
//! lowered the p50 and p99.9, but raised the p90 by about 15 % and the p99
//! by about 28 % over HTTP/1.1, because a woken hop waits for the task on
//! its CPU to block. `runtime.scheduling = "normal"` is for deployments
//! that rank that tail above CPU.
//!
//! Why adaptive. When the CPU is taken by a task that does not block (a
//! CPU-bound neighbour), a batch task waits for the tick instead: with two
//! busy loops on the 2-vCPU box, p50 through the chain went from 0.13-0.23
//! to 1.4-1.6 ms. So [`run`] watches the run-queue delay of the sidecar's
//! threads (`/proc/self/task/*/schedstat`): its mean per time slice was
//! 16-34 µs without CPU-bound neighbours, batch or not, at low load and at
//! saturation, and 160-204 µs in batch with them. Above [`MAX_MEAN_DELAY`]
//! the sidecar goes back to the normal policy, and tries batch again after a
//! hold-off that doubles on each failed try, so a busy node pays for a probe
//! at most once a minute. Under the normal policy the delay says nothing
//! about what batch would cost (the sidecar preempts), hence the probes.

use std::time::{Duration, Instant};

/// How often the run-queue delay is read.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// Mean run-queue delay per time slice above which batch costs latency.
pub const MAX_MEAN_DELAY: Duration = Duration::from_micros(100);
/// Time slices needed before a mean is trusted (a quiet sidecar takes
/// longer to judge, and is harmed less meanwhile).
const MIN_SLICES: u64 = 32;
/// First hold-off under the normal policy after batch failed.
const FIRST_HOLD: Duration = Duration::from_secs(1);
/// Longest hold-off: the most a persistently busy node pays is one probe
/// (a few hundred milliseconds of batch) per this interval.
const MAX_HOLD: Duration = Duration::from_secs(64);

/// The policy in force for all of the process's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// `SCHED_OTHER`: preempts on wake-up.
    Normal,
    /// `SCHED_BATCH`: waits for the current task to block or the tick.
    Batch,
}

/// Cumulative run-queue figures of the process's threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Nanoseconds spent runnable but waiting for a CPU.
    pub run_delay_ns: u64,
    /// Time slices run.
    pub slices: u64,
}

/// Decides the policy from successive [`Sample`]s; free of I/O so that its
/// rules can be tested with made-up figures.
#[derive(Debug)]
pub struct Controller {
    policy: Policy,
    base: Sample,
    hold_until: Option<Instant>,
    hold: Duration,
}

impl Controller {
    /// Start in batch, judged from `base` on.
    pub fn new(base: Sample) -> Self {
        Controller {
            policy: Policy::Batch,
            base,
            hold_until: None,
            hold: FIRST_HOLD,
        }
    }

    /// The policy the controller wants now.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Take a new reading; returns the policy to switch to, if it changes.
    pub fn step(&mut self, now: Instant, sample: Sample) -> Option<Policy> {
        match self.policy {
            Policy::Batch => {
                // A thread that exited takes its figures with it: start over.
                if sample.slices < self.base.slices || sample.run_delay_ns < self.base.run_delay_ns
                {
                    self.base = sample;
                    return None;
                }
                let slices = sample.slices - self.base.slices;
                if slices < MIN_SLICES {
                    return None;
                }
                let mean_ns = (sample.run_delay_ns - self.base.run_delay_ns) / slices;
                self.base = sample;
                if u128::from(mean_ns) > MAX_MEAN_DELAY.as_nanos() {
                    self.policy = Policy::Normal;
                    self.hold_until = Some(now + self.hold);
                    self.hold = (self.hold * 2).min(MAX_HOLD);
                    return Some(Policy::Normal);
                }
                self.hold = FIRST_HOLD;
                None
            }
            Policy::Normal => {
                if self.hold_until.is_some_and(|t| now < t) {
                    return None;
                }
                self.policy = Policy::Batch;
                self.base = sample;
                Some(Policy::Batch)
            }
        }
    }
}

/// Run forever: keep the process's threads in batch unless CPU-bound
/// neighbours make batch wait for the tick. Returns at once if the platform
/// or a sandbox refuses the policy; the sidecar then keeps the normal one.
pub async fn run(metrics: std::sync::Arc<crate::metrics::Metrics>) {
    let Some(first) = os::sample() else {
        tracing::debug!("no per-thread scheduler statistics; keeping the normal policy");
        return;
    };
    if let Err(e) = os::apply(Policy::Batch) {
        tracing::info!(error = %e, "SCHED_BATCH refused; keeping the normal policy");
        return;
    }
    metrics.sched_batch.set(1);
    let mut controller = Controller::new(first);
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(sample) = os::sample() else { continue };
        let Some(policy) = controller.step(Instant::now(), sample) else {
            continue;
        };
        if let Err(e) = os::apply(policy) {
            // Half-applied is possible (a thread refused); the normal policy
            // is the safe state to leave everything in.
            tracing::warn!(error = %e, ?policy, "cannot change the scheduling policy; normal from now on");
            let _ = os::apply(Policy::Normal);
            metrics.sched_batch.set(0);
            return;
        }
        metrics.sched_batch.set(i64::from(policy == Policy::Batch));
        if policy == Policy::Normal {
            metrics.sched_fallbacks.inc();
            tracing::debug!("run-queue delay high under SCHED_BATCH; back to the normal policy");
        }
    }
}

#[cfg(target_os = "linux")]
mod os {
    use super::{Policy, Sample};

    /// Sum `/proc/self/task/*/schedstat` (run time, run delay, slices).
    pub(super) fn sample() -> Option<Sample> {
        let mut total = Sample::default();
        for entry in std::fs::read_dir("/proc/self/task").ok()? {
            let Ok(entry) = entry else { continue };
            // A thread may exit between the listing and the read.
            let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
                continue;
            };
            let mut fields = text.split_ascii_whitespace().skip(1);
            let delay = fields.next().and_then(|f| f.parse::<u64>().ok())?;
            let slices = fields.next().and_then(|f| f.parse::<u64>().ok())?;
            total.run_delay_ns = total.run_delay_ns.saturating_add(delay);
            total.slices = total.slices.saturating_add(slices);
        }
        Some(total)
    }

    /// Set `policy` on every thread of the process. Threads started later
    /// inherit the policy of the thread that creates them.
    pub(super) fn apply(policy: Policy) -> std::io::Result<()> {
        let raw = match policy {
            Policy::Normal => libc::SCHED_OTHER,
            Policy::Batch => libc::SCHED_BATCH,
        };
        for entry in std::fs::read_dir("/proc/self/task")? {
            let Ok(entry) = entry else { continue };
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Err(e) = set(tid, raw) {
                // The thread exited after the listing.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    #[allow(unsafe_code)]
    fn set(tid: libc::pid_t, policy: libc::c_int) -> std::io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param for the call's duration;
        // the call only changes the policy of a thread of this process
        // (SCHED_OTHER and SCHED_BATCH at priority 0 need no privilege).
        let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// The calling thread's policy, for tests.
    #[cfg(test)]
    #[allow(unsafe_code)]
    pub(super) fn current() -> libc::c_int {
        // SAFETY: no arguments beyond the calling thread's id (0).
        unsafe { libc::sched_getscheduler(0) }
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    use super::{Policy, Sample};

    pub(super) fn sample() -> Option<Sample> {
        None
    }

    pub(super) fn apply(_: Policy) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
mod tests;
