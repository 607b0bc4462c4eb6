//! Discovery: applies the registries' typed updates and publishes routing
//! snapshots.
//!
//! Each registry (and the state file) is a *source*. One task owns every
//! source's last known endpoints, applies updates in order, merges sources
//! by instance id (the first registry in config order wins a tie), and
//! publishes a new [`Table`] with `ArcSwap::store`. Bursts of updates are
//! coalesced into one table. Nothing a registry sends can empty a source
//! except an explicit `Reset` or `Remove`; a disconnect only marks the table
//! stale (static stability).

mod persist;
mod table;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use compact_str::CompactString;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use persist::{load_state_file, state_file_path, write_state_file};
pub use table::{Endpoint, ServiceRoutes, ServiceState, Table};

use crate::balance::{EndpointState, RetryBudget};
use crate::config::{Config, UpstreamPolicy};
use crate::metrics::{EndpointLabels, Metrics, RegistryLabels};
use crate::outbound::dial::{PeerTls, PLAINTEXT_PROTOCOL};
use crate::outbound::pool::{PeerPool, PoolSettings};
use crate::registry::{EndpointRecord, SourcedUpdate, Update};

/// How many updates are applied before a table is published even if more
/// are queued, so a flood (100k keys) still makes progress visible.
const MAX_BATCH: usize = 4096;

/// Least time between two state-file writes; the file is for restarts, not
/// for every change.
const PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// Channel depth between sources and the applier; sources block (and so
/// pace themselves) when the applier falls behind.
pub const UPDATE_CHANNEL: usize = 1024;

/// Records in one batch from which it is applied on the blocking pool
/// instead of the request thread (see [`Applier::run`]). A full rebuild
/// costs about half a microsecond per record on the 2-core VMs, so below
/// this a batch holds requests for well under a millisecond, which is less
/// than handing it to another thread and back is worth.
const OFFLOAD_RECORDS: usize = 1024;

/// Readiness flag shared with the admin API (staleness and generation are
/// in the published [`Table`] itself).
#[derive(Debug, Default)]
pub struct DiscoveryStatus {
    /// A table from a registry (or the state file) has been published.
    pub loaded: AtomicBool,
}

/// What one source currently says.
#[derive(Debug)]
struct Source {
    name: Arc<str>,
    /// Keyed by (service, instance); both are inline `CompactString`s for
    /// any realistic name, so a key costs no allocation.
    endpoints: BTreeMap<(CompactString, CompactString), Known>,
    revision: u64,
    connected: bool,
    /// Has sent a full `Reset` (a complete view) at least once.
    loaded: bool,
}

#[derive(Debug, Clone)]
struct Known {
    /// Shared with every published [`Endpoint`] built from it: a table
    /// swap then copies a pointer per endpoint instead of the record's
    /// strings and metadata (about 7 allocations each), which is most of
    /// what made a 10k-endpoint rebuild slow.
    record: Arc<EndpointRecord>,
    revision: u64,
    seen_at: SystemTime,
}

/// The single task that owns the sources and publishes tables.
pub struct Applier {
    sources: Vec<Source>,
    /// Index of the state-file pseudo source (after the registries).
    state_source: usize,
    endpoint_states: HashMap<Arc<str>, Arc<EndpointState>>,
    service_states: HashMap<Arc<str>, Arc<ServiceState>>,
    table: Arc<ArcSwap<Table>>,
    status: Arc<DiscoveryStatus>,
    config: Arc<Config>,
    /// Every `[[upstreams]]` policy, and the `[outbound]` defaults for all
    /// other services, shared by the routes that use them.
    policies: HashMap<String, Arc<UpstreamPolicy>>,
    default_policy: Arc<UpstreamPolicy>,
    pool: Arc<PoolSettings>,
    metrics: Arc<Metrics>,
    state_file: Option<PathBuf>,
    generation: u64,
    /// The published table differs from the state file on disk.
    persist_pending: bool,
    last_persist: Option<Instant>,
    /// The state-file write in progress, if any. Writes run off the request
    /// thread (rendering a 10k-endpoint table and `fsync` take milliseconds
    /// to tens of them) and one at a time, so an older table can never be
    /// renamed over a newer one.
    persisting: Option<tokio::task::JoinHandle<()>>,
    /// Services whose routes must be rebuilt at the next publish.
    dirty: Dirty,
}

/// What changed since the last published table.
#[derive(Debug)]
enum Dirty {
    /// Rebuild everything (start-up, state-file hand-over).
    All,
    /// Rebuild these services only (may be empty: flags changed).
    Some(BTreeSet<String>),
}

// === impl Dirty ===

/// Collects service names during one in-order walk: consecutive marks of
/// one service (keys and records arrive sorted) cost a string compare, not
/// a set lookup.
struct Marker<'a> {
    /// Where the names go; `None` when everything is dirty already.
    names: Option<&'a mut BTreeSet<String>>,
    /// The service marked last (`None` before the first mark).
    last: Option<String>,
}

