//! Discovery: Consul blocking queries as a stream of typed updates.
//!
//! One task long-polls `/v1/catalog/services` for the services tagged
//! [`MESH_TAG`]; one task per such service long-polls
//! `/v1/health/service/<name>?passing`. They report to a single aggregator
//! that owns the last known endpoints of every service, sends one
//! [`Update::Reset`] once every service has answered, and then turns each
//! changed answer into [`Update::Upsert`]s and [`Update::Remove`]s.
//!
//! Every query follows Consul's blocking-query rules
//! (<https://developer.hashicorp.com/consul/api-docs/features/blocking>):
//! - an `X-Consul-Index` lower than the last one resets ours to 0 (a fresh,
//!   non-blocking read), and an index below 1 is raised to 1, so a buggy or
//!   restarted agent can neither wedge nor spin us;
//! - the `wait` is bounded and jittered (so a fleet's queries do not all
//!   return at once), and the read deadline is above `wait × 17/16`, since
//!   the agent itself adds up to `wait / 16` of jitter;
//! - queries are spaced at least [`MIN_QUERY_INTERVAL`] apart, so a service
//!   that churns (or an index stuck at 0) costs a bounded request rate;
//! - an answer whose index did not move, or whose content is what we
//!   already have, changes nothing (no table swap);
//! - `stale` reads let any server answer, so discovery keeps working while
//!   the cluster has no leader.
//!
//! A failed query keeps the last endpoints (static stability), reports
//! [`Update::Connected`] `false` (catalog query only, to report once) and
//! retries with jittered backoff.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::record::{HealthEntry, MESH_TAG};
use super::{encode_segment, Agent, Backoff};
use crate::metrics::IndexResetLabels;
use crate::registry::{is_service_name, EndpointRecord, Update, UpdateTx};

/// Least time between the starts of two queries of one watcher. Under
/// churn every blocking query returns at once; this caps each watcher at
/// ten requests per second, while adding at most 100 ms to how fast a
/// change after a quiet period is seen (none: the query is already
/// waiting).
pub(super) const MIN_QUERY_INTERVAL: Duration = Duration::from_millis(100);

/// Read deadline margin on top of `wait × 17/16` (network and agent work).
const READ_MARGIN: Duration = Duration::from_secs(5);

/// First and largest pause between retries after a failed query.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Internal channel depth between the watchers and the aggregator.
const EVENTS: usize = 256;

/// What the watchers tell the aggregator.
#[derive(Debug)]
enum Event {
    /// The catalog answered: the mesh services now registered.
    Services(BTreeSet<String>),
    /// The catalog query failed (`false`) or succeeded again (`true`).
    Reachable(bool),
    /// A service's passing instances (the complete, current set).
    Health {
        service: String,
        endpoints: BTreeMap<String, EndpointRecord>,
    },
}

/// One blocking query's index, with Consul's rules applied.
#[derive(Debug, Default)]
pub(super) struct BlockingIndex {
    /// The index to send; 0 means a non-blocking read.
    index: u64,
}

/// What an answer's index means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IndexStep {
    /// The index did not move: the wait timed out, nothing changed.
    Unchanged,
    /// The index moved forwards (or this is the first read): look at it.
    Changed,
    /// The index went backwards (the agent or its servers restarted, or a
    /// snapshot was restored): ours was reset to 0; look at the answer.
    WentBackwards,
    /// The answer carried an index below 1 (a Consul bug the docs warn
    /// of); ours was raised to 1; look at the answer.
    BelowOne,
}

// === impl BlockingIndex ===

impl BlockingIndex {
    /// The `index` to send (0: none).
    pub(super) fn get(&self) -> u64 {
        self.index
    }

    /// Take an answer's `X-Consul-Index` (missing counts as 0).
    pub(super) fn observe(&mut self, answer: Option<u64>) -> IndexStep {
        let new = answer.unwrap_or(0);
        let old = self.index;
        if new < 1 {
            self.index = 1;
            return IndexStep::BelowOne;
        }
        if new < old {
            self.index = 0;
            return IndexStep::WentBackwards;
        }
        self.index = new;
        if new == old {
            IndexStep::Unchanged
        } else {
            IndexStep::Changed
        }
    }
}

