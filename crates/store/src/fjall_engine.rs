//! [`FjallEngine`]: the on-disk backend, and the store directory's `FORMAT` file.
//!
//! Directory layout: `DIR/FORMAT` (one line, `ferry-store 1`) and `DIR/fjall/` (the fjall
//! database, one keyspace per [`Space`]). Keeping fjall's files in a subdirectory lets a later
//! format version change the layout next to it.

use crate::{Engine, KeyValue, Op, Space, StoreError};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// Name of the format file in the store directory.
pub const FORMAT_FILE: &str = "FORMAT";
/// First word of the format file.
pub const FORMAT_NAME: &str = "ferry-store";
/// The store format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Subdirectory holding the fjall database.
const DB_DIR: &str = "fjall";
/// How the journal is made durable for a `sync` apply. `fsync` rather than `fdatasync`: fjall
/// preallocates its journal files sparsely, and the two measured the same within noise.
const SYNC_MODE: PersistMode = PersistMode::SyncAll;
/// After a failed write, how long to wait before trying to reopen the database again.
const REOPEN_BACKOFF: Duration = Duration::from_secs(1);
/// fjall's limits (it panics beyond them, so they are checked first).
const MAX_KEY_LEN: usize = u16::MAX as usize;
const MAX_VALUE_LEN: usize = u32::MAX as usize;

/// Memory limits of a [`FjallEngine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FjallOptions {
    /// Block cache for reads, in bytes.
    pub cache_bytes: u64,
    /// Size at which a space's in-memory write buffer (memtable) is sealed and flushed to disk;
    /// each space holds at most about twice this while a flush runs. Fixed when the store is
    /// created (fjall records it per keyspace); later values are ignored.
    pub memtable_bytes: u64,
}

impl Default for FjallOptions {
    fn default() -> Self {
        FjallOptions {
            cache_bytes: 32 << 20,
            memtable_bytes: 16 << 20,
        }
    }
}

/// The on-disk [`Engine`]: a fjall database in a directory of its own.
///
/// A write failure (a full disk, an I/O error) fails that `apply` with the mapped error. fjall
/// then refuses every further write ("poisoned"), so the engine remembers the failure and, on the
/// next `apply` (at most once a second), drops the database and opens it again, recovering from
/// the journal; until that succeeds, writes fail fast with the original error (a full disk stays
/// [`StoreError::DiskFull`]) and reads are served from the database as it was.
pub struct FjallEngine {
    dir: PathBuf,
    options: FjallOptions,
    inner: RwLock<Option<Inner>>,
    failure: Mutex<Failure>,
}

struct Inner {
    db: Database,
    spaces: [Keyspace; 5],
}

#[derive(Default)]
struct Failure {
    /// The write failure since which the database needs reopening.
    error: Option<StoreError>,
    /// When a reopen was last attempted.
    last_attempt: Option<Instant>,
}

impl FjallEngine {
    /// Opens the store in `dir`, creating the directory and a new store if it does not exist or
    /// is empty. Refuses with [`StoreError::UnsupportedFormat`] a directory whose `FORMAT` file
    /// names another format version or is unreadable, and a non-empty directory without one.
    /// Uses the default [`FjallOptions`].
    pub fn open(dir: &Path) -> Result<FjallEngine, StoreError> {
        FjallEngine::open_with(dir, FjallOptions::default())
    }

