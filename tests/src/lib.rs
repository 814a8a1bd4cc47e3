//! Test support for the end-to-end tests: the real `gateway` binary as a child process,
//! a real HTTP upstream, network namespaces joined by veth pairs, and privilege checks.
//!
//! Everything created here is torn down by `Drop`, so a failing assertion still removes
//! its namespaces, links and processes.

use std::{
    convert::Infallible,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

/// Path of the `gateway` binary under test: `$GATEWAY_BIN`, else `target/debug/gateway`
/// (cargo builds it for `cargo test` at the workspace root).
pub fn gateway_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("GATEWAY_BIN") {
        return PathBuf::from(path);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests sits inside the workspace")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("debug/gateway")
}

/// Whether privileged tests must run (set by `cargo xtask test`): then a missing
/// privilege is a failure, not a skip.
pub fn privileged_required() -> bool {
    std::env::var_os("GATEWAY_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1")
}

/// `Ok(true)` when the process may create namespaces and attach XDP; `Ok(false)` to skip.
pub fn can_run_privileged(test: &str) -> Result<bool> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && ip {
        return Ok(true);
    }
    if privileged_required() {
        bail!("{test}: needs root and iproute2 (GATEWAY_REQUIRE_PRIVILEGED=1)");
    }
    eprintln!("{test}: skipped (needs root and iproute2)");
    Ok(false)
}

/// A running gateway process, stopped with SIGTERM on drop.
pub struct Gateway {
    child: Child,
    /// Data-plane address from `listening data=`.
    pub data: SocketAddr,
    /// Admin address from `listening admin=`.
    pub admin: SocketAddr,
    /// Lines the gateway printed to stdout before it was ready.
    pub banner: Vec<String>,
    stderr: PathBuf,
    _state: TempDir,
}

