//! The tokens and the users on disk: each a table of the node's redb database holding one of the
//! state's [`StoredMap`](citadel_core::stored_map::StoredMap)s, by the key the state holds each
//! entry under.
//!
//! Why: a node held every token and user in memory, and the state it saves beside its store at
//! every durable commit (once a second) carried them all, encoded under the state's write lock
//! each time: 330 to 450 ms for 100,000 tokens, a stall of every write on the node once a second,
//! and 135 MB resident. They live here only now. Each batch loads the entries its commands need
//! ([`UsersView`], [`TokensView`]), writes those it changed ([`StoredChanges`]) in the commit
//! that records the applied index, and memory forgets them; readers read them here; a snapshot
//! is written from here ([`StoredEntries`]).
//!
//! The tokens keep the indexes `apply`'s revocations walk beside them ([`Indexed`]): by parent,
//! by username, by the moment a token stops being usable, by accessor, and the logins by
//! username. A [`TokenCache`] of decoded tokens spares every request and every write's
//! authorization a read of the store.
//!
//! Each value is a checksummed JSON record ([`crate::codec`]), verified when it is read; a
//! damaged one is an error naming the file and the record's place in its table, never its key (a
//! token's key is a credential's keyed hash, which has no place in a log line).

use std::io;
use std::marker::PhantomData;

use citadel_core::stored_map::StoredChanges;
use citadel_core::token::{TokenEntry, User, UserRead};
use citadel_core::token_table::TokenRead;
use citadel_core::UnixMillis;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::db::Db;

/// A table holding one of the state's stored maps.
#[derive(Clone, Copy)]
pub(crate) struct MapTable {
    table: TableDefinition<'static, &'static str, &'static [u8]>,
    /// Where a snapshot being received stages its entries, until it is installed.
    staged: TableDefinition<'static, &'static str, &'static [u8]>,
    /// What one entry is, for errors.
    entry: &'static str,
}

pub(crate) const TOKENS: MapTable =
    MapTable { table: TableDefinition::new("tokens"), staged: TableDefinition::new("tokens.staged"), entry: "token" };
pub(crate) const USERS: MapTable =
    MapTable { table: TableDefinition::new("users"), staged: TableDefinition::new("users.staged"), entry: "user" };

/// What a stored map's entries are found by besides their key: rows of index tables kept beside
/// the map's table, written with it.
pub(crate) trait Indexed: Serialize + DeserializeOwned {
    /// Whether there are any (if not, a change does not read the entry it replaces).
    const INDEXED: bool;

    /// Empties the index tables (the map is replaced whole).
    fn clear_indexes(txn: &redb::WriteTransaction) -> Result<(), redb::Error>;

    /// Adds `key`'s rows for `value`, or removes them.
    fn index(txn: &redb::WriteTransaction, key: &str, value: &Self, add: bool) -> Result<(), redb::Error>;
}

impl Indexed for User {
    const INDEXED: bool = false;

    fn clear_indexes(_: &redb::WriteTransaction) -> Result<(), redb::Error> {
        Ok(())
    }

    fn index(_: &redb::WriteTransaction, _: &str, _: &Self, _: bool) -> Result<(), redb::Error> {
        Ok(())
    }
}

type KeyIndex = TableDefinition<'static, (&'static str, &'static str), ()>;

/// Tokens by parent, by username, by the moment they stop being usable, by accessor, and the
/// logins (tokens without a parent) by username: what `apply`'s revocations walk
/// ([`TokenRead`]) and what readers look tokens up by.
const TOKENS_BY_PARENT: KeyIndex = TableDefinition::new("tokens.by_parent");
const TOKENS_BY_USERNAME: KeyIndex = TableDefinition::new("tokens.by_username");
const TOKENS_BY_ACCESSOR: KeyIndex = TableDefinition::new("tokens.by_accessor");
const LOGINS_BY_USERNAME: KeyIndex = TableDefinition::new("tokens.logins_by_username");
const TOKENS_BY_END: TableDefinition<(u64, &str), ()> = TableDefinition::new("tokens.by_end");

