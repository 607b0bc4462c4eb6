//! Registration: our instance key, bound to a lease we keep alive.
//!
//! [`Registrar::register`] is called on every healthy probe tick, so when
//! the key is already published with the same value on a live lease it
//! returns without any RPC; every [`VERIFY_INTERVAL`] it spends one `GET` to
//! check that nobody deleted or overwrote the key by hand. Otherwise it
//! (re)grants a lease if needed and *claims* the key with a transaction that
//! only writes it when the key is absent or already ours, so two sidecars
//! configured with the same instance id cannot silently hijack each other:
//! the second one waits out the first lease's TTL (it may be our own
//! `kill -9`ed previous incarnation) and then reports
//! [`RegistryError::Duplicate`].
//!
//! The keep-alive runs in its own task per lease and re-opens its stream
//! whenever it breaks (the `etcd-client` stream does not). A lease etcd
//! reports as expired or revoked (TTL 0), or one we could not renew for a
//! whole TTL, is never used again: the next `register` grants a fresh one
//! and moves the key to it in one transaction.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Backoff, Conn, EtcdError, Keys, REQUEST_TIMEOUT};
use crate::registry::{EndpointRecord, RegistryError};

/// How often an unchanged registration is checked against etcd (one `GET`).
/// Someone may delete the key by hand; ten seconds bounds how long such a
/// mistake hides us, at one cheap read per sidecar per interval.
const VERIFY_INTERVAL: Duration = Duration::from_secs(10);

/// Extra wait, on top of the TTL, before a key held by another lease is
/// reported as a duplicate: covers the lessor's expiry granularity, so that
/// our own previous incarnation's lease has surely expired by then.
const DUPLICATE_GRACE: Duration = Duration::from_secs(1);

/// Pause between claim attempts while another lease holds our key.
const CLAIM_RETRY: Duration = Duration::from_millis(250);

/// Deadline of the RPCs of `withdraw` and `deregister`: both run on the
/// probe-failure and SIGTERM paths, which must not stall on a dead etcd.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// First and largest pause before re-opening a broken keep-alive stream.
/// The cap stays well below TTL/3 for any TTL of a few seconds, so one
/// failed attempt does not cost the lease.
const KEEPALIVE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(1));

/// How many abandoned leases we remember: a key still bound to one of them
/// is ours to move to the new lease (see [`Registrar::claim`]).
const MAX_RETIRED: usize = 4;

/// Publishes our record; one per registry.
pub(super) struct Registrar {
    /// The shared client.
    conn: Arc<Conn>,
    /// Key layout.
    keys: Keys,
    /// Requested lease TTL (whole seconds).
    ttl: Duration,
    /// Serializes `register`, `withdraw` and `deregister`: each is a short
    /// sequence of RPCs that must not interleave with another. It is an
    /// async mutex because it is held across those RPCs; [`State`] itself
    /// sits behind a plain mutex that is never held across an `.await`.
    ops: tokio::sync::Mutex<()>,
    /// What we hold and what we published.
    state: Mutex<State>,
    /// Set by `deregister`: aborts a `register` in progress and refuses new
    /// ones, so a late probe tick cannot re-publish us during the drain.
    closing: watch::Sender<bool>,
}

/// Registration state.
#[derive(Default)]
struct State {
    /// The lease in use, with its keep-alive task.
    lease: Option<Lease>,
    /// Leases we stopped using but did not manage to revoke (newest last).
    retired: Vec<i64>,
    /// What we last wrote, if it should still be there.
    published: Option<Published>,
}

/// A key we wrote.
struct Published {
    /// The key.
    key: String,
    /// The exact value written.
    value: String,
    /// The lease it is bound to.
    lease: i64,
    /// When etcd last confirmed key, value and lease.
    verified_at: Instant,
}

/// A granted lease; dropping it stops its keep-alive (but does not revoke).
struct Lease {
    /// Shared with the keep-alive task.
    shared: Arc<LeaseShared>,
    /// The keep-alive task.
    keeper: JoinHandle<()>,
}

/// What the keep-alive task tells the registrar about a lease.
struct LeaseShared {
    /// etcd's lease id.
    id: i64,
    /// The TTL etcd granted (it may raise tiny TTLs to its minimum).
    ttl: Duration,
    /// Updated by the keep-alive task.
    status: Mutex<LeaseStatus>,
}

struct LeaseStatus {
    /// etcd said the lease is gone (TTL 0 or "lease not found").
    dead: bool,
    /// When the last keep-alive that etcd acknowledged was *sent*: the
    /// lease lives at least a TTL from then.
    renewed_at: Instant,
}

