//! The live configuration: one writer at a time changes the [`Model`], the change is made
//! durable, then published to the engine (and from there to the data plane and the XDP sync).
//!
//! Invariants:
//! - [`Control::model`] is the configuration as written: what the admin API shows and what the
//!   stores hold. Readers take it without locking.
//! - The engine runs [`scale`]`(model, nodes)`: the same configuration with every throttle
//!   divided by the number of live gateways sharing the store (1 without a shared store, so
//!   then the engine runs the model itself). Quotas are not divided; they are shared counters.
//! - A change is validated as a whole, persisted, and only then applied; if any step fails the
//!   engine keeps the previous snapshot and nothing was written (the admin API answers with the
//!   error). So an answer of 2xx means the change survives a restart.
//! - Writers are serialised by one mutex; a change costs a model clone, a diff write and a
//!   recompile, so it is O(configuration size). Admin changes are rare next to requests, and
//!   so are changes of the node count.

use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

use crate::{
    engine::{Engine, EngineError},
    plan::{MethodSetting, Model, ModelError, ThrottleSettings},
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
    /// The configuration as written (unscaled).
    model: ArcSwap<Model>,
    /// Live gateways the throttles are divided by (at least 1); changed under this lock.
    writer: Mutex<u32>,
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
    /// The engine's current model is taken as the written configuration (one node).
    pub fn new(engine: Arc<Engine>, store: Option<Arc<dyn ConfigStore>>) -> Control {
        Control {
            model: ArcSwap::new(engine.snapshot()),
            engine,
            store,
            writer: Mutex::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, u32> {
        // The guarded count is one integer, always consistent.
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The engine the configuration is published to.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The current configuration, as written (throttles not divided by the node count).
    pub fn model(&self) -> Arc<Model> {
        self.model.load_full()
    }

    /// Live gateways the engine's throttles are currently divided by (1 without a fleet).
    pub fn nodes(&self) -> u32 {
        *self.lock()
    }

    /// Current time of the engine's clock, Unix seconds (for `createdDate` and friends).
    pub fn now_secs(&self) -> i64 {
        i64::try_from(self.engine.now() / 1_000_000_000).unwrap_or(i64::MAX)
    }

    /// Runs `model` scaled for `nodes` in the engine, then makes it the current configuration;
    /// `validated` when the caller has just run [`Model::validate`] on it.
    fn publish(&self, model: Model, nodes: u32, validated: bool) -> Result<(), ControlError> {
        // One copy of the configuration, shared by the engine and the admin API.
        let model = Arc::new(model);
        if validated {
            self.engine.apply_validated(model.clone(), nodes)?;
        } else {
            self.engine.apply_shared(model.clone(), nodes)?;
        }
        self.model.store(model);
        Ok(())
    }

    /// Applies `change` to a copy of the configuration; when it succeeds and the result is
    /// valid, persists and publishes it. Blocking (it waits for the disk).
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Model) -> Result<T, ModelError>,
    ) -> Result<T, ControlError> {
        let out = self.update_locked(change);
        // The copy, the old snapshot and the old tables are gone by now, whatever happened.
        release_freed_memory();
        out
    }

    fn update_locked<T>(
        &self,
        change: impl FnOnce(&mut Model) -> Result<T, ModelError>,
    ) -> Result<T, ControlError> {
        let nodes = self.lock();
        if let Some(store) = &self.store
            && let Some(latest) = store.changed(&self.model.load())?
        {
            self.publish(latest, *nodes, false)?;
        }
        let old = self.model.load_full();
        let mut new = Model::clone(&old);
        let out = change(&mut new)?;
        if new == *old {
            return Ok(out);
        }
        new.validate()?;
        if let Some(store) = &self.store {
            store.save(&old, &new)?;
        }
        self.publish(new, *nodes, true)?;
        Ok(out)
    }

    /// Applies the stored configuration when another writer changed it (fleet mode); returns
    /// whether it did. Serialised with [`Control::update`].
    pub fn refresh(&self) -> Result<bool, ControlError> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        let nodes = self.lock();
        match store.changed(&self.model.load())? {
            Some(latest) => {
                self.publish(latest, *nodes, false)?;
                drop(nodes);
                release_freed_memory();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Divides the engine's throttles by `nodes` live gateways (0 counts as 1) from now on;
    /// returns whether the count changed. Buckets and counters carry over the swap.
    pub fn set_nodes(&self, nodes: u32) -> Result<bool, ControlError> {
        let nodes = nodes.max(1);
        let mut current = self.lock();
        if *current == nodes {
            return Ok(false);
        }
        self.engine.apply_validated(self.model.load_full(), nodes)?;
        *current = nodes;
        drop(current);
        release_freed_memory();
        Ok(true)
    }
}

/// `model` with every throttle shared out over `nodes` gateways: plan and plan per-method
/// throttles, stage method settings and the account throttle get `rate / nodes` requests per
/// second and a burst of `ceil(burst / nodes)` (at least 1 when it was positive). Zero stays
/// zero (it blocks), `-1` ("no throttling" in stage settings) and unset members stay as they
/// are, and quotas are untouched. `nodes` 0 or 1 returns the model unchanged.
pub fn scale(model: &Model, nodes: u32) -> Model {
    let mut out = model.clone();
    if nodes <= 1 {
        return out;
    }
    let n = f64::from(nodes);
    let rate = |r: f64| if r > 0.0 { r / n } else { r };
    let burst = |b: i64| {
        if b > 0 {
            (b - 1) / i64::from(nodes) + 1
        } else {
            b
        }
    };
    let throttle = |t: &mut ThrottleSettings| {
        t.rate_limit = t.rate_limit.map(rate);
        t.burst_limit = t.burst_limit.map(burst);
    };
    throttle(&mut out.account.throttle_settings);
    for plan in &mut out.usage_plans {
        if let Some(t) = &mut plan.throttle {
            throttle(t);
        }
        for stage in &mut plan.api_stages {
            stage.throttle.values_mut().for_each(throttle);
        }
    }
    let setting = |m: &mut MethodSetting| {
        m.throttling_rate_limit = rate(m.throttling_rate_limit);
        m.throttling_burst_limit = burst(m.throttling_burst_limit);
    };
    for api in &mut out.rest_apis {
        for stage in &mut api.stages {
            stage.method_settings.values_mut().for_each(setting);
        }
    }
    out
}

/// Hands freed heap pages back to the system. Reading, validating, storing and compiling a
/// large configuration peaks at several times its resident size, and glibc keeps freed pages
/// mapped: without this the gateway's RSS would stay at the last change's peak.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; no allocation moves.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;
    use crate::plan::{QuotaPeriod, RestApi, Stage, UsagePlan};
    use crate::store::MemoryStore;

    const KEY: &str = "demo-key-0123456789abcdef";

    fn model() -> Model {
        Model::demo("http://127.0.0.1:9000", KEY, 30.0, 30, 1_000_000)
            .api(
                RestApi::proxy("shop", "http://127.0.0.1:9001").stage(
                    Stage::new("prod").throttle("*/*", 100.0, 50).throttle(
                        "/{proxy+}/GET",
                        -1.0,
                        -1,
                    ),
                ),
            )
            .plan(
                UsagePlan::new("gold", "Gold")
                    .method_throttle("shop", "prod", "/{proxy+}/GET", 10.0, 5)
                    .quota(100, QuotaPeriod::Day),
            )
            .plan(UsagePlan::new("shut", "Shut").throttle(0.0, 0))
            .account_throttle(500.0, 250)
    }

    #[test]
    fn scale_divides_every_throttle_and_no_quota() {
        let m = model();
        assert_eq!(scale(&m, 0), m);
        assert_eq!(scale(&m, 1), m);
        let s = scale(&m, 3);
        assert_eq!(
            s.account.throttle_settings,
            ThrottleSettings::new(500.0 / 3.0, 84)
        );
        let plan = |id: &str| s.usage_plans.iter().find(|p| p.id == id).expect(id);
        assert_eq!(
            plan("silver").throttle,
            Some(ThrottleSettings::new(10.0, 10))
        );
        assert_eq!(plan("silver").quota, m.usage_plans[0].quota);
        assert_eq!(
            plan("gold").api_stages[0].throttle["/{proxy+}/GET"],
            ThrottleSettings::new(10.0 / 3.0, 2)
        );
        assert_eq!(plan("gold").quota, m.usage_plans[1].quota);
        // Zero blocks on every node; -1 is "no throttling" and stays so.
        assert_eq!(plan("shut").throttle, Some(ThrottleSettings::new(0.0, 0)));
        let settings = &s.rest_apis[1].stages[0].method_settings;
        assert_eq!(settings["*/*"].throttling_rate_limit, 100.0 / 3.0);
        assert_eq!(settings["*/*"].throttling_burst_limit, 17);
        assert_eq!(settings["/{proxy+}/GET"].throttling_rate_limit, -1.0);
        assert_eq!(settings["/{proxy+}/GET"].throttling_burst_limit, -1);
        // A burst smaller than the node count still admits one request per node.
        assert_eq!(
            scale(&m, 400).account.throttle_settings.burst_limit,
            Some(1)
        );
        // A rate without a burst keeps its default burst rule, on the divided rate.
        let only_rate = ThrottleSettings {
            rate_limit: Some(9.0),
            burst_limit: None,
        };
        let mut m2 = m.clone();
        m2.account.throttle_settings = only_rate;
        assert_eq!(
            scale(&m2, 3).account.throttle_settings.effective(),
            Some((3.0, 3))
        );
        scale(&m, 7).validate().expect("a scaled model stays valid");
    }

    fn admitted(control: &Control) -> usize {
        let engine = control.engine();
        let route = engine
            .resolve(Some("demo"), "prod", "GET", "/x")
            .expect("route");
        (0..100)
            .take_while(|_| engine.decide(&route, Some(KEY)).is_allowed())
            .count()
    }

    #[test]
    fn the_engine_runs_the_share_and_readers_see_the_written_model() {
        let clock = Arc::new(FakeClock::new(1_700_000_000_000_000_000));
        let engine =
            Engine::new(model(), Arc::new(MemoryStore::new()), clock.clone()).expect("valid model");
        let control = Control::new(Arc::new(engine), None);
        assert_eq!(control.nodes(), 1);
        assert!(control.set_nodes(3).expect("apply"));
        assert!(!control.set_nodes(3).expect("same count"));
        assert_eq!(*control.model(), model());
        assert!(
            Arc::ptr_eq(&control.engine().snapshot(), &control.model()),
            "the engine and the admin API share one copy of the configuration"
        );
        // Silver's burst of 30 is 10 on this node.
        assert_eq!(admitted(&control), 10);

        // A change is made to the written model and runs scaled.
        control
            .update(|m| {
                m.account.throttle_settings = ThrottleSettings::new(600.0, 300);
                Ok(())
            })
            .expect("update");
        assert_eq!(
            control.model().account.throttle_settings,
            ThrottleSettings::new(600.0, 300)
        );
        assert!(Arc::ptr_eq(&control.engine().snapshot(), &control.model()));
        // Still a third of Silver's burst once the bucket refilled.
        clock.advance(10_000_000_000);
        assert_eq!(admitted(&control), 10);

        // Back to one node once the bucket refilled: the whole burst.
        clock.advance(10_000_000_000);
        assert!(control.set_nodes(0).expect("apply"));
        assert_eq!(control.nodes(), 1);
        assert!(Arc::ptr_eq(&control.engine().snapshot(), &control.model()));
        assert_eq!(admitted(&control), 30);
    }
}
