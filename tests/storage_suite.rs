//! openraft's storage conformance suite, run against fleet's real stores: a sled database in a
//! temporary directory (with real fsyncs) and the snapshot-file state machine.

use fleet::raft::flusher::Flusher;
use fleet::raft::log_store::LogStore;
use fleet::raft::state_machine_store::StateMachineStore;
use fleet::raft::TypeConfig;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .expect("open sled");
        let flusher = Flusher::start(db.clone(), &dir.path().join("db"), Default::default())
            .expect("fsync thread");
        let log = LogStore::open(db, flusher).expect("log store");
        let sm = StateMachineStore::open(dir.path()).expect("state machine store");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_stores_pass_openraft_storage_suite() {
    Suite::test_all(SledBuilder).await.expect("storage suite");
}