/// The jittered `wait` to send and the read deadline that goes with it.
pub(super) fn wait_and_deadline(wait: Duration) -> (Duration, Duration) {
    // Up to 1/16 less than configured, so sidecars started together drift
    // apart; never below one second.
    let jitter = wait.mul_f64(fastrand::f64() / 16.0);
    let sent = wait.saturating_sub(jitter).max(Duration::from_secs(1));
    (sent, sent * 17 / 16 + READ_MARGIN)
}

/// Discover until the applier goes away.
pub(super) async fn run(agent: Arc<Agent>, wait: Duration, tx: UpdateTx) {
    let (events_tx, mut events) = mpsc::channel(EVENTS);
    let catalog = tokio::spawn(watch_catalog(agent.clone(), wait, events_tx.clone()));
    // Owns every watcher task from here on: when discovery ends (or is
    // aborted at shutdown), dropping it stops them all.
    let mut aggregator = Aggregator {
        catalog,
        agent,
        wait,
        tx,
        events_tx,
        watchers: HashMap::new(),
        endpoints: BTreeMap::new(),
        pending: None,
        loaded: false,
        connected: None,
    };
    while let Some(event) = events.recv().await {
        if aggregator.tx.is_closed() || !aggregator.handle(event).await {
            break;
        }
    }
}

/// Owns the last known endpoints and the watcher tasks.
struct Aggregator {
    /// The catalog watcher.
    catalog: JoinHandle<()>,
    agent: Arc<Agent>,
    wait: Duration,
    tx: UpdateTx,
    /// Handed to new service watchers.
    events_tx: mpsc::Sender<Event>,
    /// One health watcher per mesh service.
    watchers: HashMap<String, JoinHandle<()>>,
    /// Passing instances per service, as last told to the applier (or to
    /// be told in the first `Reset`).
    endpoints: BTreeMap<String, BTreeMap<String, EndpointRecord>>,
    /// Services that have not answered yet before the first `Reset`.
    pending: Option<BTreeSet<String>>,
    /// The first `Reset` has been sent.
    loaded: bool,
    /// What we last reported as `Connected`.
    connected: Option<bool>,
}

// === impl Aggregator ===

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.catalog.abort();
        for w in self.watchers.values() {
            w.abort();
        }
    }
}

impl Aggregator {
    /// Apply one event; `false` once the applier is gone.
    async fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Reachable(up) => {
                if self.connected != Some(up) {
                    self.connected = Some(up);
                    if up {
                        info!(registry = %self.agent.name(), "consul catalog reachable");
                    }
                    return self.tx.send(Update::Connected(up)).await;
                }
                true
            }
            Event::Services(names) => self.services(names).await,
            Event::Health { service, endpoints } => self.health(service, endpoints).await,
        }
    }

    async fn services(&mut self, names: BTreeSet<String>) -> bool {
        let gone: Vec<String> = self
            .watchers
            .keys()
            .filter(|n| !names.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(w) = self.watchers.remove(&name) {
                w.abort();
            }
            let old = self.endpoints.remove(&name).unwrap_or_default();
            if let Some(p) = &mut self.pending {
                p.remove(&name);
            }
            if self.loaded {
                for instance in old.into_keys() {
                    let update = Update::Remove {
                        service: name.clone(),
                        instance,
                        revision: 0,
                    };
                    if !self.tx.send(update).await {
                        return false;
                    }
                }
            }
        }
        for name in &names {
            if !self.watchers.contains_key(name) {
                debug!(registry = %self.agent.name(), service = %name, "watching consul service");
                let task = tokio::spawn(watch_service(
                    self.agent.clone(),
                    self.wait,
                    name.clone(),
                    self.events_tx.clone(),
                    self.tx.clone(),
                ));
                self.watchers.insert(name.clone(), task);
            }
        }
        if !self.loaded && self.pending.is_none() {
            self.pending = Some(
                names
                    .iter()
                    .filter(|n| !self.endpoints.contains_key(*n))
                    .cloned()
                    .collect(),
            );
        }
        self.maybe_reset().await
    }

    async fn health(
        &mut self,
        service: String,
        endpoints: BTreeMap<String, EndpointRecord>,
    ) -> bool {
        if !self.watchers.contains_key(&service) {
            // A late answer from a watcher that was just stopped.
            return true;
        }
        if !self.loaded {
            if let Some(p) = &mut self.pending {
                p.remove(&service);
            }
            self.endpoints.insert(service, endpoints);
            return self.maybe_reset().await;
        }
        let old = self.endpoints.remove(&service).unwrap_or_default();
        for (instance, record) in &endpoints {
            if old.get(instance) != Some(record) {
                let update = Update::Upsert {
                    endpoint: record.clone(),
                    revision: 0,
                };
                if !self.tx.send(update).await {
                    return false;
                }
            }
        }
        for instance in old.keys().filter(|i| !endpoints.contains_key(*i)) {
            let update = Update::Remove {
                service: service.clone(),
                instance: instance.clone(),
                revision: 0,
            };
            if !self.tx.send(update).await {
                return false;
            }
        }
        self.endpoints.insert(service, endpoints);
        true
    }

    /// Send the first `Reset` once every known service has answered.
    async fn maybe_reset(&mut self) -> bool {
        if self.loaded || !self.pending.as_ref().is_some_and(|p| p.is_empty()) {
            return true;
        }
        self.loaded = true;
        self.pending = None;
        let all: Vec<EndpointRecord> = self
            .endpoints
            .values()
            .flat_map(|m| m.values().cloned())
            .collect();
        info!(registry = %self.agent.name(), services = self.endpoints.len(), endpoints = all.len(), "consul discovery loaded");
        self.tx
            .send(Update::Reset {
                endpoints: all,
                revision: 0,
            })
            .await
    }
}