/// Why a keep-alive stream stopped.
enum StreamEnd {
    /// etcd says the lease no longer exists.
    Dead,
    /// The stream broke; `renewed` says whether it renewed the lease at all.
    Broken { error: EtcdError, renewed: bool },
}

/// Why a claim failed.
enum ClaimError {
    /// The lease we wrote with no longer exists.
    LeaseGone,
    /// Anything else, ready for the caller.
    Failed(RegistryError),
}

/// The lease TTL etcd is asked for: whole seconds (its unit), rounded up,
/// at least one.
pub(super) fn ttl_seconds(ttl: Duration) -> Duration {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

// === impl Registrar ===

impl Registrar {
    pub(super) fn new(conn: Arc<Conn>, keys: Keys, ttl: Duration) -> Self {
        Registrar {
            conn,
            keys,
            ttl,
            ops: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::default()),
            closing: watch::channel(false).0,
        }
    }

    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    pub(super) fn is_registered(&self) -> bool {
        let state = self.lock();
        match (&state.published, &state.lease) {
            (Some(p), Some(l)) => p.lease == l.shared.id && l.shared.is_alive(),
            _ => false,
        }
    }

    pub(super) fn lease_id(&self) -> Option<i64> {
        let state = self.lock();
        let lease = state.lease.as_ref()?;
        lease.shared.is_alive().then_some(lease.shared.id)
    }

    /// Ensure `me` is published; see the module docs.
    pub(super) async fn register(&self, me: &EndpointRecord) -> Result<(), RegistryError> {
        let mut closing = self.closing.subscribe();
        if *closing.borrow() {
            return Err(closed());
        }
        tokio::select! {
            result = self.register_serialized(me) => result,
            _ = closing.wait_for(|closing| *closing) => Err(closed()),
        }
    }

    async fn register_serialized(&self, me: &EndpointRecord) -> Result<(), RegistryError> {
        let _op = self.ops.lock().await;
        let key = self.keys.instance(&me.service, &me.instance);
        let value = me.encode();
        let due_check = {
            let state = self.lock();
            match (&state.published, &state.lease) {
                (Some(p), Some(l))
                    if p.key == key
                        && p.value == value
                        && p.lease == l.shared.id
                        && l.shared.is_alive() =>
                {
                    if p.verified_at.elapsed() < VERIFY_INTERVAL {
                        return Ok(());
                    }
                    Some(p.lease)
                }
                _ => None,
            }
        };
        if let Some(lease) = due_check {
            if self.verify(&key, &value, lease).await? {
                return Ok(());
            }
        }
        self.unpublish_other_key(&key).await;
        let mut regranted = false;
        loop {
            let lease = self.live_lease().await?;
            match self.claim(me, &key, &value, lease).await {
                Ok(()) => {
                    info!(key = %key, lease, "registered");
                    self.lock().published = Some(Published {
                        key,
                        value,
                        lease,
                        verified_at: Instant::now(),
                    });
                    self.revoke_retired();
                    return Ok(());
                }
                // Revoked or expired between our last renewal and the write:
                // one fresh lease, then give up until the next tick.
                Err(ClaimError::LeaseGone) if !regranted => {
                    info!(
                        lease,
                        "lease vanished while registering; granting a new one"
                    );
                    self.bury(lease);
                    regranted = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether etcd still holds exactly what we published; refreshes the
    /// check time if so.
    async fn verify(&self, key: &str, value: &str, lease: i64) -> Result<bool, RegistryError> {
        let k = key.to_owned();
        let resp = self
            .conn
            .call("get own key", |mut c| async move { c.get(k, None).await })
            .await?;
        let intact = resp
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == value.as_bytes() && kv.lease() == lease);
        let mut state = self.lock();
        if intact {
            if let Some(p) = state.published.as_mut() {
                p.verified_at = Instant::now();
            }
        } else {
            warn!(key = %key, "our registration was deleted or overwritten; publishing it again");
            state.published = None;
        }
        Ok(intact)
    }

    /// If we published under another key (the instance id or service name
    /// changed), delete that key, if it is still ours. Best effort.
    async fn unpublish_other_key(&self, key: &str) {
        let old = {
            let mut state = self.lock();
            match &state.published {
                Some(p) if p.key != key => state.published.take(),
                _ => None,
            }
        };
        if let Some(old) = old {
            if let Err(e) = self.delete_if_ours(&old, REQUEST_TIMEOUT).await {
                warn!(key = %old.key, error = %e, "could not delete our previous key; it expires with its lease");
            }
        }
    }

    /// The id of a live lease: the current one, or a newly granted one.
    async fn live_lease(&self) -> Result<i64, RegistryError> {
        {
            let mut state = self.lock();
            if let Some(lease) = &state.lease {
                if lease.shared.is_alive() {
                    return Ok(lease.shared.id);
                }
            }
            if let Some(old) = state.lease.take() {
                let id = old.shared.id;
                debug!(
                    lease = id,
                    "retiring a lease that expired or could not be renewed"
                );
                if !old.shared.is_dead() {
                    state.retire(id);
                }
            }
        }
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let resp = self
            .conn
            .call("lease grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        if !resp.error().is_empty() || resp.id() == 0 || resp.ttl() <= 0 {
            return Err(EtcdError::Protocol {
                op: "lease grant",
                message: format!("lease {} ttl {}: {:?}", resp.id(), resp.ttl(), resp.error()),
            }
            .into());
        }
        let granted = Duration::from_secs(resp.ttl().unsigned_abs());
        let shared = Arc::new(LeaseShared {
            id: resp.id(),
            ttl: granted,
            status: Mutex::new(LeaseStatus {
                dead: false,
                renewed_at: sent,
            }),
        });
        let keeper = tokio::spawn(keep_alive(self.conn.clone(), shared.clone()));
        info!(lease = shared.id, ttl = ?granted, "granted lease");
        let id = shared.id;
        self.lock().lease = Some(Lease { shared, keeper });
        Ok(id)
    }

    /// Writes `value` at `key` on `lease`, if the key is absent or ours.
    ///
    /// "Ours" means bound to `lease`, to a lease we retired, or to no lease
    /// at all (a hand-written key no sidecar owns, which would otherwise
    /// block this instance forever). A key held by any other lease may be
    /// our own previous incarnation's, so we retry until that lease had
    /// time to expire (TTL + [`DUPLICATE_GRACE`]) before giving up.
    async fn claim(
        &self,
        me: &EndpointRecord,
        key: &str,
        value: &str,
        lease: i64,
    ) -> Result<(), ClaimError> {
        let contested_for = self.ttl + DUPLICATE_GRACE;
        let mut contested_since: Option<Instant> = None;
        loop {
            let create = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([put(key, value, lease)]);
            if self.txn("claim key", create).await? {
                return Ok(());
            }
            if let Some(holder) = self.get(key).await? {
                let retired = self.lock().retired.contains(&holder.lease());
                if holder.lease() == lease || holder.lease() == 0 || retired {
                    if holder.lease() == 0 {
                        warn!(key = %key, "our instance key has no lease (written by hand?); taking it over");
                    }
                    let take_over = Txn::new()
                        .when([Compare::mod_revision(
                            key,
                            CompareOp::Equal,
                            holder.mod_revision(),
                        )])
                        .and_then([put(key, value, lease)]);
                    if self.txn("take over key", take_over).await? {
                        return Ok(());
                    }
                } else if contested_since.is_none() {
                    info!(
                        key = %key,
                        holder_lease = holder.lease(),
                        wait = ?contested_for,
                        "our instance key is held by another lease; waiting for it to expire"
                    );
                }
            }
            // The key changed under us, or someone else holds it.
            let since = *contested_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= contested_for {
                return Err(ClaimError::Failed(RegistryError::Duplicate {
                    service: me.service.to_string(),
                    instance: me.instance.to_string(),
                    key: key.to_owned(),
                }));
            }
            tokio::time::sleep(CLAIM_RETRY).await;
        }
    }

    /// Runs a transaction; `Ok(succeeded)`.
    async fn txn(&self, op: &'static str, txn: Txn) -> Result<bool, ClaimError> {
        match self
            .conn
            .call(op, |mut c| async move { c.txn(txn).await })
            .await
        {
            Ok(resp) => Ok(resp.succeeded()),
            Err(e) if e.is_lease_not_found() => Err(ClaimError::LeaseGone),
            Err(e) => Err(ClaimError::Failed(e.into())),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, ClaimError> {
        let k = key.to_owned();
        let mut resp = self
            .conn
            .call("get own key", |mut c| async move { c.get(k, None).await })
            .await
            .map_err(|e| ClaimError::Failed(e.into()))?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Deletes our key and keeps the lease (the probe may recover soon).
    pub(super) async fn withdraw(&self) -> Result<(), RegistryError> {
        let _op = self.ops.lock().await;
        let Some(published) = self.lock().published.take() else {
            return Ok(());
        };
        match self.delete_if_ours(&published, SHUTDOWN_TIMEOUT).await {
            Ok(()) => {
                info!(key = %published.key, "withdrew registration");
                Ok(())
            }
            Err(e) => {
                // Stop renewing instead: the key then expires within a TTL
                // even if etcd stays unreachable.
                {
                    let mut state = self.lock();
                    if let Some(lease) = state.lease.take() {
                        state.retire(lease.shared.id);
                    }
                }
                warn!(key = %published.key, error = %e, ttl = ?self.ttl, "could not withdraw; letting the lease expire instead");
                Err(RegistryError::Unavailable {
                    backend: "etcd",
                    message: format!(
                        "withdrawing {}: {e}; the lease is no longer renewed, so the key expires within {:?}",
                        published.key, self.ttl
                    ),
                })
            }
        }
    }

    /// Stops the keep-alive and revokes the lease, which deletes our key.
    pub(super) async fn deregister(&self) -> Result<(), RegistryError> {
        self.closing.send_replace(true);
        // A `register` in progress sees `closing` and returns at once.
        let _op = tokio::time::timeout(SHUTDOWN_TIMEOUT, self.ops.lock()).await;
        let (lease, retired) = {
            let mut state = self.lock();
            state.published = None;
            (state.lease.take(), std::mem::take(&mut state.retired))
        };
        if !retired.is_empty() {
            tokio::spawn(revoke_quietly(self.conn.clone(), retired));
        }
        let Some(lease) = lease else {
            return Ok(());
        };
        let id = lease.shared.id;
        drop(lease); // stops the keep-alive
        match self
            .conn
            .call_within("lease revoke", SHUTDOWN_TIMEOUT, |mut c| async move {
                c.lease_revoke(id).await
            })
            .await
        {
            Ok(_) => {
                info!(lease = id, "revoked our lease; the key bound to it is gone");
                Ok(())
            }
            Err(e) if e.is_lease_not_found() => Ok(()),
            Err(e) => Err(RegistryError::Unavailable {
                backend: "etcd",
                message: format!(
                    "revoking lease {id}: {e}; our key expires within {:?}",
                    self.ttl
                ),
            }),
        }
    }

    async fn delete_if_ours(&self, p: &Published, timeout: Duration) -> Result<(), EtcdError> {
        let txn = Txn::new()
            .when([Compare::lease(p.key.as_str(), CompareOp::Equal, p.lease)])
            .and_then([TxnOp::delete(p.key.as_str(), None)]);
        self.conn
            .call_within("delete own key", timeout, |mut c| async move {
                c.txn(txn).await
            })
            .await
            .map(drop)
    }

    /// Forgets a lease etcd no longer has.
    fn bury(&self, id: i64) {
        let mut state = self.lock();
        if state.lease.as_ref().is_some_and(|l| l.shared.id == id) {
            if let Some(lease) = state.lease.take() {
                lease.shared.mark_dead();
            }
        }
    }

    /// Revokes retired leases in the background, now that our key has
    /// moved off them.
    fn revoke_retired(&self) {
        let retired = std::mem::take(&mut self.lock().retired);
        if !retired.is_empty() {
            tokio::spawn(revoke_quietly(self.conn.clone(), retired));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl State ===

impl State {
    fn retire(&mut self, id: i64) {
        if !self.retired.contains(&id) {
            self.retired.push(id);
        }
        if self.retired.len() > MAX_RETIRED {
            self.retired.remove(0);
        }
    }
}

// === impl Lease ===

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

// === impl LeaseShared ===

impl LeaseShared {
    /// Not known dead, and renewed within its TTL.
    fn is_alive(&self) -> bool {
        let status = self.status();
        !status.dead && status.renewed_at.elapsed() < self.ttl
    }

    fn is_dead(&self) -> bool {
        self.status().dead
    }

    fn mark_dead(&self) {
        self.status().dead = true;
    }

    fn renewed(&self, sent: Instant) {
        let mut status = self.status();
        status.renewed_at = status.renewed_at.max(sent);
    }

    fn status(&self) -> MutexGuard<'_, LeaseStatus> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps `lease` alive until etcd says it is gone or the task is aborted.
async fn keep_alive(conn: Arc<Conn>, lease: Arc<LeaseShared>) {
    let (min, max) = KEEPALIVE_BACKOFF;
    let mut backoff = Backoff::new(min, max);
    let mut failing = false;
    loop {
        match keep_alive_stream(&conn, &lease).await {
            StreamEnd::Dead => {
                lease.mark_dead();
                info!(
                    lease = lease.id,
                    "etcd reports our lease expired or revoked; the next registration grants a new one"
                );
                return;
            }
            StreamEnd::Broken { error, renewed } => {
                if renewed {
                    backoff.reset();
                    failing = false;
                }
                if failing {
                    debug!(lease = lease.id, error = %error, "lease keep-alive still failing");
                } else {
                    warn!(lease = lease.id, error = %error, "lease keep-alive broke; re-opening it");
                    failing = true;
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One keep-alive stream: a request every TTL/3, as etcd's own client does,
/// so that two requests can be lost before the lease expires.
async fn keep_alive_stream(conn: &Conn, lease: &LeaseShared) -> StreamEnd {
    let period = lease.ttl / 3;
    let handle = match conn.client().await {
        Ok(handle) => handle,
        Err(error) => {
            return StreamEnd::Broken {
                error,
                renewed: false,
            }
        }
    };
    let mut client = handle.client.lease_client();
    let sent = Instant::now();
    let opened = tokio::time::timeout(REQUEST_TIMEOUT, client.keep_alive(lease.id)).await;
    let (mut keeper, mut stream) = match opened {
        Ok(Ok(pair)) => pair,
        Ok(Err(source)) => {
            let error = EtcdError::Rpc {
                op: "lease keep-alive",
                source,
            };
            if error.is_lease_not_found() {
                return StreamEnd::Dead;
            }
            if !error.is_request_error() {
                handle.failed();
            }
            return StreamEnd::Broken {
                error,
                renewed: false,
            };
        }
        Err(_) => {
            handle.failed();
            return StreamEnd::Broken {
                error: EtcdError::Timeout {
                    op: "lease keep-alive",
                    timeout: REQUEST_TIMEOUT,
                },
                renewed: false,
            };
        }
    };
    // Opening sent a first keep-alive and etcd answered it with a TTL > 0.
    lease.renewed(sent);
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<Instant> = None;
    let broken = |message: &str| StreamEnd::Broken {
        error: EtcdError::Protocol {
            op: "lease keep-alive",
            message: message.to_owned(),
        },
        renewed: true,
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if pending.is_some() {
                    // A whole period without an answer: the stream is stuck.
                    handle.failed();
                    return broken("no answer to a keep-alive within TTL/3");
                }
                pending = Some(Instant::now());
                if keeper.keep_alive().await.is_err() {
                    return broken("the request stream closed");
                }
            }
            message = stream.message() => match message {
                Ok(Some(resp)) if resp.ttl() <= 0 => return StreamEnd::Dead,
                Ok(Some(_)) => {
                    if let Some(sent) = pending.take() {
                        lease.renewed(sent);
                    }
                }
                Ok(None) => return broken("etcd ended the stream"),
                Err(source) => {
                    handle.failed();
                    return StreamEnd::Broken {
                        error: EtcdError::Rpc { op: "lease keep-alive", source },
                        renewed: true,
                    };
                }
            },
        }
    }
}

/// Revokes leases we no longer use; failures only mean they expire later.
async fn revoke_quietly(conn: Arc<Conn>, ids: Vec<i64>) {
    for id in ids {
        match conn
            .call_within("lease revoke", SHUTDOWN_TIMEOUT, |mut c| async move {
                c.lease_revoke(id).await
            })
            .await
        {
            Ok(_) => debug!(lease = id, "revoked retired lease"),
            Err(e) if e.is_lease_not_found() => {}
            Err(e) => debug!(lease = id, error = %e, "could not revoke retired lease; it expires"),
        }
    }
}

fn put(key: &str, value: &str, lease: i64) -> TxnOp {
    TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))
}

fn closed() -> RegistryError {
    RegistryError::Unavailable {
        backend: "etcd",
        message: "deregistered: this registry is shutting down".into(),
    }
}

impl From<ClaimError> for RegistryError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::LeaseGone => RegistryError::Unavailable {
                backend: "etcd",
                message: "our lease vanished".into(),
            },
            ClaimError::Failed(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(
            ttl_seconds(Duration::from_millis(1)),
            Duration::from_secs(1)
        );
        assert_eq!(ttl_seconds(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(
            ttl_seconds(Duration::from_millis(4500)),
            Duration::from_secs(5)
        );
        assert_eq!(ttl_seconds(Duration::from_secs(5)), Duration::from_secs(5));
    }
}
