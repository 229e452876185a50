//! [`MemoryEngine`]: the in-memory backend.

use crate::{Engine, KeyValue, Op, Space, StoreError};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// An [`Engine`] on four BTreeMaps behind a lock: for tests, and for a broker that runs without
/// a data directory. Nothing survives the process.
#[derive(Default)]
pub struct MemoryEngine {
    spaces: RwLock<[Map; 5]>,
    fail: Mutex<Option<StoreError>>,
    applies: AtomicU64,
    syncs: AtomicU64,
}

impl MemoryEngine {
    /// An empty store.
    pub fn new() -> MemoryEngine {
        MemoryEngine::default()
    }

    /// While `Some`, every [`Engine::apply`] fails with this error and writes nothing (to test
    /// disk-full and I/O-error paths). `None` makes writes work again.
    pub fn fail_writes(&self, err: Option<StoreError>) {
        *lock(&self.fail) = err;
    }

    /// How many times [`Engine::apply`] was called (including failed calls).
    pub fn applies(&self) -> u64 {
        self.applies.load(Ordering::Relaxed)
    }

    /// How many of those calls asked for `sync`.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    fn read(&self) -> RwLockReadGuard<'_, [Map; 5]> {
        self.spaces.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, [Map; 5]> {
        self.spaces.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine for MemoryEngine {
    fn apply(&self, ops: &[Op], sync: bool) -> Result<(), StoreError> {
        self.applies.fetch_add(1, Ordering::Relaxed);
        if sync {
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        crate::fjall_engine::validate(ops)?;
        if let Some(err) = lock(&self.fail).clone() {
            return Err(err);
        }
        let mut spaces = self.write();
        for op in ops {
            match op {
                Op::Put { space, key, value } => {
                    spaces[space.index()].insert(key.clone(), value.clone());
                }
                Op::Delete { space, key } => {
                    spaces[space.index()].remove(key);
                }
            }
        }
        Ok(())
    }

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read()[space.index()].get(key).cloned())
    }

    fn scan(
        &self,
        space: Space,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let spaces = self.read();
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        Ok(spaces[space.index()]
            .range::<[u8], _>((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn count(&self, space: Space, prefix: &[u8]) -> Result<u64, StoreError> {
        let spaces = self.read();
        Ok(spaces[space.index()]
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .count() as u64)
    }
}
