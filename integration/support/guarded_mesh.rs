//! A static-registry mesh for the hardening suites: sidecar A (service `a`)
//! calling one sidecar per peer service, every local service a
//! [`RecordingUpstream`], and the same `[limits]` on every sidecar.
//!
//! The hardening tests attack one listener and then ask what reached which
//! service, and what it cost which sidecar; so the mesh hands out each
//! peer's recording upstream, sidecar process and listener addresses.

use std::net::SocketAddr;

use super::mesh::{static_entry, static_registry, SidecarSpec};
use super::ports::loopback;
use super::recording::RecordingUpstream;
use super::sidecar::SidecarOptions;
use super::{free_port, FileDir, Sidecar, SidecarPorts};

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct MeshOptions {
    /// Peer services, e.g. `["b", "c"]`.
    pub services: Vec<String>,
    /// Replicas per peer service (0 counts as 1): `b-1`, `b-2`, ...
    pub replicas: usize,
    /// TOML appended to every sidecar's config, e.g. a `[limits]` table.
    pub common: String,
    /// TOML appended to A's config only (e.g. `[[upstreams]]`).
    pub a_extra: String,
    /// Give each peer sidecar an ingress listener too.
    pub ingress: bool,
}

/// One peer service: its recording upstream and its sidecar.
#[derive(Debug)]
pub struct Peer {
    /// Service name.
    pub service: String,
    /// The local service behind the sidecar.
    pub svc: RecordingUpstream,
    /// The sidecar process.
    pub sidecar: Sidecar,
    /// Its listener ports.
    pub ports: SidecarPorts,
    /// Its ingress listener, if [`MeshOptions::ingress`].
    pub ingress: Option<SocketAddr>,
}

impl Peer {
    /// The peer sidecar's inbound listener (what other sidecars dial).
    pub fn inbound(&self) -> SocketAddr {
        self.ports.inbound_addr()
    }
}

/// Sidecar A and its peers; dropping it stops everything.
#[derive(Debug)]
pub struct GuardedMesh {
    /// The static registry file's directory.
    pub files: FileDir,
    /// A's local service.
    pub svc_a: RecordingUpstream,
    /// A's sidecar.
    pub a: Sidecar,
    /// A's ports.
    pub a_ports: SidecarPorts,
    /// The peers, in [`MeshOptions::services`] order.
    pub peers: Vec<Peer>,
}

impl GuardedMesh {
    /// Starts every sidecar and waits until all are ready.
    pub async fn start(options: MeshOptions) -> GuardedMesh {
        let files = FileDir::new();
        let file = files.file("endpoints.toml");
        let mut entries = String::new();
        let mut peers = Vec::new();
        for (service, n) in options
            .services
            .iter()
            .flat_map(|s| (1..=options.replicas.max(1)).map(move |n| (s, n)))
        {
            let svc = RecordingUpstream::start(&format!("{service}{n}")).await;
            let spec = spec(service, n, &svc, &file, &options.common);
            entries.push_str(&static_entry(
                service,
                &spec.instance,
                spec.ports.inbound_addr(),
            ));
            let ingress = options.ingress.then(|| loopback(free_port()));
            let mut env = Vec::new();
            if let Some(addr) = ingress {
                env.push(("OUTRIGGER_LISTENERS__INGRESS".to_string(), addr.to_string()));
            }
            let sidecar = Sidecar::start_with(
                &spec.instance,
                &spec.toml(),
                SidecarOptions {
                    env,
                    ..SidecarOptions::default()
                },
            );
            peers.push(Peer {
                service: service.clone(),
                svc,
                sidecar,
                ports: spec.ports,
                ingress,
            });
        }
        files.write_atomic("endpoints.toml", &entries);
        let svc_a = RecordingUpstream::start("a1").await;
        let mut a_spec = spec("a", 1, &svc_a, &file, &options.common);
        a_spec.extra.push_str(&options.a_extra);
        let mut a = a_spec.start();
        for p in &mut peers {
            p.sidecar.wait_ready().await;
        }
        a.wait_ready().await;
        GuardedMesh {
            files,
            svc_a,
            a,
            a_ports: a_spec.ports,
            peers,
        }
    }

    /// A's outbound listener.
    pub fn outbound(&self) -> SocketAddr {
        self.a_ports.outbound_addr()
    }

    /// Every replica of `service`.
    pub fn replicas(&self, service: &str) -> Vec<&Peer> {
        self.peers.iter().filter(|p| p.service == service).collect()
    }

    /// The (first) peer running `service`.
    ///
    /// # Panics
    /// If the mesh has no such peer.
    pub fn peer(&self, service: &str) -> &Peer {
        self.peers
            .iter()
            .find(|p| p.service == service)
            .unwrap_or_else(|| panic!("no peer {service} in the mesh"))
    }
}

fn spec(
    service: &str,
    n: usize,
    svc: &RecordingUpstream,
    file: &std::path::Path,
    extra: &str,
) -> SidecarSpec {
    SidecarSpec {
        service: service.to_string(),
        instance: format!("{service}-{n}"),
        service_addr: svc.addr().to_string(),
        ports: SidecarPorts::new(),
        registry: static_registry(file),
        extra: extra.to_string(),
        service_extra: String::new(),
    }
}
