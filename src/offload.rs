//! Control-plane work off the request thread.
//!
//! With the default single worker thread, every task shares one thread
//! with every request. Parsing a registry's full answer or rebuilding a
//! large routing table is CPU work of tens of milliseconds at 10k
//! endpoints; run inline it held every request for that long (a 10k-entry
//! static file rewritten every second: p99 78 ms, worst 100 ms, at 1000
//! req/s); so did rendering the admin API's `/routes` (85 ms) and
//! `/metrics` (20 ms) at that size. [`run`] moves such a job to tokio's
//! blocking pool and lowers that thread's scheduling priority, so that on a
//! busy machine the kernel prefers the request thread too: the table is
//! published a little later, and requests do not wait for it.

use tokio::task::{JoinError, JoinHandle};

/// `nice` value for threads doing control-plane work: below every request
/// thread's, far from the lowest (19), so a table still builds promptly
/// on an idle machine.
const NICENESS: i32 = 10;

/// Run `job` on the blocking pool at lowered priority and wait for it
/// without holding the calling thread. An `Err` means the job panicked.
pub async fn run<T, F>(job: F) -> Result<T, JoinError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn(job).await
}

/// Start `job` on the blocking pool at lowered priority, for a caller that
/// checks on it later instead of waiting. Must be called within a tokio
/// runtime (the pool's own threads count).
pub fn spawn<T, F>(job: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        lower_priority();
        job()
    })
}

/// Lower the calling thread's priority (on Linux, `nice` is per thread).
/// Idempotent: a blocking-pool thread that already ran a job keeps its
/// value. Failure is harmless (the job then runs at normal priority).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn lower_priority() {
    // SAFETY: gettid and setpriority have no preconditions and touch no
    // memory of ours; `who` is this thread's id, so only it is affected.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICENESS);
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn niceness() -> i32 {
        // SAFETY: as above; getpriority only reads.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[tokio::test]
    async fn jobs_run_off_the_calling_thread_at_lower_priority() {
        let caller = std::thread::current().id();
        let base = niceness();
        let (thread, nice) = run(|| (std::thread::current().id(), niceness()))
            .await
            .expect("the job does not panic");
        assert_ne!(thread, caller, "the job ran on the request thread");
        assert_eq!(
            nice,
            (base + NICENESS).min(19),
            "the job's thread was not reniced"
        );
        assert_eq!(niceness(), base, "the calling thread's priority changed");
    }
}
