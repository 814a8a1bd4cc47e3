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

use anyhow::{Context, Result, bail, ensure};
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
    /// Starts on loopback (ports chosen by the system) with one open API forwarding every
    /// path of stage `prod` to `upstream_url`, plus `extra` flags.
    pub fn start_upstream(upstream_url: &str, extra: &[&str]) -> Result<Self> {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            upstream_url,
        ];
        args.extend_from_slice(extra);
        Self::start(None, &args)
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

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
        signal_child(&self.child, libc::SIGTERM)?;
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

    /// Starts an https upstream on `127.0.0.1:0`, its certificate (for `localhost` and
    /// `127.0.0.1`) signed by a certificate authority made for it; returns it with that
    /// authority's certificate in PEM.
    pub fn start_tls() -> Result<(Self, String)> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gateway test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?
            .signed_by(&key, &ca)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let upstream = Self::start_with(None, "127.0.0.1:0".parse()?, Some(acceptor))?;
        Ok((upstream, ca.pem()))
    }

    /// Starts on `bind` inside network namespace `netns` (or the current one).
    pub fn start_in(netns: Option<&str>, bind: SocketAddr) -> Result<Self> {
        Self::start_with(netns, bind, None)
    }

    fn start_with(
        netns: Option<&str>,
        bind: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<Self> {
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
            runtime.block_on(serve_upstream(listener, counter, shutdown_rx, tls));
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

type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn serve_upstream(
    listener: std::net::TcpListener,
    requests: Arc<AtomicU64>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
    tls: Option<tokio_rustls::TlsAcceptor>,
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
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let requests = requests.clone();
                async move { Ok::<_, Infallible>(echo(req, &requests).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            match tls {
                // A failed handshake (an untrusting client) just ends the connection.
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

/// A body that sends its first chunk and then nothing more: an upstream that hangs mid-body.
struct Stall(Option<Bytes>);

impl hyper::body::Body for Stall {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(chunk) => std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// A body of `left` one-byte chunks, one every `every`: a slow upstream that keeps sending.
struct Drip {
    left: u64,
    every: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Drip {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        use std::future::Future;
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(self.timer.as_mut().poll(cx));
        self.left -= 1;
        let next = tokio::time::Instant::now() + self.every;
        self.timer.as_mut().reset(next);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"x")))))
    }
}

/// Echoes the request as JSON. Query parameters steer it: `sleep_ms=N` waits N ms
/// before answering; `bytes=N` answers with N bytes of `x` instead of JSON;
/// `stall_after=N` declares N + 1 bytes, sends N of them and then hangs; `drip_ms=N&chunks=K`
/// sends K bytes, one every N ms.
async fn echo(req: Request<Incoming>, requests: &AtomicU64) -> Response<UpstreamBody> {
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
        return Response::new(Full::new(Bytes::from(vec![b'x'; size])).boxed());
    }
    if let (Some(ms), Some(chunks)) = (param("drip_ms"), param("chunks")) {
        let every = Duration::from_millis(ms);
        return Response::new(
            Drip {
                left: chunks,
                every,
                timer: Box::pin(tokio::time::sleep(every)),
            }
            .boxed(),
        );
    }
    if let Some(n) = param("stall_after") {
        let size = usize::try_from(n).unwrap_or(0);
        return Response::builder()
            .header("content-length", size + 1)
            .body(Stall(Some(Bytes::from(vec![b'x'; size]))).boxed())
            .expect("static headers are valid");
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
        .body(Full::new(Bytes::from(json.to_string())).boxed())
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

    /// Starts the gateway in the gateway namespace, listening on its veth address, with its
    /// XDP program attached natively to that veth, plus `args`. `None` (after saying so) when
    /// this binary has no XDP program and privileged tests are not required; fails unless the
    /// program is attached natively.
    pub fn start_gateway_with_xdp(&self, args: &[&str]) -> Result<Option<Gateway>> {
        let listen = format!("{}:0", self.gateway_ip);
        let mut all = vec![
            "--listen",
            &listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--xdp-iface",
            &self.gateway_if,
            "--xdp-mode",
            "native",
        ];
        all.extend_from_slice(args);
        let gateway = match Gateway::start(Some(&self.gateway), &all) {
            Err(e)
                if e.to_string().contains("built without the XDP program")
                    && !privileged_required() =>
            {
                eprintln!(
                    "skipped: this gateway binary has no XDP program (use `cargo xtask test`)"
                );
                return Ok(None);
            }
            other => other?,
        };
        let link = ip(&["-n", &self.gateway, "link", "show", &self.gateway_if])?;
        ensure!(
            link.contains("prog/xdp"),
            "XDP is not attached natively: {link}"
        );
        Ok(Some(gateway))
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

/// The workspace root (the directory holding `tests/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests sits inside the workspace")
        .to_path_buf()
}

/// Whether the Python tools (boto3, pytest, the aws CLI) must be present (set by
/// `cargo xtask test`): then a missing venv is a failure, not a skip.
pub fn tools_required() -> bool {
    std::env::var_os("GATEWAY_REQUIRE_TOOLS").is_some_and(|v| v == "1")
}

/// The Python interpreter of the test venv (`$GATEWAY_TEST_PYTHON`, else
/// `target/py/bin/python`, which `cargo xtask setup` creates), checked to import boto3
/// and pytest. `Ok(None)` means skip; with `GATEWAY_REQUIRE_TOOLS=1` it is an error.
pub fn test_python(test: &str) -> Result<Option<PathBuf>> {
    let python = std::env::var_os("GATEWAY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/py/bin/python"));
    let usable = python.is_file()
        && Command::new(&python)
            .args(["-c", "import boto3, pytest"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if usable {
        return Ok(Some(python));
    }
    let reason = format!(
        "{} cannot import boto3 and pytest; run `cargo xtask setup` (or set GATEWAY_TEST_PYTHON)",
        python.display()
    );
    if tools_required() {
        bail!("{test}: {reason} (GATEWAY_REQUIRE_TOOLS=1)");
    }
    eprintln!("{test}: skipped ({reason})");
    Ok(None)
}

/// Runs `command` in its own process group with stdout and stderr captured together,
/// killing the group if it runs longer than `timeout`. Returns its exit status and
/// output; a timeout is an error carrying the output so far.
pub fn run_bounded(
    command: &mut Command,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String)> {
    use std::os::unix::process::CommandExt;
    let log = TempDir::new("output")?;
    let path = log.path.join("output.log");
    let file = std::fs::File::create(&path)?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let group = libc::pid_t::try_from(child.id()).context("pid fits pid_t")?;
            // SAFETY: signalling the process group our own child leads.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = child.wait();
            bail!(
                "{:?} did not finish within {timeout:?} and was killed; its output:\n{}",
                command.get_program(),
                std::fs::read_to_string(&path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok((status, std::fs::read_to_string(&path).unwrap_or_default()))
}

impl Gateway {
    /// Sends SIGKILL (no shutdown, no final flush) and reaps the process.
    pub fn kill(&mut self) -> Result<std::process::ExitStatus> {
        signal_child(&self.child, libc::SIGKILL)?;
        Ok(self.child.wait()?)
    }

    /// Sends `signal` to the gateway (SIGSTOP freezes it, as a stalled or partitioned node;
    /// SIGCONT resumes it).
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        signal_child(&self.child, signal)
    }
}

/// Sends `signal` to `child`, a process this test started and has not reaped yet.
fn signal_child(child: &Child, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id()).context("pid fits pid_t")?;
    // SAFETY: signalling our own, not yet reaped, child by its pid.
    unsafe { libc::kill(pid, signal) };
    Ok(())
}

/// Calls the admin API at `addr` with curl: `method path` (path and query), with `body` as
/// JSON when given. Returns the HTTP status and the JSON answer (`Null` when empty).
pub fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let url = format!("http://{addr}{path}");
    let text = body.map(serde_json::Value::to_string);
    let mut args = vec!["-X", method, "-H", "content-type: application/json"];
    if let Some(text) = &text {
        args.extend(["--data-binary", text.as_str()]);
    }
    args.push(&url);
    let (status, answer) = curl(None, &args)?;
    let json = if answer.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&answer)
            .with_context(|| format!("{method} {path} answered {status} with non-JSON {answer}"))?
    };
    Ok((status, json))
}

/// [`admin`] that requires a 2xx answer and returns its JSON.
pub fn admin_ok(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value> {
    let (status, json) = admin(addr, method, path, body)?;
    if !(200..300).contains(&status) {
        bail!("{method} {path} answered {status}: {json}");
    }
    Ok(json)
}

/// Today's UTC date, `yyyy-MM-dd` (the day usage is counted under).
pub fn utc_today() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(now / 86_400).unwrap_or(i64::MAX);
    let (year, month, day) = gateway::quota::civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}")
}