impl Gateway {
    /// Starts `gateway serve ARGS` (inside network namespace `netns` if given) with its
    /// own state directory, and waits for both `listening` lines.
    pub fn start(netns: Option<&str>, args: &[&str]) -> Result<Self> {
        let binary = gateway_bin();
        if !binary.is_file() {
            bail!(
                "{} does not exist: build it with `cargo build -p gateway-userspace` \
                 (or run `cargo xtask test`)",
                binary.display()
            );
        }
        let state = TempDir::new("state")?;
        let stderr = state.path.join("stderr.log");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(gateway_bin());
                c
            }
            None => Command::new(gateway_bin()),
        };
        command
            .arg("serve")
            .arg("--state-dir")
            .arg(state.path.join("state"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", gateway_bin().display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut gateway = Self {
            child,
            data: "0.0.0.0:0".parse().expect("valid"),
            admin: "0.0.0.0:0".parse().expect("valid"),
            banner: Vec::new(),
            stderr,
            _state: state,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut data, mut admin) = (None, None);
        while data.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening data=") {
                        data = Some(addr.parse()?);
                    } else if let Some(addr) = line.strip_prefix("listening admin=") {
                        admin = Some(addr.parse()?);
                    }
                    gateway.banner.push(line);
                }
                Err(_) => bail!(
                    "gateway did not print its listening lines; stderr:\n{}",
                    gateway.stderr()
                ),
            }
        }
        gateway.data = data.expect("loop ends when set");
        gateway.admin = admin.expect("loop ends when set");
        Ok(gateway)
    }

    /// What the gateway wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (at most `timeout`) for a clean exit.
    pub fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid fits pid_t")?;
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("gateway did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.stop(Duration::from_secs(10));
        }
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "gateway-test-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A real HTTP/1.1 + h2c upstream on its own thread and runtime. It answers every
/// request with a JSON echo of the method, path, query and selected headers.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Upstream {
    /// Starts on `127.0.0.1:0` in the current network namespace.
    pub fn start() -> Result<Self> {
        Self::start_in(None, "127.0.0.1:0".parse().expect("valid"))
    }

    /// Starts on `bind` inside network namespace `netns` (or the current one).
    pub fn start_in(netns: Option<&str>, bind: SocketAddr) -> Result<Self> {
        let requests = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let counter = requests.clone();
        let netns = netns.map(str::to_owned);
        std::thread::spawn(move || {
            let result = (|| -> Result<(std::net::TcpListener, SocketAddr)> {
                if let Some(ns) = &netns {
                    enter_netns(ns)?;
                }
                let listener = std::net::TcpListener::bind(bind)?;
                listener.set_nonblocking(true)?;
                let addr = listener.local_addr()?;
                Ok((listener, addr))
            })();
            let (listener, addr) = match result {
                Ok(pair) => pair,
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds");
            let _ = ready_tx.send(Ok(addr));
            runtime.block_on(serve_upstream(listener, counter, shutdown_rx));
        });
        let addr = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("upstream thread did not start")??;
        Ok(Self {
            addr,
            requests,
            _shutdown: shutdown_tx,
        })
    }

    /// Requests the upstream has answered.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

async fn serve_upstream(
    listener: std::net::TcpListener,
    requests: Arc<AtomicU64>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("inside a runtime");
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = &mut shutdown => return,
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let requests = requests.clone();
                async move { Ok::<_, Infallible>(echo(req, &requests).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Echoes the request as JSON. Query parameters steer it: `sleep_ms=N` waits N ms
/// before answering; `bytes=N` answers with N bytes of `x` instead of JSON.
async fn echo(req: Request<Incoming>, requests: &AtomicU64) -> Response<Full<Bytes>> {
    requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let param = |name: &str| {
        parts.uri.query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
        })
    };
    if let Some(ms) = param("sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = param("bytes") {
        let size = usize::try_from(n).unwrap_or(0);
        return Response::new(Full::new(Bytes::from(vec![b'x'; size])));
    }
    let body_len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let json = serde_json::json!({
        "upstream": "test",
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "bodyBytes": body_len,
        "xForwardedFor": header("x-forwarded-for"),
        "xApiKey": header("x-api-key"),
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json.to_string())))
        .expect("static headers are valid")
}

/// Moves the calling thread into network namespace `name` (from `ip netns add`).
pub fn enter_netns(name: &str) -> Result<()> {
    let file = std::fs::File::open(format!("/var/run/netns/{name}"))
        .with_context(|| format!("network namespace {name} does not exist"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({name}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two network namespaces, `client` and `gateway`, joined by a veth pair:
/// `client_if` (10.77.N.2/24, fd77:N::2/64) and `gateway_if` (10.77.N.1/24, fd77:N::1/64).
/// Dropping it deletes both namespaces, which removes the veth pair too.
pub struct NetPair {
    pub client: String,
    pub gateway: String,
    pub client_if: String,
    pub gateway_if: String,
    pub client_ip: String,
    pub gateway_ip: String,
}

impl NetPair {
    /// Creates the pair; `n` (0-255) keeps concurrent tests' addresses apart.
    pub fn create(n: u8) -> Result<Self> {
        let id = format!("{}{n}", std::process::id() % 100_000);
        let pair = Self {
            client: format!("gwt-c{id}"),
            gateway: format!("gwt-g{id}"),
            client_if: format!("gwc{id}"),
            gateway_if: format!("gwg{id}"),
            client_ip: format!("10.77.{n}.2"),
            gateway_ip: format!("10.77.{n}.1"),
        };
        // Leftovers of an earlier run with the same pid are removed first.
        let _ = ip(&["netns", "del", &pair.client]);
        let _ = ip(&["netns", "del", &pair.gateway]);
        ip(&["netns", "add", &pair.client])?;
        ip(&["netns", "add", &pair.gateway])?;
        ip(&[
            "link",
            "add",
            &pair.client_if,
            "type",
            "veth",
            "peer",
            "name",
            &pair.gateway_if,
        ])?;
        ip(&["link", "set", &pair.client_if, "netns", &pair.client])?;
        ip(&["link", "set", &pair.gateway_if, "netns", &pair.gateway])?;
        for (ns, link, v4, v6) in [
            (
                &pair.client,
                &pair.client_if,
                &pair.client_ip,
                format!("fd77:{n}::2/64"),
            ),
            (
                &pair.gateway,
                &pair.gateway_if,
                &pair.gateway_ip,
                format!("fd77:{n}::1/64"),
            ),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", link])?;
            ip(&["-n", ns, "addr", "add", &v6, "dev", link, "nodad"])?;
            ip(&["-n", ns, "link", "set", link, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.client]);
        let _ = ip(&["netns", "del", &self.gateway]);
    }
}

/// Runs curl with `args` (inside `netns` if given); returns (HTTP status, body).
pub fn curl(netns: Option<&str>, args: &[&str]) -> Result<(u16, String)> {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let out = command
        .args(["-sS", "-m", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .context("cannot run curl")?;
    if !out.status.success() {
        bail!(
            "curl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("curl printed the status")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// Reads one sample (`name` with no labels) from a Prometheus text exposition.
pub fn metric(exposition: &str, name: &str) -> Option<u64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
            .map(|v| v as u64)
    })
}
