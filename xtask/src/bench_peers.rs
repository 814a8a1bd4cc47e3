//! The benchmark's contenders as processes: the upstream, the gateway, nginx and HAProxy.
//!
//! Every process is started with a configuration generated into a temporary directory (the
//! peers' templates live in `bench/peers/`), listens on a loopback port chosen free, and is
//! stopped by its PID when its handle drops (SIGTERM, then SIGKILL after a few seconds).

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The REST API id, stage and path every contender serves.
pub const API_ID: &str = "benchapi01";
pub const PATH: &str = "/prod/bench";

/// How long a process may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A started process, stopped when dropped.
pub struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size, KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/PID/status")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with the PID of a child this handle owns and has not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "xtask: {} (pid {pid}) ignored SIGTERM; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?)
}

/// Waits until `addr` accepts a TCP connection.
fn wait_listening(proc: &mut Proc, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            bail!("{} exited with {status} before listening", proc.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} did not listen on {addr} in time", proc.name)
}

/// Reads `child`'s stdout lines until `done` says it has seen enough; returns the lines.
fn read_until(
    proc: &mut Proc,
    mut done: impl FnMut(&[String]) -> bool,
    timeout: Duration,
) -> Result<Vec<String>> {
    let stdout = proc.child.stdout.take().context("stdout is piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    while !done(&lines) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => bail!(
                "{} did not print its listening line(s) in time; got {lines:?}",
                proc.name
            ),
        }
    }
    Ok(lines)
}