/// One HTTP/1.1 keep-alive connection for sending many small requests quickly; it
/// reconnects when the server closed the previous connection.
pub struct KeepAlive {
    addr: SocketAddr,
    conn: Option<BufReader<std::net::TcpStream>>,
}

impl KeepAlive {
    /// A client of `addr`; the connection is opened by the first request.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    /// `GET path` with an optional `x-api-key`; returns status and body. An I/O error
    /// drops the connection (the next call reconnects) and is returned.
    pub fn get(&mut self, path: &str, key: Option<&str>) -> Result<(u16, String)> {
        let result = self.exchange(path, key);
        if !matches!(result, Ok((_, _, true))) {
            self.conn = None;
        }
        result.map(|(status, body, _)| (status, body))
    }

    fn exchange(&mut self, path: &str, key: Option<&str>) -> Result<(u16, String, bool)> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let stream = std::net::TcpStream::connect(self.addr)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.set_nodelay(true)?;
                self.conn.insert(BufReader::new(stream))
            }
        };
        http1_get(conn, path, key)
    }
}

/// Sends `GET path` (with `x-api-key` when given) on a keep-alive HTTP/1.1 connection in one
/// write, so the head leaves in one segment as real clients send it, and reads the response
/// (`content-length` or chunked). Returns the status, the body and whether the server keeps
/// the connection open.
pub fn http1_get(
    conn: &mut BufReader<std::net::TcpStream>,
    path: &str,
    key: Option<&str>,
) -> Result<(u16, String, bool)> {
    use std::io::{Read, Write};
    let key = key
        .map(|k| format!("x-api-key: {k}\r\n"))
        .unwrap_or_default();
    let head = format!("GET {path} HTTP/1.1\r\nhost: gateway\r\n{key}\r\n");
    conn.get_mut().write_all(head.as_bytes())?;
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        bail!("connection closed before the response");
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .context("status line has a code")?
        .parse()?;
    let (mut length, mut chunked, mut keep) = (0usize, false, true);
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            bail!("connection closed inside the response head");
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse()?;
        } else if let Some(v) = lower.strip_prefix("transfer-encoding:") {
            chunked = v.contains("chunked");
        } else if let Some(v) = lower.strip_prefix("connection:") {
            keep = !v.contains("close");
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .context("chunk size")?;
            let mut chunk = vec![0; size + 2];
            conn.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length, 0);
        conn.read_exact(&mut body)?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned(), keep))
}

