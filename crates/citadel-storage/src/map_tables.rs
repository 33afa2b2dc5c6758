//! The tokens and the users on disk: each a table of the node's redb database holding one of the
//! state's [`StoredMap`](citadel_core::stored_map::StoredMap)s, by the key the state holds each
//! entry under.
//!
//! Why: the state a node saves beside its store at every durable commit (once a second) used
//! to carry every token and user, encoded whole under the state's write lock each time: 330 to
//! 450 ms for 100,000 tokens, a stall of every write on the node once a second. Each batch now
//! writes the entries it changed here ([`StoredChanges`]), in the commit that records the
//! applied index, and the saved state holds none; a snapshot is written from here
//! ([`StoredEntries`]). The users live here only: `apply` loads those it needs and readers read
//! them here ([`UsersView`]). The state in memory still holds every token (a start reads them
//! back), for `apply` and for the requests it checks.
//!
//! Each value is a checksummed JSON record ([`crate::codec`]), verified when it is read; a
//! damaged one is an error naming the file and the record's place in its table, never its key (a
//! token's key is a credential's keyed hash, which has no place in a log line).

use std::collections::BTreeMap;
use std::io;
use std::marker::PhantomData;

use citadel_core::stored_map::StoredChanges;
use citadel_core::token::{User, UserRead};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::db::Db;

/// A table holding one of the state's stored maps.
#[derive(Clone, Copy)]
pub(crate) struct MapTable {
    table: TableDefinition<'static, &'static str, &'static [u8]>,
    /// What one entry is, for errors.
    entry: &'static str,
}

pub(crate) const TOKENS: MapTable = MapTable { table: TableDefinition::new("tokens"), entry: "token" };
pub(crate) const USERS: MapTable = MapTable { table: TableDefinition::new("users"), entry: "user" };

impl MapTable {
    /// Writes what a batch changed: every stored entry goes first when the map was replaced.
    pub(crate) fn write_changes<V: Serialize>(
        self,
        txn: &redb::WriteTransaction,
        changes: &StoredChanges<V>,
    ) -> Result<(), redb::Error> {
        if changes.is_empty() {
            return Ok(());
        }
        if changes.replace {
            txn.delete_table(self.table)?;
        }
        let mut table = txn.open_table(self.table)?;
        for key in &changes.removed {
            table.remove(key.as_str())?;
        }
        for (key, value) in &changes.put {
            table.insert(key.as_str(), codec::encode(value).as_slice())?;
        }
        Ok(())
    }

    /// Every stored entry, each record verified.
    pub(crate) fn read_all<V: DeserializeOwned>(self, db: &Db) -> io::Result<BTreeMap<String, V>> {
        let mut entries = BTreeMap::new();
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

#[cfg(test)]
mod tests {
    use citadel_core::token::TokenEntry;

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