impl Indexed for TokenEntry {
    const INDEXED: bool = true;

    fn clear_indexes(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        for table in [TOKENS_BY_PARENT, TOKENS_BY_USERNAME, TOKENS_BY_ACCESSOR, LOGINS_BY_USERNAME] {
            txn.delete_table(table)?;
        }
        txn.delete_table(TOKENS_BY_END)?;
        Ok(())
    }

    fn index(txn: &redb::WriteTransaction, key: &str, token: &Self, add: bool) -> Result<(), redb::Error> {
        let mut rows: Vec<(KeyIndex, &str)> = vec![(TOKENS_BY_ACCESSOR, token.accessor.as_str())];
        if let Some(parent) = &token.parent {
            rows.push((TOKENS_BY_PARENT, parent));
        }
        if let Some(username) = &token.username {
            rows.push((TOKENS_BY_USERNAME, username));
            if token.parent.is_none() {
                rows.push((LOGINS_BY_USERNAME, username));
            }
        }
        for (table, first) in rows {
            let mut table = txn.open_table(table)?;
            if add {
                table.insert((first, key), ())?;
            } else {
                table.remove((first, key))?;
            }
        }
        if let Some(end) = citadel_core::token_table::end_of(token) {
            let mut ends = txn.open_table(TOKENS_BY_END)?;
            if add {
                ends.insert((end, key), ())?;
            } else {
                ends.remove((end, key))?;
            }
        }
        Ok(())
    }
}

impl MapTable {
    /// Writes what a batch changed, with the index rows: every stored entry goes first when the
    /// map was replaced; an entry replaced or removed takes its rows with it.
    pub(crate) fn write_changes<V: Indexed>(
        self,
        txn: &redb::WriteTransaction,
        changes: &StoredChanges<V>,
    ) -> Result<(), redb::Error> {
        if changes.is_empty() {
            return Ok(());
        }
        if changes.replace {
            txn.delete_table(self.table)?;
            V::clear_indexes(txn)?;
        }
        let mut table = txn.open_table(self.table)?;
        if V::INDEXED && !changes.replace {
            for key in changes.removed.iter().chain(changes.put.iter().map(|(key, _)| key)) {
                let Some(old) = table.get(key.as_str())? else { continue };
                let what = format!("a {} record being replaced", self.entry);
                let old: V = codec::decode(old.value(), &what)
                    .map_err(|e| redb::Error::from(redb::StorageError::Corrupted(e.to_string())))?;
                V::index(txn, key, &old, false)?;
            }
        }
        for key in &changes.removed {
            table.remove(key.as_str())?;
        }
        for (key, value) in &changes.put {
            table.insert(key.as_str(), codec::encode(value).as_slice())?;
            V::index(txn, key, value, true)?;
        }
        Ok(())
    }

    /// Empties the staging table (the first commit of a snapshot being received, or a start
    /// after a transfer cut short).
    pub(crate) fn clear_staged(self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        txn.delete_table(self.staged)?;
        Ok(())
    }

    /// Adds received entries, each already encoded as its record, to the staging table.
    pub(crate) fn stage_in(
        self,
        txn: &redb::WriteTransaction,
        entries: &[(String, Vec<u8>)],
    ) -> Result<(), redb::Error> {
        let mut table = txn.open_table(self.staged)?;
        for (key, record) in entries {
            table.insert(key.as_str(), record.as_slice())?;
        }
        Ok(())
    }

