//! The embedded, durable state of one gateway: the configuration [`Model`] and the usage counters
//! of [`UsageStore`], in one redb database file `<state dir>/gateway.redb`.
//!
//! [`StateDb`] owns that file. redb takes an exclusive lock on it, so one state directory serves
//! one gateway process; a second open (from any process, this one included) fails with
//! [`StateError::InUse`].
//!
//! # Layout
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | `"schema_version"` | [`SCHEMA_VERSION`] in decimal |
//! | `meta` | `"model"` | JSON of the [`Model`] with its four keyed collections empty |
//! | `rest_apis` | API id | `(seq, JSON of the whole RestApi)` |
//! | `api_keys` | key id | `(seq, JSON of ApiKey)` |
//! | `usage_plans` | plan id | `(seq, JSON of UsagePlan)` |
//! | `usage_plan_keys` | `(plan id, key id)` | `(seq, JSON of UsagePlanKey)` |
//! | `periods` | `(plan id, key id)` | `(period start day, used, allowance)` |
//! | `days` | `(plan id, key id, day)` | `(used, allowance set that day)` |
//!
//! Rows hold the model's own serde JSON, so fields added to the model persist without changes
//! here, and the `meta` row carries every top-level field other than the four collections (the
//! account throttle, and whatever comes later). One row per id means a change to one API key
//! among a million writes one row.
//!
//! Days count from 1970-01-01 UTC; `used` is in requests; an allowance is the UpdateUsage override
//! of a period's limit, in requests.
//!
//! # Invariants
//!
//! - `meta."model"` exists if and only if a configuration was ever saved; the four collection
//!   tables are meaningful only then.
//! - Within a collection table, `seq` strictly increases along the order of the saved model, so a
//!   load sorted by `seq` gives back the saved order. Sequence numbers leave gaps (2^24 apart
//!   when assigned afresh): an append or an insertion between two rows writes only the new row.
//!   Only when no gap is left, or entries kept from the previous save change their relative
//!   order, is the whole collection renumbered.
//! - Each row's JSON carries the same id as its table key; a mismatch, like JSON that does not
//!   parse, is reported as [`StateError::Corrupt`] naming the table and the row, never a panic.
//! - The usage tables follow the contract of [`crate::store`] exactly;
//!   [`crate::store::MemoryStore`] is the oracle of this module's tests.
//!
//! # Durability
//!
//! Every write — [`StateDb::save_model`], [`UsageStore::add`] and [`UsageStore::set_allowance`] —
//! is one redb write transaction committed with [`Durability::Immediate`]: when the call returns,
//! the change is on disk (fsynced) and survives a crash or power loss; a call that fails or is
//! interrupted leaves nothing of itself behind. A configuration save is all-or-nothing across
//! every table. The engine flushes usage about once a second, so after `kill -9` at most the
//! increments admitted since the last successful flush are lost (see the overshoot bound in
//! [`crate::store`]). Reopening after a crash may take a moment while redb repairs its allocator
//! state; every committed transaction is still there.
//!
//! Every call blocks on disk I/O (an fsync per write); async callers run it on a blocking thread.

use std::cmp::Ordering;
use std::fmt::Display;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::ser::{self, Impossible, Serialize, SerializeStruct, Serializer};

use crate::plan::{ApiKey, Model, RestApi, UsagePlan, UsagePlanKey};
use crate::store::{DayRecord, PeriodCounter, StoreError, UsageDelta, UsageStore};

/// Name of the database file inside the state directory.
pub const FILE_NAME: &str = "gateway.redb";

/// Version of the table layout described in the module docs. A database with another version is
/// refused with [`StateError::SchemaVersion`] rather than misread.
pub const SCHEMA_VERSION: u32 = 1;

/// Distance between sequence numbers assigned afresh: room for 24 successive halvings when rows
/// are inserted between two neighbours, and for 2^40 appends.
const SEQ_GAP: u64 = 1 << 24;

const SCHEMA_VERSION_ROW: &str = "schema_version";
const MODEL_ROW: &str = "model";

const META_NAME: &str = "meta";
const META: TableDefinition<&str, &str> = TableDefinition::new(META_NAME);
const REST_APIS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("rest_apis");
const API_KEYS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("api_keys");
const USAGE_PLANS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("usage_plans");
const USAGE_PLAN_KEYS: TableDefinition<(&str, &str), (u64, &str)> =
    TableDefinition::new("usage_plan_keys");
const PERIODS: TableDefinition<(&str, &str), (u32, u64, Option<u64>)> =
    TableDefinition::new("periods");
const DAYS: TableDefinition<(&str, &str, u32), (u64, Option<u64>)> = TableDefinition::new("days");

/// Why the state database could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state directory does not exist and could not be created.
    #[error("cannot create state directory {}: {reason}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        reason: std::io::Error,
    },
    /// Another gateway (or another `StateDb` of this process) holds the database open.
    #[error(
        "state database {} is in use by another gateway process; stop it or pick another --state-dir",
        .path.display()
    )]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The database was written with a table layout this gateway does not read.
    #[error(
        "state database {} has schema version {found}; this gateway reads version {SCHEMA_VERSION}",
        .path.display()
    )]
    SchemaVersion {
        /// The database file.
        path: PathBuf,
        /// The stored version, as stored.
        found: String,
    },
    /// redb failed: I/O error, a file that is not a redb database, a corrupt page, …
    #[error("state database {}: {context}: {reason}", .path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// What the gateway was doing.
        context: &'static str,
        /// The redb error.
        reason: Box<redb::Error>,
    },
    /// A stored row cannot be read back into the model.
    #[error("state database {} is corrupt: table {table}, row {id}: {message}", .path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// Table of the row.
        table: &'static str,
        /// Key of the row.
        id: String,
        /// What is wrong with it.
        message: String,
    },
    /// The model to save has two entries with one id; a validated model never does.
    #[error(
        "cannot save the configuration to {}: {table} has two entries with id {id}",
        .path.display()
    )]
    DuplicateId {
        /// The database file.
        path: PathBuf,
        /// The collection.
        table: &'static str,
        /// The repeated id.
        id: String,
    },
    /// A shared (fleet) store failed or could not be reached; nothing was changed.
    #[error("configuration store {store}: {reason}")]
    Remote {
        /// The store, without credentials.
        store: String,
        /// What went wrong.
        reason: String,
    },
    /// The model could not be encoded as JSON.
    #[error("cannot encode the configuration for {}: {message}", .path.display())]
    Encode {
        /// The database file.
        path: PathBuf,
        /// The serde error.
        message: String,
    },
}

