//! The tokens of the replicated state, keyed by hash, with the indexes that revocation, login
//! quotas and the expiry sweep walk: each token's children, each username's tokens, and when
//! each token stops being usable.
//!
//! Why: `apply` revokes a token with its descendants (on a revoke, an expiry sweep, a user's
//! deletion or new password). Scanning every token for each revoked one made a sweep quadratic:
//! sweeping 9,980 of 20,001 tokens held `apply` on every replica for 3.4 s
//! (`examples/token_sweep.rs`). With the indexes a revocation costs its own tokens only, a
//! sweep finds the expired tokens without scanning the others (and the leader's job can sweep
//! the oldest first, a bounded number at a time), and a login's quota check does not scan every
//! token under the state's lock.
//!
//! On a node the tokens live in its store, with the same indexes beside them
//! (`citadel_storage::map_tables`), read through [`TokenRead`]; this table then holds only the
//! tokens a batch loaded (`State::preload_tokens`: each token a command names, with every token
//! a revocation it makes would reach) or changed, and forgets them once the store has taken the
//! changes. A table that holds every token (a decoded snapshot, tests and tools) reads itself.
//!
//! The indexes are derived: they are not serialized, and are rebuilt whenever a table is
//! decoded, so a snapshot and the state's encoding are those of the plain map. They index a
//! token under the key it is stored under, which `insert` makes its hash; a decoded table whose
//! key and hash differ (only an edited snapshot restored with `snapshot-force` by an earlier
//! build could hold one) is kept as it is rather than stopping the node, and a restore refuses
//! such a file (`snapshot::parse`).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::stored_map::{StoredChanges, StoredMap};
use crate::token::TokenEntry;
use crate::UnixMillis;

#[derive(Clone, Debug, Default)]
pub struct TokenTable {
    /// The tokens by key, with what the node's store has yet to take of their changes.
    by_hash: StoredMap<TokenEntry>,
    /// Parent hash → the hashes of the tokens it created (whether or not the parent is held).
    children: KeyIndex,
    /// Username → the hashes of the tokens carrying it (logins and their descendants alike).
    by_username: KeyIndex,
    /// (when the token stops being usable, its hash), for every token that will ([`end_of`]).
    by_end: BTreeSet<(UnixMillis, String)>,
}

/// What changed in a table since the node's store last took its changes.
pub type TokenChanges = StoredChanges<TokenEntry>;

/// Two tables are equal when they hold the same tokens under the same keys: the indexes derive
/// from those, and what the store has yet to take is not part of the state.
impl PartialEq for TokenTable {
    fn eq(&self, other: &Self) -> bool {
        self.by_hash == other.by_hash
    }
}

impl Eq for TokenTable {}

/// When a token stops being usable: at its expiry, or already (0) once its uses are spent;
/// `None` for a token that never expires and has uses left. `TokenEntry::is_usable(now)` is
/// false exactly when this is at or before `now`.
pub fn end_of(entry: &TokenEntry) -> Option<UnixMillis> {
    if entry.uses_left == Some(0) {
        Some(0)
    } else {
        entry.expires
    }
}

/// (key, token hash) pairs: one entry per indexed token, and no collection per key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct KeyIndex(BTreeSet<(String, String)>);

impl KeyIndex {
    fn add(&mut self, key: &str, hash: &str) {
        self.0.insert((key.to_string(), hash.to_string()));
    }

    fn remove(&mut self, key: &str, hash: &str) {
        self.0.remove(&(key.to_string(), hash.to_string()));
    }

    /// The hashes under `key`, in order.
    fn hashes<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.range((key.to_string(), String::new())..).take_while(move |(k, _)| k == key).map(|(_, h)| h.as_str())
    }
}

/// Reads go to the map as it is; every change goes through the table, which keeps its indexes.
impl Deref for TokenTable {
    type Target = BTreeMap<String, TokenEntry>;

    fn deref(&self) -> &Self::Target {
        &self.by_hash
    }
}

impl TokenTable {
    /// Adds a token, replacing one of the same hash.
    pub fn insert(&mut self, hash: String, entry: TokenEntry) {
        assert_eq!(hash, entry.hash, "a token is keyed by its own hash");
        self.remove(&hash);
        self.put(hash, entry);
    }

    /// Marks every token as the store's to write, in place of all it holds (a restore).
    pub fn replace_store(&mut self) {
        self.by_hash.replace_store();
    }

    /// What changed since the last call, for the store to write; afterwards the table and the
    /// store agree.
    pub fn take_changes(&mut self) -> TokenChanges {
        self.by_hash.take_changes()
    }