    /// The staged entries become the table (a received snapshot is installed), and the index
    /// rows are built again from them; the staging table is gone after.
    pub(crate) fn promote_staged_in<V: Indexed>(self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        txn.delete_table(self.table)?;
        V::clear_indexes(txn)?;
        // Nothing staged (a snapshot without any) leaves no staging table, and no table.
        match txn.rename_table(self.staged, self.table) {
            Ok(()) => {}
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if !V::INDEXED {
            return Ok(());
        }
        let table = txn.open_table(self.table)?;
        for (n, row) in table.iter()?.enumerate() {
            let (key, record) = row?;
            let what = format!("{} record {} of a snapshot being installed", self.entry, n + 1);
            let value: V = codec::decode(record.value(), &what)
                .map_err(|e| redb::Error::from(redb::StorageError::Corrupted(e.to_string())))?;
            V::index(txn, key.value(), &value, true)?;
        }
        Ok(())
    }

    /// Every stored entry, each record verified.
    #[cfg(test)]
    pub(crate) fn read_all<V: DeserializeOwned>(self, db: &Db) -> io::Result<std::collections::BTreeMap<String, V>> {
        let mut entries = std::collections::BTreeMap::new();
        self.snapshot::<V>(db)?.for_each(&mut |key, value| {
            entries.insert(key.to_string(), value);
            Ok(())
        })?;
        Ok(entries)
    }

    /// The entries as of the latest commit, read as they are used.
    pub(crate) fn snapshot<V>(self, db: &Db) -> io::Result<StoredEntries<'_, V>> {
        let txn = db.db.begin_read().map_err(|e| db.err(e))?;
        Ok(StoredEntries { db, txn, map: self, value: PhantomData })
    }
}

/// One table's entries as of one commit: a read transaction (opened under the state's lock
/// beside the secrets', for a snapshot) that serializes as a map of key to entry, one entry at a
/// time, each record verified as it is read.
pub(crate) struct StoredEntries<'a, V> {
    db: &'a Db,
    txn: redb::ReadTransaction,
    map: MapTable,
    value: PhantomData<fn() -> V>,
}

impl<V: DeserializeOwned> StoredEntries<'_, V> {
    fn for_each(&self, f: &mut dyn FnMut(&str, V) -> io::Result<()>) -> io::Result<()> {
        let db = self.db;
        let table = match self.txn.open_table(self.map.table) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(db.err(e)),
        };
        for (n, row) in table.iter().map_err(|e| db.err(e))?.enumerate() {
            let (key, value) = row.map_err(|e| db.err(e))?;
            let what =
                format!("{}: {} record {} of the {}s table", db.path.display(), self.map.entry, n + 1, self.map.entry);
            f(key.value(), codec::decode(value.value(), &what)?)?;
        }
        Ok(())
    }
}

impl<V: DeserializeOwned + Serialize> Serialize for StoredEntries<'_, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let mut map = serializer.serialize_map(None)?;
        let mut failed = None;
        let read = self.for_each(&mut |key, value| {
            map.serialize_entry(key, &value).map_err(|e| {
                let message = e.to_string();
                failed = Some(e);
                io::Error::other(message)
            })
        });
        match (read, failed) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(S::Error::custom(e)),
            (Ok(()), None) => map.end(),
        }
    }
}

type ReadTable = redb::ReadOnlyTable<&'static str, &'static [u8]>;

/// The users as of one commit, for readers and for `apply`'s loads
/// ([`citadel_core::state::State::preload_users`]): one read transaction, opened when first
/// used. A reader opens it under the state's lock, so that it sees the users of the state's
/// applied index.
pub struct UsersView<'db> {
    db: &'db Db,
    table: std::cell::OnceCell<Result<Option<ReadTable>, String>>,
}

impl<'db> UsersView<'db> {
    pub(crate) fn new(db: &'db Db) -> Self {
        UsersView { db, table: std::cell::OnceCell::new() }
    }

