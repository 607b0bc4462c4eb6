//! Discovery: the `{prefix}/services/` range as a stream of typed updates.
//!
//! Each session reads the whole range at one revision `R` (in pages, all at
//! `R`, so a 100k-key table neither hits gRPC message limits nor mixes
//! revisions), sends [`Update::Reset`], then watches from `R + 1` and turns
//! every event into an [`Update::Upsert`], [`Update::Remove`] or
//! [`Update::Malformed`], carrying the event's revision. Ending a session
//! never loses a change: the next one starts with a fresh read, whose
//! `Reset` lets the applier drop whatever vanished meanwhile.
//!
//! A session ends when etcd compacts past our watch (re-read at once), or
//! when the stream breaks or goes silent (report [`Update::Connected`]
//! `false` once, reconnect with jittered backoff, and report `true` after
//! the next successful read). The loop only returns once the applier has
//! gone away.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions, WatchResponse};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Backoff, Conn, EtcdError, Keys, MAX_MESSAGE_BYTES, REQUEST_TIMEOUT};
use crate::registry::{is_instance_id, is_service_name, EndpointRecord, Update, UpdateTx};

/// Keys per page of the initial read. Ten thousand records of a few hundred
/// bytes make a few MiB per response: few round trips for a large mesh,
/// well under [`MAX_MESSAGE_BYTES`].
pub(super) const PAGE_KEYS: i64 = 10_000;

/// Keys in a page from which it is decoded off the request thread
/// ([`crate::offload`]); smaller pages cost less than the hand-over.
const OFFLOAD_KEYS: usize = 512;

/// Smallest page we shrink to when a page still exceeds the message limit.
/// One: etcd caps a value at 1.5 MiB by default, far below
/// [`MAX_MESSAGE_BYTES`], so a single key always fits, and a few huge
/// (malformed) values cannot make the whole registry unreadable.
const MIN_PAGE_KEYS: i64 = 1;

/// First and largest pause between reconnection attempts: quick after a
/// blip, and at most one attempt per ~5 s per sidecar during an outage, so
/// a fleet does not hammer an etcd that is coming back.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

/// Silence on the watch after which we ask etcd for a progress report. A
/// half-open TCP connection or a wedged member otherwise looks exactly like
/// a quiet registry.
const QUIET_BEFORE_PROGRESS: Duration = Duration::from_secs(5);

/// How long etcd has to answer a progress request before the watch counts
/// as stalled and the session restarts.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(3);

/// How often the session checks for silence and for shutdown.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How many times a read is restarted when its revision is compacted away
/// between two pages, before the session gives up and backs off.
const READ_ATTEMPTS: usize = 3;

/// The discovery loop's state across sessions.
struct Discovery {
    /// The shared client.
    conn: Arc<Conn>,
    /// Key layout.
    keys: Keys,
    /// Where updates go.
    tx: UpdateTx,
    /// What we last told the applier (`None`: nothing yet).
    connected: Option<bool>,
    /// Revision of the last read or applied event; events at or below it
    /// are duplicates.
    applied: i64,
    /// Malformed values already reported: key → the value's mod revision.
    /// Each bad value is logged and counted once, not again on every
    /// re-read; bounded by the number of bad keys etcd holds.
    reported: HashMap<String, i64>,
}

/// A full read of the range.
#[derive(Default)]
struct Snapshot {
    /// The revision every page was read at.
    revision: i64,
    /// Good records, in key order.
    endpoints: Vec<EndpointRecord>,
    /// Skipped values: (key, its mod revision, reason).
    malformed: Vec<(String, i64, String)>,
}

/// How a session ended.
enum End {
    /// The applier went away.
    Shutdown,
    /// etcd compacted past our watch.
    Compacted(i64),
    /// The connection or the watch failed.
    Failed(EtcdError),
}

