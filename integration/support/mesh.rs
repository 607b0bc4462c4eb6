//! Building sidecar configs and small meshes for the scenario tests.
//!
//! A [`SidecarSpec`] renders the TOML the tests start sidecars with, so
//! every test states only what differs (registry kind, policy overrides).

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

    /// The rendered TOML.
    pub fn toml(&self) -> String {
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

[registry]
{registry}

{extra}
"#,
            service = self.service,
            instance = self.instance,
            addr = self.service_addr,
            advertise = self.ports.inbound_addr(),
            service_extra = self.service_extra,
            listeners = self.ports.listeners_toml(),
            registry = self.registry,
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
        let files = FileDir::new();
        let svc_a = Upstream::start("a1").await;
        let svc_b = Upstream::start("b1").await;
        let file = files.file("endpoints.toml");
        let mut b_spec = SidecarSpec::new("b", "b-1", &svc_b, static_registry(&file));
        b_spec.ports = SidecarPorts::new();
        files.write_atomic(
            "endpoints.toml",
            &static_entry("b", "b-1", b_spec.ports.inbound_addr()),
        );
        let mut a_spec = SidecarSpec::new("a", "a-1", &svc_a, static_registry(&file));
        a_spec.extra = a_extra.to_string();
        let mut b = b_spec.start();
        let mut a = a_spec.start();
        b.wait_ready().await;
        a.wait_ready().await;
        StaticPair {
            files,
            svc_a,
            svc_b,
            a,
            a_spec,
            b,
            b_spec,
        }
    }

    /// A's outbound listener.
    pub fn outbound(&self) -> std::net::SocketAddr {
        self.a_spec.ports.outbound_addr()
    }
}
