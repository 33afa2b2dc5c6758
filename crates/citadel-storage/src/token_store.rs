//! The tokens on disk: every token of the replicated state, by the key the state holds it under
//! (its hash), in the node's redb database.
//!
//! Why: the state a node saves beside its store at every durable commit (once a second) used
//! to carry every token, encoded whole under the state's write lock each time: 145 ms for
//! 100,000 tokens, a stall of every write on the node once a second. Each batch now writes the
//! tokens it changed here ([`citadel_core::token_table::TokenChanges`]), in the commit that
//! records the applied index, and the saved state holds none; a start reads them back. The
//! table in memory still holds every token, for `apply` and for the requests it authorizes.
//!
//! Each value is a checksummed JSON record ([`crate::codec`]), verified when it is read; a
//! damaged one stops the node naming the file, never a token's hash (a credential's keyed
//! hash has no place in a log line).

use std::collections::BTreeMap;
use std::io;

use citadel_core::token::TokenEntry;
use citadel_core::token_table::TokenChanges;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec;
use crate::db::Db;

const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");

/// Writes what a batch changed: every stored token goes first when the table was replaced.
pub(crate) fn write_changes(txn: &redb::WriteTransaction, changes: &TokenChanges) -> Result<(), redb::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    if changes.replace {
        txn.delete_table(TOKENS)?;
    }
    let mut table = txn.open_table(TOKENS)?;
    for key in &changes.removed {
        table.remove(key.as_str())?;
    }
    for (key, entry) in &changes.put {
        table.insert(key.as_str(), codec::encode(entry).as_slice())?;
    }
    Ok(())
}

/// Every stored token, each record verified.
pub(crate) fn read_all(db: &Db) -> io::Result<BTreeMap<String, TokenEntry>> {
    let txn = db.db.begin_read().map_err(|e| db.err(e))?;
    let table = match txn.open_table(TOKENS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
        Err(e) => return Err(db.err(e)),
    };
    let mut tokens = BTreeMap::new();
    for (n, row) in table.iter().map_err(|e| db.err(e))?.enumerate() {
        let (key, value) = row.map_err(|e| db.err(e))?;
        let what = format!("{}: token record {} of the tokens table", db.path.display(), n + 1);
        tokens.insert(key.value().to_string(), codec::decode(value.value(), &what)?);
    }
    Ok(tokens)
}

/// The tokens as of one commit: a read transaction, opened under the state's lock beside the
/// secrets', that serializes as a snapshot's `tokens` (key → token), one token at a time, each
/// record verified as it is read.
pub(crate) struct StoredTokens<'a> {
    db: &'a Db,
    txn: redb::ReadTransaction,
}

impl<'a> StoredTokens<'a> {
    pub(crate) fn open(db: &'a Db) -> io::Result<Self> {
        Ok(StoredTokens { db, txn: db.db.begin_read().map_err(|e| db.err(e))? })
    }
}

impl serde::Serialize for StoredTokens<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let err = |e: &dyn std::fmt::Display| S::Error::custom(self.db.err(e));
        let mut map = serializer.serialize_map(None)?;
        match self.txn.open_table(TOKENS) {
            Ok(table) => {
                for (n, row) in table.iter().map_err(|e| err(&e))?.enumerate() {
                    let (key, value) = row.map_err(|e| err(&e))?;
                    let what = format!("{}: token record {} of the tokens table", self.db.path.display(), n + 1);
                    let entry: TokenEntry = codec::decode(value.value(), &what).map_err(S::Error::custom)?;
                    map.serialize_entry(key.value(), &entry)?;
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(err(&e)),
        }
        map.end()
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
    fn changes_put_and_remove_tokens_and_a_replacement_leaves_none_of_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        assert!(read_all(&db).unwrap().is_empty(), "no table yet reads as no tokens");
        let put = |keys: &[&str]| keys.iter().map(|k| (k.to_string(), token(k))).collect();
        let write = |changes: TokenChanges| db.commit(false, |txn| write_changes(txn, &changes)).unwrap();
        write(TokenChanges { replace: false, put: put(&["a", "b", "c"]), removed: vec![] });
        write(TokenChanges { replace: false, put: put(&["d"]), removed: vec!["b".into()] });
        assert_eq!(read_all(&db).unwrap().into_keys().collect::<Vec<_>>(), ["a", "c", "d"]);
        assert_eq!(read_all(&db).unwrap()["a"], token("a"));
        write(TokenChanges { replace: true, put: put(&["x"]), removed: vec![] });
        assert_eq!(read_all(&db).unwrap().into_keys().collect::<Vec<_>>(), ["x"]);
        write(TokenChanges { replace: true, put: vec![], removed: vec![] });
        assert!(read_all(&db).unwrap().is_empty(), "a restore of no tokens leaves none");
    }

    #[test]
    fn a_damaged_token_record_is_an_error_naming_the_file_and_not_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let secret_hash = "5e1f0c0ffee";
        db.commit(false, |txn| {
            let mut record = codec::encode(&token(secret_hash));
            *record.last_mut().unwrap() ^= 1;
            txn.open_table(TOKENS)?.insert(secret_hash, record.as_slice())?;
            Ok(())
        })
        .unwrap();
        let err = read_all(&db).unwrap_err().to_string();
        assert!(err.contains(&dir.path().join(crate::DB_FILE).display().to_string()), "{err}");
        assert!(err.contains("token record 1"), "{err}");
        assert!(!err.contains(secret_hash), "{err}");
    }
}
