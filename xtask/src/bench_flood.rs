//! Scenario 3: one key flooding over keep-alive while a well-behaved key runs at a fixed rate,
//! the gateway with its XDP program attached natively vs the same gateway without it.
//!
//! Two network namespaces joined by a veth: the clients' side holds two source addresses (the
//! flood's and the calm key's), the gateway's side the gateway and its upstream. Runs with and
//! without XDP alternate round by round; every figure is a median over rounds.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{Ctx, Scenario, capture, median};
use crate::{
    bench_peers::{self, TempDir},
    bench_report::{self, Bar},
    load::{self, Mode, Report, Spec},
};

const FLOOD_KEY: &str = "bench-flood-key-0000000000001";
const CALM_KEY: &str = "bench-calm-key-00000000000002";
/// The flooded key's plan: requests per second and burst.
const FLOOD_RATE: f64 = 50.0;
const FLOOD_BURST: u64 = 50;
/// The calm key's plan, never reached.
const CALM_PLAN: f64 = 100_000.0;
/// The calm key's fixed rate, requests/s, on a few keep-alive connections.
const CALM_RATE: f64 = 200.0;
const CALM_CONNECTIONS: usize = 4;
/// Keep-alive connections of the flood, each sending back to back.
const FLOOD_CONNECTIONS: usize = 16;
/// The subnet of the veth (apart from the tests' 10.77.N.0/24).
pub(super) const GATEWAY_IP: &str = "10.78.0.1";
const FLOOD_IP: &str = "10.78.0.2";
const CALM_IP: &str = "10.78.0.3";
/// `--xdp-headroom` left at its default.
const HEADROOM: f64 = 2.0;

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<String> {
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

/// The two namespaces and their veth; deleting the namespaces (on drop) removes the veth.
pub(super) struct Net {
    client: String,
    pub(super) gateway: String,
    client_if: String,
    pub(super) gateway_if: String,
}

impl Net {
    pub(super) fn create() -> Result<Self> {
        let id = std::process::id();
        let net = Net {
            client: format!("gwb-c{id}"),
            gateway: format!("gwb-g{id}"),
            client_if: format!("gwb-vc{id}"),
            gateway_if: format!("gwb-vg{id}"),
        };
        // Leftovers of an earlier run with the same PID go first.
        let _ = ip(&["netns", "del", &net.client]);
        let _ = ip(&["netns", "del", &net.gateway]);
        let _ = ip(&["link", "del", &net.client_if]);
        ip(&["netns", "add", &net.client])?;
        ip(&["netns", "add", &net.gateway])?;
        ip(&[
            "link",
            "add",
            &net.client_if,
            "type",
            "veth",
            "peer",
            "name",
            &net.gateway_if,
        ])?;
        ip(&["link", "set", &net.client_if, "netns", &net.client])?;
        ip(&["link", "set", &net.gateway_if, "netns", &net.gateway])?;
        for (ns, link, addrs) in [
            (&net.client, &net.client_if, vec![FLOOD_IP, CALM_IP]),
            (&net.gateway, &net.gateway_if, vec![GATEWAY_IP]),
        ] {
            for addr in addrs {
                ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", link])?;
            }
            ip(&["-n", ns, "link", "set", link, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.client]);
        let _ = ip(&["netns", "del", &self.gateway]);
    }
}

/// Runs a load `spec` from a thread inside network namespace `netns` (the generator's runtime
/// threads are created from it and stay there).
fn load_in(netns: &str, spec: Spec) -> Result<Report> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
            // SAFETY: setns(2) on a valid namespace descriptor changes only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            load::run(&spec)
        })
        .join()
        .expect("the load thread does not panic")
    })
}