    /// Stores a token under `key` and indexes it there.
    fn put(&mut self, key: String, entry: TokenEntry) {
        self.index(&key, &entry);
        self.by_hash.insert(key, entry);
    }

    fn index(&mut self, key: &str, entry: &TokenEntry) {
        if let Some(parent) = &entry.parent {
            self.children.add(parent, key);
        }
        if let Some(username) = &entry.username {
            self.by_username.add(username, key);
        }
        if let Some(end) = end_of(entry) {
            self.by_end.insert((end, key.to_string()));
        }
    }

    /// Whether `key` must be loaded from the store before a command reads it: memory does not
    /// answer for it yet.
    pub fn needs(&self, key: &str) -> bool {
        self.by_hash.needs(key)
    }

    /// Takes `key`'s token as the store holds it (none: no token), indexed.
    pub fn preload(&mut self, key: &str, stored: Option<TokenEntry>) {
        if let Some(entry) = &stored {
            self.index(key, entry);
        }
        self.by_hash.preload(key, stored);
    }

    /// Empties memory once the store has taken every change: a node keeps no token between
    /// batches.
    pub fn forget(&mut self) {
        self.by_hash.forget();
        (self.children, self.by_username, self.by_end) = Default::default();
    }

    pub fn remove(&mut self, hash: &str) -> Option<TokenEntry> {
        let entry = self.by_hash.remove(hash)?;
        if let Some(parent) = &entry.parent {
            self.children.remove(parent, hash);
        }
        if let Some(username) = &entry.username {
            self.by_username.remove(username, hash);
        }
        if let Some(end) = end_of(&entry) {
            self.by_end.remove(&(end, hash.to_string()));
        }
        Some(entry)
    }

    /// A token stored under a key other than its hash, if any.
    pub fn misfiled(&self) -> Option<(&str, &TokenEntry)> {
        self.by_hash.iter().find(|(key, entry)| **key != entry.hash).map(|(key, entry)| (key.as_str(), entry))
    }

    /// Changes a held token's counters and lifetimes (its end moves in its index). Its hash,
    /// parent and username are what the other indexes are keyed by: changing them is a bug,
    /// caught here.
    pub fn update<R>(&mut self, hash: &str, change: impl FnOnce(&mut TokenEntry) -> R) -> Option<R> {
        let entry = self.by_hash.get_mut(hash)?;
        let keys = |e: &TokenEntry| (e.hash.clone(), e.parent.clone(), e.username.clone());
        let (before, end_before) = (keys(entry), end_of(entry));
        let result = change(entry);
        assert!(before == keys(entry), "an update changed a token's hash, parent or username");
        let end_after = end_of(entry);
        if end_after != end_before {
            if let Some(end) = end_before {
                self.by_end.remove(&(end, hash.to_string()));
            }
            if let Some(end) = end_after {
                self.by_end.insert((end, hash.to_string()));
            }
        }
        Some(result)
    }

    /// The hashes of the tokens no longer usable at `now`, those that ended first first.
    pub fn unusable_at(&self, now: UnixMillis) -> impl Iterator<Item = &str> + '_ {
        self.by_end.iter().take_while(move |(end, _)| *end <= now).map(|(_, hash)| hash.as_str())
    }

    /// The hashes of the tokens `parent` created.
    pub fn children_of<'a>(&'a self, parent: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.children.hashes(parent)
    }

    /// The tokens carrying `username`.
    pub fn of_username<'a>(&'a self, username: &'a str) -> impl Iterator<Item = &'a TokenEntry> + 'a {
        self.by_username.hashes(username).filter_map(|hash| self.by_hash.get(hash))
    }

    /// Removes a token and all its descendants; returns how many went.
    pub fn remove_tree(&mut self, root: &str) -> usize {
        let mut doomed = vec![root.to_string()];
        let mut removed = 0;
        while let Some(hash) = doomed.pop() {
            doomed.extend(self.children_of(&hash).map(str::to_string));
            removed += usize::from(self.remove(&hash).is_some());
        }
        removed
    }

    /// Whether the indexes say exactly what the tokens do (for tests and fuzzing).
    pub fn indexes_match_tokens(&self) -> bool {
        let rebuilt: TokenTable = (*self.by_hash).clone().into();
        rebuilt.children == self.children && rebuilt.by_username == self.by_username && rebuilt.by_end == self.by_end
    }
}