/// Runs discovery until `tx`'s receiver is dropped.
pub(super) async fn run(conn: Arc<Conn>, keys: Keys, tx: UpdateTx) {
    let mut discovery = Discovery {
        conn,
        keys,
        tx,
        connected: None,
        applied: 0,
        reported: HashMap::new(),
    };
    let (min, max) = RECONNECT_BACKOFF;
    let mut backoff = Backoff::new(min, max);
    loop {
        if discovery.tx.is_closed() {
            return;
        }
        match discovery.session(&mut backoff).await {
            End::Shutdown => return,
            End::Compacted(revision) => {
                info!(
                    compact_revision = revision,
                    applied = discovery.applied,
                    "etcd compacted past our watch; re-reading the registry"
                );
            }
            End::Failed(error) => {
                if discovery.connected == Some(false) {
                    debug!(error = %error, "etcd still unreachable");
                } else {
                    warn!(error = %error, "lost the etcd watch; serving the last table and reconnecting");
                    if !discovery.tx.send(Update::Connected(false)).await {
                        return;
                    }
                    discovery.connected = Some(false);
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

// === impl Discovery ===

impl Discovery {
    /// Read, report, watch until something ends the session.
    async fn session(&mut self, backoff: &mut Backoff) -> End {
        let snapshot = match self.read_all().await {
            Ok(snapshot) => snapshot,
            Err(error) => return End::Failed(error),
        };
        let revision = snapshot.revision;
        debug!(
            revision,
            endpoints = snapshot.endpoints.len(),
            malformed = snapshot.malformed.len(),
            "read the registry"
        );
        let reset = Update::Reset {
            endpoints: snapshot.endpoints,
            revision: as_revision(revision),
        };
        if !self.tx.send(reset).await {
            return End::Shutdown;
        }
        // Forget reports about keys that are gone or good now, so that a
        // new bad value under the same key is reported again.
        let bad: HashMap<&str, i64> = snapshot
            .malformed
            .iter()
            .map(|(k, rev, _)| (k.as_str(), *rev))
            .collect();
        self.reported
            .retain(|k, rev| bad.get(k.as_str()) == Some(rev));
        for (key, revision, reason) in snapshot.malformed {
            if !self.report_malformed(key, revision, reason).await {
                return End::Shutdown;
            }
        }
        if self.connected != Some(true) {
            info!(revision, "connected to etcd; routing table loaded");
            if !self.tx.send(Update::Connected(true)).await {
                return End::Shutdown;
            }
            self.connected = Some(true);
        }
        backoff.reset();
        self.applied = revision;
        self.watch_from(revision + 1).await
    }

    /// Watches the range from `start` and applies events until the session ends.
    async fn watch_from(&mut self, start: i64) -> End {
        // A clone of the `Arc`, so the handle does not borrow `self`.
        let conn = self.conn.clone();
        let handle = match conn.client().await {
            Ok(handle) => handle,
            Err(error) => return End::Failed(error),
        };
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_prev_key()
            .with_progress_notify();
        let mut client = handle
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let opened = tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.watch(self.keys.services.as_str(), Some(options)),
        )
        .await;
        let (mut requests, mut responses) = match opened {
            Ok(Ok(stream)) => stream.split(),
            Ok(Err(source)) => {
                handle.failed();
                return End::Failed(EtcdError::Rpc {
                    op: "watch",
                    source,
                });
            }
            Err(_) => {
                handle.failed();
                return End::Failed(EtcdError::Timeout {
                    op: "watch",
                    timeout: REQUEST_TIMEOUT,
                });
            }
        };
        let stalled = |message: String| EtcdError::Protocol {
            op: "watch",
            message,
        };
        let mut last_heard = Instant::now();
        let mut progress_asked: Option<Instant> = None;
        let mut check = tokio::time::interval(CHECK_INTERVAL);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = check.tick() => {
                    if self.tx.is_closed() {
                        return End::Shutdown;
                    }
                    match progress_asked {
                        Some(asked) if asked.elapsed() >= PROGRESS_DEADLINE => {
                            handle.failed();
                            return End::Failed(stalled(format!(
                                "no progress report within {PROGRESS_DEADLINE:?} of asking"
                            )));
                        }
                        None if last_heard.elapsed() >= QUIET_BEFORE_PROGRESS => {
                            if let Err(source) = requests.request_progress().await {
                                handle.failed();
                                return End::Failed(EtcdError::Rpc { op: "watch progress", source });
                            }
                            progress_asked = Some(Instant::now());
                        }
                        _ => {}
                    }
                }
                message = responses.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => {
                            handle.failed();
                            return End::Failed(stalled("etcd ended the watch stream".into()));
                        }
                        Err(source) => {
                            handle.failed();
                            return End::Failed(EtcdError::Rpc { op: "watch", source });
                        }
                    };
                    if response.compact_revision() > 0 {
                        return End::Compacted(response.compact_revision());
                    }
                    if response.canceled() {
                        return End::Failed(stalled(format!(
                            "etcd canceled the watch: {}",
                            response.cancel_reason()
                        )));
                    }
                    if !self.apply(&response).await {
                        return End::Shutdown;
                    }
                    last_heard = Instant::now();
                    progress_asked = None;
                }
            }
        }
    }

    /// Applies one watch response; `false` once the applier is gone.
    ///
    /// Events of one transaction share a revision and arrive in one
    /// response, so duplicates are judged against the revision applied
    /// *before* this response.
    async fn apply(&mut self, response: &WatchResponse) -> bool {
        let base = self.applied;
        let mut newest = base;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision();
            if revision <= base {
                debug!(
                    revision,
                    applied = base,
                    "skipping an event we already applied"
                );
                continue;
            }
            newest = newest.max(revision);
            let sent = match event.event_type() {
                EventType::Put => self.on_put(kv, event.prev_kv(), revision).await,
                EventType::Delete => self.on_delete(kv, revision).await,
            };
            if !sent {
                return false;
            }
        }
        self.applied = newest;
        true
    }

    async fn on_put(&mut self, kv: &KeyValue, prev: Option<&KeyValue>, revision: i64) -> bool {
        let key = String::from_utf8_lossy(kv.key());
        let reason = match self.decode(&key, kv.value()) {
            Ok(endpoint) => {
                self.reported.remove(key.as_ref());
                return self
                    .tx
                    .send(Update::Upsert {
                        endpoint,
                        revision: as_revision(revision),
                    })
                    .await;
            }
            Err(reason) => reason,
        };
        if !self
            .report_malformed(key.to_string(), revision, reason)
            .await
        {
            return false;
        }
        // A bad value over a good one must not leave the old endpoint
        // routable. Without `prev_kv` (compacted) we cannot tell, and a
        // removal of an unknown endpoint is harmless.
        let replaced_good = kv.create_revision() != kv.mod_revision()
            && prev.is_none_or(|prev| self.decode(&key, prev.value()).is_ok());
        match self.endpoint_of(&key) {
            Some((service, instance)) if replaced_good => {
                info!(key = %key, revision, "a malformed value replaced a good record; removing that endpoint");
                self.tx
                    .send(Update::Remove {
                        service: service.to_owned(),
                        instance: instance.to_owned(),
                        revision: as_revision(revision),
                    })
                    .await
            }
            _ => true,
        }
    }

    async fn on_delete(&mut self, kv: &KeyValue, revision: i64) -> bool {
        let key = String::from_utf8_lossy(kv.key());
        self.reported.remove(key.as_ref());
        let Some((service, instance)) = self.endpoint_of(&key) else {
            debug!(key = %key, "ignoring the deletion of a key that never named an endpoint");
            return true;
        };
        self.tx
            .send(Update::Remove {
                service: service.to_owned(),
                instance: instance.to_owned(),
                revision: as_revision(revision),
            })
            .await
    }

    /// Logs and reports a malformed value, unless this very value (key and
    /// mod revision) was reported already; `false` once the applier is gone.
    async fn report_malformed(&mut self, key: String, revision: i64, reason: String) -> bool {
        if self.reported.get(&key) == Some(&revision) {
            debug!(key = %key, revision, "malformed value already reported");
            return true;
        }
        warn!(key = %key, error = %reason, revision, "skipping malformed registry value");
        self.reported.insert(key.clone(), revision);
        self.tx.send(Update::Malformed { key, reason }).await
    }

    /// `(service, instance)` of a key that can name an endpoint.
    fn endpoint_of<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        self.keys
            .parse(key)
            .filter(|(service, instance)| is_service_name(service) && is_instance_id(instance))
    }

    /// Decodes a value and checks it against its key.
    fn decode(&self, key: &str, value: &[u8]) -> Result<EndpointRecord, String> {
        decode(&self.keys, key, value)
    }

    /// Reads the whole range at one revision, restarting if that revision
    /// is compacted away between pages.
    async fn read_all(&self) -> Result<Snapshot, EtcdError> {
        let mut attempt = 1;
        loop {
            match self.read_pages().await {
                Err(e) if e.is_compacted() && attempt < READ_ATTEMPTS => {
                    debug!(error = %e, "the registry read was compacted; starting it over");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn read_pages(&self) -> Result<Snapshot, EtcdError> {
        let end = self.keys.services_end();
        let mut from = self.keys.services.as_bytes().to_vec();
        let mut page = PAGE_KEYS;
        let mut snapshot = Snapshot::default();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
            if snapshot.revision > 0 {
                options = options.with_revision(snapshot.revision);
            }
            let key = from.clone();
            let result = self
                .conn
                .call("read registry", |client| async move {
                    let mut kv = client
                        .kv_client()
                        .max_decoding_message_size(MAX_MESSAGE_BYTES);
                    kv.get(key, Some(options)).await
                })
                .await;
            let mut response = match result {
                // A page that fit: grow back towards full pages, so a few
                // huge values do not slow the rest of the read.
                Ok(response) => {
                    page = (page * 2).min(PAGE_KEYS);
                    response
                }
                Err(e) if e.is_message_too_large() && page > MIN_PAGE_KEYS => {
                    page = (page / 2).max(MIN_PAGE_KEYS);
                    debug!(page, "registry page too large; reading smaller pages");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if snapshot.revision == 0 {
                snapshot.revision = response
                    .header()
                    .map(|h| h.revision())
                    .filter(|r| *r > 0)
                    .ok_or_else(|| EtcdError::Protocol {
                        op: "read registry",
                        message: "response without a revision".into(),
                    })?;
            }
            let more = response.more();
            let kvs = response.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = last.key().to_vec();
            from.push(0); // the next key after `last`
            let (endpoints, malformed) = if kvs.len() < OFFLOAD_KEYS {
                decode_page(&self.keys, &kvs)
            } else {
                // Decoding a page of 10k values is milliseconds of CPU that
                // every request would wait for (see `offload`).
                let keys = self.keys.clone();
                crate::offload::run(move || decode_page(&keys, &kvs))
                    .await
                    .map_err(|e| EtcdError::Protocol {
                        op: "read registry",
                        message: format!("decoding a page failed: {e}"),
                    })?
            };
            snapshot.endpoints.extend(endpoints);
            snapshot.malformed.extend(malformed);
            if !more {
                break;
            }
        }
        Ok(snapshot)
    }
}

/// Decodes a value and checks it against its key.
fn decode(keys: &Keys, key: &str, value: &[u8]) -> Result<EndpointRecord, String> {
    let Some((service, instance)) = keys.parse(key) else {
        return Err(format!(
            "key is not of the form {}{{service}}/{{instance}}",
            keys.services
        ));
    };
    let record = EndpointRecord::decode(value).map_err(|e| e.to_string())?;
    if record.service != service || record.instance != instance {
        return Err(format!(
            "record names {}/{} but its key names {service}/{instance}",
            record.service, record.instance
        ));
    }
    Ok(record)
}

/// One page of the initial read: good records, in key order, and skipped
/// values as (key, mod revision, reason).
type Page = (Vec<EndpointRecord>, Vec<(String, i64, String)>);

fn decode_page(keys: &Keys, kvs: &[KeyValue]) -> Page {
    let mut page: Page = (Vec::with_capacity(kvs.len()), Vec::new());
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key());
        match decode(keys, &key, kv.value()) {
            Ok(record) => page.0.push(record),
            Err(reason) => page.1.push((key.into_owned(), kv.mod_revision(), reason)),
        }
    }
    page
}

/// etcd revisions are positive `i64`s; updates carry them as `u64`.
fn as_revision(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}
