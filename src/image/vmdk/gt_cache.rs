//! The grain tables of an image's sparse extents, kept in a cache of bounded size shared by
//! every reader thread, so that table memory does not grow with the disk (a fully allocated
//! 8 TiB disk has 512 MiB of tables).
//!
//! One cache serves a whole open image (every extent and parent). Entries are keyed by
//! (extent, grain directory index) and evicted by CLOCK: a hit only sets a flag, so the
//! pipeline's workers, which look a table up once per table a chunk crosses, barely hold the
//! lock. A table is read and checked outside the lock; two threads missing the same table
//! both read it, and the second insert keeps the first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bookkeeping counted for each entry besides its table (map and slot), so that tiny tables
/// (a hostile 1-entry geometry) cannot hold many times the capacity in overhead.
pub(crate) const ENTRY_OVERHEAD: u64 = 64;

type Key = (u32, u64);

/// A grain table as cached: its entries, or no entries when the table is all zeros (it then
/// maps nothing, and costs only its bookkeeping).
pub(crate) type Table = Arc<[u32]>;

struct Slot {
    key: Key,
    table: Table,
    cost: u64,
    referenced: bool,
}

#[derive(Default)]
struct Inner {
    index: HashMap<Key, usize>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    hand: usize,
    bytes: u64,
}

/// Grain tables of one open image, at most `capacity` bytes of them (bookkeeping included).
pub(crate) struct GtCache {
    capacity: u64,
    owners: AtomicU32,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for GtCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GtCache").field("capacity", &self.capacity).field("bytes", &self.lock().bytes).finish()
    }
}

/// Bytes an entry holding `table` counts for.
pub(crate) fn cost(table: &[u32]) -> u64 {
    table.len() as u64 * 4 + ENTRY_OVERHEAD
}

impl GtCache {
    pub(crate) fn new(capacity: u64) -> GtCache {
        GtCache { capacity, owners: AtomicU32::new(0), inner: Mutex::new(Inner::default()) }
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// A key space of its own, for one extent.
    pub(crate) fn register(&self) -> u32 {
        self.owners.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The cache holds no invariant a panicking reader could break halfway through an
        // update that matters for correctness: every entry is a checked table.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn get(&self, owner: u32, index: u64) -> Option<Table> {
        let mut inner = self.lock();
        let slot = *inner.index.get(&(owner, index))?;
        let slot = inner.slots[slot].as_mut()?;
        slot.referenced = true;
        Some(slot.table.clone())
    }

    /// Bytes not yet taken.
    pub(crate) fn room(&self) -> u64 {
        self.capacity.saturating_sub(self.lock().bytes)
    }

    /// Adds a table, evicting tables not used since the hand last passed them as needed.
    /// A table larger than the whole capacity is not kept.
    pub(crate) fn insert(&self, owner: u32, index: u64, table: Table) {
        self.put(owner, index, table, true);
    }

    /// Adds a table only if it fits without evicting anything (warming at open).
    pub(crate) fn insert_if_room(&self, owner: u32, index: u64, table: Table) -> bool {
        self.put(owner, index, table, false)
    }

    fn put(&self, owner: u32, index: u64, table: Table, evict: bool) -> bool {
        let cost = cost(&table);
        if cost > self.capacity {
            return false;
        }
        let key = (owner, index);
        let mut inner = self.lock();
        if inner.index.contains_key(&key) {
            return true;
        }
        if inner.bytes + cost > self.capacity {
            if !evict {
                return false;
            }
            inner.evict_until(self.capacity - cost);
        }
        let slot = Slot { key, table, cost, referenced: true };
        let at = match inner.free.pop() {
            Some(at) => {
                inner.slots[at] = Some(slot);
                at
            }
            None => {
                inner.slots.push(Some(slot));
                inner.slots.len() - 1
            }
        };
        inner.index.insert(key, at);
        inner.bytes += cost;
        true
    }

    /// Bytes held, bookkeeping included.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().index.len()
    }
}

impl Inner {
    /// Evicts until at most `target` bytes are held. Each pass clears the flags it finds set,
    /// so two passes over the slots always free enough.
    fn evict_until(&mut self, target: u64) {
        while self.bytes > target && !self.slots.is_empty() {
            self.hand %= self.slots.len();
            let at = self.hand;
            self.hand += 1;
            let Some(slot) = &mut self.slots[at] else { continue };
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            let gone = self.slots[at].take().expect("checked above");
            self.index.remove(&gone.key);
            self.bytes -= gone.cost;
            self.free.push(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize, fill: u32) -> Table {
        Arc::from(vec![fill; n])
    }

    #[test]
    fn stays_within_capacity_and_keeps_what_is_used() {
        let one = cost(&table(512, 0));
        let cache = GtCache::new(4 * one);
        let owner = cache.register();
        for i in 0..4 {
            cache.insert(owner, i, table(512, i as u32));
        }
        assert_eq!(cache.bytes(), 4 * one);
        // The hand clears every flag on its first pass, then evicts the oldest.
        cache.insert(owner, 4, table(512, 4));
        assert!(cache.bytes() <= cache.capacity());
        assert!(cache.get(owner, 0).is_none());
        // Table 2 is used again: the next eviction passes over it.
        assert_eq!(cache.get(owner, 2).unwrap()[0], 2);
        cache.insert(owner, 5, table(512, 5));
        cache.insert(owner, 6, table(512, 6));
        assert!(cache.get(owner, 2).is_some(), "a table in use is kept");
        assert!(cache.bytes() <= cache.capacity());
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn tables_of_different_sizes_and_owners() {
        let cache = GtCache::new(3 * cost(&table(512, 0)));
        let (a, b) = (cache.register(), cache.register());
        assert_ne!(a, b);
        cache.insert(a, 0, table(512, 1));
        cache.insert(b, 0, table(512, 2));
        assert_eq!(cache.get(a, 0).unwrap()[0], 1);
        assert_eq!(cache.get(b, 0).unwrap()[0], 2);
        for i in 0..200 {
            cache.insert(a, 1 + i, table(1 + (i as usize * 7) % 512, 3));
            assert!(cache.bytes() <= cache.capacity(), "{} > {}", cache.bytes(), cache.capacity());
        }
        // A table larger than the cache is used by the reader but not kept.
        let small = GtCache::new(100);
        small.insert(a, 0, table(512, 1));
        assert_eq!((small.bytes(), small.len()), (0, 0));
        assert!(!small.insert_if_room(a, 0, table(512, 1)));
        // Warming never evicts.
        let warm = GtCache::new(2 * cost(&table(512, 0)));
        assert!(warm.insert_if_room(a, 0, table(512, 1)));
        assert!(warm.insert_if_room(a, 1, table(512, 1)));
        assert!(!warm.insert_if_room(a, 2, table(512, 1)));
        assert!(warm.get(a, 0).is_some() && warm.get(a, 1).is_some());
        assert_eq!(warm.room(), 0);
    }

    #[test]
    fn many_threads_share_it() {
        let cache = Arc::new(GtCache::new(16 * cost(&table(512, 0))));
        let owner = cache.register();
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let cache = &cache;
                scope.spawn(move || {
                    for i in 0..2000u64 {
                        let index = (i + t * 7) % 40;
                        match cache.get(owner, index) {
                            Some(found) => assert_eq!(found[0], index as u32),
                            None => cache.insert(owner, index, table(512, index as u32)),
                        }
                        assert!(cache.bytes() <= cache.capacity());
                    }
                });
            }
        });
    }
}