/// A table built from a map (a decoded snapshot or restore) replaces what the store holds.
/// Reads tokens where they live: a node's store (with its indexes beside it), or a table in
/// memory (tests and tools). Keys are the table's keys, a token's hash.
pub trait TokenRead {
    fn token(&self, key: &str) -> io::Result<Option<TokenEntry>>;

    /// The keys of the tokens `parent` created.
    fn token_children(&self, parent: &str) -> io::Result<Vec<String>>;

    /// The keys of the tokens carrying `username`.
    fn tokens_of_username(&self, username: &str) -> io::Result<Vec<String>>;

    /// The keys of the tokens no longer usable at `now`, those that ended first first.
    fn tokens_unusable_at(&self, now: UnixMillis) -> io::Result<Vec<String>>;

    /// When the `n`th token to stop being usable does or did (0 for the first), of all that will.
    fn nth_token_end(&self, n: usize) -> io::Result<Option<UnixMillis>>;
}

impl TokenRead for TokenTable {
    fn token(&self, key: &str) -> io::Result<Option<TokenEntry>> {
        Ok(self.by_hash.get(key).cloned())
    }

    fn token_children(&self, parent: &str) -> io::Result<Vec<String>> {
        Ok(self.children_of(parent).map(str::to_string).collect())
    }

    fn tokens_of_username(&self, username: &str) -> io::Result<Vec<String>> {
        Ok(self.by_username.hashes(username).map(str::to_string).collect())
    }

    fn tokens_unusable_at(&self, now: UnixMillis) -> io::Result<Vec<String>> {
        Ok(self.unusable_at(now).map(str::to_string).collect())
    }

    fn nth_token_end(&self, n: usize) -> io::Result<Option<UnixMillis>> {
        Ok(self.by_end.iter().nth(n).map(|(end, _)| *end))
    }
}

/// When the `n`th token to stop being usable did (1 for the first), if `n` tokens had by `now`:
/// a sweep up to that moment removes `n` of them (more if several ended at the same
/// millisecond), the oldest first.
pub fn nth_end_by(tokens: &dyn TokenRead, now: UnixMillis, n: usize) -> io::Result<Option<UnixMillis>> {
    let Some(index) = n.checked_sub(1) else { return Ok(None) };
    Ok(tokens.nth_token_end(index)?.filter(|end| *end <= now))
}

/// Up to when a sweep of at most `batch` of the tokens due at `now` goes, the oldest first:
/// `now` if no more are due, else just before the first token left out ended, or that whole
/// millisecond if the batch all ended in it (a sweep cannot split one). `None`: none is due.
pub fn sweep_cut(tokens: &dyn TokenRead, now: UnixMillis, batch: usize) -> io::Result<Option<UnixMillis>> {
    let due_by = |at: UnixMillis| -> io::Result<bool> { Ok(tokens.nth_token_end(0)?.is_some_and(|end| end <= at)) };
    if !due_by(now)? {
        return Ok(None);
    }
    let Some(left_out) = nth_end_by(tokens, now, batch.saturating_add(1))? else { return Ok(Some(now)) };
    let before = match left_out.checked_sub(1) {
        Some(up_to) if due_by(up_to)? => Some(up_to),
        _ => None,
    };
    Ok(Some(before.unwrap_or(left_out)))
}

impl From<BTreeMap<String, TokenEntry>> for TokenTable {
    fn from(tokens: BTreeMap<String, TokenEntry>) -> Self {
        let mut table = TokenTable::default();
        for (key, entry) in tokens {
            table.put(key, entry);
        }
        table.by_hash.replace_store();
        table
    }
}

