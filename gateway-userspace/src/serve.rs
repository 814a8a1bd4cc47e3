//! `gateway serve`: binds the listeners, starts the data plane, the admin API and the
//! optional XDP program, and tears everything down in order on SIGTERM or Ctrl-C.
//!
//! Start-up contract other tools rely on: once both listeners are bound, stdout gets
//! `listening data=IP:PORT` and `listening admin=IP:PORT`, one line each, flushed.

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::Uri;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    admin,
    clock::SystemClock,
    control::Control,
    demo,
    engine::Engine,
    fastpath::{FastPath, FastPathConfig},
    metrics::Metrics,
    plan::{Method, Model, RestApi, Stage},
    proxy::{Limits, Proxy, ProxyConfig},
    state::StateDb,
    xdp::{XdpMode, XdpProgram},
};

/// Everything `gateway serve` needs, validated.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Data-plane listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Admin API listen address (port 0 picks a free port).
    pub admin_listen: SocketAddr,
    /// SigV4 credentials the admin API requires; `None` accepts unsigned requests.
    pub admin_credentials: Option<crate::sigv4::Credentials>,
    /// Directory for persistent state.
    pub state_dir: PathBuf,
    /// Where the APIs, plans and keys come from.
    pub model: ModelSource,
    /// Interface to attach the XDP program to, if any.
    pub xdp_iface: Option<String>,
    /// XDP attach mode.
    pub xdp_mode: XdpMode,
    /// Kernel map sizes and fast-path policy (used with `xdp_iface`).
    pub xdp: XdpConfig,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub drain_timeout: Duration,
    /// Longest wait for an upstream response head (`--upstream` mode).
    pub integration_timeout: Duration,
    /// Data-plane resource limits.
    pub limits: Limits,
    /// IETF RateLimit headers and Retry-After on.
    pub rate_limit_headers: bool,
    /// Forward `x-api-key` upstream.
    pub forward_api_key: bool,
    /// Certificate authorities trusted for `https` integrations besides the system's.
    pub upstream_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The shared store of a fleet; `None` keeps everything in the embedded store.
    pub store: Option<crate::fleet::FleetOptions>,
}

/// The XDP fast path's sizes and policy.
#[derive(Clone, Debug, Default)]
pub struct XdpConfig {
    /// Kernel map sizes.
    pub options: crate::xdp::XdpOptions,
    /// Flow binding, headroom, shedding and source blocking.
    pub fast_path: FastPathConfig,
    /// Per-source SYN rate limit; `None` turns the guard off.
    pub syn_guard: Option<gateway_common::gcra::GcraParams>,
}

/// Where the gateway's configuration (APIs, stages, plans, keys) comes from.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// The configuration stored in the state directory (empty at first start), changed
    /// through the admin API.
    Stored,
    /// The built-in demo: a demo upstream, API `demo`, stage `prod`, plan `silver`, and
    /// the demo key. Replaces the stored configuration.
    Demo,
    /// One open API (no key required) forwarding every path of `stage` to `upstream`.
    /// Replaces the stored configuration.
    Upstream { upstream: Uri, stage: String },
    /// A JSON file holding a `plan::Model` (AWS member names). Replaces the stored
    /// configuration.
    File(PathBuf),
}