/// One redb database file `<dir>/gateway.redb` holding the configuration and the usage counters.
/// Cheap to clone (all clones share one open database); the file is closed when the last clone
/// is dropped.
#[derive(Clone)]
pub struct StateDb {
    db: Arc<Handle>,
    path: Arc<Path>,
}

/// The open database. redb refuses all further work on a handle that saw an I/O error (a full
/// disk, say) until it is closed and opened again, so such an error marks the handle `failed`
/// and the next transaction opens the file afresh: the last committed state, nothing half
/// written.
struct Handle {
    current: Mutex<Option<Arc<Database>>>,
    failed: AtomicBool,
}

impl Handle {
    fn note(&self, e: &redb::Error) {
        if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
            self.failed.store(true, AtomicOrdering::Release);
        }
    }
}

fn open_database(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(CACHE_BYTES).create(path)
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Rows written and deleted by one save; a save that changes nothing writes no transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SaveStats {
    written: usize,
    deleted: usize,
}

/// The store's page cache. The configuration is read once at start-up and written in small
/// diffs, and usage rows are small: 64 MiB is plenty, where redb's default (1 GiB) would keep
/// most of a million-key database resident.
pub const CACHE_BYTES: usize = 64 << 20;

impl StateDb {
    /// Opens `<dir>/gateway.redb`, creating the directory and an empty database if missing.
    /// Fails with [`StateError::InUse`] while another `StateDb` (in any process) has it open.
    pub fn open(dir: &Path) -> Result<StateDb, StateError> {
        std::fs::create_dir_all(dir).map_err(|reason| StateError::CreateDir {
            path: dir.to_path_buf(),
            reason,
        })?;
        let path = dir.join(FILE_NAME);
        let db = match open_database(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StateError::InUse { path });
            }
            Err(e) => {
                return Err(StateError::Database {
                    path,
                    context: "open",
                    reason: Box::new(e.into()),
                });
            }
        };
        let state = StateDb {
            db: Arc::new(Handle {
                current: Mutex::new(Some(Arc::new(db))),
                failed: AtomicBool::new(false),
            }),
            path: path.into(),
        };
        state.init()?;
        Ok(state)
    }

    /// The database file, `<dir>/gateway.redb`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database to run one transaction on; after an I/O error, the file opened again first
    /// (once no other transaction still holds the old handle).
    fn database(&self) -> Result<Arc<Database>, redb::Error> {
        let mut current = self
            .db
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.db.failed.load(AtomicOrdering::Acquire)
            && current.as_ref().is_none_or(|db| Arc::strong_count(db) == 1)
        {
            // Dropping the last handle closes the file, which a second open needs.
            *current = None;
            *current = Some(Arc::new(open_database(&self.path)?));
            self.db.failed.store(false, AtomicOrdering::Release);
            tracing::warn!(path = %self.path.display(), "store reopened after an I/O error");
        }
        current.clone().ok_or(redb::Error::PreviousIo)
    }

    /// A read transaction on the current database (see [`StateDb::database`]).
    fn begin_read(&self) -> Result<ReadTransaction, redb::Error> {
        Ok(self.database()?.begin_read()?)
    }

    /// A write transaction on the current database (see [`StateDb::database`]).
    fn begin_write(&self) -> Result<WriteTransaction, redb::Error> {
        Ok(self.database()?.begin_write()?)
    }

    /// The stored configuration, or None when nothing was ever saved (fresh state dir).
    /// Collections come back in the order they had in the saved model.
    pub fn load_model(&self) -> Result<Option<Model>, StateError> {
        let txn = self
            .begin_read()
            .map_err(self.db_err("begin read transaction"))?;
        let meta = txn
            .open_table(META)
            .map_err(self.db_err("open table meta"))?;
        let Some(row) = meta.get(MODEL_ROW).map_err(self.db_err("read meta"))? else {
            return Ok(None);
        };
        let mut model: Model = serde_json::from_str(row.value())
            .map_err(|e| self.corrupt(META_NAME, MODEL_ROW.to_string(), e))?;
        model.rest_apis = self.load_rows(&txn)?;
        model.api_keys = self.load_rows(&txn)?;
        model.usage_plans = self.load_rows(&txn)?;
        model.usage_plan_keys = self.load_rows(&txn)?;
        Ok(Some(model))
    }

    /// Persists `new`, writing only what differs from `old` (None = write everything), in ONE
    /// redb write transaction committed with immediate durability before returning.
    ///
    /// `old` must be the model last saved (or loaded); if the database holds no configuration yet
    /// it is ignored and everything is written. Entries are compared per id: a changed entry
    /// rewrites its row, a removed one deletes it, the rest is untouched. Fails with
    /// [`StateError::DuplicateId`], writing nothing, when `new` repeats an id in a collection.
    pub fn save_model(&self, old: Option<&Model>, new: &Model) -> Result<(), StateError> {
        self.save(old, new).map(|_| ())
    }

    fn save(&self, old: Option<&Model>, new: &Model) -> Result<SaveStats, StateError> {
        let mut txn = self
            .begin_write()
            .map_err(self.db_err("begin write transaction"))?;
        txn.set_durability(Durability::Immediate)
            .map_err(self.db_err("set durability"))?;
        let mut stats = SaveStats::default();
        {
            let mut meta = txn
                .open_table(META)
                .map_err(self.db_err("open table meta"))?;
            let saved_before = meta
                .get(MODEL_ROW)
                .map_err(self.db_err("read meta"))?
                .is_some();
            let old = if saved_before { old } else { None };
            let new_meta = self.meta_json(new)?;
            let unchanged = match old {
                Some(old) => self.meta_json(old)? == new_meta,
                None => false,
            };
            if !unchanged {
                meta.insert(MODEL_ROW, new_meta.as_str())
                    .map_err(self.db_err("write meta"))?;
                stats.written += 1;
            }
            drop(meta);
            self.save_rows(
                &txn,
                old.map(|m| &m.rest_apis[..]),
                &new.rest_apis,
                &mut stats,
            )?;
            self.save_rows(
                &txn,
                old.map(|m| &m.api_keys[..]),
                &new.api_keys,
                &mut stats,
            )?;
            self.save_rows(
                &txn,
                old.map(|m| &m.usage_plans[..]),
                &new.usage_plans,
                &mut stats,
            )?;
            self.save_rows(
                &txn,
                old.map(|m| &m.usage_plan_keys[..]),
                &new.usage_plan_keys,
                &mut stats,
            )?;
        }
        if stats == SaveStats::default() {
            // Nothing differs: skip the commit and its fsync.
            txn.abort().map_err(self.db_err("abort"))?;
        } else {
            txn.commit().map_err(self.db_err("commit"))?;
        }
        Ok(stats)
    }

    /// Creates every table and records the schema version on a fresh database; checks it on an
    /// existing one.
    fn init(&self) -> Result<(), StateError> {
        let txn = self
            .begin_write()
            .map_err(self.db_err("begin write transaction"))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(self.db_err("open table meta"))?;
            let found = meta
                .get(SCHEMA_VERSION_ROW)
                .map_err(self.db_err("read meta"))?
                .map(|v| v.value().to_string());
            match found {
                None => {
                    meta.insert(SCHEMA_VERSION_ROW, SCHEMA_VERSION.to_string().as_str())
                        .map_err(self.db_err("write meta"))?;
                }
                Some(v) if v == SCHEMA_VERSION.to_string() => {}
                Some(found) => {
                    return Err(StateError::SchemaVersion {
                        path: self.path.to_path_buf(),
                        found,
                    });
                }
            }
            let create = "create table";
            txn.open_table(REST_APIS).map_err(self.db_err(create))?;
            txn.open_table(API_KEYS).map_err(self.db_err(create))?;
            txn.open_table(USAGE_PLANS).map_err(self.db_err(create))?;
            txn.open_table(USAGE_PLAN_KEYS)
                .map_err(self.db_err(create))?;
            txn.open_table(PERIODS).map_err(self.db_err(create))?;
            txn.open_table(DAYS).map_err(self.db_err(create))?;
        }
        txn.commit().map_err(self.db_err("commit"))
    }

    /// The `meta` row of a model: its JSON with the four keyed collections written as `[]`.
    fn meta_json(&self, model: &Model) -> Result<String, StateError> {
        serde_json::to_string(&ModelMeta(model)).map_err(|e| StateError::Encode {
            path: self.path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// All rows of one collection table, in saved order.
    fn load_rows<T: Row>(&self, txn: &ReadTransaction) -> Result<Vec<T>, StateError> {
        let table = txn
            .open_table(T::TABLE)
            .map_err(self.db_err("open table"))?;
        let mut rows = Vec::new();
        for entry in table.iter().map_err(self.db_err("read table"))? {
            let (key, value) = entry.map_err(self.db_err("read table"))?;
            let id = T::key_ident(key.value());
            let (seq, json) = value.value();
            let row: T =
                serde_json::from_str(json).map_err(|e| self.corrupt(T::NAME, show_ident(id), e))?;
            if row.ident() != id {
                return Err(self.corrupt(
                    T::NAME,
                    show_ident(id),
                    format_args!("row holds id {}", show_ident(row.ident())),
                ));
            }
            rows.push((seq, row));
        }
        rows.sort_by_key(|(seq, _)| *seq);
        Ok(rows.into_iter().map(|(_, row)| row).collect())
    }

    /// Brings one collection table from `old` to `new` inside `txn`.
    fn save_rows<T: Row>(
        &self,
        txn: &WriteTransaction,
        old: Option<&[T]>,
        new: &[T],
        stats: &mut SaveStats,
    ) -> Result<(), StateError> {
        let mut table = txn
            .open_table(T::TABLE)
            .map_err(self.db_err("open table"))?;
        let changes = plan_changes(old, new, |row: &T| {
            let stored = table.get(row.key()).map_err(self.db_err("read table"))?;
            Ok(stored.map(|v| v.value().0))
        })
        .map_err(|e| match e {
            PlanError::Duplicate(id) => StateError::DuplicateId {
                path: self.path.to_path_buf(),
                table: T::NAME,
                id,
            },
            PlanError::State(e) => e,
        })?;
        let (deletes, puts) = match changes {
            Changes::Incremental { deletes, puts } => (deletes, puts),
            Changes::Rewrite => {
                let stale = table.len().map_err(self.db_err("read table"))?;
                stats.deleted += usize::try_from(stale).unwrap_or(usize::MAX);
                drop(table);
                txn.delete_table(T::TABLE)
                    .map_err(self.db_err("clear table"))?;
                table = txn
                    .open_table(T::TABLE)
                    .map_err(self.db_err("open table"))?;
                let seqs = (1u64..).map(|n| n * SEQ_GAP);
                (Vec::new(), new.iter().zip(seqs).collect())
            }
        };
        for row in deletes {
            table.remove(row.key()).map_err(self.db_err("delete row"))?;
            stats.deleted += 1;
        }
        for (row, seq) in puts {
            let json = serde_json::to_string(row).map_err(|e| StateError::Encode {
                path: self.path.to_path_buf(),
                message: format!("{} {}: {e}", T::NAME, show_ident(row.ident())),
            })?;
            table
                .insert(row.key(), (seq, json.as_str()))
                .map_err(self.db_err("write row"))?;
            stats.written += 1;
        }
        Ok(())
    }

    fn db_err<E: Into<redb::Error>>(&self, context: &'static str) -> impl FnOnce(E) -> StateError {
        let path = self.path.to_path_buf();
        let handle = self.db.clone();
        move |e| {
            let reason = e.into();
            handle.note(&reason);
            StateError::Database {
                path,
                context,
                reason: Box::new(reason),
            }
        }
    }

    fn corrupt(&self, table: &'static str, id: String, message: impl Display) -> StateError {
        StateError::Corrupt {
            path: self.path.to_path_buf(),
            table,
            id,
            message: message.to_string(),
        }
    }

    /// A redb error as the usage store reports it: corruption is `Corrupt`, the rest (I/O, a
    /// closed database, …) `Unavailable`, so the engine keeps its deltas and retries.
    fn store_err<E: Into<redb::Error>>(&self, e: E) -> StoreError {
        let e = e.into();
        self.db.note(&e);
        match e {
            redb::Error::Corrupted(m) => {
                StoreError::Corrupt(format!("{}: {m}", self.path.display()))
            }
            other => StoreError::Unavailable(format!("{}: {other}", self.path.display())),
        }
    }

    fn begin_usage_write(&self) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.begin_write().map_err(|e| self.store_err(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.store_err(e))?;
        Ok(txn)
    }
}

impl UsageStore for StateDb {
    fn add(&self, batch: &[UsageDelta]) -> Result<Vec<u64>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.begin_usage_write()?;
        let mut totals = Vec::with_capacity(batch.len());
        {
            let mut days = txn.open_table(DAYS).map_err(|e| self.store_err(e))?;
            let mut periods = txn.open_table(PERIODS).map_err(|e| self.store_err(e))?;
            for d in batch {
                let day_key = (d.plan_id.as_str(), d.key_id.as_str(), d.day);
                let (used, allowance) = days
                    .get(day_key)
                    .map_err(|e| self.store_err(e))?
                    .map_or((0, None), |v| v.value());
                days.insert(day_key, (used.saturating_add(d.count), allowance))
                    .map_err(|e| self.store_err(e))?;

                let period_key = (d.plan_id.as_str(), d.key_id.as_str());
                // A missing counter behaves as period 0 with nothing used, as in the reference.
                let (start, used, allowance) = periods
                    .get(period_key)
                    .map_err(|e| self.store_err(e))?
                    .map_or((0, 0, None), |v| v.value());
                let total = match start.cmp(&d.period_start) {
                    Ordering::Equal => {
                        let total = used.saturating_add(d.count);
                        periods
                            .insert(period_key, (start, total, allowance))
                            .map_err(|e| self.store_err(e))?;
                        total
                    }
                    Ordering::Less => {
                        periods
                            .insert(period_key, (d.period_start, d.count, None))
                            .map_err(|e| self.store_err(e))?;
                        d.count
                    }
                    Ordering::Greater => d.count,
                };
                totals.push(total);
            }
        }
        txn.commit().map_err(|e| self.store_err(e))?;
        Ok(totals)
    }

    fn set_allowance(
        &self,
        plan_id: &str,
        key_id: &str,
        period_start: u32,
        allowance: u64,
        day: u32,
    ) -> Result<(), StoreError> {
        let txn = self.begin_usage_write()?;
        {
            let mut periods = txn.open_table(PERIODS).map_err(|e| self.store_err(e))?;
            let (start, used, _) = periods
                .get((plan_id, key_id))
                .map_err(|e| self.store_err(e))?
                .map_or((0, 0, None), |v| v.value());
            let used = if start == period_start { used } else { 0 };
            periods
                .insert((plan_id, key_id), (period_start, used, Some(allowance)))
                .map_err(|e| self.store_err(e))?;

            let mut days = txn.open_table(DAYS).map_err(|e| self.store_err(e))?;
            let (used, _) = days
                .get((plan_id, key_id, day))
                .map_err(|e| self.store_err(e))?
                .map_or((0, None), |v| v.value());
            days.insert((plan_id, key_id, day), (used, Some(allowance)))
                .map_err(|e| self.store_err(e))?;
        }
        txn.commit().map_err(|e| self.store_err(e))
    }

    fn load_periods(&self) -> Result<Vec<PeriodCounter>, StoreError> {
        let txn = self.begin_read().map_err(|e| self.store_err(e))?;
        let periods = txn.open_table(PERIODS).map_err(|e| self.store_err(e))?;
        let mut out = Vec::new();
        for entry in periods.iter().map_err(|e| self.store_err(e))? {
            let (key, value) = entry.map_err(|e| self.store_err(e))?;
            let (plan_id, key_id) = key.value();
            let (period_start, used, allowance) = value.value();
            out.push(PeriodCounter {
                plan_id: plan_id.to_string(),
                key_id: key_id.to_string(),
                period_start,
                used,
                allowance,
            });
        }
        Ok(out)
    }

    fn history(
        &self,
        plan_id: &str,
        key_id: Option<&str>,
        first_day: u32,
        last_day: u32,
    ) -> Result<Vec<DayRecord>, StoreError> {
        let mut out = Vec::new();
        if first_day > last_day {
            return Ok(out);
        }
        let txn = self.begin_read().map_err(|e| self.store_err(e))?;
        let days = txn.open_table(DAYS).map_err(|e| self.store_err(e))?;
        let key_days = |key: &str, out: &mut Vec<DayRecord>| -> Result<(), StoreError> {
            let range = days
                .range((plan_id, key, first_day)..=(plan_id, key, last_day))
                .map_err(|e| self.store_err(e))?;
            for entry in range {
                let (k, v) = entry.map_err(|e| self.store_err(e))?;
                let (_, key_id, day) = k.value();
                let (used, allowance) = v.value();
                out.push(DayRecord {
                    key_id: key_id.to_string(),
                    day,
                    used,
                    allowance,
                });
            }
            Ok(())
        };
        match key_id {
            Some(key) => key_days(key, &mut out)?,
            None => {
                // Seek from key to key of the plan and read only each key's days in range, rather
                // than every day the plan ever recorded.
                let mut previous: Option<String> = None;
                loop {
                    let lower = match &previous {
                        None => Bound::Included((plan_id, "", 0)),
                        Some(key) => Bound::Excluded((plan_id, key.as_str(), u32::MAX)),
                    };
                    let next = days
                        .range((lower, Bound::Unbounded))
                        .map_err(|e| self.store_err(e))?
                        .next()
                        .transpose()
                        .map_err(|e| self.store_err(e))?;
                    let Some((k, _)) = next else { break };
                    let (plan, key, _) = k.value();
                    if plan != plan_id {
                        break;
                    }
                    let key = key.to_string();
                    key_days(&key, &mut out)?;
                    previous = Some(key);
                }
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Collections
// ---------------------------------------------------------------------------------------------

/// One entry of a keyed model collection, stored as `key -> (seq, JSON)`.
trait Row: Serialize + DeserializeOwned + PartialEq {
    /// Table name, for errors.
    const NAME: &'static str;
    type Key: redb::Key + 'static;
    const TABLE: TableDefinition<'static, Self::Key, (u64, &'static str)>;

    /// The table key of this entry.
    fn key(&self) -> <Self::Key as redb::Value>::SelfType<'_>;
    /// The identity of this entry; the second part is empty for single-id collections.
    fn ident(&self) -> (&str, &str);
    /// The identity a table key stands for.
    fn key_ident<'a>(key: <Self::Key as redb::Value>::SelfType<'a>) -> (&'a str, &'a str);
}

impl Row for RestApi {
    const NAME: &'static str = "rest_apis";
    type Key = &'static str;
    const TABLE: TableDefinition<'static, &'static str, (u64, &'static str)> = REST_APIS;
    fn key(&self) -> &str {
        &self.id
    }
    fn ident(&self) -> (&str, &str) {
        (&self.id, "")
    }
    fn key_ident<'a>(key: <Self::Key as redb::Value>::SelfType<'a>) -> (&'a str, &'a str) {
        (key, "")
    }
}

impl Row for ApiKey {
    const NAME: &'static str = "api_keys";
    type Key = &'static str;
    const TABLE: TableDefinition<'static, &'static str, (u64, &'static str)> = API_KEYS;
    fn key(&self) -> &str {
        &self.id
    }
    fn ident(&self) -> (&str, &str) {
        (&self.id, "")
    }
    fn key_ident<'a>(key: <Self::Key as redb::Value>::SelfType<'a>) -> (&'a str, &'a str) {
        (key, "")
    }
}

impl Row for UsagePlan {
    const NAME: &'static str = "usage_plans";
    type Key = &'static str;
    const TABLE: TableDefinition<'static, &'static str, (u64, &'static str)> = USAGE_PLANS;
    fn key(&self) -> &str {
        &self.id
    }
    fn ident(&self) -> (&str, &str) {
        (&self.id, "")
    }
    fn key_ident<'a>(key: <Self::Key as redb::Value>::SelfType<'a>) -> (&'a str, &'a str) {
        (key, "")
    }
}

impl Row for UsagePlanKey {
    const NAME: &'static str = "usage_plan_keys";
    type Key = (&'static str, &'static str);
    const TABLE: TableDefinition<'static, (&'static str, &'static str), (u64, &'static str)> =
        USAGE_PLAN_KEYS;
    fn key(&self) -> (&str, &str) {
        (&self.usage_plan_id, &self.key_id)
    }
    fn ident(&self) -> (&str, &str) {
        (&self.usage_plan_id, &self.key_id)
    }
    fn key_ident<'a>(key: <Self::Key as redb::Value>::SelfType<'a>) -> (&'a str, &'a str) {
        key
    }
}

fn show_ident((a, b): (&str, &str)) -> String {
    if b.is_empty() {
        a.to_string()
    } else {
        format!("({a}, {b})")
    }
}

/// What a save does to one collection table.
#[derive(Debug, PartialEq)]
enum Changes<'a, T> {
    /// Delete these rows and write these with these sequence numbers; the rest stays.
    Incremental {
        deletes: Vec<&'a T>,
        puts: Vec<(&'a T, u64)>,
    },
    /// Clear the table and write every entry afresh, numbered `SEQ_GAP, 2 * SEQ_GAP, …`.
    Rewrite,
}

#[derive(Debug)]
enum PlanError {
    Duplicate(String),
    State(StateError),
}

impl From<StateError> for PlanError {
    fn from(e: StateError) -> Self {
        PlanError::State(e)
    }
}

/// Where the previous entry (in `new`'s order) got its sequence number.
#[derive(Clone, Copy)]
enum Prev<'a, T> {
    Start,
    Known(u64),
    Unchanged(&'a T),
}

/// The row writes that take a collection table holding `old` to `new`. `stored_seq` reads the
/// sequence number of an entry kept from `old`; it is called only for kept entries that change
/// or neighbour an inserted one, so a one-entry change reads at most two rows.
fn plan_changes<'a, T: Row>(
    old: Option<&'a [T]>,
    new: &'a [T],
    mut stored_seq: impl FnMut(&T) -> Result<Option<u64>, StateError>,
) -> Result<Changes<'a, T>, PlanError> {
    use foldhash::{HashMapExt, HashSetExt};
    let mut new_ids = foldhash::HashSet::with_capacity(new.len());
    for row in new {
        if !new_ids.insert(row.ident()) {
            return Err(PlanError::Duplicate(show_ident(row.ident())));
        }
    }
    let Some(old_all) = old else {
        return Ok(Changes::Rewrite);
    };
    // Most changes touch a few entries: the entries equal in both at the start and at the end
    // stay as they are, and only the rest is compared by id (`new_ids` still holds all of
    // `new`, so an `old` that repeats an id fails the order check below and is rewritten).
    let head = old_all.iter().zip(new).take_while(|(a, b)| a == b).count();
    let tail = old_all[head..]
        .iter()
        .rev()
        .zip(new[head..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let old = &old_all[head..old_all.len() - tail];
    let before_first = head.checked_sub(1).map(|i| &new[i]);
    let after_last = new.get(new.len() - tail);
    let all_new = new;
    let new = &all_new[head..all_new.len() - tail];
    let mut old_by_id = foldhash::HashMap::with_capacity(old.len());
    for row in old {
        if old_by_id.insert(row.ident(), row).is_some() {
            // Not something this store wrote: start over.
            return Ok(Changes::Rewrite);
        }
    }
    let kept_in_old_order = old.iter().filter(|r| new_ids.contains(&r.ident()));
    let kept_in_new_order = new.iter().filter(|r| old_by_id.contains_key(&r.ident()));
    if !kept_in_old_order
        .map(Row::ident)
        .eq(kept_in_new_order.map(Row::ident))
    {
        return Ok(Changes::Rewrite);
    }
    let deletes: Vec<&T> = old
        .iter()
        .filter(|r| !new_ids.contains(&r.ident()))
        .collect();

    let mut puts = Vec::new();
    let mut prev: Prev<'a, T> = match before_first {
        Some(row) => Prev::Unchanged(row),
        None => Prev::Start,
    };
    let mut i = 0;
    while i < new.len() {
        let row = &new[i];
        if let Some(&before) = old_by_id.get(&row.ident()) {
            if before == row {
                prev = Prev::Unchanged(row);
            } else {
                let Some(seq) = stored_seq(row)? else {
                    return Ok(Changes::Rewrite);
                };
                puts.push((row, seq));
                prev = Prev::Known(seq);
            }
            i += 1;
            continue;
        }
        // A run of inserted entries new[i..j], placed between the previous entry and new[j].
        let j = new[i..]
            .iter()
            .position(|r| old_by_id.contains_key(&r.ident()))
            .map_or(new.len(), |p| i + p);
        let lo = match prev {
            Prev::Start => 0,
            Prev::Known(seq) => seq,
            Prev::Unchanged(r) => match stored_seq(r)? {
                Some(seq) => seq,
                None => return Ok(Changes::Rewrite),
            },
        };
        let count = (j - i) as u64;
        let next = new.get(j).or(after_last);
        let step = if let Some(next) = next {
            match stored_seq(next)? {
                Some(hi) if hi > lo && (hi - lo) / (count + 1) > 0 => (hi - lo) / (count + 1),
                _ => return Ok(Changes::Rewrite),
            }
        } else {
            match SEQ_GAP.checked_mul(count).and_then(|n| lo.checked_add(n)) {
                Some(_) => SEQ_GAP,
                None => return Ok(Changes::Rewrite),
            }
        };
        for (n, row) in (1u64..).zip(&new[i..j]) {
            puts.push((row, lo + step * n));
        }
        prev = Prev::Known(lo + step * count);
        i = j;
    }
    Ok(Changes::Incremental { deletes, puts })
}

