//! Ferry's data directory: the admin key file (readable only by its owner) and the API
//! endpoint file, both for `ferry ctl` on the same machine.

use anyhow::{Context, Result};
use ferry_meta::{AdminKey, Meta};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const DEFAULT_DIR: &str = "ferry-data";
const KEY_FILE: &str = "admin-key.json";
const ENDPOINT_FILE: &str = "api-endpoint";

/// The admin key as stored on disk.
#[derive(Serialize, Deserialize)]
pub struct KeyFile {
    pub access_key_id: String,
    pub access_key_secret: String,
}

pub fn ensure(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))
}

fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Loads the admin key from `dir`, or creates one (returned as `Some`, to be shown once).
pub fn admin_key(dir: &Path, meta: &Meta) -> Result<Option<(AdminKey, PathBuf)>> {
    let path = dir.join(KEY_FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file: KeyFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid admin key file", path.display()))?;
        if meta.admin_secret(&file.access_key_id).is_none() {
            meta.insert_admin_key(AdminKey {
                access_key_id: file.access_key_id,
                secret: file.access_key_secret,
                created_at: ferry_meta::now_ms(),
            })
            .map_err(|e| anyhow::anyhow!("cannot store the admin key: {e}"))?;
        }
        return Ok(None);
    }
    let key = meta
        .create_admin_key(ferry_meta::now_ms())
        .map_err(|e| anyhow::anyhow!("cannot store the admin key: {e}"))?;
    let file = KeyFile {
        access_key_id: key.access_key_id.clone(),
        access_key_secret: key.secret.clone(),
    };
    write_private(&path, serde_json::to_string_pretty(&file)?.as_bytes())?;
    Ok(Some((key, path)))
}

/// Reads the admin key file (for `ferry ctl`).
pub fn read_key(dir: &Path) -> Result<KeyFile> {
    let path = dir.join(KEY_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no admin key: cannot read {} (pass --data-dir, or --key-id and --key-secret)",
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid admin key file", path.display()))
}

pub fn write_endpoint(dir: &Path, url: &str) -> Result<()> {
    write_private(&dir.join(ENDPOINT_FILE), url.as_bytes())
}

/// The API URL `ferry serve` wrote, if any.
pub fn read_endpoint(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(ENDPOINT_FILE))
        .ok()
        .map(|s| s.trim().to_string())
}
