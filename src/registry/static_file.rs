//! The `static` registry: a TOML file of endpoints, re-read when it changes.
//!
//! For tests, benchmarks and small fixed meshes. The file is polled (size,
//! mtime and content) rather than watched with inotify, because polling also
//! sees the symlink swaps Kubernetes uses for ConfigMaps and costs one
//! `stat` per interval. An invalid new file is logged and ignored: the old
//! table keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use compact_str::CompactString;
use serde::Deserialize;

use super::{BoxFuture, EndpointRecord, Registry, RegistryError, Update, UpdateTx, DEFAULT_WEIGHT};

/// A registry backed by an endpoints file.
#[derive(Debug)]
pub struct StaticRegistry {
    file: PathBuf,
    poll_interval: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    service: CompactString,
    address: CompactString,
    instance: Option<CompactString>,
    zone: Option<CompactString>,
    weight: Option<u32>,
    #[serde(default)]
    tls: bool,
    /// What the inbound speaks; with `tls`, `"plaintext"` marks a
    /// permissive listener (see `outbound::dial`).
    #[serde(default)]
    protocols: Vec<CompactString>,
    #[serde(default)]
    metadata: std::collections::BTreeMap<String, String>,
}

// === impl StaticRegistry ===

impl StaticRegistry {
    /// Poll `file` every `poll_interval`.
    pub fn new(file: PathBuf, poll_interval: Duration) -> Self {
        StaticRegistry {
            file,
            poll_interval,
        }
    }
}

impl Registry for StaticRegistry {
    fn kind(&self) -> &'static str {
        "static"
    }

    // A static file lists peers; there is nothing to publish ourselves.
    fn register<'a>(&'a self, _me: &'a EndpointRecord) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async { Ok(()) })
    }

    fn withdraw(&self) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(async { Ok(()) })
    }

    fn deregister(&self) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(async { Ok(()) })
    }

    fn discover(self: Arc<Self>, tx: UpdateTx) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut last: Option<(u64, Option<SystemTime>, String)> = None;
            let mut revision = 0u64;
            let mut reported_missing = false;
            loop {
                match read_if_changed(&self.file, &last).await {
                    Ok(Some((stamp, text))) => {
                        reported_missing = false;
                        // Parsed off the request thread: a 10k-endpoint
                        // file took ~70 ms to parse (see `offload`). A panic
                        // in the parser counts as an invalid file; with the
                        // empty text remembered, this version is skipped
                        // until the file changes again.
                        let (text, parsed) = crate::offload::run(move || {
                            let parsed = parse_endpoints(&text);
                            (text, parsed)
                        })
                        .await
                        .unwrap_or_else(|e| {
                            (String::new(), Err(format!("the parser failed: {e}")))
                        });
                        match parsed {
                            Ok(endpoints) => {
                                revision += 1;
                                tracing::info!(file = %self.file.display(), endpoints = endpoints.len(), "static endpoints loaded");
                                if !tx
                                    .send(Update::Reset {
                                        endpoints,
                                        revision,
                                    })
                                    .await
                                {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(file = %self.file.display(), error = %e, "invalid endpoints file; keeping the previous table");
                                let _ = tx
                                    .send(Update::Malformed {
                                        key: self.file.display().to_string(),
                                        reason: e,
                                    })
                                    .await;
                            }
                        }
                        last = Some((stamp.0, stamp.1, text));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if !reported_missing {
                            tracing::warn!(file = %self.file.display(), error = %e, "cannot read endpoints file; keeping the previous table");
                            reported_missing = true;
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(self.poll_interval).await;
            }
        })
    }
}

/// Read the file when its size, mtime or content changed.
async fn read_if_changed(
    file: &std::path::Path,
    last: &Option<(u64, Option<SystemTime>, String)>,
) -> std::io::Result<Option<((u64, Option<SystemTime>), String)>> {
    let meta = tokio::fs::metadata(file).await?;
    let stamp = (meta.len(), meta.modified().ok());
    if let Some((len, mtime, _)) = last {
        // Same size and mtime: unchanged (mtime granularity is fine; a
        // same-second same-size edit is caught by the content check below
        // on the next real change).
        if *len == stamp.0 && *mtime == stamp.1 {
            return Ok(None);
        }
    }
    let text = tokio::fs::read_to_string(file).await?;
    if let Some((_, _, old)) = last {
        if *old == text {
            return Ok(None);
        }
    }
    Ok(Some((stamp, text)))
}