impl<'a> Marker<'a> {
    /// Marks services dirty.
    fn new(dirty: &'a mut Dirty) -> Self {
        match dirty {
            Dirty::All => Marker::over(None),
            Dirty::Some(set) => Marker::over(Some(set)),
        }
    }

    fn over(names: Option<&'a mut BTreeSet<String>>) -> Self {
        Marker { names, last: None }
    }

    fn mark(&mut self, service: &str) {
        if self.last.as_deref() == Some(service) {
            return;
        }
        if let Some(set) = self.names.as_deref_mut() {
            insert_name(set, service);
        }
        let last = self.last.get_or_insert_with(String::new);
        last.clear();
        last.push_str(service);
    }
}

impl Dirty {
    fn mark(&mut self, service: &str) {
        if let Dirty::Some(set) = self {
            insert_name(set, service);
        }
    }
}

/// Insert `service`, allocating its name only if it is not there yet.
fn insert_name(set: &mut BTreeSet<String>, service: &str) {
    if !set.contains(service) {
        set.insert(service.to_string());
    }
}

// === impl Applier ===

impl Applier {
    /// An applier for `registry_names` (in config order).
    pub fn new(
        registry_names: Vec<Arc<str>>,
        config: Arc<Config>,
        pool: Arc<PoolSettings>,
        metrics: Arc<Metrics>,
        table: Arc<ArcSwap<Table>>,
        status: Arc<DiscoveryStatus>,
    ) -> Self {
        let mut sources: Vec<Source> = registry_names.into_iter().map(Source::new).collect();
        let state_source = sources.len();
        sources.push(Source::new("state-file".into()));
        let state_file = config.runtime.state_dir.as_deref().map(state_file_path);
        let policies = config
            .upstreams
            .iter()
            .map(|u| (u.name.clone(), Arc::new(u.policy.clone())))
            .collect();
        let default_policy = Arc::new(config.outbound.defaults.clone());
        Applier {
            policies,
            default_policy,
            sources,
            state_source,
            endpoint_states: HashMap::new(),
            service_states: HashMap::new(),
            table,
            status,
            config,
            pool,
            metrics,
            state_file,
            generation: 0,
            persist_pending: false,
            last_persist: None,
            persisting: None,
            dirty: Dirty::All,
        }
    }

    /// Seed the table from the state file, so a sidecar restarted while its
    /// registries are down still routes. The table is marked stale until
    /// every registry has delivered a full view.
    pub fn seed_from_state_file(&mut self) {
        let Some(path) = self.state_file.clone() else {
            return;
        };
        match load_state_file(&path) {
            Ok(Some(records)) => {
                tracing::info!(path = %path.display(), endpoints = records.len(), "routing from the persisted table until the registry answers");
                let update = Update::Reset {
                    endpoints: records,
                    revision: 0,
                };
                self.apply(self.state_source, update);
                self.publish();
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable state file")
            }
        }
    }