    /// [`FjallEngine::open`] with explicit memory limits.
    pub fn open_with(dir: &Path, options: FjallOptions) -> Result<FjallEngine, StoreError> {
        fs::create_dir_all(dir).map_err(|e| {
            StoreError::from_io(&format!("creating store directory {}", dir.display()), &e)
        })?;
        check_format(dir)?;
        let inner = open_db(dir, &options)?;
        Ok(FjallEngine {
            dir: dir.to_path_buf(),
            options,
            inner: RwLock::new(Some(inner)),
            failure: Mutex::new(Failure::default()),
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the database uses on disk (tables, blobs and journals), for metrics.
    pub fn disk_space(&self) -> u64 {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner
            .as_ref()
            .and_then(|i| i.db.disk_space().ok())
            .unwrap_or(0)
    }

    fn failure(&self) -> MutexGuard<'_, Failure> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// If an earlier write failed, reopens the database (at most once per [`REOPEN_BACKOFF`]);
    /// returns the error to fail with when the database is still unusable.
    fn recover_if_failed(&self) -> Result<(), StoreError> {
        let mut failure = self.failure();
        let Some(error) = failure.error.clone() else {
            return Ok(());
        };
        if failure
            .last_attempt
            .is_some_and(|t| t.elapsed() < REOPEN_BACKOFF)
        {
            return Err(error);
        }
        failure.last_attempt = Some(Instant::now());
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        // Drop the poisoned database first: it holds the directory lock.
        drop(inner.take());
        match open_db(&self.dir, &self.options) {
            Ok(db) => {
                *inner = Some(db);
                *failure = Failure::default();
                tracing::info!(dir = %self.dir.display(), "store reopened after a write failure");
                Ok(())
            }
            Err(e) => {
                tracing::debug!(dir = %self.dir.display(), error = %e, "store reopen failed");
                // Keep reporting the original kind of failure (a full disk stays DiskFull).
                Err(if e.is_disk_full() || !error.is_disk_full() {
                    e
                } else {
                    error
                })
            }
        }
    }

    fn read_inner<T>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard = self.inner.read().unwrap_or_else(|p| p.into_inner());
        if let Some(inner) = guard.as_ref() {
            return f(inner);
        }
        // Lock order is failure -> inner, so let go of inner first.
        drop(guard);
        Err(self
            .failure()
            .error
            .clone()
            .unwrap_or_else(|| StoreError::Io("store is unavailable after a write failure".into())))
    }
}

impl Engine for FjallEngine {
    fn apply(&self, ops: &[Op], sync: bool) -> Result<(), StoreError> {
        validate(ops)?;
        self.recover_if_failed()?;
        let result = self.read_inner(|inner| {
            let mode = if sync { SYNC_MODE } else { PersistMode::Buffer };
            if ops.is_empty() {
                return if sync {
                    inner.db.persist(mode).map_err(|e| map_fjall("persist", e))
                } else {
                    Ok(())
                };
            }
            let mut batch = inner.db.batch().durability(Some(mode));
            // All items of a fjall batch get the same sequence number, so two writes to one key
            // in one batch are two versions that compare equal. fjall 3.1 happens to keep the
            // later one, but does not promise it; merged group commits often hold such pairs (a
            // message queued by one batch and deleted by the next), so keep only the last write
            // per key, which is what applying the ops in order means.
            let keep = last_writes(ops);
            for (i, op) in ops.iter().enumerate() {
                if !keep.as_ref().is_none_or(|k| k[i]) {
                    continue;
                }
                match op {
                    Op::Put { space, key, value } => batch.insert(
                        &inner.spaces[space.index()],
                        key.as_slice(),
                        value.as_slice(),
                    ),
                    Op::Delete { space, key } => {
                        batch.remove(&inner.spaces[space.index()], key.as_slice())
                    }
                }
            }
            batch.commit().map_err(|e| map_fjall("write", e))
        });
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let mut failure = self.failure();
                match &failure.error {
                    // A later error of a poisoned database: report the original failure.
                    Some(first) => Err(first.clone()),
                    None => {
                        failure.error = Some(e.clone());
                        failure.last_attempt = Some(Instant::now());
                        Err(e)
                    }
                }
            }
        }
    }

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Ok(None);
        }
        self.read_inner(|inner| {
            inner.spaces[space.index()]
                .get(key)
                .map(|v| v.map(|v| v.to_vec()))
                .map_err(|e| map_fjall("read", e))
        })
    }

    fn scan(
        &self,
        space: Space,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read_inner(|inner| {
            let mut out = Vec::new();
            for guard in inner.spaces[space.index()].range(prefix_range(prefix, after)) {
                let (k, v) = guard.into_inner().map_err(|e| map_fjall("scan", e))?;
                if !k.starts_with(prefix) {
                    break;
                }
                out.push((k.to_vec(), v.to_vec()));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn count(&self, space: Space, prefix: &[u8]) -> Result<u64, StoreError> {
        self.read_inner(|inner| {
            let mut n = 0u64;
            for guard in inner.spaces[space.index()].range(prefix_range(prefix, None)) {
                let k = guard.key().map_err(|e| map_fjall("count", e))?;
                if !k.starts_with(prefix) {
                    break;
                }
                n += 1;
            }
            Ok(n)
        })
    }
}

/// Rejects what fjall would panic on.
pub(crate) fn validate(ops: &[Op]) -> Result<(), StoreError> {
    for op in ops {
        let key = op.key();
        if key.is_empty() {
            return Err(StoreError::InvalidOp(format!(
                "empty key in space {}",
                op.space().name()
            )));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(StoreError::InvalidOp(format!(
                "key of {} bytes in space {} (at most {MAX_KEY_LEN})",
                key.len(),
                op.space().name()
            )));
        }
        if let Op::Put { value, .. } = op {
            if value.len() > MAX_VALUE_LEN {
                return Err(StoreError::InvalidOp(format!(
                    "value of {} bytes (at most {MAX_VALUE_LEN})",
                    value.len()
                )));
            }
        }
    }
    Ok(())
}

/// For each op, whether it is the last write to its key; `None` when every key is distinct.
fn last_writes(ops: &[Op]) -> Option<Vec<bool>> {
    if ops.len() < 2 {
        return None;
    }
    let mut last: HashMap<(Space, &[u8]), usize> = HashMap::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        last.insert((op.space(), op.key()), i);
    }
    if last.len() == ops.len() {
        return None;
    }
    let mut keep = vec![false; ops.len()];
    for i in last.into_values() {
        keep[i] = true;
    }
    Some(keep)
}

/// The key range of `prefix`, starting after `after` when that lies within or past it.
fn prefix_range<'a>(prefix: &'a [u8], after: Option<&'a [u8]>) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let start = match after {
        Some(a) if a >= prefix => Bound::Excluded(a.to_vec()),
        _ => Bound::Included(prefix.to_vec()),
    };
    // The first key past every key with the prefix: the prefix with its last non-0xFF byte
    // incremented and the rest cut off (none if the prefix is all 0xFF or empty).
    let end = match prefix.iter().rposition(|&b| b != 0xFF) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            Bound::Excluded(end)
        }
        None => Bound::Unbounded,
    };
    (start, end)
}