// ---------------------------------------------------------------------------------------------
// The `meta` row
// ---------------------------------------------------------------------------------------------

/// The model's JSON member names of the collections that have tables of their own.
const COLLECTION_FIELDS: [&str; 4] = ["restApis", "apiKeys", "usagePlans", "usagePlanKeys"];

/// Serializes a [`Model`] through its own serde derive with the keyed collections replaced by
/// `[]`: every other top-level field, present or future, lands in the `meta` row, and the
/// collections are never encoded (a million keys cost nothing here).
struct ModelMeta<'a>(&'a Model);

/// JSON of `model` with its four keyed collections empty (the `meta` row; also what the fleet
/// store keeps beside its rows).
pub(crate) fn meta_json(model: &Model) -> Result<String, serde_json::Error> {
    serde_json::to_string(&ModelMeta(model))
}

impl Serialize for ModelMeta<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(WithoutCollections(serializer))
    }
}

/// A serializer for the top level of a [`Model`] only, which is a struct.
struct WithoutCollections<S>(S);

/// Drops the collection fields; insists on seeing all of them, so a renamed member fails loudly
/// instead of being stored twice.
struct FieldFilter<S> {
    inner: S,
    seen: usize,
}

impl<S: SerializeStruct> SerializeStruct for FieldFilter<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), S::Error> {
        if COLLECTION_FIELDS.contains(&key) {
            self.seen += 1;
            self.inner.serialize_field(key, &[(); 0])
        } else {
            self.inner.serialize_field(key, value)
        }
    }

    fn skip_field(&mut self, key: &'static str) -> Result<(), S::Error> {
        self.inner.skip_field(key)
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        if self.seen != COLLECTION_FIELDS.len() {
            return Err(ser::Error::custom(format!(
                "the model no longer has all of the members {COLLECTION_FIELDS:?}"
            )));
        }
        self.inner.end()
    }
}

