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
    let db = StateDb::open(&config.state_dir)?;
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
    let model = match load_model(&config).await? {
        Some(model) => {
            model.validate()?;
            db.save_model(stored.as_ref(), &model)?;
            model
        }
        None => stored.unwrap_or_default(),
    };
    tracing::info!(
        state = %db.path().display(),
        rest_apis = model.rest_apis.len(),
        api_keys = model.api_keys.len(),
        usage_plans = model.usage_plans.len(),
        "configuration loaded"
    );
    let engine = Arc::new(Engine::new(
        model,
        Arc::new(db.clone()),
        Arc::new(SystemClock),
    )?);
    let control = Arc::new(Control::new(engine.clone(), Some(Arc::new(db.clone()))));

    let metrics = Arc::new(Metrics::new());
    let xdp = match &config.xdp_iface {
        Some(iface) => Some(Arc::new(Mutex::new(XdpProgram::attach(
            iface,
            config.xdp_mode,
            &[data_addr.port()],
        )?))),
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let proxy = Arc::new(Proxy::new(
        ProxyConfig {
            limits: config.limits.clone(),
            rate_limit_headers: config.rate_limit_headers,
            forward_api_key: config.forward_api_key,
        },
        engine.clone(),
        metrics.clone(),
    ));
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
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
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
    let [
        data_port_packets,
        other_passed,
        parse_failures,
        fragments_passed,
    ] = *counters;
    tracing::info!(
        data_port_packets,
        other_passed,
        parse_failures,
        fragments_passed,
        "XDP counters"
    );
}