    /// Apply updates until every sender is gone.
    ///
    /// A batch that carries many records (a full read of a large registry)
    /// is applied through [`crate::offload`], not on this task: with the
    /// default single worker thread, this task shares its thread with every
    /// request, and a 10k-endpoint rebuild held all of them for its whole
    /// duration. The applier moves to the pool thread and back, so it is
    /// still the only writer and batches still apply in order. Small
    /// batches (one endpoint changed) stay inline: they cost less than the
    /// hand-over.
    pub async fn run(mut self, mut rx: mpsc::Receiver<SourcedUpdate>) {
        let mut tick = tokio::time::interval(PERSIST_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                first = rx.recv() => {
                    let Some(first) = first else { break };
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(u) => batch.push(u),
                            Err(_) => break,
                        }
                    }
                    if self.weight(&batch) < OFFLOAD_RECORDS {
                        self.apply_batch(batch);
                        continue;
                    }
                    let job = crate::offload::run(move || {
                        self.apply_batch(batch);
                        self
                    });
                    self = match job.await {
                        Ok(applier) => applier,
                        Err(e) => {
                            // Only a panic gets here (a blocking task is never
                            // cancelled). The last published table keeps serving.
                            tracing::error!(error = %e, "routing-table applier failed; the current table stays in place");
                            return;
                        }
                    };
                }
                _ = tick.tick() => self.maybe_persist(false),
            }
        }
        // Shutting down: wait for a write in progress, then write the last
        // table if it has not been written yet.
        self.finish_persisting().await;
        self.maybe_persist(true);
        self.finish_persisting().await;
    }

    async fn finish_persisting(&mut self) {
        if let Some(write) = self.persisting.take() {
            if let Err(e) = write.await {
                tracing::warn!(error = %e, "persisting the routing table failed");
            }
        }
    }

    /// Roughly how many records applying `batch` touches: what decides
    /// whether it leaves the request thread.
    fn weight(&self, batch: &[SourcedUpdate]) -> usize {
        let everything = match self.dirty {
            // Start-up or a state-file hand-over: every service is rebuilt.
            Dirty::All => self.sources.iter().map(|s| s.endpoints.len()).sum(),
            Dirty::Some(_) => 0,
        };
        batch.iter().fold(everything, |n, u| {
            n + match &u.update {
                Update::Reset { endpoints, .. } => endpoints.len(),
                _ => 1,
            }
        })
    }

    /// Apply a batch of updates and publish one table if anything changed,
    /// exactly as [`Applier::run`] does for a burst from its channel. Lets
    /// benchmarks and scale tests drive the applier without a runtime.
    pub fn apply_batch(&mut self, updates: impl IntoIterator<Item = SourcedUpdate>) {
        let mut changed = false;
        for u in updates {
            changed |= self.apply(u.source, u.update);
        }
        if changed {
            self.publish();
        }
    }

    /// Apply one update; returns whether the table must be rebuilt.
    fn apply(&mut self, source: usize, update: Update) -> bool {
        let Some(src) = self.sources.get_mut(source) else {
            return false;
        };
        let now = SystemTime::now();
        match update {
            Update::Reset {
                mut endpoints,
                revision,
            } => {
                // Sorted by key (stable, so of two records with one key the
                // later still wins, as an insert would): the old view is then
                // matched in one in-order walk and the new map is bulk-built.
                // A keyed lookup and insert per record in a 10k-entry map of
                // string keys chased pointers through cold memory, which made
                // a full rebuild grow faster than linearly.
                endpoints.sort_by(|a, b| {
                    (a.service.as_str(), a.instance.as_str())
                        .cmp(&(b.service.as_str(), b.instance.as_str()))
                });
                // One in-order walk over the old view (taken, so its keys
                // and unchanged records are moved into the new one instead
                // of reallocated) and the sorted new records. Only services
                // with an added, removed or changed endpoint are marked for
                // rebuilding: a resync that repeats what we know (every etcd
                // reconnect) rebuilds nothing, and a full swap allocates one
                // key per *new* endpoint only (glibc's malloc/free were ~40%
                // of a 10k-endpoint swap; perf, benches/routing.rs).
                let mut old = std::mem::take(&mut src.endpoints).into_iter().peekable();
                let mut next = Vec::with_capacity(endpoints.len());
                let mut dirty = Marker::new(&mut self.dirty);
                for record in endpoints {
                    while let Some(((svc, _), _)) = old.next_if(|((s, i), _)| {
                        (s.as_str(), i.as_str())
                            < (record.service.as_str(), record.instance.as_str())
                    }) {
                        dirty.mark(&svc);
                    }
                    let found =
                        old.next_if(|((s, i), _)| *s == record.service && *i == record.instance);
                    let (key, known) = match found {
                        // Keep `seen_at` for records that did not change,
                        // so `/routes` ages stay meaningful across resyncs.
                        Some((key, known)) if *known.record == record => {
                            (key, Known { revision, ..known })
                        }
                        found => {
                            dirty.mark(&record.service);
                            let key = match found {
                                Some((key, _)) => key,
                                None => (record.service.clone(), record.instance.clone()),
                            };
                            let known = Known {
                                record: Arc::new(record),
                                revision,
                                seen_at: now,
                            };
                            (key, known)
                        }
                    };
                    // Two records with one key: the later wins, as an
                    // insert would.
                    match next.last_mut() {
                        Some((k, v)) if *k == key => *v = known,
                        _ => next.push((key, known)),
                    }
                }
                for ((svc, _), _) in old {
                    dirty.mark(&svc);
                }
                // Sorted and unique: `collect` bulk-builds the map.
                src.endpoints = next.into_iter().collect();
                src.revision = revision;
                if src.loaded && source != self.state_source {
                    self.metrics
                        .registry_resyncs
                        .get_or_create(&RegistryLabels {
                            registry: src.name.clone(),
                        })
                        .inc();
                }
                src.loaded = true;
                src.connected = true;
                if source != self.state_source {
                    // A full read proves the registry is reachable.
                    self.metrics
                        .registry_connected
                        .get_or_create(&RegistryLabels {
                            registry: src.name.clone(),
                        })
                        .set(1);
                }
                let all_loaded = self.sources[..self.state_source].iter().all(|s| s.loaded);
                if source != self.state_source && all_loaded {
                    // Every registry has given a full view: the persisted
                    // table has served its purpose.
                    let state = &mut self.sources[self.state_source].endpoints;
                    if !state.is_empty() {
                        state.clear();
                        self.dirty = Dirty::All;
                    }
                }
                true
            }
            Update::Upsert { endpoint, revision } => {
                // Strictly older only: every change of one etcd transaction
                // shares its revision (a bulk registration of 128 keys
                // arrives as 128 upserts at one revision), and replaying an
                // upsert is harmless. The source drops exact duplicates.
                if revision != 0 && revision < src.revision {
                    tracing::debug!(source = %src.name, revision, applied = src.revision, "dropping stale upsert");
                    return false;
                }
                src.revision = src.revision.max(revision);
                let key = (endpoint.service.clone(), endpoint.instance.clone());
                if src.endpoints.get(&key).map(|k| &*k.record) == Some(&endpoint) {
                    return false;
                }
                self.dirty.mark(&endpoint.service);
                src.endpoints.insert(
                    key,
                    Known {
                        record: Arc::new(endpoint),
                        revision,
                        seen_at: now,
                    },
                );
                true
            }
            Update::Remove {
                service,
                instance,
                revision,
            } => {
                // Strictly older only, as for upserts.
                if revision != 0 && revision < src.revision {
                    return false;
                }
                src.revision = src.revision.max(revision);
                let key = (CompactString::from(service.as_str()), instance.into());
                let removed = src.endpoints.remove(&key).is_some();
                if removed {
                    self.dirty.mark(&service);
                }
                removed
            }
            Update::Connected(up) => {
                let labels = RegistryLabels {
                    registry: src.name.clone(),
                };
                self.metrics
                    .registry_connected
                    .get_or_create(&labels)
                    .set(up as i64);
                let changed = src.connected != up;
                if changed && !up {
                    self.metrics
                        .registry_disconnects
                        .get_or_create(&labels)
                        .inc();
                }
                src.connected = up;
                changed
            }
            Update::Malformed { key, reason } => {
                // The source logged it (once per value, with its context).
                tracing::debug!(source = %src.name, key, reason, "skipped malformed registry value");
                self.metrics
                    .malformed_values
                    .get_or_create(&RegistryLabels {
                        registry: src.name.clone(),
                    })
                    .inc();
                false
            }
        }
    }

    /// Build and publish a table from the current sources. Only services
    /// marked dirty are rebuilt; the others are shared with the previous
    /// table (an `Arc` clone each), so one change costs O(that service), not
    /// O(the whole mesh).
    fn publish(&mut self) {
        let now = Instant::now();
        let prev = self.table.load_full();
        let (mut services, names): (HashMap<Arc<str>, Arc<ServiceRoutes>>, Vec<String>) =
            match std::mem::replace(&mut self.dirty, Dirty::Some(BTreeSet::new())) {
                Dirty::All => {
                    // Keys are sorted by service: one name per run of keys,
                    // not one allocation per endpoint.
                    let mut names: BTreeSet<String> = BTreeSet::new();
                    let mut marker = Marker::over(Some(&mut names));
                    for src in &self.sources {
                        for (svc, _) in src.endpoints.keys() {
                            marker.mark(svc);
                        }
                    }
                    for k in prev.services.keys() {
                        marker.mark(k);
                    }
                    (
                        HashMap::with_capacity(names.len()),
                        names.into_iter().collect(),
                    )
                }
                Dirty::Some(set) => (prev.services.clone(), set.into_iter().collect()),
            };
        // States that an old route used and the new one does not: they are
        // forgotten below unless another service still uses them.
        let mut dropped: Vec<(Arc<str>, Arc<EndpointState>)> = Vec::new();
        for svc in &names {
            let old = prev.services.get(svc.as_str());
            let routes = self.build_service(svc, old, now);
            if let Some(old) = old {
                let new = routes.as_deref().map_or(&[][..], |r| &r.endpoints[..]);
                dropped.extend(
                    unused(&old.endpoints, new).map(|e| (state_key(&e.record), e.state.clone())),
                );
            }
            match routes {
                Some(r) => {
                    services.insert(r.name.clone(), r);
                }
                None => {
                    services.remove(svc.as_str());
                    for state in ["healthy", "ejected"] {
                        self.metrics.endpoints.remove(&EndpointLabels {
                            service: svc.as_str().into(),
                            state,
                        });
                    }
                }
            }
        }
        // Endpoints that left the registry lose their learned state: if they
        // come back, a fresh registration is fresh evidence of health. (An
        // address still used by another service keeps its state.) "Used" is
        // pointer identity of the state, so the scan hashes one pointer per
        // endpoint instead of building a key string for each of them.
        if !dropped.is_empty() {
            let live: HashSet<*const EndpointState> = services
                .values()
                .flat_map(|s| s.endpoints.iter().map(|e| Arc::as_ptr(&e.state)))
                .collect();
            for (key, state) in dropped {
                let ours = self
                    .endpoint_states
                    .get(&key)
                    .is_some_and(|s| Arc::ptr_eq(s, &state));
                if ours && !live.contains(&Arc::as_ptr(&state)) {
                    self.endpoint_states.remove(&key);
                }
            }
        }
        let stale = self.sources[..self.state_source]
            .iter()
            .any(|s| !s.connected || !s.loaded)
            || !self.sources[self.state_source].endpoints.is_empty();
        self.generation += 1;
        let table = Table {
            services,
            generation: self.generation,
            stale,
            built_at: Some(SystemTime::now()),
        };
        self.table.store(Arc::new(table));
        self.status.loaded.store(true, Ordering::Relaxed);
        self.metrics.table_updates.inc();
        self.metrics
            .table_build
            .observe(now.elapsed().as_secs_f64());
        self.metrics.table_stale.set(stale as i64);
        if self.sources[..self.state_source].iter().any(|s| s.loaded) {
            self.persist_pending = true;
            self.maybe_persist(false);
        }
    }

    /// The routes of one service, merged across sources by instance (the
    /// first source in config order wins); `None` if it has no endpoints.
    ///
    /// `old` is the service's previous routes: an endpoint still there under
    /// the same instance and state key takes its state from them, which
    /// spares a hash lookup per endpoint (a fifth of the rebuild's samples
    /// under perf in a full 10k swap; the wall-time effect is in README.md,
    /// "Routing scale").
    fn build_service(
        &mut self,
        svc: &str,
        old: Option<&Arc<ServiceRoutes>>,
        now: Instant,
    ) -> Option<Arc<ServiceRoutes>> {
        // Each source's range is sorted by instance; with one source
        // holding the service (the usual case) that range is the result.
        // Otherwise: concatenate, sort stably by instance (source order
        // breaks ties) and keep the first of each instance.
        let mut merged: Vec<(&str, usize, &Known)> = Vec::new();
        let from = (CompactString::from(svc), CompactString::default());
        let mut contributing = 0;
        for (i, src) in self.sources.iter().enumerate() {
            let before = merged.len();
            for ((s, inst), known) in src.endpoints.range(&from..) {
                if s != svc {
                    break;
                }
                merged.push((inst.as_str(), i, known));
            }
            contributing += usize::from(merged.len() > before);
        }
        if merged.is_empty() {
            return None;
        }
        if contributing > 1 {
            merged.sort_by(|a, b| a.0.cmp(b.0));
            merged.dedup_by(|later, first| later.0 == first.0);
        }
        let my_zone = self.config.service.zone.as_deref();
        let mut endpoints = Vec::with_capacity(merged.len());
        let old = old.map_or(&[][..], |o| &o.endpoints[..]);
        let mut cursor = 0;
        for (instance, source, known) in merged {
            // Both lists are sorted by instance: one forward walk pairs them.
            while old
                .get(cursor)
                .is_some_and(|e| e.record.instance.as_str() < instance)
            {
                cursor += 1;
            }
            let previous = old.get(cursor).filter(|e| {
                Arc::ptr_eq(&e.record, &known.record)
                    || (e.record.instance == instance && same_state_key(&e.record, &known.record))
            });
            // Otherwise by key. Plaintext endpoints are keyed by address
            // alone, so they are looked up by `&str` and a key is allocated
            // only for an address seen for the first time; mTLS keys carry
            // the identity too.
            let existing = match previous {
                Some(e) => Some(&e.state),
                None if known.record.tls => self.endpoint_states.get(&*state_key(&known.record)),
                None => self.endpoint_states.get(known.record.address.as_str()),
            };
            let state = match existing {
                Some(state) => state.clone(),
                None => {
                    let addr: Arc<str> = known.record.address.as_str().into();
                    let peer = peer_tls(&known.record);
                    let state = Arc::new(EndpointState::new(
                        addr.clone(),
                        PeerPool::for_peer(addr.clone(), self.pool.clone(), Some(peer)),
                        now,
                    ));
                    self.endpoint_states
                        .insert(state_key(&known.record), state.clone());
                    state
                }
            };
            endpoints.push(Endpoint {
                weight: known.record.weight,
                local: my_zone.is_some() && known.record.zone.as_deref() == my_zone,
                record: known.record.clone(),
                source,
                revision: known.revision,
                seen_at: known.seen_at,
                state,
            });
        }
        let name = match self.service_states.get_key_value(svc) {
            Some((k, _)) => k.clone(),
            None => Arc::<str>::from(svc),
        };
        let shared = self.service_state(&name, now);
        let policy = self
            .policies
            .get(svc)
            .unwrap_or(&self.default_policy)
            .clone();
        Some(Arc::new(ServiceRoutes {
            name,
            policy,
            endpoints,
            rr: Default::default(),
            shared,
        }))
    }

    fn service_state(&mut self, name: &Arc<str>, now: Instant) -> Arc<ServiceState> {
        let policy = self.config.policy_for(name);
        let metrics = &self.metrics;
        self.service_states
            .entry(name.clone())
            .or_insert_with(|| {
                // Publish zeroes for a new service so dashboards and alerts
                // see "no retries" rather than "no data".
                let labels = Metrics::service(name);
                drop(metrics.retries.get_or_create(&labels));
                drop(metrics.ejections.get_or_create(&labels));
                drop(metrics.retry_budget_exhausted.get_or_create(&labels));
                Arc::new(ServiceState {
                    budget: RetryBudget::new(
                        policy.retry_budget_percent,
                        policy.retry_budget_min_per_sec,
                        now,
                    ),
                    in_flight: AtomicU64::new(0),
                    requests: metrics.request_metrics("outbound", name),
                })
            })
            .clone()
    }

    fn maybe_persist(&mut self, force: bool) {
        let Some(path) = self.state_file.clone() else {
            return;
        };
        if !self.persist_pending {
            return;
        }
        let now = Instant::now();
        let due = self
            .last_persist
            .is_none_or(|t| now.duration_since(t) >= PERSIST_INTERVAL);
        if !(force || due) {
            return;
        }
        if self.persisting.as_ref().is_some_and(|w| !w.is_finished()) {
            // Still writing the previous table: the next tick tries again
            // (`persist_pending` stays set).
            return;
        }
        let table = self.table.load_full();
        self.persisting = Some(crate::offload::spawn(move || {
            let records: Vec<EndpointRecord> = table
                .services
                .values()
                .flat_map(|s| s.endpoints.iter().map(|e| (*e.record).clone()))
                .collect();
            if let Err(e) = write_state_file(&path, &records) {
                tracing::warn!(path = %path.display(), error = %e, "could not persist routing table");
            }
        }));
        self.last_persist = Some(now);
        self.persist_pending = false;
    }
}

