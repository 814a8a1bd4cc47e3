//! The live configuration: one writer at a time changes the [`Model`], the change is made
//! durable, then published to the engine (and from there to the data plane and the XDP sync).
//!
//! Invariants:
//! - The engine's snapshot is the configuration: readers take [`Control::model`] and never lock.
//! - A change is validated as a whole, persisted, and only then applied; if any step fails the
//!   engine keeps the previous snapshot and nothing was written (the admin API answers with the
//!   error). So an answer of 2xx means the change survives a restart.
//! - Writers are serialised by one mutex; a change costs a model clone, a diff write and a
//!   recompile, so it is O(configuration size). Admin changes are rare next to requests.

use std::sync::{Arc, Mutex};

use crate::{
    engine::{Engine, EngineError},
    plan::{Model, ModelError},
    state::{StateDb, StateError},
};

/// Where configuration changes are made durable.
pub trait ConfigStore: Send + Sync {
    /// Persists `new`, given the previously persisted `old`; returns once it is durable. A
    /// shared store refuses with a `ConflictException` when another node saved in between.
    fn save(&self, old: &Model, new: &Model) -> Result<(), ControlError>;

    /// The stored configuration when another writer changed it since this process last loaded
    /// or saved it (a shared store); `None` when it did not (always, for a private store). A
    /// shared store that lost its data gets `current` written back.
    fn changed(&self, current: &Model) -> Result<Option<Model>, ControlError> {
        let _ = current;
        Ok(None)
    }
}

impl ConfigStore for StateDb {
    fn save(&self, old: &Model, new: &Model) -> Result<(), ControlError> {
        Ok(self.save_model(Some(old), new)?)
    }
}

/// Why a configuration change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The change breaks a rule of the model (a 4xx with AWS's text).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The change could not be made durable (a 5xx; nothing changed).
    #[error("the configuration could not be saved: {0}")]
    Storage(#[from] StateError),
    /// A usage operation failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The single writer of the configuration.
pub struct Control {
    engine: Arc<Engine>,
    store: Option<Arc<dyn ConfigStore>>,
    writer: Mutex<()>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("generation", &self.engine.generation())
            .field("persistent", &self.store.is_some())
            .finish()
    }
}

impl Control {
    /// A control over `engine`'s configuration; `store` `None` keeps changes in memory only.
    pub fn new(engine: Arc<Engine>, store: Option<Arc<dyn ConfigStore>>) -> Control {
        Control {
            engine,
            store,
            writer: Mutex::new(()),
        }
    }

    /// The engine the configuration is published to.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The current configuration.
    pub fn model(&self) -> Arc<Model> {
        self.engine.snapshot()
    }

    /// Current time of the engine's clock, Unix seconds (for `createdDate` and friends).
    pub fn now_secs(&self) -> i64 {
        i64::try_from(self.engine.now() / 1_000_000_000).unwrap_or(i64::MAX)
    }

    /// Applies `change` to a copy of the configuration; when it succeeds and the result is
    /// valid, persists and publishes it. Blocking (it waits for the disk).
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Model) -> Result<T, ModelError>,
    ) -> Result<T, ControlError> {
        let _writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(store) = &self.store
            && let Some(latest) = store.changed(&self.engine.snapshot())?
        {
            self.engine.apply(latest)?;
        }
        let old = self.engine.snapshot();
        let mut new = Model::clone(&old);
        let out = change(&mut new)?;
        if new == *old {
            return Ok(out);
        }
        new.validate()?;
        if let Some(store) = &self.store {
            store.save(&old, &new)?;
        }
        self.engine.apply(new)?;
        Ok(out)
    }

    /// Applies the stored configuration when another writer changed it (fleet mode); returns
    /// whether it did. Serialised with [`Control::update`].
    pub fn refresh(&self) -> Result<bool, ControlError> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        let _writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match store.changed(&self.engine.snapshot())? {
            Some(latest) => {
                self.engine.apply(latest)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