fn open_db(dir: &Path, options: &FjallOptions) -> Result<Inner, StoreError> {
    let path = dir.join(DB_DIR);
    let context = format!("opening store {}", path.display());
    let db = Database::builder(&path)
        .cache_size(options.cache_bytes)
        .open()
        .map_err(|e| map_fjall(&context, e))?;
    let space = |s: Space| {
        db.keyspace(s.name(), || {
            KeyspaceCreateOptions::default().max_memtable_size(options.memtable_bytes)
        })
        .map_err(|e| map_fjall(&context, e))
    };
    let spaces = [
        space(Space::Meta)?,
        space(Space::Retained)?,
        space(Space::Sessions)?,
        space(Space::Messages)?,
        space(Space::Queue)?,
    ];
    Ok(Inner { db, spaces })
}

fn map_fjall(context: &str, err: fjall::Error) -> StoreError {
    use fjall::Error as E;
    match err {
        E::Io(e) | E::Storage(fjall::LsmError::Io(e)) => StoreError::from_io(context, &e),
        E::Locked => StoreError::Io(format!(
            "{context}: the store directory is in use (locked by another open store, \
             probably another ferry process)"
        )),
        E::Poisoned => StoreError::Io(format!(
            "{context}: store refuses writes after an earlier write failure"
        )),
        E::KeyspaceDeleted => StoreError::Io(format!("{context}: keyspace deleted")),
        other @ (E::Storage(_)
        | E::JournalRecovery(_)
        | E::InvalidVersion(_)
        | E::Decompress(_)
        | E::InvalidTrailer
        | E::InvalidTag(_)
        | E::Unrecoverable) => StoreError::Corrupt(format!("{context}: {other:?}")),
        other => StoreError::Io(format!("{context}: {other:?}")),
    }
}

