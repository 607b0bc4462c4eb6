//! The persisted last-known table: the static endpoints format, written
//! atomically (temp file + rename) so a crash mid-write never leaves a torn
//! file that would be worse than none.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::registry::static_file::{parse_endpoints, render_endpoints};
use crate::registry::EndpointRecord;

/// `routes.toml` inside the state dir.
pub fn state_file_path(dir: &Path) -> PathBuf {
    dir.join("routes.toml")
}

/// Read the state file; `Ok(None)` when there is none.
pub fn load_state_file(path: &Path) -> Result<Option<Vec<EndpointRecord>>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_endpoints(&text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Write the state file atomically.
pub fn write_state_file(path: &Path, records: &[EndpointRecord]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("toml.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(render_endpoints(records).as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