/// Makes `command` start inside network namespace `name` (from `ip netns add`); the process
/// keeps its own PID, so it can be measured and stopped like any other.
pub fn in_netns(command: &mut Command, name: &str) -> Result<()> {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let file = std::fs::File::open(format!("/var/run/netns/{name}"))
        .with_context(|| format!("network namespace {name} does not exist"))?;
    // SAFETY: the closure only calls setns(2), which is async-signal-safe, on a descriptor
    // opened above and kept alive by the closure.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The upstream: this program's `bench-upstream` with `threads` worker threads.
pub fn upstream(threads: usize) -> Result<(Proc, SocketAddr)> {
    upstream_in(threads, None)
}

/// [`upstream`] on loopback inside network namespace `netns` if given.
pub fn upstream_in(threads: usize, netns: Option<&str>) -> Result<(Proc, SocketAddr)> {
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let mut command = Command::new(exe);
    command
        .args(["bench-upstream", "--listen", "127.0.0.1:0", "--threads"])
        .arg(threads.to_string())
        .stdout(Stdio::piped());
    if let Some(ns) = netns {
        in_netns(&mut command, ns)?;
    }
    let child = command.spawn().context("cannot start the upstream")?;
    let mut proc = Proc {
        child,
        name: "upstream",
    };
    let lines = read_until(&mut proc, |l| !l.is_empty(), START_TIMEOUT)?;
    let addr = lines[0]
        .strip_prefix("listening ")
        .context("the upstream printed no address")?
        .parse()?;
    Ok((proc, addr))
}

/// A started gateway and its addresses.
pub struct Gateway {
    pub proc: Proc,
    pub data: SocketAddr,
    pub admin: SocketAddr,
    /// From spawn to both `listening` lines.
    pub startup: Duration,
}

/// Starts `binary serve` with the JSON `model` written into `dir`, `threads` runtime worker
/// threads (`TOKIO_WORKER_THREADS`), logging only warnings, plus `extra` flags.
pub fn gateway(
    binary: &Path,
    dir: &Path,
    model: &serde_json::Value,
    threads: usize,
    extra: &[&str],
) -> Result<Gateway> {
    gateway_in(binary, dir, model, threads, None, "127.0.0.1:0", extra)
}

/// [`gateway`] inside network namespace `netns` if given, its data plane on `listen` (the
/// admin API stays on loopback).
pub fn gateway_in(
    binary: &Path,
    dir: &Path,
    model: &serde_json::Value,
    threads: usize,
    netns: Option<&str>,
    listen: &str,
    extra: &[&str],
) -> Result<Gateway> {
    let config = dir.join("model.json");
    std::fs::write(&config, serde_json::to_vec(model)?)?;
    let state = dir.join("state");
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state)?;
    let started = Instant::now();
    let mut command = Command::new(binary);
    if let Some(ns) = netns {
        in_netns(&mut command, ns)?;
    }
    let child = command
        .arg("serve")
        .args(["--listen", listen, "--admin-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--config")
        .arg(&config)
        .args(["--log", "warn"])
        .args(extra)
        .env("TOKIO_WORKER_THREADS", threads.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let mut proc = Proc {
        child,
        name: "gateway",
    };
    let lines = read_until(
        &mut proc,
        |l| {
            l.iter().any(|l| l.starts_with("listening data="))
                && l.iter().any(|l| l.starts_with("listening admin="))
        },
        START_TIMEOUT,
    )?;
    let startup = started.elapsed();
    let find = |prefix: &str| -> Result<SocketAddr> {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .context("no listening line")?
            .parse()
            .context("bad listening address")
    };
    Ok(Gateway {
        data: find("listening data=")?,
        admin: find("listening admin=")?,
        proc,
        startup,
    })
}

/// The gateway's JSON model: one REST API whose `ANY /{proxy+}` needs a key and forwards to
/// `upstream`, and one plan (`rate`/`burst`) holding every key in `keys`. The account throttle
/// is raised out of the way so only the plan limits.
pub fn gateway_model(
    upstream: SocketAddr,
    keys: &[String],
    rate: f64,
    burst: u64,
) -> serde_json::Value {
    let api_keys: Vec<serde_json::Value> = keys
        .iter()
        .enumerate()
        .map(|(i, value)| serde_json::json!({"id": format!("k{i}"), "value": value, "enabled": true}))
        .collect();
    let members: Vec<serde_json::Value> = (0..keys.len())
        .map(|i| serde_json::json!({"usagePlanId": "bench", "keyId": format!("k{i}")}))
        .collect();
    serde_json::json!({
        "restApis": [{
            "id": API_ID,
            "name": "bench",
            "resources": [{
                "id": "proxy",
                "path": "/{proxy+}",
                "resourceMethods": {"ANY": {
                    "apiKeyRequired": true,
                    "methodIntegration": {"type": "HTTP_PROXY", "uri": format!("http://{upstream}/{{proxy}}")}
                }}
            }],
            "stages": [{"stageName": "prod"}]
        }],
        "apiKeys": api_keys,
        "usagePlans": [{
            "id": "bench",
            "name": "bench",
            "apiStages": [{"apiId": API_ID, "stage": "prod"}],
            "throttle": {"rateLimit": rate, "burstLimit": burst}
        }],
        "usagePlanKeys": members,
        "account": {"throttleSettings": {"rateLimit": 1.0e9, "burstLimit": 2_000_000_000u64}}
    })
}

/// The values a peer's template is filled with.
pub struct PeerConfig<'a> {
    /// Worker processes (nginx) or threads (HAProxy).
    pub threads: usize,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub keys: &'a [String],
    /// Requests per second per key.
    pub rate: u64,
    /// Requests a key may send at once above the rate.
    pub burst: u64,
}

/// Fills `{{NAME}}` placeholders of the template `bench/peers/<name>`.
fn render(root: &Path, name: &str, values: &[(&str, String)]) -> Result<String> {
    let path = root.join("bench/peers").join(name);
    let mut text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    for (key, value) in values {
        text = text.replace(&format!("{{{{{key}}}}}"), value);
    }
    if let Some(at) = text.find("{{") {
        bail!("{name}: unfilled placeholder at byte {at}");
    }
    Ok(text)
}

/// nginx with `bench/peers/nginx.conf`: a `map` of keys (unknown: 403), `limit_req` keyed by
/// the key (`nodelay`, 429), keep-alive to the upstream.
pub fn nginx(root: &Path, dir: &Path, peer: &PeerConfig) -> Result<Proc> {
    let keys: String = peer.keys.iter().map(|k| format!("{k} bench;\n")).collect();
    std::fs::write(dir.join("keys.map"), keys)?;
    // A shared-memory zone of 1 MiB holds about 8,000 keys' states.
    let zone_mib = (peer.keys.len() / 4000 + 1).max(1);
    let conf = render(
        root,
        "nginx.conf",
        &[
            ("DIR", dir.display().to_string()),
            ("WORKERS", peer.threads.to_string()),
            ("LISTEN", peer.listen.to_string()),
            ("UPSTREAM", peer.upstream.to_string()),
            ("RATE", peer.rate.to_string()),
            ("BURST", peer.burst.to_string()),
            ("ZONE", format!("{zone_mib}m")),
        ],
    )?;
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start nginx")?;
    let mut proc = Proc {
        child,
        name: "nginx",
    };
    wait_listening(&mut proc, peer.listen)?;
    Ok(proc)
}

/// HAProxy with `bench/peers/haproxy.cfg`: a map of keys (unknown: 403), a stick-table on
/// `req.hdr(x-api-key)` counting admitted requests (429 over the limit), keep-alive upstream.
///
/// HAProxy has no token bucket; its rate counters count events in a sliding window. A rate
/// with a burst is approximated as `burst` admitted requests per `burst / rate` seconds.
pub fn haproxy(root: &Path, dir: &Path, peer: &PeerConfig) -> Result<Proc> {
    let keys: String = peer.keys.iter().map(|k| format!("{k} bench\n")).collect();
    std::fs::write(dir.join("keys.map"), keys)?;
    let window_ms = (peer.burst.max(1) * 1000 / peer.rate.max(1)).max(1);
    let conf = render(
        root,
        "haproxy.cfg",
        &[
            ("DIR", dir.display().to_string()),
            ("THREADS", peer.threads.to_string()),
            ("LISTEN", peer.listen.to_string()),
            ("UPSTREAM", peer.upstream.to_string()),
            ("LIMIT", peer.burst.max(1).to_string()),
            ("WINDOW", format!("{window_ms}ms")),
            ("TABLE", (peer.keys.len() * 2).max(1024).to_string()),
        ],
    )?;
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf)?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start haproxy")?;
    let mut proc = Proc {
        child,
        name: "haproxy",
    };
    wait_listening(&mut proc, peer.listen)?;
    Ok(proc)
}

/// A fresh temporary directory, removed when dropped.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "gateway-bench-{label}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ rand::random::<u64>() as u128
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// CPU seconds (user + system) used so far by a process and its live children (nginx's
/// workers).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let mut ticks = own_ticks(pid)?.0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok((t, parent)) = own_ticks(child)
            && parent == pid
        {
            ticks += t;
        }
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// (utime + stime in clock ticks, parent pid) of one process.
fn own_ticks(pid: u32) -> Result<(u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which may hold spaces, sit after the last ')'.
    let rest = stat.rsplit_once(')').context("bad /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 4 (ppid) and fields 14, 15 (utime, stime), 1-based over the whole line.
    let parent = fields.get(1).and_then(|f| f.parse().ok()).unwrap_or(0);
    let ticks = fields[11..=12]
        .iter()
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Ok((ticks, parent))
}
