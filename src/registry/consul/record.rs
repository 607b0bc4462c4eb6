//! Our [`EndpointRecord`] in Consul's shapes: the agent register body we
//! send, and the `/v1/health/service/<name>` entries we read back.
//!
//! The record's fields map onto Consul's own where Consul has one (ID,
//! Name, Address, Port, Weights.Passing) and onto `Meta` otherwise (zone,
//! protocols, version, tls). Free-form metadata rides in `Meta` too; our
//! keys are written last so a user's `zone` cannot shadow the real one.

use std::collections::BTreeMap;
use std::time::Duration;

use compact_str::CompactString;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::registry::{DecodeError, EndpointRecord, DEFAULT_WEIGHT};

/// The tag every outrigger registration carries. Discovery watches only
/// catalog services with it, so the `consul` service itself and services
/// no sidecar fronts never enter the routing table.
pub const MESH_TAG: &str = "outrigger";

/// Meta keys that carry record fields.
const META_ZONE: &str = "zone";
const META_PROTOCOLS: &str = "protocols";
const META_VERSION: &str = "version";
const META_TLS: &str = "tls";

/// One element of a `/v1/health/service/<name>` answer (the fields we use).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthEntry {
    /// The node the instance's agent runs on.
    pub node: HealthNode,
    /// The registered service instance.
    pub service: HealthService,
}

/// `Node` of a health entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthNode {
    /// The node's address: what Consul says to use when the service has no
    /// address of its own.
    pub address: String,
}

/// `Service` of a health entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthService {
    /// Instance id.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub service: String,
    /// Service address (may be empty: then the node's).
    pub address: String,
    /// Service port.
    pub port: u32,
    /// Meta map.
    pub meta: Option<BTreeMap<String, String>>,
    /// Weights.
    pub weights: Option<Weights>,
}

/// `Weights` of a service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Weights {
    /// Weight while passing.
    pub passing: u32,
}

/// The check id we register and pass: one per instance.
pub fn check_id(instance: &str) -> String {
    format!("{MESH_TAG}:{instance}")
}

/// Consul's duration syntax (`"5s"`, `"1m0s"` both parse; Go's
/// `time.ParseDuration`). Milliseconds keep sub-second TTLs exact.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// The `PUT /v1/agent/service/register` body for `me`.
///
/// The TTL check starts critical (Consul's default for a new check), so
/// the instance is not routable until the first pass, which the registrar
/// sends right after registering.
pub fn register_body(
    me: &EndpointRecord,
    tags: &[String],
    ttl: Duration,
    deregister_critical_after: Duration,
) -> Result<Value, String> {
    let (host, port) = split_host_port(&me.address)?;
    let mut meta: BTreeMap<String, String> = me
        .metadata
        .iter()
        .filter(|(k, v)| is_meta_key(k) && v.len() <= 512)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(zone) = &me.zone {
        meta.insert(META_ZONE.into(), zone.to_string());
    } else {
        meta.remove(META_ZONE);
    }
    meta.insert(META_PROTOCOLS.into(), me.protocols.join(","));
    meta.insert(META_VERSION.into(), me.version.to_string());
    meta.insert(META_TLS.into(), me.tls.to_string());
    let mut all_tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    if !all_tags.contains(&MESH_TAG) {
        all_tags.push(MESH_TAG);
    }
    Ok(json!({
        "ID": me.instance,
        "Name": me.service,
        "Address": host,
        "Port": port,
        "Tags": all_tags,
        "Meta": meta,
        "Weights": { "Passing": me.weight, "Warning": 1 },
        "Check": {
            "CheckID": check_id(&me.instance),
            "Name": "outrigger local health probe",
            "Notes": "passed by the outrigger sidecar while its probe of the local service passes",
            "TTL": go_duration(ttl),
            "DeregisterCriticalServiceAfter": go_duration(deregister_critical_after),
        },
    }))
}