    fn table(&self) -> io::Result<Option<&ReadTable>> {
        let opened = self.table.get_or_init(|| {
            let txn = self.db.db.begin_read().map_err(|e| e.to_string())?;
            match txn.open_table(USERS.table) {
                Ok(t) => Ok(Some(t)),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        });
        opened.as_ref().map(Option::as_ref).map_err(|e| self.db.err(e))
    }
}

impl UserRead for UsersView<'_> {
    fn user(&self, key: &str) -> io::Result<Option<User>> {
        let Some(table) = self.table()? else { return Ok(None) };
        let Some(value) = table.get(key).map_err(|e| self.db.err(e))? else { return Ok(None) };
        codec::decode(value.value(), &format!("{}: the user {key:?}", self.db.path.display())).map(Some)
    }

    fn user_keys_under(&self, prefix: &str) -> io::Result<Vec<String>> {
        let Some(table) = self.table()? else { return Ok(Vec::new()) };
        let mut keys = Vec::new();
        for row in table.range(prefix..).map_err(|e| self.db.err(e))? {
            let (key, _) = row.map_err(|e| self.db.err(e))?;
            if !key.value().starts_with(prefix) {
                break;
            }
            keys.push(key.value().to_string());
        }
        Ok(keys)
    }
}

/// Tokens most recently read or written, decoded, by key: at most this many.
const TOKEN_CACHE_ENTRIES: usize = 4096;

/// Recently used tokens, decoded: every request checks its token, and every node loads the token
/// that authorized each write it applies. Reading and checking the record in the store each time
/// showed in the comparison with etcd: writes at 64 clients, 3,101 ops/s without the cache and
/// 5,024 with it, etcd 3,144 and 3,140 in the same runs. Coherent with the table as
/// `KvCache` is with the secrets: only the state machine changes the table, under the state's
/// write lock, and updates the cache after each commit ([`TokenCache::committed`]); readers
/// fill it under the read lock from a view of the same commit. Bounded by count: when full, an
/// arbitrary entry makes room.
#[derive(Default)]
pub(crate) struct TokenCache {
    cached: std::sync::Mutex<std::collections::HashMap<String, TokenEntry>>,
}

impl TokenCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, TokenEntry>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, key: &str, token: &TokenEntry) {
        let mut cached = self.lock();
        if cached.len() >= TOKEN_CACHE_ENTRIES && !cached.contains_key(key) {
            let victim = cached.keys().next().cloned();
            victim.map(|v| cached.remove(&v));
        }
        cached.insert(key.to_string(), token.clone());
    }

    /// What a batch committed: removed tokens leave, written ones are kept; a replaced table
    /// empties the cache.
    pub(crate) fn committed(&self, changes: &StoredChanges<TokenEntry>) {
        if changes.replace {
            self.clear();
        }
        let mut cached = self.lock();
        for key in &changes.removed {
            cached.remove(key);
        }
        drop(cached);
        for (key, token) in &changes.put {
            self.insert(key, token);
        }
    }

    /// The table was replaced whole (a snapshot installed).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }
}

/// The tokens as of one commit, with their indexes, for readers and for `apply`'s loads
/// ([`citadel_core::state::State::preload_tokens`]): one read transaction, opened when first
/// used (a reader opens it under the state's lock), read through the cache.
pub struct TokensView<'db> {
    db: &'db Db,
    cache: &'db TokenCache,
    txn: std::cell::OnceCell<Result<redb::ReadTransaction, String>>,
}

impl<'db> TokensView<'db> {
    /// Must be made under the state's lock, so that the cache and the transaction agree.
    pub(crate) fn new(db: &'db Db, cache: &'db TokenCache) -> Self {
        TokensView { db, cache, txn: std::cell::OnceCell::new() }
    }

    fn err(&self, e: impl std::fmt::Display) -> io::Error {
        self.db.err(e)
    }