/// A throwaway `redis-server` on a free loopback port, persistence off, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl RedisServer {
    /// Starts one; `Ok(None)` (skip, with a note) when `redis-server` is not installed, an
    /// error instead with `GATEWAY_REQUIRE_TOOLS=1`.
    pub fn start(test: &str) -> Result<Option<Self>> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            let reason = "redis-server is not installed; run `cargo xtask setup`";
            if tools_required() {
                bail!("{test}: {reason} (GATEWAY_REQUIRE_TOOLS=1)");
            }
            eprintln!("{test}: skipped ({reason})");
            return Ok(None);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut server = Self { child: None, port };
        server.restart()?;
        Ok(Some(server))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port (empty: nothing is persisted).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start redis-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("redis-server on port {port} did not answer PING")
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Sends `signal` to the server (SIGSTOP makes it hang, SIGCONT resumes it).
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        signal_child(
            self.child.as_ref().context("redis-server is not running")?,
            signal,
        )
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Ids of a REST API built through the admin API.
pub struct ProxyApi {
    /// REST API id.
    pub id: String,
    /// Id of the root resource `/`.
    pub root: String,
    /// Id of the `/{proxy+}` resource.
    pub proxy: String,
}

impl ProxyApi {
    /// Data-plane path of `/anything` on stage `prod`.
    pub fn path(&self) -> String {
        format!("/restapis/{}/prod/_user_request_/anything", self.id)
    }
}