/// Consul's Meta key rule: at most 64 characters of ASCII letters, digits,
/// `-` and `_`, and not the reserved `consul-` prefix. Keys that break it
/// are left out rather than failing the whole registration.
fn is_meta_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 64
        && !k.starts_with("consul-")
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// `host:port` → (`host` without IPv6 brackets, port).
fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("advertise {address:?} is not host:port"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("advertise {address:?} has an invalid port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok((host.to_owned(), port))
}

// === impl HealthEntry ===

impl HealthEntry {
    /// The record this entry describes, checked like any registry value.
    pub fn to_record(&self) -> Result<EndpointRecord, DecodeError> {
        let s = &self.service;
        let host = if s.address.is_empty() {
            &self.node.address
        } else {
            &s.address
        };
        let port = u16::try_from(s.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| DecodeError::Field {
                field: "Port",
                reason: format!("{} is not a port", s.port),
            })?;
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut meta = s.meta.clone().unwrap_or_default();
        let zone = meta
            .remove(META_ZONE)
            .filter(|z| !z.is_empty())
            .map(CompactString::from);
        let protocols = meta
            .remove(META_PROTOCOLS)
            .map(|p| {
                p.split(',')
                    .filter(|x| !x.is_empty())
                    .map(CompactString::from)
                    .collect()
            })
            .unwrap_or_default();
        let version = meta.remove(META_VERSION).unwrap_or_default().into();
        let tls = meta.remove(META_TLS).is_some_and(|t| t == "true");
        let weight = match s.weights.as_ref().map(|w| w.passing) {
            Some(w) if w > 0 => w,
            _ => DEFAULT_WEIGHT,
        };
        let record = EndpointRecord {
            service: s.service.as_str().into(),
            instance: s.id.as_str().into(),
            address: address.into(),
            zone,
            weight,
            protocols,
            tls,
            metadata: meta,
            version,
        };
        record.check()?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> EndpointRecord {
        EndpointRecord {
            service: "b".into(),
            instance: "b-1".into(),
            address: "10.0.0.7:15006".into(),
            zone: Some("z1".into()),
            weight: 30,
            protocols: vec!["http1".into(), "h2".into()],
            tls: true,
            metadata: BTreeMap::from([
                ("team".to_string(), "pay".to_string()),
                ("zone".to_string(), "spoofed".to_string()),
                ("bad key!".to_string(), "x".to_string()),
            ]),
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn register_body_shape() {
        let body = register_body(
            &me(),
            &["blue".into()],
            Duration::from_secs(5),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(body["ID"], "b-1");
        assert_eq!(body["Name"], "b");
        assert_eq!(body["Address"], "10.0.0.7");
        assert_eq!(body["Port"], 15006);
        assert_eq!(body["Tags"], json!(["blue", "outrigger"]));
        assert_eq!(body["Meta"]["zone"], "z1");
        assert_eq!(body["Meta"]["protocols"], "http1,h2");
        assert_eq!(body["Meta"]["version"], "0.1.0");
        assert_eq!(body["Meta"]["team"], "pay");
        assert!(body["Meta"].get("bad key!").is_none());
        assert_eq!(body["Weights"]["Passing"], 30);
        assert_eq!(body["Check"]["CheckID"], "outrigger:b-1");
        assert_eq!(body["Check"]["TTL"], "5000ms");
        assert_eq!(body["Check"]["DeregisterCriticalServiceAfter"], "60000ms");
    }

    #[test]
    fn health_entry_round_trip() {
        let mut body =
            register_body(&me(), &[], Duration::from_secs(5), Duration::from_secs(60)).unwrap();
        // Health answers name the service `Service` where the register body
        // says `Name`.
        body["Service"] = body["Name"].clone();
        let entry: HealthEntry = serde_json::from_value(json!({
            "Node": { "Node": "n1", "Address": "10.9.9.9" },
            "Service": body,
            "Checks": [],
        }))
        .unwrap();
        let got = entry.to_record().unwrap();
        let mut want = me();
        want.metadata.remove("zone");
        want.metadata.remove("bad key!");
        assert_eq!(got, want);
    }

    #[test]
    fn health_entry_falls_back_to_node_address_and_rejects_bad_ports() {
        let mut entry: HealthEntry = serde_json::from_value(json!({
            "Node": { "Address": "fd00::1" },
            "Service": { "ID": "b-2", "Service": "b", "Address": "", "Port": 80 },
        }))
        .unwrap();
        let r = entry.to_record().unwrap();
        assert_eq!(r.address, "[fd00::1]:80");
        assert_eq!(r.weight, DEFAULT_WEIGHT);
        entry.service.port = 0;
        assert!(entry.to_record().is_err());
        entry.service.port = 70000;
        assert!(entry.to_record().is_err());
        entry.service.port = 80;
        entry.service.service = "Bad_Name".into();
        assert!(entry.to_record().is_err());
    }
}