/// Parse an endpoints file. Errors name the entry and field.
pub fn parse_endpoints(text: &str) -> Result<Vec<EndpointRecord>, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| match e.message() {
        // Some syntax errors carry no message of their own (a lone `\r`,
        // found by the property tests); the full error still says where.
        "" => e.to_string().trim().replace('\n', " "),
        message => message.to_string(),
    })?;
    let mut out = Vec::with_capacity(raw.endpoints.len());
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, e) in raw.endpoints.into_iter().enumerate() {
        let record = EndpointRecord {
            instance: e.instance.unwrap_or_else(|| e.address.clone()),
            service: e.service,
            address: e.address,
            zone: e.zone,
            weight: e.weight.unwrap_or(DEFAULT_WEIGHT),
            protocols: e.protocols,
            tls: e.tls,
            metadata: e.metadata,
            version: CompactString::default(),
        };
        match record.check() {
            Ok(()) => {
                if seen.insert((record.service.clone(), record.instance.clone())) {
                    out.push(record);
                } else {
                    errors.push(format!(
                        "endpoints[{i}].instance: {:?} of service {:?} is listed twice",
                        record.instance, record.service
                    ));
                }
            }
            Err(err) => errors.push(format!("endpoints[{i}].{err}")),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("; "))
    }
}

/// Render records in the endpoints-file format (used for the state file).
pub fn render_endpoints(records: &[EndpointRecord]) -> String {
    let mut out = String::from("# outrigger: last known routing table\n");
    for r in records {
        out.push_str("\n[[endpoints]]\n");
        out.push_str(&format!("service = {}\n", toml_str(&r.service)));
        out.push_str(&format!("address = {}\n", toml_str(&r.address)));
        out.push_str(&format!("instance = {}\n", toml_str(&r.instance)));
        if let Some(z) = &r.zone {
            out.push_str(&format!("zone = {}\n", toml_str(z)));
        }
        out.push_str(&format!("weight = {}\n", r.weight));
        if r.tls {
            out.push_str("tls = true\n");
        }
        if !r.metadata.is_empty() {
            // An inline table with quoted keys: metadata keys are free-form.
            let pairs: Vec<String> = r
                .metadata
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_str(k), toml_str(v)))
                .collect();
            out.push_str(&format!("metadata = {{ {} }}\n", pairs.join(", ")));
        }
        if !r.protocols.is_empty() {
            let list: Vec<String> = r.protocols.iter().map(|p| toml_str(p)).collect();
            out.push_str(&format!("protocols = [{}]\n", list.join(", ")));
        }
    }
    out
}

/// A TOML basic string (`"..."`), usable as a value *and* as a key: the
/// `toml` crate may pick a multi-line form (`"""..."""`) that is not a valid
/// key (found by the property tests, for metadata keys with quotes).
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_design_format_with_defaults() {
        let eps = parse_endpoints(
            r#"
            [[endpoints]]
            service = "b"
            address = "127.0.0.1:15106"
            instance = "b-1"
            zone = "z1"
            weight = 50

            [[endpoints]]
            service = "c"
            address = "c-1:15006"
            "#,
        )
        .unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].instance, "b-1");
        assert_eq!(eps[0].weight, 50);
        assert_eq!(
            eps[1].instance, "c-1:15006",
            "instance defaults to the address"
        );
        assert_eq!(eps[1].weight, DEFAULT_WEIGHT);
    }

    #[test]
    fn empty_file_is_an_empty_table() {
        assert!(parse_endpoints("").unwrap().is_empty());
    }

    #[test]
    fn errors_name_entry_and_field() {
        let err = parse_endpoints(
            r#"
            [[endpoints]]
            service = "b"
            address = "nope"
            "#,
        )
        .unwrap_err();
        assert!(err.contains("endpoints[0].address"), "{err}");
        assert!(parse_endpoints("[[endpoints]]\nservice = 1").is_err());
        assert!(parse_endpoints("[[endpoints]]\nservice=\"b\"\naddress=\"h:1\"\nbogus=1").is_err());
    }

    #[test]
    fn render_round_trips() {
        let eps = parse_endpoints(
            "[[endpoints]]\nservice=\"b\"\naddress=\"h:1\"\ninstance=\"b-1\"\nzone=\"z\\\"q\"\n",
        )
        .unwrap();
        assert_eq!(parse_endpoints(&render_endpoints(&eps)).unwrap(), eps);
        let tls = parse_endpoints(
            "[[endpoints]]\nservice=\"b\"\naddress=\"h:1\"\ntls=true\nprotocols=[\"h2\",\"plaintext\"]\n",
        )
        .unwrap();
        assert_eq!(tls[0].protocols, ["h2", "plaintext"]);
        assert_eq!(parse_endpoints(&render_endpoints(&tls)).unwrap(), tls);
    }
}