/// The key of an endpoint's long-lived state (and connection pool). An
/// address alone suffices for a plaintext endpoint; an mTLS endpoint's
/// connections are also bound to the identity they verified and to the way
/// they were dialed, so a TLS and a plaintext registration of one address
/// (a rollout in progress) never share a connection.
fn state_key(record: &EndpointRecord) -> Arc<str> {
    if !record.tls {
        return record.address.as_str().into();
    }
    let peer = peer_tls(record);
    let plain = if peer.plaintext { "+plaintext" } else { "" };
    format!("{}#mtls:{}{plain}", record.address, record.service).into()
}

/// Whether two records of one service share a [`state_key`], without
/// building either key.
fn same_state_key(a: &EndpointRecord, b: &EndpointRecord) -> bool {
    a.address == b.address
        && a.tls == b.tls
        && (!a.tls || (a.service == b.service && peer_tls(a).plaintext == peer_tls(b).plaintext))
}

/// The endpoints of `old` whose state no endpoint of `new` uses. An
/// endpoint's state is the one `endpoint_states` holds for its key
/// (inserted once per key, removed only when no table uses it), so "same
/// key" is "same state `Arc`". Small services are scanned pairwise; a large
/// one is checked against its sorted state pointers, so a 10k-endpoint
/// service costs O(n log n), not O(n²).
fn unused<'a>(old: &'a [Endpoint], new: &'a [Endpoint]) -> impl Iterator<Item = &'a Endpoint> {
    const PAIRWISE: usize = 32;
    let large = new.len() > PAIRWISE;
    let mut sorted: Vec<*const EndpointState> = Vec::new();
    if large {
        sorted.extend(new.iter().map(|e| Arc::as_ptr(&e.state)));
        sorted.sort_unstable();
    }
    old.iter().filter(move |e| {
        let p = Arc::as_ptr(&e.state);
        if large {
            sorted.binary_search(&p).is_err()
        } else {
            !new.iter().any(|n| Arc::as_ptr(&n.state) == p)
        }
    })
}