/// The gateway's JSON model: `GET /flood` and `GET /calm` needing a key, the flood key on a
/// plan of rate 50 / burst 50, the calm key on a generous one.
fn model(upstream: SocketAddr) -> serde_json::Value {
    let resource = |name: &str| {
        serde_json::json!({
            "id": name,
            "path": format!("/{name}"),
            "resourceMethods": {"GET": {
                "apiKeyRequired": true,
                "methodIntegration": {"type": "HTTP_PROXY", "uri": format!("http://{upstream}/{name}")}
            }}
        })
    };
    let plan = |id: &str, rate: f64, burst: u64| {
        serde_json::json!({
            "id": id,
            "name": id,
            "apiStages": [{"apiId": bench_peers::API_ID, "stage": "prod"}],
            "throttle": {"rateLimit": rate, "burstLimit": burst}
        })
    };
    serde_json::json!({
        "restApis": [{
            "id": bench_peers::API_ID,
            "name": "flood",
            "resources": [resource("flood"), resource("calm")],
            "stages": [{"stageName": "prod"}]
        }],
        "apiKeys": [
            {"id": "kflood", "value": FLOOD_KEY, "enabled": true},
            {"id": "kcalm", "value": CALM_KEY, "enabled": true}
        ],
        "usagePlans": [
            plan("tight", FLOOD_RATE, FLOOD_BURST),
            plan("roomy", CALM_PLAN, CALM_PLAN as u64)
        ],
        "usagePlanKeys": [
            {"usagePlanId": "tight", "keyId": "kflood"},
            {"usagePlanId": "roomy", "keyId": "kcalm"}
        ],
        "account": {"throttleSettings": {"rateLimit": 1.0e9, "burstLimit": 2_000_000_000u64}}
    })
}