    /// `table` as of the view's commit; `None` before anything was written to it.
    fn open<K: redb::Key + 'static, T: redb::Value + 'static>(
        &self,
        table: TableDefinition<'static, K, T>,
    ) -> io::Result<Option<redb::ReadOnlyTable<K, T>>> {
        let txn = self.txn.get_or_init(|| self.db.db.begin_read().map_err(|e| e.to_string()));
        let txn = txn.as_ref().map_err(|e| self.err(e))?;
        match txn.open_table(table) {
            Ok(table) => Ok(Some(table)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// The second part of every key of `index` whose first part is `first`, in order.
    fn keys_under(&self, index: KeyIndex, first: &str) -> io::Result<Vec<String>> {
        let Some(table) = self.open(index)? else { return Ok(Vec::new()) };
        let mut keys = Vec::new();
        for row in table.range((first, "")..).map_err(|e| self.err(e))? {
            let (key, _) = row.map_err(|e| self.err(e))?;
            let (at, key) = key.value();
            if at != first {
                break;
            }
            keys.push(key.to_string());
        }
        Ok(keys)
    }

    /// The token whose accessor is `accessor`.
    pub fn by_accessor(&self, accessor: &str) -> io::Result<Option<TokenEntry>> {
        match self.keys_under(TOKENS_BY_ACCESSOR, accessor)?.first() {
            Some(key) => self.token(key),
            None => Ok(None),
        }
    }

    /// Every token's accessor, in order.
    pub fn accessors(&self) -> io::Result<Vec<String>> {
        let Some(table) = self.open(TOKENS_BY_ACCESSOR)? else { return Ok(Vec::new()) };
        let rows = table.iter().map_err(|e| self.err(e))?;
        rows.map(|row| row.map(|(key, _)| key.value().0.to_string()).map_err(|e| self.err(e))).collect()
    }

    /// How many tokens are held.
    pub fn count(&self) -> io::Result<u64> {
        let Some(table) = self.open(TOKENS.table)? else { return Ok(0) };
        table.len().map_err(|e| self.err(e))
    }

    /// How many tokens are no longer usable at `now` (until the sweep removes them).
    pub fn count_unusable_at(&self, now: UnixMillis) -> io::Result<u64> {
        let Some(table) = self.open(TOKENS_BY_END)? else { return Ok(0) };
        let mut count = 0;
        for row in table.iter().map_err(|e| self.err(e))? {
            if row.map_err(|e| self.err(e))?.0.value().0 > now {
                break;
            }
            count += 1;
        }
        Ok(count)
    }

    /// How many logins (tokens without a parent) carry `username`.
    pub fn count_logins(&self, username: &str) -> io::Result<usize> {
        Ok(self.keys_under(LOGINS_BY_USERNAME, username)?.len())
    }
}

impl TokenRead for TokensView<'_> {
    fn token(&self, key: &str) -> io::Result<Option<TokenEntry>> {
        if let Some(token) = self.cache.lock().get(key) {
            return Ok(Some(token.clone()));
        }
        let Some(table) = self.open(TOKENS.table)? else { return Ok(None) };
        let Some(value) = table.get(key).map_err(|e| self.err(e))? else { return Ok(None) };
        // Never the key: a token's key is a credential's keyed hash.
        let what = format!("{}: a token record of the tokens table", self.db.path.display());
        let token: TokenEntry = codec::decode(value.value(), &what)?;
        self.cache.insert(key, &token);
        Ok(Some(token))
    }

    fn token_children(&self, parent: &str) -> io::Result<Vec<String>> {
        self.keys_under(TOKENS_BY_PARENT, parent)
    }

    fn tokens_of_username(&self, username: &str) -> io::Result<Vec<String>> {
        self.keys_under(TOKENS_BY_USERNAME, username)
    }

    fn tokens_unusable_at(&self, now: UnixMillis) -> io::Result<Vec<String>> {
        let Some(table) = self.open(TOKENS_BY_END)? else { return Ok(Vec::new()) };
        let mut keys = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (key, _) = row.map_err(|e| self.err(e))?;
            let (end, key) = key.value();
            if end > now {
                break;
            }
            keys.push(key.to_string());
        }
        Ok(keys)
    }

    fn nth_token_end(&self, n: usize) -> io::Result<Option<UnixMillis>> {
        let Some(table) = self.open(TOKENS_BY_END)? else { return Ok(None) };
        let nth = match table.iter().map_err(|e| self.err(e))?.nth(n) {
            Some(row) => Some(row.map_err(|e| self.err(e))?.0.value().0),
            None => None,
        };
        Ok(nth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(hash: &str) -> TokenEntry {
        TokenEntry { hash: hash.into(), policies: vec!["default".into()], ..TokenEntry::default() }
    }

    fn open(dir: &std::path::Path) -> Db {
        Db::open(&dir.join(crate::DB_FILE)).unwrap()
    }

    #[test]
    fn changes_put_and_remove_entries_and_a_replacement_leaves_none_of_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        assert!(TOKENS.read_all::<TokenEntry>(&db).unwrap().is_empty(), "no table yet reads as no tokens");
        let put = |keys: &[&str]| keys.iter().map(|k| (k.to_string(), token(k))).collect();
        let write =
            |changes: StoredChanges<TokenEntry>| db.commit(false, |txn| TOKENS.write_changes(txn, &changes)).unwrap();
        let keys = || TOKENS.read_all::<TokenEntry>(&db).unwrap().into_keys().collect::<Vec<_>>();
        write(StoredChanges { replace: false, put: put(&["a", "b", "c"]), removed: vec![] });
        write(StoredChanges { replace: false, put: put(&["d"]), removed: vec!["b".into()] });
        assert_eq!(keys(), ["a", "c", "d"]);
        assert_eq!(TOKENS.read_all::<TokenEntry>(&db).unwrap()["a"], token("a"));
        write(StoredChanges { replace: true, put: put(&["x"]), removed: vec![] });
        assert_eq!(keys(), ["x"]);
        write(StoredChanges { replace: true, put: vec![], removed: vec![] });
        assert!(keys().is_empty(), "a restore of no tokens leaves none");
        assert!(USERS.read_all::<User>(&db).unwrap().is_empty(), "each map has its own table");
    }

    fn user(name: &str) -> User {
        User {
            username: name.into(),
            password_hash: "$argon2id$".into(),
            policies: vec![],
            token_ttl_secs: 0,
            token_max_ttl_secs: 0,
        }
    }

    #[test]
    fn the_users_view_reads_one_user_and_the_keys_under_a_mount_path_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        assert_eq!(UsersView::new(&db).user("ann").unwrap(), None, "no table yet reads as no users");
        let keys = ["ann", "corp/ann", "corp/bob", "corp2/ann", "corq/x", "zed"];
        let put = keys.iter().map(|k| (k.to_string(), user(k))).collect();
        db.commit(false, |txn| USERS.write_changes(txn, &StoredChanges { replace: false, put, removed: vec![] }))
            .unwrap();
        let view = UsersView::new(&db);
        assert_eq!(view.user("corp/bob").unwrap(), Some(user("corp/bob")));
        assert_eq!(view.user("corp/cy").unwrap(), None);
        assert_eq!(view.user_keys_under("corp/").unwrap(), ["corp/ann", "corp/bob"]);
        assert_eq!(view.user_keys_under("").unwrap(), keys, "every user under the empty path");
        assert!(view.user_keys_under("nope/").unwrap().is_empty());
    }

    /// A token with a parent, a username and an expiry as given.
    fn linked(hash: &str, parent: Option<&str>, username: Option<&str>, expires: Option<u64>) -> TokenEntry {
        TokenEntry {
            accessor: format!("acc-{hash}"),
            parent: parent.map(Into::into),
            username: username.map(Into::into),
            expires,
            ..token(hash)
        }
    }

    #[test]
    fn the_token_indexes_follow_every_put_change_removal_and_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        // One cache throughout, told of each commit as the state machine tells it.
        let cache = TokenCache::default();
        let write = |replace: bool, put: Vec<TokenEntry>, removed: &[&str]| {
            let put = put.into_iter().map(|t| (t.hash.clone(), t)).collect();
            let removed = removed.iter().map(|k| k.to_string()).collect();
            let changes = StoredChanges { replace, put, removed };
            db.commit(false, |txn| TOKENS.write_changes(txn, &changes)).unwrap();
            cache.committed(&changes);
        };
        write(
            false,
            vec![
                linked("a", None, Some("ann"), Some(30)),
                linked("b", Some("a"), Some("ann"), Some(10)),
                linked("c", Some("a"), None, None),
                linked("d", None, Some("bob"), Some(20)),
            ],
            &[],
        );
        let view = TokensView::new(&db, &cache);
        assert_eq!(view.token_children("a").unwrap(), ["b", "c"]);
        assert_eq!(view.tokens_of_username("ann").unwrap(), ["a", "b"]);
        assert_eq!((view.count_logins("ann").unwrap(), view.count_logins("bob").unwrap()), (1, 1));
        assert_eq!(view.tokens_unusable_at(20).unwrap(), ["b", "d"], "the first ended first");
        assert_eq!(
            (view.nth_token_end(0).unwrap(), view.nth_token_end(2).unwrap(), view.nth_token_end(3).unwrap()),
            (Some(10), Some(30), None)
        );
        assert_eq!(view.by_accessor("acc-c").unwrap().map(|t| t.hash), Some("c".into()));
        assert_eq!(view.token("b").unwrap().and_then(|t| t.expires), Some(10), "read, and kept in the cache");
        assert_eq!((view.count().unwrap(), view.count_unusable_at(25).unwrap()), (4, 2));
        drop(view);

        // A renewal moves a token's end; a removal takes every row with it.
        write(false, vec![linked("b", Some("a"), Some("ann"), Some(40))], &["d"]);
        let view = TokensView::new(&db, &cache);
        assert_eq!(view.tokens_unusable_at(35).unwrap(), ["a"]);
        assert_eq!(view.token("b").unwrap().and_then(|t| t.expires), Some(40), "the cache follows the commit");
        assert_eq!(view.token("d").unwrap(), None);
        assert_eq!((view.count_logins("bob").unwrap(), view.by_accessor("acc-d").unwrap()), (0, None));
        assert_eq!(view.accessors().unwrap(), ["acc-a", "acc-b", "acc-c"]);
        drop(view);

        write(true, vec![linked("x", Some("p"), None, Some(5))], &[]);
        let view = TokensView::new(&db, &cache);
        assert_eq!((view.token_children("a").unwrap(), view.tokens_of_username("ann").unwrap()), (vec![], vec![]));
        assert_eq!(
            (view.token_children("p").unwrap(), view.tokens_unusable_at(100).unwrap()),
            (keys(&["x"]), keys(&["x"]))
        );
        assert_eq!(view.accessors().unwrap(), ["acc-x"], "a replacement leaves no row of the old tokens");
        assert_eq!(view.token("b").unwrap(), None, "nor a cached token");
    }

    fn keys(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_the_file_and_not_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let secret_hash = "5e1f0c0ffee";
        db.commit(false, |txn| {
            let mut record = codec::encode(&token(secret_hash));
            *record.last_mut().unwrap() ^= 1;
            txn.open_table(TOKENS.table)?.insert(secret_hash, record.as_slice())?;
            Ok(())
        })
        .unwrap();
        let err = TOKENS.read_all::<TokenEntry>(&db).unwrap_err().to_string();
        assert!(err.contains(&dir.path().join(crate::DB_FILE).display().to_string()), "{err}");
        assert!(err.contains("token record 1 of the tokens table"), "{err}");
        assert!(!err.contains(secret_hash), "{err}");
        let mut snapshot = Vec::new();
        let written = serde_json::to_writer(&mut snapshot, &TOKENS.snapshot::<TokenEntry>(&db).unwrap());
        assert!(written.unwrap_err().to_string().contains("token record 1"), "a snapshot stops on it too");
    }
}