/// How the record says its endpoint may be dialed.
fn peer_tls(record: &EndpointRecord) -> PeerTls {
    PeerTls {
        service: record.service.as_str().into(),
        tls: record.tls,
        plaintext: !record.tls || record.protocols.iter().any(|p| p == PLAINTEXT_PROTOCOL),
    }
}

impl Source {
    fn new(name: Arc<str>) -> Self {
        Source {
            name,
            endpoints: BTreeMap::new(),
            revision: 0,
            connected: false,
            loaded: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applier() -> (Applier, Arc<ArcSwap<Table>>, Arc<Metrics>) {
        applier_with("")
    }

    /// An applier whose config has `runtime` as its `[runtime]` section.
    fn applier_with(runtime: &str) -> (Applier, Arc<ArcSwap<Table>>, Arc<Metrics>) {
        let config = Config::from_str_with_env(
            &format!(
                "[service]\nname = \"a\"\naddress = \"127.0.0.1:8080\"\ninstance_id = \"a-1\"\n\
                 [registry]\nkind = \"static\"\nfile = \"x.toml\"\n[runtime]\n{runtime}\n"
            ),
            [],
        )
        .expect("valid config");
        let table = Arc::new(ArcSwap::from_pointee(Table::default()));
        let metrics = Arc::new(Metrics::new());
        let applier = Applier::new(
            vec!["0-etcd".into()],
            Arc::new(config),
            Arc::new(PoolSettings::default()),
            metrics.clone(),
            table.clone(),
            Arc::new(DiscoveryStatus::default()),
        );
        (applier, table, metrics)
    }

    fn record(instance: &str, port: u16) -> EndpointRecord {
        EndpointRecord {
            service: "b".into(),
            instance: instance.into(),
            address: format!("127.0.0.1:{port}").into(),
            zone: None,
            weight: 100,
            protocols: Vec::new(),
            tls: false,
            metadata: BTreeMap::new(),
            version: Default::default(),
        }
    }

    fn instances(table: &ArcSwap<Table>) -> Vec<String> {
        let table = table.load();
        let mut v: Vec<String> = table
            .services
            .get("b")
            .map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| e.record.instance.to_string())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The state file is written off the runtime thread, and the table
    /// published last is on disk once the applier has stopped, even when
    /// it changed while an earlier write was still running.
    #[tokio::test]
    async fn the_last_table_is_persisted_by_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (applier, table, _) = applier_with(&format!(
            "state_dir = {:?}",
            dir.path().display().to_string()
        ));
        let (tx, rx) = mpsc::channel(UPDATE_CHANNEL);
        let task = tokio::spawn(applier.run(rx));
        let file = dir.path().join("routes.toml");
        for (generation, instance) in [(1, "b-1"), (2, "b-2"), (3, "b-3")] {
            let endpoint = record(instance, 1000 + generation as u16);
            // A full read first: only a table some registry has delivered
            // completely is worth persisting.
            let update = if generation == 1 {
                Update::Reset {
                    endpoints: vec![endpoint],
                    revision: generation,
                }
            } else {
                Update::Upsert {
                    endpoint,
                    revision: generation,
                }
            };
            tx.send(SourcedUpdate { source: 0, update })
                .await
                .expect("applier is running");
            while table.load().generation < generation {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        task.await.expect("applier ends when its senders are gone");
        let persisted = load_state_file(&file)
            .expect("readable state file")
            .expect("a state file was written");
        let mut persisted: Vec<String> = persisted.iter().map(|r| r.instance.to_string()).collect();
        persisted.sort();
        assert_eq!(persisted, ["b-1", "b-2", "b-3"]);
    }

    /// A full read of a large registry is applied off the runtime thread:
    /// while it is built, the other tasks on that thread (requests, in a
    /// sidecar) keep taking turns. Applied inline, the applier's one poll
    /// would build and publish the whole table before any of them ran again.
    #[tokio::test]
    async fn a_large_batch_does_not_hold_the_runtime_thread() {
        let (applier, table, _) = applier();
        let (tx, rx) = mpsc::channel(UPDATE_CHANNEL);
        let task = tokio::spawn(applier.run(rx));
        let turns = Arc::new(AtomicU64::new(0));
        let counter = {
            let turns = turns.clone();
            tokio::spawn(async move {
                loop {
                    turns.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        let endpoints: Vec<EndpointRecord> = (0..20_000u16)
            .map(|i| record(&format!("b-{i}"), 10_000 + i))
            .collect();
        let update = Update::Reset {
            endpoints,
            revision: 1,
        };
        tx.send(SourcedUpdate { source: 0, update })
            .await
            .expect("applier is running");
        let before = turns.load(Ordering::Relaxed);
        while table.load().generation == 0 {
            tokio::task::yield_now().await;
        }
        let during = turns.load(Ordering::Relaxed) - before;
        assert!(
            during > 100,
            "other tasks took only {during} turns while 20k endpoints were applied: \
             the batch ran on the runtime thread"
        );
        assert_eq!(table.load().services["b"].endpoints.len(), 20_000);
        // The applier came back from the pool and still applies updates.
        let update = Update::Remove {
            service: "b".into(),
            instance: "b-0".into(),
            revision: 2,
        };
        tx.send(SourcedUpdate { source: 0, update })
            .await
            .expect("applier is running");
        while table.load().generation == 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(table.load().services["b"].endpoints.len(), 19_999);
        drop(tx);
        task.await.expect("applier ends when its senders are gone");
        counter.abort();
    }

    #[tokio::test]
    async fn every_change_of_one_transaction_is_applied() {
        let (mut applier, table, _) = applier();
        let reset = Update::Reset {
            endpoints: vec![record("b-0", 1000)],
            revision: 10,
        };
        applier.apply(0, reset);
        // One etcd transaction: three puts and a delete at revision 11.
        for (i, port) in [(1, 1001), (2, 1002), (3, 1003)] {
            let upsert = Update::Upsert {
                endpoint: record(&format!("b-{i}"), port),
                revision: 11,
            };
            assert!(applier.apply(0, upsert), "b-{i} at the shared revision");
        }
        let remove = Update::Remove {
            service: "b".into(),
            instance: "b-0".into(),
            revision: 11,
        };
        assert!(applier.apply(0, remove));
        applier.publish();
        assert_eq!(instances(&table), ["b-1", "b-2", "b-3"]);
        // Older than what was applied: a stale replay, dropped.
        let stale = Update::Upsert {
            endpoint: record("b-0", 1000),
            revision: 10,
        };
        assert!(!applier.apply(0, stale));
    }

    #[tokio::test]
    async fn faults_are_counted() {
        let (mut applier, _, metrics) = applier();
        let reset = || Update::Reset {
            endpoints: vec![record("b-1", 1001)],
            revision: 1,
        };
        applier.apply(0, reset());
        applier.apply(0, Update::Connected(false));
        applier.apply(0, Update::Connected(false));
        applier.apply(0, reset());
        applier.apply(0, Update::Connected(true));
        let text = metrics.encode();
        assert!(
            text.contains("outrigger_registry_disconnects_total{registry=\"0-etcd\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("outrigger_registry_resyncs_total{registry=\"0-etcd\"} 1"),
            "{text}"
        );
    }

    /// The state each instance of service `svc` routes with.
    fn states(table: &ArcSwap<Table>, svc: &str) -> BTreeMap<String, Arc<EndpointState>> {
        let table = table.load();
        table
            .services
            .get(svc)
            .map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| (e.record.instance.to_string(), e.state.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Apply one update from source 0 and publish, as the applier's task does.
    fn publish(applier: &mut Applier, update: Update) {
        applier.apply_batch([SourcedUpdate { source: 0, update }]);
    }

    fn upsert(applier: &mut Applier, endpoint: EndpointRecord) {
        publish(
            applier,
            Update::Upsert {
                endpoint,
                revision: 0,
            },
        );
    }

    fn remove(applier: &mut Applier, service: &str, instance: &str) {
        publish(
            applier,
            Update::Remove {
                service: service.into(),
                instance: instance.into(),
                revision: 0,
            },
        );
    }

    /// Learned state (latency, ejection, warm connections) follows the
    /// endpoint's address across record changes and resyncs, and is
    /// forgotten when the endpoint leaves. Services of both sizes are
    /// checked: a large one finds unused states by sorted pointers instead
    /// of pairwise.
    #[tokio::test]
    async fn endpoint_state_follows_the_address_and_is_forgotten_on_leave() {
        for n in [3u16, 40] {
            let (mut applier, table, _) = applier();
            let all: Vec<_> = (0..n)
                .map(|i| record(&format!("b-{i}"), 2000 + i))
                .collect();
            publish(
                &mut applier,
                Update::Reset {
                    endpoints: all.clone(),
                    revision: 1,
                },
            );
            let first = states(&table, "b");
            assert_eq!(first.len(), n as usize);

            // A changed weight, then a full resync of changed records: same state.
            let mut heavier = record("b-1", 2001);
            heavier.weight = 7;
            upsert(&mut applier, heavier);
            let resync: Vec<_> = all
                .iter()
                .cloned()
                .map(|mut r| {
                    r.weight = 3;
                    r
                })
                .collect();
            publish(
                &mut applier,
                Update::Reset {
                    endpoints: resync,
                    revision: 2,
                },
            );
            let after = states(&table, "b");
            for (instance, state) in &first {
                assert!(
                    Arc::ptr_eq(state, &after[instance]),
                    "{n} endpoints: {instance} lost its state to a record change"
                );
            }

            // A new address under the same instance is a different endpoint.
            upsert(&mut applier, record("b-2", 3002));
            assert!(!Arc::ptr_eq(&first["b-2"], &states(&table, "b")["b-2"]));

            // Leaving forgets the state: a returning endpoint starts fresh,
            // while the others keep theirs.
            remove(&mut applier, "b", "b-0");
            assert!(!states(&table, "b").contains_key("b-0"));
            upsert(&mut applier, record("b-0", 2000));
            let back = states(&table, "b");
            assert!(
                !Arc::ptr_eq(&first["b-0"], &back["b-0"]),
                "{n} endpoints: a returning endpoint reused forgotten state"
            );
            assert!(Arc::ptr_eq(&first["b-1"], &back["b-1"]));
        }
    }

    /// An address that two services route to keeps its state while either
    /// of them still uses it.
    #[tokio::test]
    async fn shared_address_keeps_its_state_while_any_service_uses_it() {
        let (mut applier, table, _) = applier();
        let mut in_c = record("c-1", 4000);
        in_c.service = "c".into();
        publish(
            &mut applier,
            Update::Reset {
                endpoints: vec![record("b-1", 4000), in_c],
                revision: 1,
            },
        );
        let shared = states(&table, "b")["b-1"].clone();
        assert!(Arc::ptr_eq(&shared, &states(&table, "c")["c-1"]));
        remove(&mut applier, "b", "b-1");
        assert!(
            Arc::ptr_eq(&shared, &states(&table, "c")["c-1"]),
            "c still routes to the address"
        );
        upsert(&mut applier, record("b-1", 4000));
        assert!(
            Arc::ptr_eq(&shared, &states(&table, "b")["b-1"]),
            "the state was kept for c, so b picks it up again"
        );
    }
}