/// Checks `DIR/FORMAT`, or writes it when the directory is new (empty).
fn check_format(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(FORMAT_FILE);
    let tmp = dir.join(format!("{FORMAT_FILE}.tmp"));
    match fs::read(&path) {
        Ok(bytes) => parse_format(&path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let listing = fs::read_dir(dir).map_err(|e| {
                StoreError::from_io(&format!("listing store directory {}", dir.display()), &e)
            })?;
            let mut others = Vec::new();
            for entry in listing {
                let entry = entry.map_err(|e| {
                    StoreError::from_io(&format!("listing store directory {}", dir.display()), &e)
                })?;
                if entry.path() != tmp {
                    others.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
            if !others.is_empty() {
                others.sort();
                others.truncate(5);
                return Err(StoreError::UnsupportedFormat {
                    found: format!(
                        "no {FORMAT_FILE} file in the non-empty directory {} (it holds {}); \
                         give the store a directory of its own",
                        dir.display(),
                        others.join(", ")
                    ),
                    supported: FORMAT_VERSION,
                });
            }
            write_format(dir, &path, &tmp)
        }
        Err(e) => Err(StoreError::from_io(
            &format!("reading {}", path.display()),
            &e,
        )),
    }
}

fn parse_format(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let text = String::from_utf8_lossy(bytes);
    let mut words = text.split_whitespace();
    let version = match (words.next(), words.next(), words.next()) {
        (Some(FORMAT_NAME), Some(v), None) => v.parse::<u32>().ok(),
        _ => None,
    };
    let found = match version {
        Some(FORMAT_VERSION) => return Ok(()),
        Some(v) if v > FORMAT_VERSION => format!(
            "format version {v} in {} (newer than this build: written by a later ferry)",
            path.display()
        ),
        Some(v) => format!("unknown format version {v} in {}", path.display()),
        None => {
            let mut shown: String = text.trim().chars().take(60).collect();
            if shown.len() < text.trim().len() {
                shown.push('…');
            }
            format!("unrecognised contents {shown:?} in {}", path.display())
        }
    };
    Err(StoreError::UnsupportedFormat {
        found,
        supported: FORMAT_VERSION,
    })
}

/// Writes the format file atomically: a temporary file, fsynced, renamed into place, and the
/// directory fsynced.
fn write_format(dir: &Path, path: &Path, tmp: &Path) -> Result<(), StoreError> {
    let io = |what: &str, e: std::io::Error| {
        StoreError::from_io(&format!("{what} {}", path.display()), &e)
    };
    let mut file = fs::File::create(tmp).map_err(|e| io("creating", e))?;
    file.write_all(format!("{FORMAT_NAME} {FORMAT_VERSION}\n").as_bytes())
        .map_err(|e| io("writing", e))?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    drop(file);
    fs::rename(tmp, path).map_err(|e| io("creating", e))?;
    sync_dir(dir).map_err(|e| io("syncing the directory of", e))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        assert_eq!(
            prefix_range(b"ab", None),
            (
                Bound::Included(b"ab".to_vec()),
                Bound::Excluded(b"ac".to_vec())
            )
        );
        assert_eq!(
            prefix_range(b"a\xff", Some(b"a\xff1")),
            (
                Bound::Excluded(b"a\xff1".to_vec()),
                Bound::Excluded(b"b".to_vec())
            )
        );
        assert_eq!(
            prefix_range(b"\xff", Some(b"a")),
            (Bound::Included(b"\xff".to_vec()), Bound::Unbounded)
        );
        assert_eq!(
            prefix_range(b"", None),
            (Bound::Included(vec![]), Bound::Unbounded)
        );
    }

    #[test]
    fn last_writes_keeps_the_last_per_key() {
        let ops = vec![
            Op::put(Space::Meta, "a", "1"),
            Op::put(Space::Retained, "a", "1"),
            Op::delete(Space::Meta, "a"),
            Op::put(Space::Meta, "b", "1"),
        ];
        assert_eq!(last_writes(&ops), Some(vec![false, true, true, true]));
        assert_eq!(last_writes(&ops[1..]), None);
    }

    #[test]
    fn format_parsing() {
        let p = Path::new("/x/FORMAT");
        assert!(parse_format(p, b"ferry-store 1\n").is_ok());
        let e = parse_format(p, b"ferry-store 7\n").unwrap_err().to_string();
        assert!(e.contains("format version 7") && e.contains("newer"), "{e}");
        assert!(e.contains("supports store format 1"), "{e}");
        let e = parse_format(p, b"ferry-store 0").unwrap_err().to_string();
        assert!(e.contains("unknown format version 0"), "{e}");
        let e = parse_format(p, b"something else").unwrap_err().to_string();
        assert!(
            e.contains("unrecognised contents \"something else\""),
            "{e}"
        );
    }
}