/// Pace one watcher: wait until [`MIN_QUERY_INTERVAL`] after the last start.
async fn pace(last_start: &mut Option<Instant>) {
    if let Some(t) = *last_start {
        tokio::time::sleep_until(t + MIN_QUERY_INTERVAL).await;
    }
    *last_start = Some(Instant::now());
}

/// Count an index reset; log it when it starts (an index stuck at 0 resets
/// on every answer, and one line per answer would flood the log).
fn count_reset(agent: &Agent, query: &'static str, step: IndexStep, last: &mut IndexStep) {
    let previous = std::mem::replace(last, step);
    let reason = match step {
        IndexStep::WentBackwards => "backwards",
        IndexStep::BelowOne => "below_one",
        _ => return,
    };
    if previous != step {
        warn!(registry = %agent.name(), query, reason, "consul index reset");
    } else {
        debug!(registry = %agent.name(), query, reason, "consul index reset");
    }
    agent
        .metrics()
        .consul_index_resets
        .get_or_create(&IndexResetLabels {
            registry: agent.name().clone(),
            query,
            reason,
        })
        .inc();
}

/// Long-poll `/v1/catalog/services` and report the mesh services.
async fn watch_catalog(agent: Arc<Agent>, wait: Duration, events: mpsc::Sender<Event>) {
    let mut index = BlockingIndex::default();
    let mut backoff = Backoff::new(RETRY_BACKOFF.0, RETRY_BACKOFF.1);
    let mut last_start = None;
    let mut last: Option<BTreeSet<String>> = None;
    let mut last_step = IndexStep::Changed;
    loop {
        pace(&mut last_start).await;
        let (sent_wait, deadline) = wait_and_deadline(wait);
        let path = format!(
            "/v1/catalog/services?stale&index={}&wait={}ms{}",
            index.get(),
            sent_wait.as_millis(),
            agent.dc_param()
        );
        let answer = agent
            .call("catalog", Method::GET, &path, None, deadline, &[])
            .await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                warn!(registry = %agent.name(), error = %e, "consul catalog query failed; keeping the last table");
                // The agent may come back with a new index history.
                index = BlockingIndex::default();
                if events.send(Event::Reachable(false)).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff.reset();
        if events.send(Event::Reachable(true)).await.is_err() {
            return;
        }
        let step = index.observe(answer.index);
        count_reset(&agent, "catalog", step, &mut last_step);
        if step == IndexStep::Unchanged && last.is_some() {
            continue;
        }
        let parsed: BTreeMap<String, Vec<String>> = match serde_json::from_slice(&answer.body) {
            Ok(p) => p,
            Err(e) => {
                warn!(registry = %agent.name(), error = %e, "consul catalog answer is not the expected JSON; keeping the last set");
                continue;
            }
        };
        let names: BTreeSet<String> = parsed
            .into_iter()
            .filter(|(name, tags)| tags.iter().any(|t| t == MESH_TAG) && is_service_name(name))
            .map(|(name, _)| name)
            .collect();
        if last.as_ref() == Some(&names) {
            continue;
        }
        last = Some(names.clone());
        if events.send(Event::Services(names)).await.is_err() {
            return;
        }
    }
}

