//! Waiting for a condition instead of sleeping.
//!
//! Fixed sleeps make tests both slow and flaky (too short on a loaded CI
//! machine, too long everywhere else). Instead, every wait in the harness
//! polls a condition every [`POLL_INTERVAL`] until it holds or a deadline
//! passes, and a timeout names what was awaited and for how long.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`wait_until`] and [`wait_for`] re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The result of one poll of a condition: done (with a value) or not yet
/// (optionally with a reason, reported if the wait times out).
///
/// Implemented for `bool` (value `()`), `Option<T>` and `Result<T, E>`
/// (the last error is kept for the timeout message).
pub trait Outcome {
    /// What the wait returns once the condition holds.
    type Value;
    /// `Ok(value)` when done; `Err(reason)` to poll again.
    fn into_outcome(self) -> Result<Self::Value, Option<String>>;
}

impl Outcome for bool {
    type Value = ();
    fn into_outcome(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn into_outcome(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Debug> Outcome for Result<T, E> {
    type Value = T;
    fn into_outcome(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(format!("{e:?}")))
    }
}

/// A wait that ran out of time; its `Display` is the panic message of
/// [`wait_until`].
#[derive(Debug, Clone)]
pub struct Timeout {
    /// What was awaited.
    pub what: String,
    /// How long the wait lasted.
    pub elapsed: Duration,
    /// The reason the last poll gave, if any.
    pub last: Option<String>,
}

impl std::fmt::Display for Timeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}",
            self.elapsed, self.what
        )?;
        if let Some(last) = &self.last {
            write!(f, " (last: {last})")?;
        }
        Ok(())
    }
}

/// Polls `f` every [`POLL_INTERVAL`] until it reports done, returning its
/// value, or returns a [`Timeout`] once `timeout` has passed. `f` is always
/// polled at least once, and once more at the deadline.
pub async fn wait_for<F, Fut, R>(
    what: &str,
    timeout: Duration,
    mut f: F,
) -> Result<R::Value, Timeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = R>,
    R: Outcome,
{
    let start = Instant::now();
    loop {
        let last = match f().await.into_outcome() {
            Ok(value) => return Ok(value),
            Err(last) => last,
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(Timeout {
                what: what.to_string(),
                elapsed,
                last,
            });
        }
        tokio::time::sleep(POLL_INTERVAL.min(timeout - elapsed)).await;
    }
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `true`, `Some(v)` or
/// `Ok(v)`, and returns `()`/`v`.
///
/// # Panics
/// After `timeout`, with `what`, the elapsed time and the last error.
pub async fn wait_until<F, Fut, R>(what: &str, timeout: Duration, f: F) -> R::Value
where
    F: FnMut() -> Fut,
    Fut: Future<Output = R>,
    R: Outcome,
{
    match wait_for(what, timeout, f).await {
        Ok(value) => value,
        Err(timeout) => panic!("{timeout}"),
    }
}

/// Timing tests (latency or traffic-share assertions) run alone: they take
/// this lock exclusively, and every other async test takes it shared, so on
/// a 2-core machine no other test's sidecars compete with a measurement.
pub async fn exclusive() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    timing_lock().write().await
}

/// The shared side of [`exclusive`]: ordinary tests run in parallel with
/// each other, never with a timing test.
pub async fn shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    timing_lock().read().await
}

fn timing_lock() -> &'static tokio::sync::RwLock<()> {
    static LOCK: std::sync::OnceLock<tokio::sync::RwLock<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::RwLock::new(()))
}
