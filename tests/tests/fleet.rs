//! Fleet mode end to end: three real gateway processes sharing one real, throwaway
//! `redis-server` (`--store redis://…`), a real upstream, real clients.
//!
//! - A key created through node A's admin API works on node C within a second.
//! - A daily quota of 1,000 spread over the three nodes admits 1,000 plus at most the
//!   documented overshoot `2 × (nodes − 1) × r × flush interval` (r: one node's admission rate).
//! - Redis hanging mid-load (SIGSTOP): with `--store-failure local` every node keeps answering
//!   at once and the counts reconcile when Redis resumes; with `closed` keyed requests get 503
//!   within the store timeout, and 200 again when it resumes.
//! - A plan throttle of 30 req/s, burst 30, holds fleet-wide: one key hammered round-robin over
//!   the three nodes for 3 s gets about `burst + rate × T` admitted, not three times that
//!   (each node enforces its share, `rate / live nodes`).
//! - On a real three-master Redis Cluster (`--store redis+cluster://…`), two nodes share keys,
//!   a quota and GetUsage the same way.
//! - Redis losing its data (a restart without persistence): the configuration is seeded again
//!   once, a node that was frozen meanwhile loads the fleet's newer configuration instead of
//!   writing its old one back, and GetUsage counts again.
//! - Connections Redis closed (idle `timeout`, a restart) are retried once, so neither keyed
//!   requests in `closed` mode nor admin calls fail; a password change is logged with its
//!   reason; usage left unsent at shutdown is logged; the usage data in Redis stays bounded.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use gateway_tests::{
    Gateway, KeepAlive, RedisCluster, RedisServer, Upstream, admin, admin_ok, create_plan,
    create_plan_key, create_proxy_api, curl, metric, utc_today,
};

/// How often a gateway flushes usage to the store.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How soon a change on one node must be in force on another.
const PROPAGATION: Duration = Duration::from_secs(1);
/// `--store-timeout-ms` of these tests.
const STORE_TIMEOUT_MS: u64 = 200;

fn start_node(redis: &RedisServer, failure: &str) -> Result<Gateway> {
    start_node_at(&redis.url(), failure)
}

/// A gateway node on the store at `url` (`--store URL`).
fn start_node_at(url: &str, failure: &str) -> Result<Gateway> {
    let timeout = STORE_TIMEOUT_MS.to_string();
    Gateway::start(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--store",
            url,
            "--store-failure",
            failure,
            "--store-timeout-ms",
            &timeout,
        ],
    )
}

fn used_today(addr: SocketAddr, plan: &str, key: &str) -> Result<u64> {
    let today = utc_today();
    let usage = admin_ok(
        addr,
        "GET",
        &format!("/usageplans/{plan}/usage?startDate={today}&endDate={today}"),
        None,
    )?;
    usage["values"][key][0][0]
        .as_u64()
        .with_context(|| format!("no usage for {key}: {usage}"))
}