/// The gateway's `/metrics`, fetched with curl inside its namespace.
pub(super) fn metrics(netns: &str, admin: SocketAddr) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sS", "-m", "10"])
        .arg(format!("http://{admin}/metrics"))
        .output()
        .context("cannot run curl")?;
    if !out.status.success() {
        bail!("/metrics: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `gateway_requests_total` of `resource`, summed over statuses, with `status` if given.
fn requests(exposition: &str, resource: &str, status: Option<&str>) -> f64 {
    let resource = format!("resource=\"{resource}\"");
    let status = status.map(|s| format!("status=\"{s}\""));
    exposition
        .lines()
        .filter(|l| l.starts_with("gateway_requests_total{") && l.contains(&resource))
        .filter(|l| status.as_ref().is_none_or(|s| l.contains(s.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One unlabelled sample of `name`; 0 when absent (no XDP program, no counter).
pub(super) fn sample(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One run's figures.
#[derive(Clone, Default)]
struct Run {
    cpu: f64,
    calm_p50: f64,
    calm_p99: f64,
    calm_not_ok: f64,
    seen: f64,
    admitted: f64,
    drops: f64,
    flood_answers: f64,
    flood_unanswered: f64,
}

/// One round of one condition: a fresh gateway (and upstream), a warm-up of the calm key,
/// then the calm key at its fixed rate alongside the flood.
fn round(ctx: &Ctx, net: &Net, xdp: bool) -> Result<Run> {
    let dir = TempDir::new("flood")?;
    let (_upstream, upstream) = bench_peers::upstream_in(1, Some(&net.gateway))?;
    let mut extra = vec![];
    if xdp {
        extra = vec!["--xdp-iface", &net.gateway_if, "--xdp-mode", "native"];
    }
    let listen = format!("{GATEWAY_IP}:0");
    let gw = bench_peers::gateway_in(
        &ctx.gateway,
        &dir.path,
        &model(upstream),
        2,
        Some(&net.gateway),
        &listen,
        &extra,
    )?;
    if xdp {
        let link = ip(&["-n", &net.gateway, "link", "show", &net.gateway_if])?;
        if !link.contains("prog/xdp") {
            bail!("XDP is not attached natively: {link}");
        }
    }
    let spec = |key: &str, source: &str, connections, mode, duration| -> Result<Spec> {
        Ok(Spec {
            addr: gw.data,
            path: format!("/prod/{}", if key == FLOOD_KEY { "flood" } else { "calm" }),
            keys: Arc::new(vec![key.to_string()]),
            connections,
            duration,
            mode,
            threads: 1,
            source: Some(source.parse::<IpAddr>()?),
        })
    };
    // The kernel maps are synced within 250 ms of start; the warm-up also fills the
    // upstream connection pool.
    std::thread::sleep(Duration::from_millis(500));
    let calm_mode = Mode::Open { rate: CALM_RATE };
    load_in(
        &net.client,
        spec(
            CALM_KEY,
            CALM_IP,
            CALM_CONNECTIONS,
            calm_mode,
            Duration::from_millis(500),
        )?,
    )?;
    let before = metrics(&net.gateway, gw.admin)?;
    let pid = gw.proc.pid();
    let cpu_before = bench_peers::cpu_seconds(pid)?;
    let calm_spec = spec(CALM_KEY, CALM_IP, CALM_CONNECTIONS, calm_mode, ctx.plan.run)?;
    let flood_spec = spec(
        FLOOD_KEY,
        FLOOD_IP,
        FLOOD_CONNECTIONS,
        Mode::Closed,
        ctx.plan.run,
    )?;
    let (calm, flood) = std::thread::scope(|s| {
        let flooding = s.spawn(|| load_in(&net.client, flood_spec));
        let calm = load_in(&net.client, calm_spec);
        (
            calm,
            flooding.join().expect("the flood thread does not panic"),
        )
    });
    let (calm, flood) = (calm?, flood?);
    let cpu = bench_peers::cpu_seconds(pid)? - cpu_before;
    // The XDP counters reach /metrics once a second.
    std::thread::sleep(Duration::from_millis(1100));
    let after = metrics(&net.gateway, gw.admin)?;
    let delta = |f: &dyn Fn(&str) -> f64| f(&after) - f(&before);
    let run = Run {
        cpu,
        calm_p50: calm.ms(0.5),
        calm_p99: calm.ms(0.99),
        calm_not_ok: (calm.answered() - calm.status(200) + calm.errors) as f64,
        seen: delta(&|e| requests(e, "/flood/GET", None)),
        admitted: delta(&|e| requests(e, "/flood/GET", Some("200"))),
        drops: delta(&|e| sample(e, "gateway_xdp_dropped_over_rate_total")),
        flood_answers: flood.answered() as f64,
        flood_unanswered: flood.errors as f64,
    };
    if run.seen == 0.0 && flood.answered() > 0 {
        bail!("the flood's requests are missing from /metrics (resource label changed?)");
    }
    Ok(run)
}

/// Scenario 3.
pub(super) fn flood(ctx: &Ctx) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "## {}\n", Scenario::Flood.title())?;
    if capture("id", &["-u"])? != "0" {
        writeln!(
            out,
            "Skipped: needs root (network namespaces, a veth and the XDP program).\n"
        )?;
        return Ok(out);
    }
    let net = Net::create()?;
    let rounds = ctx.plan.rounds;
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        // Alternate which condition goes first.
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for xdp in order {
            let run = round(ctx, &net, xdp)?;
            crate::step(&format!(
                "bench: round {} XDP {}: proxy CPU {:.2} s, calm p50/p99 {:.2}/{:.2} ms \
                 (not 200: {}), flood seen by the proxy {} ({} admitted), kernel drops {}, \
                 flood answers {} (unanswered {})",
                r + 1,
                if xdp { "on" } else { "off" },
                run.cpu,
                run.calm_p50,
                run.calm_p99,
                run.calm_not_ok,
                run.seen,
                run.admitted,
                run.drops,
                run.flood_answers,
                run.flood_unanswered
            ));
            runs[usize::from(xdp)].push(run);
        }
    }
    drop(net);
    let med = |xdp: bool, f: fn(&Run) -> f64| -> f64 {
        let mut v: Vec<f64> = runs[usize::from(xdp)].iter().map(f).collect();
        median(&mut v)
    };
    let secs = ctx.plan.run.as_secs_f64();
    writeln!(
        out,
        "Two network namespaces joined by a veth; the gateway (2 worker threads) and its \
         upstream in one, the clients in the other with two source addresses. The flood key \
         (plan rate {FLOOD_RATE:.0}/s, burst {FLOOD_BURST}) is sent back to back on \
         {FLOOD_CONNECTIONS} keep-alive connections from one address while the calm key \
         (a generous plan) runs open loop at {CALM_RATE:.0} requests/s on {CALM_CONNECTIONS} \
         connections from the other, both for {secs:.0} s. \"XDP on\": `--xdp-iface <veth> \
         --xdp-mode native` (headroom {HEADROOM}: the kernel bucket is twice the plan); \"XDP \
         off\": the same gateway without `--xdp-iface`. A fresh gateway per run; the \
         conditions alternate, median of {rounds} rounds each. Proxy CPU: the gateway's user + \
         system seconds over the run. Calm latency from the scheduled send time. \"Seen by \
         the proxy\": the flood's requests in `gateway_requests_total`; kernel drops: \
         `gateway_xdp_dropped_over_rate_total`. The machine has {} cores shared by both \
         clients, the gateway and the upstream.\n\n\
         A request start the kernel drops is not refused but lost: its connection stalls \
         until TCP retransmits it (200 ms and up), so with XDP on the flood's keep-alive \
         connections spend most of the run waiting, and the client sees few answers. The \
         proxy's exact answers stay with the proxy: it admits about the plan's share either \
         way (with XDP on a little more, probably because stalled requests finish in the load \
         generator's 3 s grace after the run, when the bucket has refilled).\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    )?;
    type Field = (&'static str, fn(&Run) -> f64, &'static str);
    let fields: [Field; 8] = [
        ("proxy CPU s", |r| r.cpu, "{:.2}"),
        ("calm p50 ms", |r| r.calm_p50, "{:.2}"),
        ("calm p99 ms", |r| r.calm_p99, "{:.2}"),
        ("calm not 200", |r| r.calm_not_ok, "{:.0}"),
        ("flood seen by the proxy", |r| r.seen, "{:.0}"),
        ("flood admitted (200)", |r| r.admitted, "{:.0}"),
        ("kernel drops", |r| r.drops, "{:.0}"),
        ("flood answers at the client", |r| r.flood_answers, "{:.0}"),
    ];
    writeln!(out, "| | XDP on | XDP off | on / off |\n|---|---|---|---|")?;
    for (label, f, format) in fields {
        let (on, off) = (med(true, f), med(false, f));
        let fmt = |v: f64| {
            if format == "{:.2}" {
                format!("{v:.2}")
            } else {
                format!("{v:.0}")
            }
        };
        let ratio = if off > 0.0 {
            let ratio = on / off;
            if ratio < 0.1 {
                format!("{ratio:.3}x")
            } else {
                format!("{ratio:.2}x")
            }
        } else {
            "-".to_string()
        };
        writeln!(out, "| {label} | {} | {} | {ratio} |", fmt(on), fmt(off))?;
    }
    writeln!(out)?;
    let (cpu_on, cpu_off) = (med(true, |r| r.cpu), med(false, |r| r.cpu));
    let (p99_on, p99_off) = (med(true, |r| r.calm_p99), med(false, |r| r.calm_p99));
    let (seen_on, seen_off) = (med(true, |r| r.seen), med(false, |r| r.seen));
    let mut verdicts = Vec::new();
    let mut verdict = |what: &str, on: f64, off: f64, digits: usize, unit: &str| {
        let ratio = on / off.max(f64::MIN_POSITIVE);
        if on < off {
            verdicts.push(format!(
                "- XDP on wins on {what}: {on:.digits$}{unit} vs {off:.digits$}{unit} \
                 ({ratio:.3}x)."
            ));
        } else {
            verdicts.push(format!(
                "- **XDP does not win on {what}:** {on:.digits$}{unit} with it vs \
                 {off:.digits$}{unit} without ({ratio:.2}x)."
            ));
        }
    };
    verdict("proxy CPU", cpu_on, cpu_off, 2, " s");
    verdict("the calm key's p99", p99_on, p99_off, 2, " ms");
    verdict(
        "flood requests reaching the proxy",
        seen_on,
        seen_off,
        0,
        "",
    );
    for v in verdicts {
        writeln!(out, "{v}")?;
    }
    writeln!(out)?;
    bench_report::bars(
        &ctx.root.join("bench/flood.svg"),
        &format!("Gateway CPU seconds over a {secs:.0} s flood (lower is better)"),
        "CPU s",
        &[
            Bar {
                label: "XDP on".into(),
                value: cpu_on,
            },
            Bar {
                label: "XDP off".into(),
                value: cpu_off,
            },
        ],
    )?;
    writeln!(out, "![proxy CPU under the flood](flood.svg)\n")?;
    Ok(out)
}
