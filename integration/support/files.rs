//! Files the sidecar reads while it runs: static registry endpoint files.
//!
//! A `kind = "static"` registry re-reads its file when it changes. Editors
//! and config management replace files atomically (write a temp file, then
//! rename), but plain `>` redirection truncates and rewrites in place, so a
//! watcher can see an empty or half-written file. [`FileDir`] can do both,
//! so tests can check the sidecar keeps its last good table on a torn read.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tempfile::TempDir;

/// A temporary directory for test files, deleted on drop.
#[derive(Debug)]
pub struct FileDir {
    dir: TempDir,
    counter: AtomicU64,
}

impl Default for FileDir {
    fn default() -> Self {
        Self::new()
    }
}

impl FileDir {
    /// A new empty temporary directory.
    pub fn new() -> FileDir {
        let dir = tempfile::Builder::new()
            .prefix("outrigger-files-")
            .tempdir()
            .expect("temp dir");
        FileDir {
            dir,
            counter: AtomicU64::new(0),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The path of `name` inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces `name` atomically: writes and syncs a temp file in the same
    /// directory, then renames it over `name`. Readers see the old or the
    /// new contents, never a mix. Returns the path.
    pub fn write_atomic(&self, name: &str, contents: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.file(&format!(".{name}.tmp-{n}"));
        let mut f = std::fs::File::create(&tmp).expect("create temp file");
        f.write_all(contents.as_bytes()).expect("write temp file");
        f.sync_all().expect("sync temp file");
        let path = self.file(name);
        std::fs::rename(&tmp, &path).expect("rename temp file into place");
        path
    }

    /// Rewrites `name` in place: truncate, write the first half, flush,
    /// write the rest. A concurrent reader may see an empty or partial
    /// file. Returns the path.
    pub fn write_in_place(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.file(name);
        let mut f = std::fs::File::create(&path).expect("open file for rewrite");
        let (first, rest) = contents.as_bytes().split_at(contents.len() / 2);
        f.write_all(first).expect("write first half");
        f.flush().expect("flush");
        f.write_all(rest).expect("write rest");
        path
    }

    /// Deletes `name` if it exists.
    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.file(name));
    }
}

/// One `[[endpoints]]` entry of a static registry file.
#[derive(Debug, Clone)]
pub struct StaticEndpoint {
    /// Service name.
    pub service: String,
    /// A peer sidecar's inbound listener.
    pub address: SocketAddr,
    /// Instance id, if any.
    pub instance: Option<String>,
    /// Zone, if any.
    pub zone: Option<String>,
    /// Weight, if any.
    pub weight: Option<u32>,
}

impl StaticEndpoint {
    /// An endpoint with only service and address.
    pub fn new(service: &str, address: SocketAddr) -> StaticEndpoint {
        StaticEndpoint {
            service: service.to_string(),
            address,
            instance: None,
            zone: None,
            weight: None,
        }
    }

    /// Sets the instance id.
    pub fn instance(mut self, instance: &str) -> Self {
        self.instance = Some(instance.to_string());
        self
    }

    /// Sets the zone.
    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = Some(zone.to_string());
        self
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = Some(weight);
        self
    }
}

/// Renders a static registry file (DESIGN.md format).
pub fn static_endpoints_toml(endpoints: &[StaticEndpoint]) -> String {
    let mut out = String::new();
    for e in endpoints {
        let _ = write!(
            out,
            "[[endpoints]]\nservice = \"{}\"\naddress = \"{}\"\n",
            e.service, e.address
        );
        if let Some(instance) = &e.instance {
            let _ = writeln!(out, "instance = \"{instance}\"");
        }
        if let Some(zone) = &e.zone {
            let _ = writeln!(out, "zone = \"{zone}\"");
        }
        if let Some(weight) = e.weight {
            let _ = writeln!(out, "weight = {weight}");
        }
        out.push('\n');
    }
    out
}