fn not_a_struct<E: ser::Error>() -> E {
    E::custom("the configuration model must serialize as a struct")
}

macro_rules! reject_scalars {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, _: $ty) -> Result<S::Ok, S::Error> {
            Err(not_a_struct())
        })*
    };
}

impl<S: Serializer> Serializer for WithoutCollections<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Impossible<S::Ok, S::Error>;
    type SerializeTuple = Impossible<S::Ok, S::Error>;
    type SerializeTupleStruct = Impossible<S::Ok, S::Error>;
    type SerializeTupleVariant = Impossible<S::Ok, S::Error>;
    type SerializeMap = Impossible<S::Ok, S::Error>;
    type SerializeStruct = FieldFilter<S::SerializeStruct>;
    type SerializeStructVariant = Impossible<S::Ok, S::Error>;

    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        Ok(FieldFilter {
            inner: self.0.serialize_struct(name, len)?,
            seen: 0,
        })
    }

    reject_scalars!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

    fn serialize_none(self) -> Result<S::Ok, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<S::Ok, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_unit(self) -> Result<S::Ok, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<S::Ok, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<S::Ok, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<S::Ok, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        Err(not_a_struct())
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        Err(not_a_struct())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

    use proptest::prelude::*;

    use super::*;
    use crate::plan::{QuotaPeriod, Stage};
    use crate::store::MemoryStore;

    /// A fresh directory under the system temp dir, removed on drop (also when a test fails).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, AtomicOrdering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("gateway-state-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add(Vec<UsageDelta>),
        SetAllowance {
            plan: String,
            key: String,
            period_start: u32,
            allowance: u64,
            day: u32,
        },
        History {
            plan: String,
            key: Option<String>,
            first: u32,
            last: u32,
        },
        LoadPeriods,
        Restart,
    }

    // Ids that share prefixes, to catch range bounds that spill from one plan or key into the next.
    fn plan_id() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["p", "pp", "q"]).prop_map(String::from)
    }

    fn key_id() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "aa", "b"]).prop_map(String::from)
    }

    fn delta() -> impl Strategy<Value = UsageDelta> {
        (
            plan_id(),
            key_id(),
            0u32..30,
            0u32..8,
            prop_oneof![4 => 0u64..1000, 1 => Just(u64::MAX - 3)],
        )
            .prop_map(|(plan_id, key_id, day, back, count)| UsageDelta {
                plan_id,
                key_id,
                day,
                period_start: day.saturating_sub(back),
                count,
            })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::collection::vec(delta(), 0..6).prop_map(Op::Add),
            1 => (plan_id(), key_id(), 0u32..30, 0u64..5000, 0u32..30).prop_map(
                |(plan, key, period_start, allowance, day)| Op::SetAllowance {
                    plan,
                    key,
                    period_start,
                    allowance,
                    day,
                }
            ),
            2 => (plan_id(), prop::option::of(key_id()), 0u32..32, 0u32..32).prop_map(
                |(plan, key, first, last)| Op::History {
                    plan,
                    key,
                    first,
                    last,
                }
            ),
            1 => Just(Op::LoadPeriods),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// The embedded store answers every operation as the reference does, across restarts.
        #[test]
        fn usage_matches_memory_store(ops in prop::collection::vec(op(), 1..40)) {
            let dir = TempDir::new("model");
            let oracle = MemoryStore::new();
            let mut db = StateDb::open(&dir.0).expect("open");
            for op in ops {
                match op {
                    Op::Add(batch) => {
                        prop_assert_eq!(db.add(&batch), oracle.add(&batch));
                    }
                    Op::SetAllowance { plan, key, period_start, allowance, day } => {
                        prop_assert_eq!(
                            db.set_allowance(&plan, &key, period_start, allowance, day),
                            oracle.set_allowance(&plan, &key, period_start, allowance, day)
                        );
                    }
                    Op::History { plan, key, first, last } => {
                        prop_assert_eq!(
                            db.history(&plan, key.as_deref(), first, last),
                            oracle.history(&plan, key.as_deref(), first, last)
                        );
                    }
                    Op::LoadPeriods => {
                        prop_assert_eq!(db.load_periods(), oracle.load_periods());
                    }
                    Op::Restart => {
                        drop(db);
                        db = StateDb::open(&dir.0).expect("reopen");
                    }
                }
            }
            drop(db);
            let db = StateDb::open(&dir.0).expect("reopen");
            prop_assert_eq!(db.load_periods(), oracle.load_periods());
            for plan in ["p", "pp", "q"] {
                prop_assert_eq!(
                    db.history(plan, None, 0, u32::MAX),
                    oracle.history(plan, None, 0, u32::MAX)
                );
            }
        }
    }

    fn sample_model() -> Model {
        Model::demo(
            "http://127.0.0.1:9000",
            "demo-key-0123456789abcdef",
            10.0,
            20,
            1000,
        )
        .api(
            RestApi::proxy("shop", "http://127.0.0.1:9001")
                .stage(Stage::new("prod").throttle("*/*", 50.0, 100))
                .stage(Stage::new("beta").variable("backend", "10.0.0.1")),
        )
        .plan(
            UsagePlan::new("gold", "Gold")
                .stage("shop", "prod")
                .throttle(100.0, 200)
                .quota(100_000, QuotaPeriod::Month)
                .method_throttle("shop", "prod", "/{proxy+}/ANY", 5.0, 10),
        )
        .plan(UsagePlan::new("bronze", "Bronze").stage("shop", "beta"))
        .key(ApiKey::new("k1", "value-of-k1-0123456789").named("one"))
        .key(ApiKey::new("k2", "value-of-k2-0123456789"))
        .key(ApiKey::new("k3", "value-of-k3-0123456789").enabled(false))
        .key(ApiKey::new("k4", "value-of-k4-0123456789"))
        .plan_key("gold", "k1")
        .plan_key("gold", "k2")
        .plan_key("bronze", "k3")
        .account_throttle(500.0, 250)
    }

    fn reopened(dir: &TempDir, db: StateDb) -> StateDb {
        drop(db);
        StateDb::open(&dir.0).expect("reopen")
    }

    #[test]
    fn config_round_trips_and_saves_only_differences() {
        let dir = TempDir::new("config");
        let db = StateDb::open(&dir.0).expect("open");
        assert_eq!(db.path(), dir.0.join(FILE_NAME));
        assert_eq!(db.load_model().expect("load"), None);

        let m1 = sample_model();
        m1.validate().expect("sample model is valid");
        let stats = db.save(None, &m1).expect("save");
        assert_eq!(stats.written, 1 + 2 + 5 + 3 + 4);
        let db = reopened(&dir, db);
        assert_eq!(db.load_model().expect("load"), Some(m1.clone()));

        // Change one key, delete another (which leaves its plan), add a plan key.
        let mut m2 = m1.clone();
        m2.api_keys[1].enabled = false;
        m2.delete_api_key("k3").expect("delete k3");
        m2.create_usage_plan_key("gold", "k4")
            .expect("add k4 to gold");
        let stats = db.save(Some(&m1), &m2).expect("save");
        assert_eq!(
            stats,
            SaveStats {
                written: 2,
                deleted: 2
            }
        );
        let db = reopened(&dir, db);
        assert_eq!(db.load_model().expect("load"), Some(m2.clone()));

        // Saving what is stored writes nothing.
        assert_eq!(db.save(Some(&m2), &m2).expect("save"), SaveStats::default());
        db.save_model(Some(&m2), &m2).expect("save");
        assert_eq!(db.load_model().expect("load"), Some(m2.clone()));

        // A top-level field outside the collections lands in the meta row alone.
        let m3 = m2.clone().account_throttle(1.0, 1);
        assert_eq!(
            db.save(Some(&m2), &m3).expect("save"),
            SaveStats {
                written: 1,
                deleted: 0
            }
        );
        let db = reopened(&dir, db);
        assert_eq!(db.load_model().expect("load"), Some(m3));
    }

    #[test]
    fn order_is_kept_through_inserts_and_moves() {
        let dir = TempDir::new("order");
        let db = StateDb::open(&dir.0).expect("open");
        let m1 = sample_model();
        db.save_model(None, &m1).expect("save");

        // Inserting at the front and in the middle writes only the new rows.
        let mut m2 = m1.clone();
        m2.api_keys
            .insert(0, ApiKey::new("k0", "value-of-k0-0123456789"));
        m2.api_keys
            .insert(2, ApiKey::new("k1b", "value-of-k1b-012345678"));
        assert_eq!(
            db.save(Some(&m1), &m2).expect("save"),
            SaveStats {
                written: 2,
                deleted: 0
            }
        );
        let db = reopened(&dir, db);
        assert_eq!(db.load_model().expect("load"), Some(m2.clone()));

        // Many inserts into one gap eventually renumber the collection, still in order.
        let mut prev = m2.clone();
        for n in 0..40 {
            let mut next = prev.clone();
            next.api_keys.insert(
                1,
                ApiKey::new(format!("x{n}"), format!("value-of-x{n}-0123456789")),
            );
            db.save_model(Some(&prev), &next).expect("save");
            prev = next;
        }
        let db = reopened(&dir, db);
        assert_eq!(db.load_model().expect("load"), Some(prev.clone()));

        // Swapping two kept entries renumbers the collection.
        let mut m3 = prev.clone();
        m3.usage_plans.swap(0, 2);
        db.save_model(Some(&prev), &m3).expect("save");
        let db = reopened(&dir, db);
        assert_eq!(db.load_model().expect("load"), Some(m3));
    }

    #[test]
    fn old_model_is_ignored_when_nothing_was_saved() {
        let dir = TempDir::new("fresh");
        let db = StateDb::open(&dir.0).expect("open");
        let m = sample_model();
        db.save_model(Some(&m), &m).expect("save");
        let db = reopened(&dir, db);
        assert_eq!(db.load_model().expect("load"), Some(m));
    }

    #[test]
    fn duplicate_ids_are_refused_and_write_nothing() {
        let dir = TempDir::new("dup");
        let db = StateDb::open(&dir.0).expect("open");
        let m = sample_model();
        let dup = m.clone().key(ApiKey::new("k1", "another-value-0123456789"));
        let err = db.save_model(None, &dup).expect_err("duplicate id");
        assert!(
            matches!(&err, StateError::DuplicateId { table: "api_keys", id, .. } if id == "k1"),
            "{err}"
        );
        assert_eq!(db.load_model().expect("load"), None);
    }

    #[test]
    fn second_open_is_refused_while_the_first_is_open() {
        let dir = TempDir::new("lock");
        let first = StateDb::open(&dir.0).expect("open");
        let err = StateDb::open(&dir.0).expect_err("second open must fail");
        assert!(matches!(err, StateError::InUse { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("in use by another gateway process") && message.contains(FILE_NAME),
            "{message}"
        );
        // A clone shares the open database; only dropping every handle releases it.
        let clone = first.clone();
        drop(first);
        assert!(matches!(
            StateDb::open(&dir.0),
            Err(StateError::InUse { .. })
        ));
        drop(clone);
        StateDb::open(&dir.0).expect("open after the first closed");
    }

    /// Writes into the database file behind the store's back, as a disk fault or a foreign tool
    /// would.
    fn tamper(path: &Path, write: impl FnOnce(&WriteTransaction)) {
        let raw = Database::create(path).expect("open raw");
        let txn = raw.begin_write().expect("write");
        write(&txn);
        txn.commit().expect("commit");
    }

    #[test]
    fn corrupt_rows_are_reported_with_table_and_id() {
        type Tamper = Box<dyn FnOnce(&WriteTransaction)>;
        let other_key =
            serde_json::to_string(&ApiKey::new("zz", "value-of-zz-0123456789")).expect("encode");
        let cases: Vec<(Tamper, &str, &str)> = vec![
            (
                Box::new(|txn| {
                    let mut t = txn.open_table(API_KEYS).expect("table");
                    t.insert("k2", (5, "{not json")).expect("insert");
                }),
                "api_keys",
                "k2",
            ),
            (
                Box::new(move |txn| {
                    let mut t = txn.open_table(API_KEYS).expect("table");
                    t.insert("k2", (5, other_key.as_str())).expect("insert");
                }),
                "api_keys",
                "k2",
            ),
            (
                Box::new(|txn| {
                    let mut t = txn.open_table(USAGE_PLAN_KEYS).expect("table");
                    t.insert(("gold", "k1"), (5, "{}")).expect("insert");
                }),
                "usage_plan_keys",
                "(gold, k1)",
            ),
            (
                Box::new(|txn| {
                    let mut t = txn.open_table(META).expect("table");
                    t.insert(MODEL_ROW, r#"{"account": 7}"#).expect("insert");
                }),
                "meta",
                "model",
            ),
        ];
        let dir = TempDir::new("corrupt");
        for (write, table, id) in cases {
            // A full save repairs whatever the previous case broke.
            let db = StateDb::open(&dir.0).expect("open");
            db.save_model(None, &sample_model()).expect("save");
            let path = db.path().to_path_buf();
            drop(db);
            tamper(&path, write);

            let db = StateDb::open(&dir.0).expect("open");
            let err = db.load_model().expect_err("corrupt row");
            match &err {
                StateError::Corrupt {
                    table: t, id: i, ..
                } => assert_eq!((*t, i.as_str()), (table, id)),
                other => panic!("{table} {id}: {other:?}"),
            }
            let message = err.to_string();
            assert!(message.contains(table) && message.contains(id), "{message}");
        }
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = TempDir::new("schema");
        let path = StateDb::open(&dir.0).expect("open").path().to_path_buf();
        tamper(&path, |txn| {
            let mut t = txn.open_table(META).expect("table");
            t.insert(SCHEMA_VERSION_ROW, "99").expect("insert");
        });
        let err = StateDb::open(&dir.0).expect_err("newer schema");
        assert!(
            matches!(&err, StateError::SchemaVersion { found, .. } if found == "99"),
            "{err:?}"
        );
    }

    #[test]
    fn one_entry_changes_touch_one_row() {
        let keys: Vec<ApiKey> = (0..1000)
            .map(|n| ApiKey::new(format!("k{n}"), format!("value-of-k{n}-0123456789")))
            .collect();
        // Stored as a fresh save numbers them: k{n} has seq (n + 1) * SEQ_GAP.
        let reads = std::cell::Cell::new(0);
        let stored = |k: &ApiKey| {
            reads.set(reads.get() + 1);
            Ok(k.id[1..].parse::<u64>().ok().map(|n| (n + 1) * SEQ_GAP))
        };
        let plan = |new: &[ApiKey]| {
            reads.set(0);
            let changes = match plan_changes(Some(&keys), new, stored).expect("plan") {
                Changes::Incremental { deletes, puts } => {
                    let deletes: Vec<String> = deletes.iter().map(|k| k.id.clone()).collect();
                    let puts: Vec<(String, u64)> =
                        puts.iter().map(|(k, seq)| (k.id.clone(), *seq)).collect();
                    Some((deletes, puts))
                }
                Changes::Rewrite => None,
            };
            (changes, reads.get())
        };

        let mut changed = keys.clone();
        changed[500].enabled = false;
        let put = vec![("k500".to_string(), 501 * SEQ_GAP)];
        assert_eq!(plan(&changed), (Some((vec![], put)), 1));

        let mut inserted = keys.clone();
        inserted.insert(500, ApiKey::new("new", "value-of-new-0123456789"));
        let put = vec![("new".to_string(), 500 * SEQ_GAP + SEQ_GAP / 2)];
        assert_eq!(plan(&inserted), (Some((vec![], put)), 2));

        let mut appended = keys.clone();
        appended.push(ApiKey::new("new", "value-of-new-0123456789"));
        let put = vec![("new".to_string(), 1001 * SEQ_GAP)];
        assert_eq!(plan(&appended), (Some((vec![], put)), 1));

        let mut removed = keys.clone();
        removed.remove(10);
        assert_eq!(plan(&removed), (Some((vec!["k10".to_string()], vec![])), 0));

        let mut swapped = keys.clone();
        swapped.swap(1, 2);
        assert_eq!(plan(&swapped), (None, 0));

        // At the ends: no neighbour on one side.
        let mut first = keys.clone();
        first[0].enabled = false;
        let put = vec![("k0".to_string(), SEQ_GAP)];
        assert_eq!(plan(&first), (Some((vec![], put)), 1));

        let mut last = keys.clone();
        last[999].enabled = false;
        let put = vec![("k999".to_string(), 1000 * SEQ_GAP)];
        assert_eq!(plan(&last), (Some((vec![], put)), 1));

        let mut prepended = keys.clone();
        prepended.insert(0, ApiKey::new("new", "value-of-new-0123456789"));
        let put = vec![("new".to_string(), SEQ_GAP / 2)];
        assert_eq!(plan(&prepended), (Some((vec![], put)), 1));

        let mut shrunk = keys.clone();
        shrunk.remove(999);
        shrunk.remove(0);
        let gone = vec!["k0".to_string(), "k999".to_string()];
        assert_eq!(plan(&shrunk), (Some((gone, vec![])), 0));

        // Two changes far apart: everything between them is compared, nothing else changes.
        let mut two = keys.clone();
        two[100].enabled = false;
        two[900].enabled = false;
        let puts = vec![
            ("k100".to_string(), 101 * SEQ_GAP),
            ("k900".to_string(), 901 * SEQ_GAP),
        ];
        assert_eq!(plan(&two), (Some((vec![], puts)), 2));
        assert_eq!(plan(&keys), (Some((vec![], vec![])), 0));

        // An old list that repeats an id (not something this store wrote) is rewritten, even
        // when the repeat sits in the part that did not change.
        let a = ApiKey::new("a", "value-of-a-0123456789");
        let x = ApiKey::new("x", "value-of-x-0123456789");
        let old = [a.clone(), x.clone(), a.clone()];
        let new = [a, x];
        let planned = plan_changes(Some(&old), &new, |_| Ok(Some(SEQ_GAP))).expect("plan");
        assert_eq!(planned, Changes::Rewrite);
    }

    #[test]
    fn meta_row_leaves_out_the_collections() {
        let m = sample_model();
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&ModelMeta(&m)).expect("encode"))
                .expect("parse");
        for field in COLLECTION_FIELDS {
            assert_eq!(json[field], serde_json::json!([]), "{field}");
        }
        assert_eq!(json["account"]["throttleSettings"]["rateLimit"], 500.0);
    }

    #[test]
    fn errors_cross_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<StateError>();
        send_sync::<StateDb>();
    }
}