impl Serialize for TokenTable {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.by_hash.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TokenTable {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, TokenEntry>::deserialize(deserializer).map(TokenTable::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(hash: &str, parent: Option<&str>, username: Option<&str>) -> TokenEntry {
        TokenEntry {
            hash: hash.into(),
            accessor: format!("acc-{hash}"),
            parent: parent.map(Into::into),
            username: username.map(Into::into),
            ..TokenEntry::default()
        }
    }

    fn table(tokens: &[TokenEntry]) -> TokenTable {
        let mut table = TokenTable::default();
        for t in tokens {
            table.insert(t.hash.clone(), t.clone());
        }
        table
    }

    #[test]
    fn removing_a_tree_takes_every_descendant_and_nothing_else() {
        let mut t = table(&[
            token("a", None, Some("ann")),
            token("b", Some("a"), Some("ann")),
            token("c", Some("b"), None),
            token("d", Some("a"), None),
            token("e", None, Some("bob")),
            token("f", Some("e"), Some("bob")),
        ]);
        assert_eq!(t.remove_tree("a"), 4);
        assert_eq!(t.keys().collect::<Vec<_>>(), ["e", "f"]);
        assert!(t.indexes_match_tokens());
        assert_eq!(t.of_username("ann").count(), 0);
        assert_eq!(t.children_of("a").count(), 0, "no index entry outlives its token");
        assert_eq!(t.remove_tree("gone"), 0);
    }

    #[test]
    fn replacing_or_updating_a_token_keeps_the_indexes_true() {
        let mut t = table(&[token("a", None, Some("ann")), token("b", Some("a"), Some("ann"))]);
        t.insert("b".into(), token("b", Some("x"), Some("bob")));
        assert!(t.indexes_match_tokens());
        assert_eq!(t.children_of("a").count(), 0);
        assert_eq!(t.children_of("x").collect::<Vec<_>>(), ["b"]);
        assert_eq!(t.update("a", |e| e.uses_left = Some(3)), Some(()));
        assert_eq!(t["a"].uses_left, Some(3));
        assert_eq!(t.update("nope", |e| e.uses_left = Some(3)), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 1000, failure_persistence: None, ..Default::default() })]