/// Long-poll `/v1/health/service/<name>?passing` and report its instances.
async fn watch_service(
    agent: Arc<Agent>,
    wait: Duration,
    service: String,
    events: mpsc::Sender<Event>,
    tx: UpdateTx,
) {
    let mut index = BlockingIndex::default();
    let mut backoff = Backoff::new(RETRY_BACKOFF.0, RETRY_BACKOFF.1);
    let mut last_start = None;
    let mut last: Option<BTreeMap<String, EndpointRecord>> = None;
    let mut last_step = IndexStep::Changed;
    loop {
        pace(&mut last_start).await;
        let (sent_wait, deadline) = wait_and_deadline(wait);
        let path = format!(
            "/v1/health/service/{}?passing&stale&index={}&wait={}ms{}",
            encode_segment(&service),
            index.get(),
            sent_wait.as_millis(),
            agent.dc_param()
        );
        let answer = match agent
            .call("health", Method::GET, &path, None, deadline, &[])
            .await
        {
            Ok(a) => a,
            Err(e) => {
                debug!(registry = %agent.name(), service, error = %e, "consul health query failed; keeping its endpoints");
                index = BlockingIndex::default();
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff.reset();
        let step = index.observe(answer.index);
        count_reset(&agent, "health", step, &mut last_step);
        if step == IndexStep::Unchanged && last.is_some() {
            continue;
        }
        let entries: Vec<HealthEntry> = match serde_json::from_slice(&answer.body) {
            Ok(e) => e,
            Err(e) => {
                // The applier only counts malformed values; each source logs
                // its own, with the context it alone has.
                warn!(registry = %agent.name(), service, error = %e, "consul health answer is not the expected JSON; keeping its endpoints");
                let update = Update::Malformed {
                    key: format!("/v1/health/service/{service}"),
                    reason: format!("not the expected JSON: {e}"),
                };
                if !tx.send(update).await {
                    return;
                }
                continue;
            }
        };
        let mut endpoints = BTreeMap::new();
        let mut malformed = Vec::new();
        for entry in &entries {
            match entry.to_record() {
                // An entry listed under another name is an agent bug; it
                // would put an instance under the wrong service.
                Ok(r) if r.service == service => {
                    endpoints.insert(r.instance.to_string(), r);
                }
                Ok(r) => malformed.push((
                    r.instance.to_string(),
                    format!("listed under {service:?} but names service {:?}", r.service),
                )),
                Err(e) => malformed.push((entry.service.id.clone(), e.to_string())),
            }
        }
        if last.as_ref() == Some(&endpoints) {
            continue;
        }
        // Report bad entries only when the answer changed, so a bad value
        // sitting in Consul is not counted on every long-poll.
        for (id, reason) in malformed {
            warn!(registry = %agent.name(), service, instance = %id, reason, "skipped malformed consul entry");
            let update = Update::Malformed {
                key: format!("consul service {service}/{id}"),
                reason,
            };
            if !tx.send(update).await {
                return;
            }
        }
        last = Some(endpoints.clone());
        if events
            .send(Event::Health {
                service: service.clone(),
                endpoints,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        let mut i = BlockingIndex::default();
        assert_eq!(i.get(), 0);
        assert_eq!(i.observe(Some(10)), IndexStep::Changed);
        assert_eq!(i.get(), 10);
        assert_eq!(i.observe(Some(10)), IndexStep::Unchanged);
        assert_eq!(i.observe(Some(12)), IndexStep::Changed);
        // Backwards: start over with a non-blocking read.
        assert_eq!(i.observe(Some(3)), IndexStep::WentBackwards);
        assert_eq!(i.get(), 0);
        assert_eq!(i.observe(Some(3)), IndexStep::Changed);
        // Zero or missing: never send index=0 again (it would not block).
        assert_eq!(i.observe(Some(0)), IndexStep::BelowOne);
        assert_eq!(i.get(), 1);
        assert_eq!(i.observe(None), IndexStep::BelowOne);
        assert_eq!(i.get(), 1);
    }

    #[test]
    fn wait_is_jittered_and_deadline_exceeds_consul_jitter() {
        for _ in 0..100 {
            let (sent, deadline) = wait_and_deadline(Duration::from_secs(60));
            assert!(sent <= Duration::from_secs(60));
            assert!(sent >= Duration::from_secs(60) * 15 / 16);
            assert!(deadline > sent * 17 / 16);
        }
        let (sent, _) = wait_and_deadline(Duration::from_millis(500));
        assert_eq!(sent, Duration::from_secs(1));
    }
}
