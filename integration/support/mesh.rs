//! Building sidecar configs and small meshes for the scenario tests.
//!
//! A [`SidecarSpec`] renders the TOML the tests start sidecars with, so
//! every test states only what differs (registry kind, policy overrides).

use super::relay::Relay;
use super::{FileDir, Sidecar, SidecarPorts, Upstream};

/// What to render into one sidecar's TOML.
#[derive(Debug, Clone)]
pub struct SidecarSpec {
    /// `service.name`.
    pub service: String,
    /// `service.instance_id`.
    pub instance: String,
    /// The local service's address.
    pub service_addr: String,
    /// Listener ports.
    pub ports: SidecarPorts,
    /// The `[registry]` section body (without the header).
    pub registry: String,
    /// Extra TOML appended verbatim (e.g. `[[upstreams]]`, `[outbound]`).
    pub extra: String,
    /// Extra keys appended to `[service]`.
    pub service_extra: String,
}

impl SidecarSpec {
    /// A spec with fresh ports and an HTTP probe on `/healthz`.
    pub fn new(
        service: &str,
        instance: &str,
        upstream: &Upstream,
        registry: String,
    ) -> SidecarSpec {
        SidecarSpec {
            service: service.into(),
            instance: instance.into(),
            service_addr: upstream.addr().to_string(),
            ports: SidecarPorts::new(),
            registry,
            extra: String::new(),
            service_extra: String::new(),
        }
    }

    /// The rendered TOML. A `registry` body that starts with `[[registry]]`
    /// is a list of registries and is rendered as is.
    pub fn toml(&self) -> String {
        let registry = if self.registry.trim_start().starts_with("[[registry]]") {
            self.registry.clone()
        } else {
            format!("[registry]\n{}", self.registry)
        };
        format!(
            r#"[service]
name = "{service}"
instance_id = "{instance}"
address = "{addr}"
advertise = "{advertise}"
{service_extra}
[service.health]
http = "/healthz"
interval = "200ms"
timeout = "200ms"

{listeners}
[runtime]
drain_timeout = "5s"

{registry}

{extra}
"#,
            service = self.service,
            instance = self.instance,
            addr = self.service_addr,
            advertise = self.ports.inbound_addr(),
            service_extra = self.service_extra,
            listeners = self.ports.listeners_toml(),
            registry = registry,
            extra = self.extra,
        )
    }

    /// Start the sidecar.
    pub fn start(&self) -> Sidecar {
        Sidecar::start(&self.instance, &self.toml())
    }
}

/// `[registry]` body for a static file.
pub fn static_registry(file: &std::path::Path) -> String {
    format!(
        "kind = \"static\"\nfile = \"{}\"\npoll_interval = \"100ms\"",
        file.display()
    )
}

/// `[registry]` body for etcd.
pub fn etcd_registry(endpoint: &str, ttl: &str) -> String {
    format!("kind = \"etcd\"\nendpoints = [\"{endpoint}\"]\nttl = \"{ttl}\"")
}

/// `[registry]` body for Consul: the agent URL, check TTL and a 2 s
/// blocking wait (so index anomalies show within seconds).
pub fn consul_registry(url: &str, ttl: &str) -> String {
    format!("kind = \"consul\"\nendpoints = [\"{url}\"]\nttl = \"{ttl}\"\nwait = \"2s\"")
}

