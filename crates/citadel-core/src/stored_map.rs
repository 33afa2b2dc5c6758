//! A map of the replicated state that the node's store keeps a copy of, key by key: it records
//! which keys changed since the store last took them ([`StoredMap::take_changes`]).
//!
//! Why: the state a node saves beside its store at every durable commit (once a second) used to
//! carry the tokens and the users whole, encoded under the state's write lock each time. Their
//! number grows with use (logins) and with what operators create, so they live in tables of
//! their own in the store instead, and each batch writes only the keys it changed.
//!
//! A node's map holds only what its store does not answer for: the entries a batch loaded
//! ([`StoredMap::preload`]) or changed, forgotten once the store has taken the changes
//! ([`StoredMap::forget`]). A map that did not come from the store (decoded from a snapshot, or
//! restored) holds every entry and replaces everything the store holds.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Debug)]
pub struct StoredMap<V> {
    entries: BTreeMap<String, V>,
    /// The keys inserted, changed or removed since the store last took the changes.
    changed: BTreeSet<String>,
    /// The keys loaded from the store (or found absent there) since the map last forgot its
    /// entries ([`StoredMap::forget`]): memory, not the store, answers for them.
    loaded: BTreeSet<String>,
    /// Whether the store's entries all give way to this map's.
    replaces_store: bool,
}

/// What changed in a map since the store last took its changes: the store writes `put` and
/// removes `removed`, after removing everything it holds when `replace` is set.
#[derive(Debug, PartialEq, Eq)]
pub struct StoredChanges<V> {
    pub replace: bool,
    pub put: Vec<(String, V)>,
    pub removed: Vec<String>,
}

impl<V> Default for StoredChanges<V> {
    fn default() -> Self {
        StoredChanges { replace: false, put: Vec::new(), removed: Vec::new() }
    }
}

impl<V> StoredChanges<V> {
    pub fn is_empty(&self) -> bool {
        !self.replace && self.put.is_empty() && self.removed.is_empty()
    }
}

/// An empty map agrees with an empty store: a fresh state's first changes are its own.
impl<V> Default for StoredMap<V> {
    fn default() -> Self {
        StoredMap { entries: BTreeMap::new(), changed: BTreeSet::new(), loaded: BTreeSet::new(), replaces_store: false }
    }
}

/// Equal when they hold the same entries: what the store has yet to take is not state.
impl<V: PartialEq> PartialEq for StoredMap<V> {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl<V: Eq> Eq for StoredMap<V> {}

/// Reads go to the map as it is; every change goes through [`StoredMap`], which records it.
impl<V> Deref for StoredMap<V> {
    type Target = BTreeMap<String, V>;

    fn deref(&self) -> &Self::Target {
        &self.entries
    }
}

impl<V: Clone> StoredMap<V> {
    pub fn insert(&mut self, key: String, value: V) -> Option<V> {
        self.changed.insert(key.clone());
        self.entries.insert(key, value)
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        let removed = self.entries.remove(key)?;
        self.changed.insert(key.to_string());
        Some(removed)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        let value = self.entries.get_mut(key)?;
        self.changed.insert(key.to_string());
        Some(value)
    }

    /// Whether `key` must be loaded from the store before a command reads it: memory does not
    /// answer for it yet (a map that replaces the store answers for every key).
    pub fn needs(&self, key: &str) -> bool {
        !self.replaces_store && !self.loaded.contains(key) && !self.changed.contains(key)
    }

    /// Takes `key`'s entry as the store holds it (none: no entry).
    pub fn preload(&mut self, key: &str, stored: Option<V>) {
        debug_assert!(self.needs(key), "an entry in memory is newer than the store's");
        self.loaded.insert(key.to_string());
        if let Some(value) = stored {
            self.entries.insert(key.to_string(), value);
        }
    }

    /// Empties memory once the store holds every change: a node keeps no entry between batches.
    pub fn forget(&mut self) {
        assert!(self.changed.is_empty() && !self.replaces_store, "forgetting entries the store has not taken");
        self.entries.clear();
        self.loaded.clear();
    }