/// Creates a usage plan `name` on API `api_id`'s `prod` stage with a throttle of
/// `(rate, burst)` and, if given, a daily quota; returns its id.
pub fn create_plan(
    addr: SocketAddr,
    api_id: &str,
    name: &str,
    (rate, burst): (f64, i64),
    daily_quota: Option<i64>,
) -> Result<String> {
    let mut body = serde_json::json!({
        "name": name,
        "throttle": {"rateLimit": rate, "burstLimit": burst},
        "apiStages": [{"apiId": api_id, "stage": "prod"}],
    });
    if let Some(limit) = daily_quota {
        body["quota"] = serde_json::json!({"limit": limit, "period": "DAY"});
    }
    let plan = admin_ok(addr, "POST", "/usageplans", Some(&body))?;
    Ok(plan["id"].as_str().context("plan id")?.to_owned())
}

/// Creates an enabled key `name` with `value` and adds it to `plan`; returns its id.
pub fn create_plan_key(addr: SocketAddr, plan: &str, name: &str, value: &str) -> Result<String> {
    let key = admin_ok(
        addr,
        "POST",
        "/apikeys",
        Some(&serde_json::json!({"name": name, "enabled": true, "value": value})),
    )?;
    let id = key["id"].as_str().context("key id")?.to_owned();
    admin_ok(
        addr,
        "POST",
        &format!("/usageplans/{plan}/keys"),
        Some(&serde_json::json!({"keyId": id, "keyType": "API_KEY"})),
    )?;
    Ok(id)
}

/// Creates a REST API whose `ANY /{proxy+}` needs a key and forwards to `upstream`, and
/// deploys it to stage `prod`.
pub fn create_proxy_api(addr: SocketAddr, upstream: &Upstream, name: &str) -> Result<ProxyApi> {
    let api = admin_ok(
        addr,
        "POST",
        "/restapis",
        Some(&serde_json::json!({"name": name})),
    )?;
    let id = api["id"].as_str().context("api id")?.to_owned();
    let root = api["rootResourceId"]
        .as_str()
        .context("rootResourceId")?
        .to_owned();
    let proxy = admin_ok(
        addr,
        "POST",
        &format!("/restapis/{id}/resources/{root}"),
        Some(&serde_json::json!({"pathPart": "{proxy+}"})),
    )?;
    let proxy = proxy["id"].as_str().context("resource id")?.to_owned();
    let method = format!("/restapis/{id}/resources/{proxy}/methods/ANY");
    admin_ok(
        addr,
        "PUT",
        &method,
        Some(&serde_json::json!({"authorizationType": "NONE", "apiKeyRequired": true})),
    )?;
    admin_ok(
        addr,
        "PUT",
        &format!("{method}/integration"),
        Some(&serde_json::json!({
            "type": "HTTP_PROXY",
            "httpMethod": "ANY",
            "uri": format!("http://{}/{{proxy}}", upstream.addr),
        })),
    )?;
    admin_ok(
        addr,
        "POST",
        &format!("/restapis/{id}/deployments"),
        Some(&serde_json::json!({"stageName": "prod"})),
    )?;
    Ok(ProxyApi { id, root, proxy })
}

