//! The registry value: what one sidecar publishes about its service instance.
//!
//! The same JSON is stored under `{prefix}/services/{service}/{instance}` in
//! etcd, rebuilt from Consul's catalog, persisted in the state file, and read
//! from the static endpoints file. Decoding is strict about what the data
//! path relies on (service name, address, weight) and lenient about the rest,
//! so a newer sidecar can add fields without breaking older ones.

use std::collections::BTreeMap;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Largest registry value we accept. A real record is a few hundred bytes;
/// anything near this is a mistake or an attack, and decoding it would let
/// one bad writer bloat every sidecar's memory.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Default weight when a record does not say.
pub const DEFAULT_WEIGHT: u32 = 100;

/// Largest weight honoured; keeps weighted picks far from integer overflow.
pub const MAX_WEIGHT: u32 = 10_000;

/// One service instance, as published in a registry.
///
/// Its strings are [`CompactString`]s: a service name, instance id, address,
/// zone or version of up to 24 bytes (nearly all of them) is stored inline,
/// so a record costs one allocation (its protocol list) instead of seven.
/// A registry's full read decodes, and a full table swap frees, one record
/// per endpoint, and glibc's `malloc`/`free` were about half of a 10k swap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Logical service name (`b`).
    pub service: CompactString,
    /// Unique instance id (`b-1`); the merge key across registries.
    pub instance: CompactString,
    /// What peers dial: the instance's sidecar inbound listener (`host:port`).
    pub address: CompactString,
    /// Locality, for same-zone preference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<CompactString>,
    /// Relative balancing weight.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Protocols the inbound listener speaks (`http1`, `h2`).
    #[serde(default)]
    pub protocols: Vec<CompactString>,
    /// Whether the inbound listener requires mTLS.
    #[serde(default)]
    pub tls: bool,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The outrigger version that wrote the record.
    #[serde(default)]
    pub version: CompactString,
}

/// Why a registry value was rejected.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_RECORD_BYTES`].
    #[error("value is {0} bytes, above the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not the JSON we publish.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field the data path depends on is unusable.
    #[error("{field}: {reason}")]
    Field {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

// === impl EndpointRecord ===

impl EndpointRecord {
    /// Decode and check a registry value.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let record: EndpointRecord = serde_json::from_slice(bytes)?;
        record.check()?;
        Ok(record)
    }

    /// Encode for publishing.
    pub fn encode(&self) -> String {
        // Serializing plain strings, numbers and maps cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Validate the fields the data path relies on.
    pub fn check(&self) -> Result<(), DecodeError> {
        if !is_service_name(&self.service) {
            return Err(field(
                "service",
                format!("{:?} is not a valid service name", self.service),
            ));
        }
        if !is_instance_id(&self.instance) {
            return Err(field(
                "instance",
                format!("{:?} is not a valid instance id", self.instance),
            ));
        }
        if let Err(reason) = check_host_port(&self.address) {
            return Err(field("address", reason));
        }
        if self.weight == 0 || self.weight > MAX_WEIGHT {
            return Err(field(
                "weight",
                format!("{} is outside 1..={MAX_WEIGHT}", self.weight),
            ));
        }
        Ok(())
    }
}

fn field(field: &'static str, reason: String) -> DecodeError {
    DecodeError::Field { field, reason }
}

/// A DNS label: what `Host: b` and `b.<mesh_domain>` can name.
pub fn is_service_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Instance ids appear in registry keys, so they are kept to a safe alphabet
/// (`:` is allowed because a static entry defaults its instance to its address).
pub fn is_instance_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b':'))
}

/// `host:port` with a non-zero port; the host is an IP, `[v6]`, or a DNS name.
pub fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} is not host:port"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("{s:?} has an invalid port")),
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ok = !host.is_empty()
        && host.len() <= 253
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_')));
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} has an invalid host"))
    }
}

#[cfg(test)]
pub(crate) mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_defaults() {
        let r =
            EndpointRecord::decode(br#"{"service":"b","instance":"b-1","address":"b-1:15006"}"#)
                .unwrap();
        assert_eq!(r.weight, DEFAULT_WEIGHT);
        assert_eq!(EndpointRecord::decode(r.encode().as_bytes()).unwrap(), r);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(matches!(
            EndpointRecord::decode(b"{nope"),
            Err(DecodeError::Json(_))
        ));
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        assert!(matches!(
            EndpointRecord::decode(&big),
            Err(DecodeError::TooLarge(_))
        ));
        let bad_addr = br#"{"service":"b","instance":"b-1","address":"nowhere"}"#;
        assert!(matches!(
            EndpointRecord::decode(bad_addr),
            Err(DecodeError::Field {
                field: "address",
                ..
            })
        ));
        let bad_port = br#"{"service":"b","instance":"b-1","address":"h:0"}"#;
        assert!(EndpointRecord::decode(bad_port).is_err());
        let bad_name = br#"{"service":"B_","instance":"b-1","address":"h:1"}"#;
        assert!(EndpointRecord::decode(bad_name).is_err());
        let zero_weight = br#"{"service":"b","instance":"b-1","address":"h:1","weight":0}"#;
        assert!(EndpointRecord::decode(zero_weight).is_err());
    }

    #[test]
    fn host_port_forms() {
        assert!(check_host_port("127.0.0.1:80").is_ok());
        assert!(check_host_port("[::1]:80").is_ok());
        assert!(check_host_port("b-1.mesh:15006").is_ok());
        assert!(check_host_port("b 1:80").is_err());
        assert!(check_host_port(":80").is_err());
    }
}