    /// Marks every entry as the store's to write, in place of all it holds (a restore).
    pub fn replace_store(&mut self) {
        self.replaces_store = true;
        self.changed.clear();
        self.loaded.clear();
    }

    /// What changed since the last call, for the store to write; afterwards the map and the
    /// store agree.
    pub fn take_changes(&mut self) -> StoredChanges<V> {
        let changed = std::mem::take(&mut self.changed);
        if std::mem::take(&mut self.replaces_store) {
            let put = self.entries.iter().map(|(key, value)| (key.clone(), value.clone())).collect();
            return StoredChanges { replace: true, put, removed: Vec::new() };
        }
        let mut changes = StoredChanges::default();
        for key in changed {
            match self.entries.get(&key) {
                Some(value) => changes.put.push((key, value.clone())),
                None => changes.removed.push(key),
            }
        }
        changes
    }
}

/// A map built from entries (a decoded snapshot or restore) replaces what the store holds.
impl<V> From<BTreeMap<String, V>> for StoredMap<V> {
    fn from(entries: BTreeMap<String, V>) -> Self {
        StoredMap { entries, changed: BTreeSet::new(), loaded: BTreeSet::new(), replaces_store: true }
    }
}

impl<V: Serialize> Serialize for StoredMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.entries.serialize(serializer)
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for StoredMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, V>::deserialize(deserializer).map(StoredMap::from)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes `changes` to a model of the node's store.
    pub(crate) fn store_changes<V>(store: &mut BTreeMap<String, V>, changes: StoredChanges<V>) {
        if changes.replace {
            store.clear();
        }
        for key in changes.removed {
            store.remove(&key);
        }
        store.extend(changes.put);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// Entries inserted, changed, removed and replaced whole, with the store taking the
        /// changes at random points: after every take the store holds exactly the map.
        #[test]
        fn a_store_that_takes_the_changes_at_any_point_holds_exactly_the_maps_entries(
            ops in proptest::collection::vec((0u8..5, "[a-f]", 0u8..9, proptest::bool::ANY), 0..40),
        ) {
            let mut store = BTreeMap::new();
            let mut map = StoredMap::default();
            for (op, key, value, take) in &ops {
                match op {
                    0 | 1 => { map.insert(key.clone(), *value); }
                    2 => { if let Some(v) = map.get_mut(key) { *v += 1; } }
                    3 => { map.remove(key); }
                    _ => {
                        let kept = map.iter().filter(|(k, _)| *k != key).map(|(k, v)| (k.clone(), *v)).collect::<BTreeMap<_, _>>();
                        map = kept.into();
                    }
                }
                if *take {
                    store_changes(&mut store, map.take_changes());
                    proptest::prop_assert_eq!(&store, &*map);
                    proptest::prop_assert!(map.take_changes().is_empty(), "nothing is taken twice");
                }
            }
            store_changes(&mut store, map.take_changes());
            proptest::prop_assert_eq!(&store, &*map);
        }
    }

    #[test]
    fn a_decoded_map_replaces_the_stores_entries_and_one_loaded_from_the_store_has_nothing_to_write() {
        let entries = BTreeMap::from([("a".to_string(), 1)]);
        let mut decoded: StoredMap<i32> = serde_json::from_str(&serde_json::to_string(&entries).unwrap()).unwrap();
        assert_eq!(
            decoded.take_changes(),
            StoredChanges { replace: true, put: vec![("a".into(), 1)], removed: vec![] }
        );
        let mut stored = StoredMap::default();
        stored.preload("a", Some(1));
        assert!(stored.take_changes().is_empty(), "a loaded entry is not the store's to write");
        stored.remove("a");
        stored.replace_store();
        assert_eq!(stored.take_changes(), StoredChanges { replace: true, put: vec![], removed: vec![] });
        assert_eq!(serde_json::to_string(&stored).unwrap(), "{}", "encoded as its map");
    }
}