/// Polls `GET path` on `addr` with `key` until it answers `want`; returns how long that took.
fn wait_for(
    addr: SocketAddr,
    path: &str,
    key: &str,
    want: u16,
    limit: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let mut client = KeepAlive::new(addr);
    loop {
        let (status, _) = client.get(path, Some(key))?;
        if status == want {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < limit,
            "{path} on {addr} still answers {status} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Fleet {
    _upstream: Upstream,
    nodes: Vec<Gateway>,
    api: String,
    path: String,
    plan: String,
}

impl Fleet {
    /// [`wait_for`] on every node's data plane.
    fn wait_all(&self, key: &str, want: u16, limit: Duration) -> Result<()> {
        for node in &self.nodes {
            wait_for(node.data, &self.path, key, want, limit)?;
        }
        Ok(())
    }
}

/// Redis, an upstream, three nodes, and an API + plan created on node A and live on every node.
fn fleet(test: &str, failure: &str, daily_quota: i64) -> Result<Option<(Fleet, RedisServer)>> {
    let Some(redis) = RedisServer::start(test)? else {
        return Ok(None);
    };
    let upstream = Upstream::start()?;
    let nodes = (0..3)
        .map(|_| start_node(&redis, failure))
        .collect::<Result<Vec<_>>>()?;
    let api = create_proxy_api(nodes[0].admin, &upstream, "shop")?.id;
    let plan = create_plan(
        nodes[0].admin,
        &api,
        "fleet",
        (5000.0, 5000),
        Some(daily_quota),
    )?;
    let path = format!("/restapis/{api}/prod/_user_request_/pets");
    // Redis is handed back beside the fleet so a test can hang and resume it.
    let fleet = Fleet {
        _upstream: upstream,
        nodes,
        api,
        path,
        plan,
    };
    Ok(Some((fleet, redis)))
}

#[test]
fn key_created_on_one_node_works_on_another_within_a_second() -> Result<()> {
    let Some((f, _redis)) = fleet("fleet propagation", "local", 1_000_000)? else {
        return Ok(());
    };
    let (a, c) = (&f.nodes[0], &f.nodes[2]);
    let mut worst = Duration::ZERO;
    for n in 0..3 {
        let value = format!("fleet-propagation-key-{n}-0123456789");
        create_plan_key(a.admin, &f.plan, &value, &value)?;
        let took = wait_for(c.data, &f.path, &value, 200, PROPAGATION)?;
        worst = worst.max(took);
    }
    eprintln!("fleet: a key created on node A answered 200 on node C after at most {worst:?}");
    // The admin API of node C shows what node A created.
    let keys = admin_ok(c.admin, "GET", "/apikeys", None)?;
    ensure!(
        keys["item"].as_array().map(Vec::len) == Some(3),
        "node C lists {keys}"
    );
    Ok(())
}

#[test]
fn quota_holds_across_three_nodes() -> Result<()> {
    const QUOTA: u64 = 1_000;
    /// Requests per second each client sends to its node.
    const RATE: u64 = 100;
    let Some((f, _redis)) = fleet("fleet quota", "local", QUOTA as i64)? else {
        return Ok(());
    };
    let value = "fleet-quota-key-0123456789";
    let key = create_plan_key(f.nodes[0].admin, &f.plan, value, value)?;
    f.wait_all(value, 200, PROPAGATION)?;
    // Those three probes were admitted too.
    let started = Instant::now();
    let results = spend_quota(&f.nodes, &f.path, value, RATE)?;
    let admitted: u64 = results.iter().map(|r| r.0).sum::<u64>() + 3;
    let bound = 2 * (f.nodes.len() as u64 - 1) * RATE * FLUSH_INTERVAL.as_secs();
    eprintln!(
        "fleet: quota {QUOTA}/day over 3 nodes at {RATE} req/s each: admitted {admitted} \
         (overshoot {}, documented bound {bound}) in {:?}; per node {results:?}",
        admitted.saturating_sub(QUOTA),
        started.elapsed()
    );
    ensure!(admitted >= QUOTA, "admitted {admitted} < quota {QUOTA}");
    ensure!(
        admitted <= QUOTA + bound,
        "admitted {admitted} > quota {QUOTA} + bound {bound}"
    );
    // Every node reports the fleet's usage once the last flush is in.
    std::thread::sleep(FLUSH_INTERVAL * 2);
    for node in &f.nodes {
        let used = used_today(node.admin, &f.plan, &key)?;
        ensure!(
            used == admitted,
            "node reports {used} used, {admitted} admitted"
        );
    }
    Ok(())
}

/// Sends `value`'s requests to every node at `rate` requests per second each (one client per
/// node) until each node has refused it for three flush intervals in a row (at most 30 s);
/// returns (admitted, sent) per node.
fn spend_quota(nodes: &[Gateway], path: &str, value: &str, rate: u64) -> Result<Vec<(u64, u64)>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|node| {
                let (addr, path) = (node.data, path.to_owned());
                s.spawn(move || -> Result<(u64, u64)> {
                    let mut client = KeepAlive::new(addr);
                    let (mut admitted, mut refused_in_a_row) = (0u64, 0u64);
                    let mut sent = 0u64;
                    let begin = Instant::now();
                    // Until refused for three flush intervals in a row, at most 30 s.
                    while refused_in_a_row < 3 * rate && begin.elapsed() < Duration::from_secs(30) {
                        let due = begin + Duration::from_millis(sent * 1000 / rate);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        sent += 1;
                        let (status, body) = client.get(&path, Some(value))?;
                        match status {
                            200 => {
                                admitted += 1;
                                refused_in_a_row = 0;
                            }
                            429 => refused_in_a_row += 1,
                            other => anyhow::bail!("{other}: {body}"),
                        }
                    }
                    Ok((admitted, sent))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect::<Result<Vec<_>>>()
    })
}

/// Sends `count` requests to every node in turn; returns the statuses and the slowest answer.
fn load(f: &Fleet, value: &str, count: usize) -> Result<(Vec<u16>, Duration)> {
    let mut clients: Vec<KeepAlive> = f.nodes.iter().map(|n| KeepAlive::new(n.data)).collect();
    let mut statuses = Vec::with_capacity(count * clients.len());
    let mut slowest = Duration::ZERO;
    for _ in 0..count {
        for client in &mut clients {
            let started = Instant::now();
            let (status, _) = client.get(&f.path, Some(value))?;
            slowest = slowest.max(started.elapsed());
            statuses.push(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((statuses, slowest))
}

#[test]
fn hung_store_in_local_mode_keeps_serving_and_reconciles() -> Result<()> {
    let Some((f, redis)) = fleet("fleet outage local", "local", 1_000_000)? else {
        return Ok(());
    };
    let value = "fleet-outage-key-0123456789";
    let key = create_plan_key(f.nodes[0].admin, &f.plan, value, value)?;
    f.wait_all(value, 200, PROPAGATION)?;
    let (before, _) = load(&f, value, 50)?;
    redis.signal(libc::SIGSTOP)?;
    let (during, slowest) = load(&f, value, 100)?;
    redis.signal(libc::SIGCONT)?;
    let (after, _) = load(&f, value, 50)?;
    eprintln!("fleet: slowest answer while Redis hung (local mode): {slowest:?}");
    for statuses in [&before, &during, &after] {
        ensure!(statuses.iter().all(|&s| s == 200), "statuses {statuses:?}");
    }
    ensure!(
        slowest < Duration::from_millis(STORE_TIMEOUT_MS + 300),
        "a request took {slowest:?} while the store hung"
    );
    // Everything admitted before, during and after the outage is in the store.
    let admitted = (3 + before.len() + during.len() + after.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used = used_today(f.nodes[1].admin, &f.plan, &key)?;
        if used == admitted {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "store has {used} used, {admitted} admitted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn hung_store_in_closed_mode_refuses_keyed_requests() -> Result<()> {
    let Some((f, redis)) = fleet("fleet outage closed", "closed", 1_000_000)? else {
        return Ok(());
    };
    let value = "fleet-closed-key-0123456789";
    create_plan_key(f.nodes[0].admin, &f.plan, value, value)?;
    f.wait_all(value, 200, PROPAGATION)?;
    redis.signal(libc::SIGSTOP)?;
    // Each node notices at its next store call (flush or version check: within a second
    // plus the store timeout).
    let notice = FLUSH_INTERVAL + Duration::from_millis(STORE_TIMEOUT_MS) * 3;
    f.wait_all(value, 503, notice + Duration::from_secs(1))?;
    let (during, slowest) = load(&f, value, 10)?;
    ensure!(during.iter().all(|&s| s == 503), "statuses {during:?}");
    redis.signal(libc::SIGCONT)?;
    f.wait_all(value, 200, notice + Duration::from_secs(1))?;
    eprintln!("fleet: slowest 503 while Redis hung (closed mode): {slowest:?}");
    ensure!(slowest < Duration::from_millis(STORE_TIMEOUT_MS + 300));
    Ok(())
}

#[test]
fn hung_store_in_open_mode_waives_quota_until_it_returns() -> Result<()> {
    let Some((f, redis)) = fleet("fleet outage open", "open", 3)? else {
        return Ok(());
    };
    let value = "fleet-open-key-0123456789ab";
    create_plan_key(f.nodes[0].admin, &f.plan, value, value)?;
    f.wait_all(value, 200, PROPAGATION)?;
    // Spend the daily quota of 3 (one request went to each node above); the fleet total
    // reaches every node at its next flush.
    f.wait_all(value, 429, FLUSH_INTERVAL * 3)?;
    redis.signal(libc::SIGSTOP)?;
    // While the store is unreachable the quota cannot be checked fleet-wide: open mode
    // serves the key's requests rather than refusing them.
    let notice = FLUSH_INTERVAL + Duration::from_millis(STORE_TIMEOUT_MS) * 3;
    f.wait_all(value, 200, notice + Duration::from_secs(1))?;
    let (during, slowest) = load(&f, value, 10)?;
    ensure!(during.iter().all(|&s| s == 200), "statuses {during:?}");
    redis.signal(libc::SIGCONT)?;
    // Back to enforcing: the quota is spent, so 429 Limit Exceeded again.
    f.wait_all(value, 429, notice + Duration::from_secs(1))?;
    eprintln!("fleet: slowest request while Redis hung (open mode): {slowest:?}");
    ensure!(slowest < Duration::from_millis(STORE_TIMEOUT_MS + 300));
    Ok(())
}

/// Waits until `node` counts `want` live gateways (`gateway_fleet_nodes`, the count its
/// throttles are divided by).
fn wait_for_nodes(node: &Gateway, want: u64, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let (status, text) = curl(None, &[&format!("http://{}/metrics", node.admin)])?;
        let seen = metric(&text, "gateway_fleet_nodes");
        if status == 200 && seen == Some(want) {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < limit,
            "node {} counts {seen:?} live gateways after {limit:?}, want {want}",
            node.admin
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn plan_throttle_holds_across_three_nodes() -> Result<()> {
    const RATE: f64 = 30.0;
    const BURST: i64 = 30;
    /// How long the key is hammered.
    const RUN: Duration = Duration::from_secs(3);
    let Some((mut f, _redis)) = fleet("fleet throttle", "local", 1_000_000)? else {
        return Ok(());
    };
    // Heartbeats every second; a new node counts at the next heartbeat of each node.
    let mut joined = Duration::ZERO;
    for node in &f.nodes {
        joined = joined.max(wait_for_nodes(node, 3, Duration::from_secs(5))?);
    }
    let plan = create_plan(
        f.nodes[0].admin,
        &f.api,
        "fleet",
        (RATE, BURST),
        Some(1_000_000),
    )?;
    let value = "fleet-throttle-key-0123456789";
    create_plan_key(f.nodes[0].admin, &plan, value, value)?;
    f.wait_all(value, 200, PROPAGATION)?;
    // Let the three probes' tokens come back: every bucket starts full.
    std::thread::sleep(Duration::from_secs(1));

    let mut clients: Vec<KeepAlive> = f.nodes.iter().map(|n| KeepAlive::new(n.data)).collect();
    let mut per_node = vec![0u64; clients.len()];
    let (mut sent, mut admitted) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < RUN {
        for (client, count) in clients.iter_mut().zip(&mut per_node) {
            let (status, body) = client.get(&f.path, Some(value))?;
            sent += 1;
            match status {
                200 => {
                    admitted += 1;
                    *count += 1;
                }
                429 => {}
                other => anyhow::bail!("{other}: {body}"),
            }
        }
    }
    let elapsed = started.elapsed();
    let ideal = BURST as f64 + RATE * elapsed.as_secs_f64();
    let (low, high) = (0.75 * ideal, ideal * 1.15 + 3.0);
    eprintln!(
        "fleet: throttle {RATE} req/s burst {BURST} over 3 nodes, round-robin for {elapsed:?}: \
         admitted {admitted} of {sent} (ideal burst + rate × T = {ideal:.0}, {:.2}× ideal; \
         allowed {low:.0}..={high:.0}); per node {per_node:?}",
        admitted as f64 / ideal
    );
    ensure!(
        (low..=high).contains(&(admitted as f64)),
        "admitted {admitted}, ideal {ideal:.0}, allowed {low:.0}..={high:.0}"
    );

    // A node that stops cleanly leaves the count at once; the others take the larger share
    // after two heartbeats (not after the 3 s a silent node takes to expire).
    let mut gone = f.nodes.pop().context("three nodes")?;
    let status = gone.stop(Duration::from_secs(10))?;
    ensure!(status.success(), "exit {status}: {}", gone.stderr());
    let stopped = Instant::now();
    for node in &f.nodes {
        wait_for_nodes(
            node,
            2,
            Duration::from_millis(3_000).saturating_sub(stopped.elapsed()),
        )?;
    }
    eprintln!(
        "fleet: every node counted 3 live gateways within {joined:?} of the set-up; 2 within {:?} \
         of one stopping",
        stopped.elapsed()
    );
    Ok(())
}

#[test]
fn redis_cluster_shares_keys_quota_and_usage() -> Result<()> {
    const QUOTA: u64 = 20;
    /// Requests per second each client sends to its node.
    const RATE: u64 = 5;
    let Some(cluster) = RedisCluster::start("fleet on Redis Cluster")? else {
        return Ok(());
    };
    let upstream = Upstream::start()?;
    let url = cluster.url();
    let nodes = (0..2)
        .map(|_| start_node_at(&url, "local"))
        .collect::<Result<Vec<_>>>()?;
    let (a, b) = (&nodes[0], &nodes[1]);
    // Heartbeats go through the cluster too.
    for node in &nodes {
        wait_for_nodes(node, 2, Duration::from_secs(5))?;
    }
    let api = create_proxy_api(a.admin, &upstream, "shop")?.id;
    let plan = create_plan(a.admin, &api, "fleet", (5000.0, 5000), Some(QUOTA as i64))?;
    let path = format!("/restapis/{api}/prod/_user_request_/pets");

    let value = "fleet-cluster-key-0123456789";
    let key = create_plan_key(a.admin, &plan, value, value)?;
    let took = wait_for(b.data, &path, value, 200, PROPAGATION)?;
    wait_for(a.data, &path, value, 200, PROPAGATION)?;
    eprintln!(
        "fleet (cluster {url}): a key created on node A answered 200 on node B after {took:?}"
    );

    // The two probes above were admitted too.
    let results = spend_quota(&nodes, &path, value, RATE)?;
    let admitted: u64 = results.iter().map(|r| r.0).sum::<u64>() + 2;
    let bound = 2 * (nodes.len() as u64 - 1) * RATE * FLUSH_INTERVAL.as_secs();
    eprintln!(
        "fleet (cluster): quota {QUOTA}/day over 2 nodes at {RATE} req/s each: admitted \
         {admitted} (overshoot {}, documented bound {bound}); per node {results:?}",
        admitted.saturating_sub(QUOTA)
    );
    ensure!(admitted >= QUOTA, "admitted {admitted} < quota {QUOTA}");
    ensure!(
        admitted <= QUOTA + bound,
        "admitted {admitted} > quota {QUOTA} + bound {bound}"
    );
    std::thread::sleep(FLUSH_INTERVAL * 2);
    for node in &nodes {
        let used = used_today(node.admin, &plan, &key)?;
        ensure!(
            used == admitted,
            "node {} reports {used} used, {admitted} admitted",
            node.admin
        );
    }
    for node in &nodes {
        ensure!(
            !node.stderr().contains("CROSSSLOT"),
            "node {} logged a cross-slot error:\n{}",
            node.admin,
            node.stderr()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Redis losing its data, dropped connections, bounded usage data
// ---------------------------------------------------------------------------------------------

/// One reply of Redis (RESP2), as far as these tests read them.
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Text(String),
    Int(i64),
    Nil,
    Error(String),
    List(Vec<Reply>),
}

impl Reply {
    /// The strings of an array reply (HKEYS, SMEMBERS).
    fn texts(&self) -> Vec<String> {
        match self {
            Reply::List(items) => items
                .iter()
                .filter_map(|r| match r {
                    Reply::Text(t) => Some(t.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Runs `commands` in order on one new connection to the Redis on 127.0.0.1:`port`.
fn redis_cmds(port: u16, commands: &[&[&str]]) -> Result<Vec<Reply>> {
    use std::io::{BufReader, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut out = Vec::with_capacity(commands.len());
    for command in commands {
        let mut bytes = format!("*{}\r\n", command.len()).into_bytes();
        for arg in *command {
            bytes.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            bytes.extend_from_slice(arg.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        writer.write_all(&bytes)?;
        out.push(read_reply(&mut reader)?);
    }
    Ok(out)
}

fn redis_cmd(port: u16, command: &[&str]) -> Result<Reply> {
    let reply = redis_cmds(port, &[command])?.remove(0);
    if let Reply::Error(e) = &reply {
        anyhow::bail!("{}: {e}", command.join(" "));
    }
    Ok(reply)
}

fn read_reply(r: &mut impl std::io::BufRead) -> Result<Reply> {
    let mut line = String::new();
    ensure!(r.read_line(&mut line)? > 0, "redis closed the connection");
    let line = line.trim_end_matches("\r\n");
    ensure!(!line.is_empty(), "empty reply line");
    let (kind, rest) = line.split_at(1);
    Ok(match kind {
        "+" => Reply::Text(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Int(rest.parse()?),
        "$" => match usize::try_from(rest.parse::<i64>()?) {
            Err(_) => Reply::Nil,
            Ok(len) => {
                let mut buf = vec![0; len + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(len);
                Reply::Text(String::from_utf8_lossy(&buf).into_owned())
            }
        },
        "*" => match usize::try_from(rest.parse::<i64>()?) {
            Err(_) => Reply::Nil,
            Ok(n) => {
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(read_reply(r)?);
                }
                Reply::List(items)
            }
        },
        other => anyhow::bail!("unexpected reply type {other:?}: {line}"),
    })
}

/// One sample of `node`'s `/metrics`.
fn node_metric(node: &Gateway, name: &str) -> Result<Option<u64>> {
    let (status, text) = curl(None, &[&format!("http://{}/metrics", node.admin)])?;
    ensure!(status == 200, "/metrics answered {status}");
    Ok(metric(&text, name))
}

/// Waits until `node` serves configuration version `want` (`gateway_config_version`).
fn wait_for_version(node: &Gateway, want: u64, limit: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let seen = node_metric(node, "gateway_config_version")?;
        if seen == Some(want) {
            return Ok(());
        }
        ensure!(
            started.elapsed() < limit,
            "node {} serves configuration version {seen:?} after {limit:?}, want {want}",
            node.admin
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until GetUsage on `addr` reports `want` requests of `key` today.
fn wait_used(addr: SocketAddr, plan: &str, key: &str, want: u64, limit: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let used = used_today(addr, plan, key);
        if matches!(used, Ok(n) if n == want) {
            return Ok(());
        }
        ensure!(
            started.elapsed() < limit,
            "GetUsage reports {used:?} used after {limit:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `count` requests with `value`; returns the statuses.
fn send(addr: SocketAddr, path: &str, value: &str, count: usize) -> Result<Vec<u16>> {
    let mut client = KeepAlive::new(addr);
    (0..count)
        .map(|_| Ok(client.get(path, Some(value))?.0))
        .collect()
}

/// Sends requests with `value` every 10 ms for `run`; returns the statuses.
fn send_for(addr: SocketAddr, path: &str, value: &str, run: Duration) -> Result<Vec<u16>> {
    let mut client = KeepAlive::new(addr);
    let started = Instant::now();
    let mut statuses = Vec::new();
    while started.elapsed() < run {
        statuses.push(client.get(path, Some(value))?.0);
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(statuses)
}

/// Days since 1970-01-01 UTC, the day usage is counted under.
fn today_number() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

fn patch(op_path: &str, value: &str) -> serde_json::Value {
    serde_json::json!({"patchOperations": [{"op": "replace", "path": op_path, "value": value}]})
}

/// One node on `redis` with an API and a plan holding one key (`value`), not yet used.
struct Single {
    _upstream: Upstream,
    node: Gateway,
    path: String,
    plan: String,
    key: String,
}

fn single(redis: &RedisServer, failure: &str, value: &str) -> Result<Single> {
    let upstream = Upstream::start()?;
    let node = start_node(redis, failure)?;
    let api = create_proxy_api(node.admin, &upstream, "shop")?.id;
    let plan = create_plan(node.admin, &api, "single", (5000.0, 5000), Some(1_000_000))?;
    let key = create_plan_key(node.admin, &plan, value, value)?;
    let path = format!("/restapis/{api}/prod/_user_request_/pets");
    Ok(Single {
        _upstream: upstream,
        node,
        path,
        plan,
        key,
    })
}

#[test]
fn store_that_lost_its_data_keeps_the_fleets_latest_configuration() -> Result<()> {
    let Some((f, mut redis)) = fleet("fleet reseed", "local", 1_000_000)? else {
        return Ok(());
    };
    let (a, b, c) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let one = "fleet-reseed-key-1-0123456789";
    let k1 = create_plan_key(a.admin, &f.plan, one, one)?;
    f.wait_all(one, 200, PROPAGATION)?;
    // C freezes (a stalled VM, a partition) knowing version `vc`; B one change later.
    let vc = node_metric(a, "gateway_config_version")?.context("A's version")?;
    wait_for_version(c, vc, PROPAGATION)?;
    c.signal(libc::SIGSTOP)?;
    let two = "fleet-reseed-key-2-0123456789";
    let k2 = create_plan_key(a.admin, &f.plan, two, two)?;
    let vb = node_metric(a, "gateway_config_version")?.context("A's version")?;
    wait_for_version(b, vb, PROPAGATION)?;
    b.signal(libc::SIGSTOP)?;

    // Redis restarts empty; A, the only node running, seeds it again with what it serves.
    redis.restart()?;
    wait_for_version(a, 1, Duration::from_secs(3))?;
    // Acknowledged changes through A bring the new numbering up to C's version, the last one
    // disabling key 1: B now knows a higher version number than the store, C the same one.
    ensure!(vc >= 2 && vb > vc, "versions {vc} and {vb}");
    for i in 2..vc {
        admin_ok(
            a.admin,
            "PATCH",
            &format!("/apikeys/{k2}"),
            Some(&patch("/name", &format!("renamed-{i}"))),
        )?;
    }
    admin_ok(
        a.admin,
        "PATCH",
        &format!("/apikeys/{k1}"),
        Some(&patch("/enabled", "false")),
    )?;
    wait_for_version(a, vc, PROPAGATION)?;

    b.signal(libc::SIGCONT)?;
    c.signal(libc::SIGCONT)?;
    // Both load the fleet's configuration: key 1 disabled, key 2 there.
    for node in &f.nodes {
        wait_for(node.data, &f.path, one, 403, Duration::from_secs(3))?;
        wait_for(node.data, &f.path, two, 200, Duration::from_secs(3))?;
    }
    // Long enough for a node to have written its old configuration back.
    std::thread::sleep(FLUSH_INTERVAL * 2);
    for node in &f.nodes {
        let (status, body) = KeepAlive::new(node.data).get(&f.path, Some(one))?;
        ensure!(
            status == 403,
            "node {}: the disabled key answers {status} {body}",
            node.admin
        );
    }
    let key = admin_ok(a.admin, "GET", &format!("/apikeys/{k1}"), None)?;
    ensure!(key["enabled"] == false, "key 1 is enabled again: {key}");
    Ok(())
}

#[test]
fn connections_redis_closed_are_retried_not_failed() -> Result<()> {
    let Some(mut redis) = RedisServer::start("fleet dropped connections")? else {
        return Ok(());
    };
    let value = "fleet-retry-key-0123456789ab";
    let s = single(&redis, "closed", value)?;
    wait_for(s.node.data, &s.path, value, 200, PROPAGATION)?;
    // Redis closes connections idle for more than 2 s: traffic resuming after a pause meets
    // a closed usage connection.
    redis_cmd(redis.port, &["CONFIG", "SET", "timeout", "2"])?;
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(4500));
        let statuses = send_for(s.node.data, &s.path, value, Duration::from_millis(1500))?;
        let refused = statuses.iter().filter(|&&st| st != 200).count();
        ensure!(
            refused == 0,
            "round {round}: {refused} of {} requests after an idle pause were refused: \
             {statuses:?}",
            statuses.len()
        );
    }
    // A restart cuts every connection (and empties the store, which is seeded again): the
    // first admin call after it still succeeds.
    for round in 0..3 {
        redis.restart()?;
        let body = serde_json::json!({"name": format!("after-restart-{round}"), "enabled": true});
        let (status, answer) = admin(s.node.admin, "POST", "/apikeys", Some(&body))?;
        ensure!(
            (200..300).contains(&status),
            "round {round}: the first admin call after a Redis restart answered {status} \
             {answer}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

#[test]
fn usage_is_indexed_again_after_the_store_lost_its_data() -> Result<()> {
    let Some(mut redis) = RedisServer::start("fleet usage index")? else {
        return Ok(());
    };
    let value = "fleet-index-key-0123456789ab";
    let s = single(&redis, "local", value)?;
    let before = send(s.node.data, &s.path, value, 5)?;
    ensure!(before.iter().all(|&st| st == 200), "{before:?}");
    wait_used(s.node.admin, &s.plan, &s.key, 5, FLUSH_INTERVAL * 3)?;
    redis.restart()?;
    wait_for_version(&s.node, 1, Duration::from_secs(3))?;
    // Usage from now on is in the new store, and GetUsage finds it.
    let after = send(s.node.data, &s.path, value, 7)?;
    ensure!(after.iter().all(|&st| st == 200), "{after:?}");
    wait_used(s.node.admin, &s.plan, &s.key, 7, FLUSH_INTERVAL * 4)?;
    Ok(())
}

#[test]
fn usage_data_in_the_store_stays_bounded() -> Result<()> {
    let Some(redis) = RedisServer::start("fleet bounded usage")? else {
        return Ok(());
    };
    let value = "fleet-bounded-key-0123456789";
    let s = single(&redis, "local", value)?;
    let (today, old) = (today_number(), today_number() - 500);
    let pair = format!("{}\u{1f}{}", s.plan, s.key);
    let days = format!("gateway:u:{{{pair}}}:d");
    let marks = format!("gateway:u:{{{pair}}}:b{today}");
    let index = format!("gateway:u:{{{}}}:keys", s.plan);
    // The key's day records as a key in use for 500 days has them, with a batch mark as the
    // layout before this one kept them.
    redis_cmd(
        redis.port,
        &[
            "HSET",
            &days,
            &format!("u{old}"),
            "9",
            &format!("a{old}"),
            "9",
            &format!("b{old}:{old}:gone-node"),
            "4",
        ],
    )?;
    let statuses = send(s.node.data, &s.path, value, 5)?;
    ensure!(statuses.iter().all(|&st| st == 200), "{statuses:?}");
    wait_used(s.node.admin, &s.plan, &s.key, 5, FLUSH_INTERVAL * 3)?;

    let fields = redis_cmd(redis.port, &["HKEYS", &days])?.texts();
    ensure!(
        fields.contains(&format!("u{today}")),
        "no record of today: {fields:?}"
    );
    ensure!(
        !fields
            .iter()
            .any(|f| f.starts_with('b') || f.ends_with(&old.to_string())),
        "batch marks or records older than the history window are kept: {fields:?}"
    );
    let ttl = |key: &str| -> Result<i64> {
        match redis_cmd(redis.port, &["TTL", key])? {
            Reply::Int(n) => Ok(n),
            other => anyhow::bail!("TTL {key}: {other:?}"),
        }
    };
    let days_ttl = ttl(&days)?;
    ensure!(
        (1..=400 * 86_400).contains(&days_ttl),
        "day records expire in {days_ttl} s"
    );
    let marks_ttl = ttl(&marks)?;
    ensure!(
        (1..=2 * 86_400).contains(&marks_ttl),
        "batch marks expire in {marks_ttl} s"
    );

    // Taking the key out of the plan takes it out of the plan's usage index; putting it back
    // indexes it again at its next request.
    admin_ok(
        s.node.admin,
        "DELETE",
        &format!("/usageplans/{}/keys/{}", s.plan, s.key),
        None,
    )?;
    let members = redis_cmd(redis.port, &["SMEMBERS", &index])?.texts();
    ensure!(
        !members.contains(&s.key),
        "a removed key stays in the usage index: {members:?}"
    );
    admin_ok(
        s.node.admin,
        "POST",
        &format!("/usageplans/{}/keys", s.plan),
        Some(&serde_json::json!({"keyId": s.key, "keyType": "API_KEY"})),
    )?;
    let statuses = send(s.node.data, &s.path, value, 1)?;
    ensure!(statuses == [200], "{statuses:?}");
    wait_used(s.node.admin, &s.plan, &s.key, 6, FLUSH_INTERVAL * 3)?;
    let members = redis_cmd(redis.port, &["SMEMBERS", &index])?.texts();
    ensure!(
        members.contains(&s.key),
        "a key put back in its plan is missing from the usage index: {members:?}"
    );
    Ok(())
}

#[test]
fn usage_left_unsent_at_shutdown_is_logged() -> Result<()> {
    let Some(mut redis) = RedisServer::start("fleet unsent usage")? else {
        return Ok(());
    };
    let value = "fleet-unsent-key-0123456789";
    let mut s = single(&redis, "local", value)?;
    wait_for(s.node.data, &s.path, value, 200, PROPAGATION)?;
    wait_used(s.node.admin, &s.plan, &s.key, 1, FLUSH_INTERVAL * 3)?;
    redis.kill();
    let statuses = send(s.node.data, &s.path, value, 5)?;
    ensure!(statuses.iter().all(|&st| st == 200), "{statuses:?}");
    let status = s.node.stop(Duration::from_secs(10))?;
    ensure!(status.success(), "exit {status}: {}", s.node.stderr());
    let log = s.node.stderr();
    ensure!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("requests=5")),
        "no error names the 5 requests left unsent:\n{log}"
    );
    Ok(())
}

#[test]
fn password_change_is_logged_with_its_reason_and_counted() -> Result<()> {
    let Some(redis) = RedisServer::start("fleet password change")? else {
        return Ok(());
    };
    let value = "fleet-password-key-0123456789";
    let s = single(&redis, "closed", value)?;
    wait_for(s.node.data, &s.path, value, 200, PROPAGATION)?;
    let failures = node_metric(&s.node, "gateway_store_failures_total")?.unwrap_or(0);
    // Redis now wants a password the gateway does not have, and the connections end (as at a
    // restart with the new setting).
    let replies = redis_cmds(
        redis.port,
        &[
            &["CONFIG", "SET", "requirepass", "new-secret-0123456789"],
            &["CLIENT", "KILL", "TYPE", "normal"],
        ],
    )?;
    ensure!(
        !replies.iter().any(|r| matches!(r, Reply::Error(_))),
        "{replies:?}"
    );
    wait_for(s.node.data, &s.path, value, 503, Duration::from_secs(3))?;
    // A few more heartbeats and version checks, all refused.
    std::thread::sleep(FLUSH_INTERVAL * 3);
    let log = s.node.stderr();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("NOAUTH"))
        .collect();
    ensure!(
        warnings.len() == 1,
        "want one warning naming NOAUTH, got {}:\n{log}",
        warnings.len()
    );
    let counted = node_metric(&s.node, "gateway_store_failures_total")?.unwrap_or(0);
    ensure!(
        counted >= failures + 3,
        "gateway_store_failures_total went from {failures} to {counted}"
    );
    ensure!(node_metric(&s.node, "gateway_store_up")? == Some(0));
    Ok(())
}
