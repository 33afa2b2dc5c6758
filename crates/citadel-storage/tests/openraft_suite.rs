//! openraft's own storage conformance suite, run against Citadel's redb storage.

use citadel_storage::{LogStore, StateMachine, TypeConfig};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = citadel_storage::open(dir.path(), 0).expect("open storage");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_storage_passes_the_openraft_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(RedbBuilder).await?;
    Ok(())
}