/// Why `gateway serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    // The io error is part of the message, not a `source`, so it is printed once.
    #[error("cannot bind the {which} listener on {addr}: {reason}")]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        reason: std::io::Error,
    },
    #[error("cannot create the state directory {path}: {reason}")]
    StateDir {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("cannot start the demo upstream: {0}")]
    Demo(std::io::Error),
    #[error(transparent)]
    Xdp(#[from] crate::xdp::XdpError),
    #[error("cannot read the configuration {path}: {reason}")]
    ConfigFile { path: PathBuf, reason: String },
    #[error("the configuration is not valid: {0}")]
    Model(#[from] crate::plan::ModelError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
}

/// Requests per second, burst and daily quota of the demo's plan.
const DEMO_PLAN: (f64, i64, i64) = (10.0, 20, 1000);

/// Runs the gateway until `shutdown` resolves.
pub async fn run(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&config.state_dir).map_err(|reason| ServeError::StateDir {
        path: config.state_dir.clone(),
        reason,
    })?;
    // The state first: a second gateway on the same directory is refused with that reason,
    // whatever its ports.
    let db = Backend::open(&config)?;
    let data = bind("data", config.listen).await?;
    let admin_listener = bind("admin", config.admin_listen).await?;
    let data_addr = data.local_addr().map_err(|reason| ServeError::Bind {
        which: "data",
        addr: config.listen,
        reason,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|reason| ServeError::Bind {
            which: "admin",
            addr: config.admin_listen,
            reason,
        })?;

    let stored = db.load_model()?;
    // Validated once here (before it is stored), not again by the engine.
    let model = match load_model(&config).await? {
        Some(model) => {
            model.validate()?;
            db.save_model(stored.as_ref(), &model)?;
            model
        }
        None => {
            let model = stored.unwrap_or_default();
            model.validate()?;
            model
        }
    };
    tracing::info!(
        state = %db.describe(),
        rest_apis = model.rest_apis.len(),
        api_keys = model.api_keys.len(),
        usage_plans = model.usage_plans.len(),
        "configuration loaded"
    );
    let engine = Arc::new(Engine::new_validated(
        model,
        db.usage(),
        Arc::new(SystemClock),
    )?);
    let control = Arc::new(Control::new(engine.clone(), Some(db.config())));
    crate::control::release_freed_memory();
    // Other nodes' changes reach this one until the watcher is dropped at the end of `run`.
    let _watcher = db.watch(&control);
    let store_health = db.health();

    let mut metrics = Metrics::new();
    if let Some(health) = &store_health {
        metrics.register_collector(Box::new(crate::fleet::HealthMetrics(health.clone())));
    }
    let metrics = Arc::new(metrics);
    let xdp = match &config.xdp_iface {
        Some(iface) => {
            let program = XdpProgram::attach_with(
                iface,
                config.xdp_mode,
                &[data_addr.port()],
                config.xdp.options,
            )?;
            program.maps().set_syn_guard(config.xdp.syn_guard)?;
            Some(Arc::new(Mutex::new(program)))
        }
        None => None,
    };
    let fast_path = xdp.as_ref().map(|xdp| {
        let program = xdp.lock().expect("the XDP lock is never poisoned");
        Arc::new(FastPath::new(
            program.kernel_maps(),
            config.xdp.fast_path.clone(),
        ))
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let proxy = Arc::new(
        Proxy::new(
            ProxyConfig {
                limits: config.limits.clone(),
                rate_limit_headers: config.rate_limit_headers,
                forward_api_key: config.forward_api_key,
                upstream_ca: config.upstream_ca.clone(),
            },
            engine.clone(),
            metrics.clone(),
        )
        .with_store_health(store_health)
        .with_fast_path(fast_path.clone()),
    );
    let flusher = tokio::spawn(flush_usage(engine.clone()));
    let data_task = tokio::spawn(proxy.serve(data, stopped(stop_rx.clone()), config.drain_timeout));
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(admin::Ctx {
            control,
            metrics: metrics.clone(),
            credentials: config.admin_credentials.clone(),
        }),
        stopped(stop_rx.clone()),
    ));
    let poller = xdp
        .clone()
        .map(|xdp| tokio::spawn(poll_xdp(xdp, metrics.clone())));
    let syncer = fast_path.clone().map(|fast_path| {
        tokio::spawn(sync_fast_path(
            fast_path,
            engine.clone(),
            config.xdp.options.key_slots,
            metrics.clone(),
        ))
    });

    announce(data_addr, admin_addr);
    tracing::info!(%data_addr, %admin_addr, "gateway started");

    shutdown.await;
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    let _ = stop_tx.send(true);
    let _ = data_task.await;
    let _ = admin_task.await;
    flusher.abort();
    if let Err(error) = engine.flush() {
        tracing::error!(%error, "final usage flush failed");
    }
    if let Some(poller) = poller {
        poller.abort();
    }
    if let Some(syncer) = syncer {
        syncer.abort();
    }
    if let Some(xdp) = xdp {
        let mut program = xdp.lock().expect("the XDP lock is never poisoned");
        if let Ok(counters) = program.counters() {
            metrics.set_xdp_counters(&counters);
            log_counters(&counters);
        }
        program.detach();
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// The model a start-up source imposes, or `None` to serve the stored configuration.
async fn load_model(config: &ServeConfig) -> Result<Option<Model>, ServeError> {
    let model = match &config.model {
        ModelSource::Stored => return Ok(None),
        ModelSource::Demo => {
            let addr = demo::spawn_upstream().await.map_err(ServeError::Demo)?;
            let (rate, burst, quota) = DEMO_PLAN;
            println!(
                "demo upstream={addr} key={} api=demo stage=prod plan=silver \
                 rate={rate}/s burst={burst} quota={quota}/day",
                demo::DEMO_KEY
            );
            Model::demo(
                &format!("http://{addr}"),
                demo::DEMO_KEY,
                rate,
                burst,
                quota,
            )
        }
        ModelSource::Upstream { upstream, stage } => {
            let base = upstream.to_string();
            let base = base.trim_end_matches('/');
            let timeout = u32::try_from(config.integration_timeout.as_millis()).unwrap_or(29_000);
            Model::new().api(
                RestApi::new("default", "default")
                    .method(
                        "/",
                        "ANY",
                        Method::http_proxy(format!("{base}/")).timeout_ms(timeout),
                    )
                    .method(
                        "/{proxy+}",
                        "ANY",
                        Method::http_proxy(format!("{base}/{{proxy}}")).timeout_ms(timeout),
                    )
                    .stage(Stage::new(stage.as_str())),
            )
        }
        ModelSource::File(path) => {
            let bad = |reason: String| ServeError::ConfigFile {
                path: path.clone(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            // A misspelt member would otherwise be dropped without a word and the file would
            // replace the stored configuration without it (a `throtle` loses the throttle).
            let mut unknown = Vec::new();
            let model = serde_ignored::deserialize(
                &mut serde_json::Deserializer::from_str(&text),
                |path| unknown.push(path.to_string()),
            )
            .map_err(|e| bad(e.to_string()))?;
            if !unknown.is_empty() {
                return Err(bad(format!(
                    "unknown member(s) {}: check the spelling (members use AWS's names, e.g. \
                     restApis, usagePlans, apiKeys, usagePlanKeys)",
                    unknown.join(", ")
                )));
            }
            model
        }
    };
    Ok(Some(model))
}

/// Writes admitted-request counts to the usage store once a second.
async fn flush_usage(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        // A flush waits for the disk: keep it off the async workers.
        let engine = engine.clone();
        match tokio::task::spawn_blocking(move || engine.flush()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "usage flush failed; counts are kept for the next one")
            }
            Err(error) => tracing::error!(%error, "usage flush task failed"),
        }
    }
}

async fn bind(which: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|reason| ServeError::Bind {
            which,
            addr,
            reason,
        })
}

fn announce(data: SocketAddr, admin: SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening data={data}");
    let _ = writeln!(out, "listening admin={admin}");
    let _ = out.flush();
}

/// Keeps the kernel's key buckets in line with the configuration: at once after a change
/// (checked every 250 ms), once a second while shed marks wait to expire, and once a minute
/// to retry failed writes. Keys whose slot is
/// beyond the kernel's `key_slots` are limited by the proxy only.
async fn sync_fast_path(
    fast_path: Arc<FastPath>,
    engine: Arc<Engine>,
    key_slots: u32,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut synced_generation = 0;
    let mut last_sync = tokio::time::Instant::now();
    let mut warned = false;
    loop {
        tick.tick().await;
        metrics.set_xdp_bound_flows(fast_path.bound_flows());
        let generation = engine.generation();
        // Walking every key costs O(keys): only after a change, while a shed mark waits to
        // expire (once a second), and once a minute to retry writes the kernel refused.
        let since = last_sync.elapsed();
        let due = since >= Duration::from_secs(60)
            || (fast_path.has_shed_marks() && since >= Duration::from_secs(1));
        if generation == synced_generation && !due {
            continue;
        }
        let changed = generation != synced_generation;
        let (fast_path, engine) = (fast_path.clone(), engine.clone());
        let synced = tokio::task::spawn_blocking(move || {
            let began = std::time::Instant::now();
            let mut slots = engine.key_slots();
            let before = slots.len();
            slots.retain(|s| s.slot < key_slots);
            let written = fast_path.sync(&slots);
            let took = began.elapsed();
            let beyond = before - slots.len();
            // The walk's temporary tables are the size of the key set: hand them back after a
            // configuration change, not on the once-a-second walks while keys are shed.
            drop(slots);
            if changed {
                crate::control::release_freed_memory();
            }
            (written, beyond, took)
        })
        .await;
        match synced {
            Ok((written, beyond, took)) => {
                metrics.xdp_key_synced(took, written as u64);
                let took_ms = took.as_secs_f64() * 1e3;
                if written > 0 && changed {
                    tracing::info!(written, generation, took_ms, "kernel key buckets synced");
                } else if written > 0 {
                    tracing::debug!(written, generation, took_ms, "kernel key buckets synced");
                }
                if beyond > 0 && !warned {
                    warned = true;
                    tracing::warn!(
                        beyond,
                        key_slots,
                        "more API keys than kernel key slots: those keys are limited by the proxy only (raise --xdp-key-slots)"
                    );
                }
            }
            Err(error) => tracing::error!(%error, "kernel key sync failed"),
        }
        synced_generation = generation;
        last_sync = tokio::time::Instant::now();
    }
}

/// Copies the kernel counters into the metrics every second, and logs them when they
/// changed in the last ten seconds.
async fn poll_xdp(xdp: Arc<Mutex<XdpProgram>>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_logged = [0u64; gateway_common::stats::COUNT as usize];
    let mut ticks = 0u64;
    loop {
        tick.tick().await;
        let counters = xdp
            .lock()
            .expect("the XDP lock is never poisoned")
            .counters();
        match counters {
            Ok(counters) => {
                metrics.set_xdp_counters(&counters);
                ticks += 1;
                if ticks.is_multiple_of(10) && counters != last_logged {
                    log_counters(&counters);
                    last_logged = counters;
                }
            }
            Err(error) => tracing::warn!(%error, "reading XDP counters failed"),
        }
    }
}

fn log_counters(counters: &[u64; gateway_common::stats::COUNT as usize]) {
    let summary = gateway_common::stats::NAMES
        .iter()
        .zip(counters)
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info!(counters = %summary, "XDP counters");
}

/// Where configuration and usage live: the embedded database, or the fleet's shared store.
enum Backend {
    Embedded(StateDb),
    Fleet(Arc<crate::fleet::FleetStore>),
}

impl Backend {
    /// The embedded database in the state directory (refused while another gateway holds it),
    /// or, with `--store`, the shared store (the state directory then stays empty).
    fn open(config: &ServeConfig) -> Result<Backend, ServeError> {
        Ok(match &config.store {
            None => Backend::Embedded(StateDb::open(&config.state_dir)?),
            Some(options) => Backend::Fleet(crate::fleet::FleetStore::open(options.clone())?),
        })
    }

    fn describe(&self) -> String {
        match self {
            Backend::Embedded(db) => db.path().display().to_string(),
            Backend::Fleet(f) => f.name().to_string(),
        }
    }

    fn load_model(&self) -> Result<Option<Model>, ServeError> {
        Ok(match self {
            Backend::Embedded(db) => db.load_model()?,
            Backend::Fleet(f) => f.load_model()?,
        })
    }

    fn save_model(&self, old: Option<&Model>, new: &Model) -> Result<(), ServeError> {
        match self {
            Backend::Embedded(db) => db.save_model(old, new)?,
            Backend::Fleet(f) => f.save_model(old, new)?,
        }
        Ok(())
    }

    fn usage(&self) -> Arc<dyn crate::store::UsageStore> {
        match self {
            Backend::Embedded(db) => Arc::new(db.clone()),
            Backend::Fleet(f) => f.clone(),
        }
    }

    fn config(&self) -> Arc<dyn crate::control::ConfigStore> {
        match self {
            Backend::Embedded(db) => Arc::new(db.clone()),
            Backend::Fleet(f) => f.clone(),
        }
    }

    fn watch(&self, control: &Arc<Control>) -> Option<crate::fleet::Watcher> {
        match self {
            Backend::Embedded(_) => None,
            Backend::Fleet(f) => Some(f.watch(control.clone())),
        }
    }

    fn health(&self) -> Option<Arc<crate::fleet::Health>> {
        match self {
            Backend::Embedded(_) => None,
            Backend::Fleet(f) => Some(f.health().clone()),
        }
    }
}
