//! The idle list behind both keep-alive pools to the local service.
//!
//! There is one local service and one address, so a pool is just a list of
//! idle connections behind a mutex, held only to push or pop, plus a task
//! that expires connections idle too long while no request comes to do it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// Idle connections are closed after this (hyper-util's client's setting).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// At most this many idle connections are kept; a burst's extra ones close
/// when they come back.
const MAX_IDLE: usize = 256;

/// How often idle connections are checked for expiry while no request
/// comes to do it.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// What a pooled connection says about itself when it is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Ready for a request.
    Ready,
    /// Still busy with an earlier exchange: leave it in the list.
    Busy,
    /// Gone (closed by the service, or unusable): drop it.
    Closed,
}

/// A connection that can sit in an [`IdleList`].
pub trait Pooled: Send + 'static {
    /// Its state right now, without waiting.
    fn state(&mut self) -> State;
}

#[derive(Debug)]
struct Entry<C> {
    conn: C,
    since: Instant,
}

/// Idle connections to one address.
#[derive(Debug)]
pub struct IdleList<C> {
    /// Oldest first, so expiry trims the front and checkouts pop the back
    /// (the most recently used connection, whose buffers are warm).
    idle: Mutex<Vec<Entry<C>>>,
    sweeper: AtomicBool,
    /// How long a connection may sit idle before it is closed.
    timeout: Duration,
}

impl<C: Pooled> IdleList<C> {
    /// An empty list whose connections expire after [`IDLE_TIMEOUT`].
    pub fn new() -> Arc<Self> {
        Self::with_timeout(IDLE_TIMEOUT)
    }

    /// An empty list whose connections expire after `timeout`.
    pub fn with_timeout(timeout: Duration) -> Arc<Self> {
        Arc::new(IdleList {
            idle: Mutex::new(Vec::new()),
            sweeper: AtomicBool::new(false),
            timeout,
        })
    }

    /// The most recently used ready connection, dropping closed and
    /// expired ones on the way.
    pub fn checkout(&self) -> Option<C> {
        let mut idle = self.idle.lock().ok()?;
        // The sweep runs only every so often; a connection past its time
        // is never handed out, whoever is first to notice.
        if let Some(oldest) = idle.first() {
            let now = Instant::now();
            if now.saturating_duration_since(oldest.since) >= self.timeout {
                idle.retain(|e| now.saturating_duration_since(e.since) < self.timeout);
            }
        }
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            match idle[i].conn.state() {
                State::Ready => return Some(idle.remove(i).conn),
                State::Closed => {
                    idle.remove(i);
                }
                State::Busy => {}
            }
        }
        None
    }

    /// Put a connection back (unless it is closed or the list is full).
    pub fn checkin(self: &Arc<Self>, mut conn: C) {
        if conn.state() == State::Closed {
            return;
        }
        if !self.sweeper.swap(true, Ordering::Relaxed) {
            // Started here, not in `new`, because this always runs inside
            // the runtime.
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push(Entry {
                    conn,
                    since: Instant::now(),
                });
            }
        }
    }

    /// How many connections are in the list.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    /// Drop connections idle longer than the list's timeout or already
    /// closed.
    pub fn expire(&self, now: Instant) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain_mut(|e| {
                e.conn.state() != State::Closed
                    && now.saturating_duration_since(e.since) < self.timeout
            });
        }
    }

    /// Close every idle connection.
    pub fn clear(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

/// Expire idle connections periodically, for as long as the list lives.
async fn sweep<C: Pooled>(list: Weak<IdleList<C>>) {
    let every = match list.upgrade() {
        Some(l) => SWEEP_INTERVAL.min(l.timeout),
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(list) = list.upgrade() else { return };
        list.expire(Instant::now());
    }
}