        /// Tokens created, renewed, used and removed at random: the index of ends names exactly
        /// the tokens a scan finds unusable, the earliest ended first.
        #[test]
        fn the_tokens_unusable_at_a_moment_are_those_a_scan_finds_the_first_ended_first(
            tokens in proptest::collection::vec(("[a-h]", proptest::option::of(0u64..20), proptest::option::of(0u64..3)), 0..12),
            changes in proptest::collection::vec(("[a-h]", 0u8..3, 0u64..20), 0..12),
            now in 0u64..22,
            n in 1usize..6,
        ) {
            let mut t = TokenTable::default();
            for (hash, expires, uses_left) in &tokens {
                t.insert(hash.clone(), TokenEntry { hash: hash.clone(), expires: *expires, uses_left: *uses_left, ..TokenEntry::default() });
            }
            for (hash, kind, value) in &changes {
                match kind {
                    0 => { t.update(hash, |e| e.expires = Some(*value)); }
                    1 => { t.update(hash, |e| e.uses_left = e.uses_left.map(|u| u.saturating_sub(1))); }
                    _ => { t.remove(hash); }
                }
            }
            proptest::prop_assert!(t.indexes_match_tokens());
            let by_index: Vec<&str> = t.unusable_at(now).collect();
            let mut by_scan: Vec<&TokenEntry> = t.values().filter(|e| !e.is_usable(now)).collect();
            by_scan.sort_by_key(|e| (end_of(e), e.hash.clone()));
            proptest::prop_assert_eq!(by_index, by_scan.iter().map(|e| e.hash.as_str()).collect::<Vec<_>>());
            proptest::prop_assert_eq!(nth_end_by(&t, now, n).unwrap(), by_scan.get(n - 1).and_then(|e| end_of(e)));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 1000, failure_persistence: None, ..Default::default() })]

        /// Sweeping up to each cut in turn takes every due token, at most `batch` a time unless
        /// they all ended in one millisecond, and never nothing.
        #[test]
        fn sweeps_up_to_each_cut_take_every_due_token_a_bounded_batch_at_a_time(
            ends in proptest::collection::vec(proptest::option::of(0u64..8), 0..30),
            now in 0u64..10,
            batch in 1usize..5,
        ) {
            let mut t = TokenTable::default();
            for (i, end) in ends.iter().enumerate() {
                let hash = format!("t{i:02}");
                t.insert(hash.clone(), TokenEntry { hash, expires: *end, ..TokenEntry::default() });
            }
            let due = t.unusable_at(now).count();
            let mut swept = 0;
            while let Some(cut) = sweep_cut(&t, now, batch).unwrap() {
                proptest::prop_assert!(cut <= now);
                let taken: Vec<String> = t.unusable_at(cut).map(str::to_string).collect();
                let one_millisecond = taken.iter().all(|h| t[h].expires == Some(cut));
                proptest::prop_assert!(!taken.is_empty(), "a sweep takes something");
                proptest::prop_assert!(taken.len() <= batch || one_millisecond, "{} taken, batch {batch}", taken.len());
                taken.iter().for_each(|h| { t.remove(h); });
                swept += taken.len();
            }
            proptest::prop_assert_eq!(swept, due);
            proptest::prop_assert_eq!(t.unusable_at(now).count(), 0);
        }
    }

    #[test]
    #[should_panic(expected = "changed a token's hash, parent or username")]
    fn an_update_that_moves_a_token_in_an_index_is_caught() {
        let mut t = table(&[token("a", None, Some("ann"))]);
        t.update("a", |e| e.username = Some("bob".into()));
    }

    /// Revocation as it was before the indexes: scan every token for children of the doomed set
    /// until none is left.
    fn doomed_by_scan(tokens: &BTreeMap<String, TokenEntry>, root: &str) -> BTreeSet<String> {
        let mut doomed = BTreeSet::from([root.to_string()]);
        loop {
            let children: Vec<String> = tokens
                .values()
                .filter(|t| t.parent.as_ref().is_some_and(|p| doomed.contains(p)) && !doomed.contains(&t.hash))
                .map(|t| t.hash.clone())
                .collect();
            if children.is_empty() {
                return doomed;
            }
            doomed.extend(children);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// Forests over a small vocabulary of hashes: shared parents, missing parents, cycles.
        #[test]
        fn removing_a_tree_removes_what_a_scan_of_every_token_would(
            links in proptest::collection::vec(("[a-h]", proptest::option::of("[a-h]"), proptest::option::of("[xy]")), 0..12),
            root in "[a-h]",
        ) {
            let tokens: Vec<TokenEntry> =
                links.iter().map(|(h, p, u)| token(h, p.as_deref(), u.as_deref())).collect();
            let mut t = table(&tokens);
            let doomed = doomed_by_scan(&t, &root);
            let expected: Vec<String> = t.keys().filter(|h| !doomed.contains(*h)).cloned().collect();
            t.remove_tree(&root);
            proptest::prop_assert_eq!(t.keys().cloned().collect::<Vec<_>>(), expected);
            proptest::prop_assert!(t.indexes_match_tokens());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// Tokens inserted, updated, removed with their trees and replaced whole, with the store
        /// taking the changes at random points: after every take the store holds exactly the
        /// table's tokens, and a table read back from it is the same table.
        #[test]
        fn a_store_that_takes_each_batchs_changes_holds_exactly_the_tables_tokens(
            ops in proptest::collection::vec((0u8..6, "[a-f]", proptest::option::of("[a-f]"), proptest::bool::ANY), 0..40),
        ) {
            let mut store = BTreeMap::new();
            let mut t = TokenTable::default();
            for (op, hash, parent, take) in &ops {
                match op {
                    0 | 1 => t.insert(hash.clone(), token(hash, parent.as_deref(), None)),
                    2 => { t.update(hash, |e| e.uses_left = Some(1)); }
                    3 => { t.remove(hash); }
                    4 => { t.remove_tree(hash); }
                    _ => {
                        let mut replaced: TokenTable = (*t.by_hash).clone().into_iter().filter(|(k, _)| k != hash).collect::<BTreeMap<_, _>>().into();
                        std::mem::swap(&mut t, &mut replaced);
                    }
                }
                if *take {
                    crate::stored_map::tests::store_changes(&mut store, t.take_changes());
                    proptest::prop_assert_eq!(&store, &*t.by_hash);
                    proptest::prop_assert!(t.take_changes().is_empty(), "nothing is taken twice");
                }
            }
            crate::stored_map::tests::store_changes(&mut store, t.take_changes());
            proptest::prop_assert_eq!(&store, &*t.by_hash);
            let reread = TokenTable::from(store);
            proptest::prop_assert!(reread == t && reread.indexes_match_tokens());
        }
    }

    #[test]
    fn a_table_encodes_as_its_map_and_decodes_with_its_indexes() {
        let t = table(&[token("a", None, Some("ann")), token("b", Some("a"), None)]);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, serde_json::to_string(&*t).unwrap());
        let back: TokenTable = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        assert!(back.indexes_match_tokens());
    }

    #[test]
    fn a_decoded_token_stored_under_another_key_is_kept_and_indexed_under_that_key() {
        let json = r#"{"a":{"hash":"b","accessor":"","policies":[],"display_name":"","meta":{},"created":0,"expires":null,"ttl_secs":0,"renewable":false,"parent":"p","username":"ann"}}"#;
        let mut t: TokenTable = serde_json::from_str(json).unwrap();
        assert!(t.indexes_match_tokens());
        assert_eq!(t.misfiled().map(|(key, e)| (key, e.hash.as_str())), Some(("a", "b")));
        assert_eq!(t.children_of("p").collect::<Vec<_>>(), ["a"]);
        assert_eq!(t.remove_tree("p"), 1, "revoked with its parent like any other token");
        assert!(t.is_empty() && t.indexes_match_tokens());
    }
}