/// Whether `program --version` runs (the tool is installed).
fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a Redis on `127.0.0.1:port` answers `PING`.
fn redis_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A throwaway Redis Cluster of three masters (no replicas) on loopback, persistence off,
/// its node files in a temp dir. Every server is killed by pid and the dir removed on drop.
pub struct RedisCluster {
    children: Vec<Child>,
    /// Client ports of the three masters on 127.0.0.1 (each cluster bus is on port + 10000).
    pub ports: Vec<u16>,
    dir: TempDir,
}

impl RedisCluster {
    /// Masters in the cluster.
    const MASTERS: usize = 3;
    /// Longest wait for the servers to answer and for the cluster to report `ok`.
    const READY: Duration = Duration::from_secs(20);

    /// Starts the servers, joins them with `redis-cli --cluster create` and waits until every
    /// node reports `cluster_state:ok`. `Ok(None)` (skip, with a note) when `redis-server` or
    /// `redis-cli` is not installed, an error instead with `GATEWAY_REQUIRE_TOOLS=1`.
    pub fn start(test: &str) -> Result<Option<Self>> {
        if let Some(missing) = ["redis-server", "redis-cli"]
            .into_iter()
            .find(|p| !installed(p))
        {
            let reason = format!("{missing} is not installed; run `cargo xtask setup`");
            if tools_required() {
                bail!("{test}: {reason} (GATEWAY_REQUIRE_TOOLS=1)");
            }
            eprintln!("{test}: skipped ({reason})");
            return Ok(None);
        }
        let mut cluster = Self {
            children: Vec::new(),
            ports: Self::free_ports()?,
            dir: TempDir::new("redis-cluster")?,
        };
        for port in cluster.ports.clone() {
            let conf = cluster.dir.path.join(format!("nodes-{port}.conf"));
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(&conf)
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&cluster.dir.path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("cannot start redis-server")?;
            cluster.children.push(child);
        }
        let deadline = Instant::now() + Self::READY;
        for &port in &cluster.ports {
            while !redis_answers(port) {
                if Instant::now() > deadline {
                    bail!("redis-server on port {port} did not answer PING");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        create.args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")));
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let (status, output) = run_bounded(&mut create, Self::READY)?;
        if !status.success() {
            bail!("redis-cli --cluster create failed ({status}):\n{output}");
        }
        for &port in &cluster.ports {
            loop {
                let (_, info) = run_bounded(
                    Command::new("redis-cli").args(["-p", &port.to_string(), "cluster", "info"]),
                    Duration::from_secs(5),
                )?;
                if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "Redis Cluster node {port} is not ok after {:?}:\n{info}",
                        Self::READY
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(Some(cluster))
    }

    /// Three distinct free client ports whose bus ports (port + 10000) are free too.
    fn free_ports() -> Result<Vec<u16>> {
        // Held until all are chosen, so no port is picked twice.
        let mut held = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..200 {
            let client = std::net::TcpListener::bind("127.0.0.1:0")?;
            let port = client.local_addr()?.port();
            let Some(bus) = port.checked_add(10_000) else {
                continue;
            };
            if let Ok(bus) = std::net::TcpListener::bind(("127.0.0.1", bus)) {
                ports.push(port);
                held.push((client, bus));
                if ports.len() == Self::MASTERS {
                    return Ok(ports);
                }
            }
        }
        bail!("no free port pairs (PORT, PORT + 10000) on 127.0.0.1")
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`, the gateway's `--store` form.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // `dir` is removed after this, once no server writes to it.
    }
}