/// A list of registries (`[[registry]]` tables) from `[registry]` bodies.
pub fn registry_list(bodies: &[String]) -> String {
    bodies
        .iter()
        .map(|b| format!("[[registry]]\n{b}\n"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One static endpoints entry.
pub fn static_entry(service: &str, instance: &str, addr: std::net::SocketAddr) -> String {
    format!("[[endpoints]]\nservice = \"{service}\"\ninstance = \"{instance}\"\naddress = \"{addr}\"\n\n")
}

/// Sidecar A (service `a`) calling service `b` (one replica, sidecar B), on
/// the static registry.
pub struct StaticPair {
    /// Registry file dir.
    pub files: FileDir,
    /// A's local service (only probed).
    pub svc_a: Upstream,
    /// B's local service.
    pub svc_b: Upstream,
    /// A's sidecar: the tests call its outbound listener.
    pub a: Sidecar,
    /// A's spec (ports).
    pub a_spec: SidecarSpec,
    /// B's sidecar.
    pub b: Sidecar,
    /// B's spec (ports).
    pub b_spec: SidecarSpec,
}

impl StaticPair {
    /// Start both sidecars and wait until they are ready.
    pub async fn start() -> StaticPair {
        Self::start_with("").await
    }

    /// Start with extra TOML for sidecar A.
    pub async fn start_with(a_extra: &str) -> StaticPair {
        Self::start_inner(a_extra, false, false).await.0
    }

    /// Start with B's service speaking HTTP/1.x only.
    pub async fn start_http1_only_b() -> StaticPair {
        Self::start_inner("", false, true).await.0
    }

    /// Start with A calling B through a [`Relay`], which records what A
    /// sends on the sidecar link.
    pub async fn start_relayed() -> (StaticPair, Relay) {
        let (pair, relay) = Self::start_inner("", true, false).await;
        (pair, relay.expect("a relay was asked for"))
    }

    async fn start_inner(
        a_extra: &str,
        relayed: bool,
        b_http1_only: bool,
    ) -> (StaticPair, Option<Relay>) {
        let files = FileDir::new();
        let svc_a = Upstream::start("a1").await;
        let svc_b = match b_http1_only {
            true => Upstream::start_http1_only("b1").await,
            false => Upstream::start("b1").await,
        };
        let file = files.file("endpoints.toml");
        let mut b_spec = SidecarSpec::new("b", "b-1", &svc_b, static_registry(&file));
        b_spec.ports = SidecarPorts::new();
        let relay = match relayed {
            true => Some(Relay::start(b_spec.ports.inbound_addr()).await),
            false => None,
        };
        let b_addr = relay
            .as_ref()
            .map_or(b_spec.ports.inbound_addr(), Relay::addr);
        files.write_atomic("endpoints.toml", &static_entry("b", "b-1", b_addr));
        let mut a_spec = SidecarSpec::new("a", "a-1", &svc_a, static_registry(&file));
        a_spec.extra = a_extra.to_string();
        let mut b = b_spec.start();
        let mut a = a_spec.start();
        b.wait_ready().await;
        a.wait_ready().await;
        let pair = StaticPair {
            files,
            svc_a,
            svc_b,
            a,
            a_spec,
            b,
            b_spec,
        };
        (pair, relay)
    }

    /// A's outbound listener.
    pub fn outbound(&self) -> std::net::SocketAddr {
        self.a_spec.ports.outbound_addr()
    }
}

/// The etcd key of an instance under the default prefix.
pub fn etcd_key(service: &str, instance: &str) -> String {
    format!("/outrigger/services/{service}/{instance}")
}

/// A sidecar spec on etcd (TTL given, e.g. "2s").
pub fn etcd_spec(
    service: &str,
    instance: &str,
    upstream: &Upstream,
    endpoint: &str,
    ttl: &str,
) -> SidecarSpec {
    SidecarSpec::new(service, instance, upstream, etcd_registry(endpoint, ttl))
}

/// Service `a` calling service `b` with two replicas, each behind its own
/// sidecar process, all registered in one etcd.
pub struct EtcdTrio {
    /// The registry.
    pub etcd: super::Etcd,
    /// A's local service.
    pub svc_a: Upstream,
    /// b1's local service.
    pub svc_b1: Upstream,
    /// b2's local service.
    pub svc_b2: Upstream,
    /// Sidecar of a.
    pub a: Sidecar,
    /// Sidecar of b1.
    pub b1: Sidecar,
    /// Sidecar of b2.
    pub b2: Sidecar,
}

impl EtcdTrio {
    /// Start etcd and three sidecars (default policy; `a_extra` is appended
    /// to a's config) and wait until a routes to both replicas.
    pub async fn start(a_extra: &str) -> EtcdTrio {
        let etcd = super::Etcd::start().await;
        let (svc_a, svc_b1, svc_b2) = (
            Upstream::start("a1").await,
            Upstream::start("b1").await,
            Upstream::start("b2").await,
        );
        let ep = etcd.endpoint();
        let mut a_spec = etcd_spec("a", "a-1", &svc_a, &ep, "5s");
        a_spec.extra = a_extra.to_string();
        let mut a = a_spec.start();
        let mut b1 = etcd_spec("b", "b-1", &svc_b1, &ep, "5s").start();
        let mut b2 = etcd_spec("b", "b-2", &svc_b2, &ep, "5s").start();
        a.wait_ready().await;
        b1.wait_ready().await;
        b2.wait_ready().await;
        let trio = EtcdTrio {
            etcd,
            svc_a,
            svc_b1,
            svc_b2,
            a,
            b1,
            b2,
        };
        super::wait_until(
            "a routes to b-1 and b-2",
            std::time::Duration::from_secs(5),
            || async { trio.instances("b").await == ["b-1", "b-2"] },
        )
        .await;
        trio
    }

    /// a's outbound listener.
    pub fn outbound(&self) -> std::net::SocketAddr {
        self.a.outbound.expect("a has an outbound listener")
    }

    /// Instances of `service` in a's routing table, sorted.
    pub async fn instances(&self, service: &str) -> Vec<String> {
        routed_instances(&self.a.routes_json().await, service)
    }

    /// Whether a's table lists `instance` of `service` as ejected.
    pub async fn is_ejected(&self, service: &str, instance: &str) -> bool {
        self.endpoint(service, instance)
            .await
            .is_some_and(|e| e["state"] == "ejected")
    }

    /// a's view of one endpoint (the `/routes` entry), if listed.
    pub async fn endpoint(&self, service: &str, instance: &str) -> Option<serde_json::Value> {
        let routes = self.a.routes_json().await;
        routes["services"]
            .as_array()?
            .iter()
            .filter(|s| s["name"] == service)
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .find(|e| e["instance"] == instance)
    }
}

/// Instances of `service` in a `/routes` document, sorted.
pub fn routed_instances(routes: &serde_json::Value, service: &str) -> Vec<String> {
    let mut v: Vec<String> = routes["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["instance"].as_str().map(String::from))
        .collect();
    v.sort();
    v
}
