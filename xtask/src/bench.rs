//! `cargo xtask bench [SCENARIO...] [--quick]`: the gateway against nginx and HAProxy doing
//! the same job, on loopback, with this crate's load generator ([`crate::load`]).
//!
//! Each scenario writes a section to `bench/results/<scenario>.md` (and its charts to
//! `bench/*.svg`); `bench/RESULTS.md` is then assembled from every section present, so running
//! one scenario refreshes it without losing the others. Timings on a small machine are noisy:
//! contenders are interleaved round by round and every figure is a median over rounds, quoted
//! next to its ratio to the gateway.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

#[path = "bench_flood.rs"]
mod bench_flood;

use crate::{
    bench_peers::{self, Gateway, PeerConfig, Proc, TempDir},
    bench_report::{self, Bar},
    load::{self, Mode, Spec},
};

/// Debian packages of the peers; installed by `bench` only.
const BENCH_PACKAGES: &[(&str, &str)] = &[("nginx", "nginx"), ("haproxy", "haproxy")];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// Requests/s and latency: upstream direct vs gateway vs nginx vs HAProxy, 1,000 keys.
    Throughput,
    /// One key at rate 50 / burst 100 hammered for 10 s: admitted vs the ideal 600.
    Accuracy,
    /// One key flooding while another runs at a fixed rate, with and without XDP (root).
    Flood,
    /// Nanoseconds per packet of each XDP path (BPF_PROG_TEST_RUN).
    Kernel,
    /// 10k / 100k (/ 1M) keys: RSS, start-up, CSV import, kernel map sync.
    Scale,
}

impl Scenario {
    /// The section heading in `bench/RESULTS.md`.
    fn title(self) -> &'static str {
        match self {
            Scenario::Throughput => "1. Throughput",
            Scenario::Accuracy => "2. Accuracy",
            Scenario::Flood => "3. Flood",
            Scenario::Kernel => "4. Kernel cost",
            Scenario::Scale => "5. Scale",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Accuracy => "accuracy",
            Scenario::Flood => "flood",
            Scenario::Kernel => "kernel",
            Scenario::Scale => "scale",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scenarios to run (default: all that are implemented).
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Shorter runs and fewer rounds (under 10 minutes in all).
    #[arg(long)]
    quick: bool,
}

/// How long and how often things run.
struct Plan {
    quick: bool,
    /// Rounds over the interleaved contenders; medians are over these.
    rounds: usize,
    /// Length of one measured load run.
    run: Duration,
    /// Keep-alive connections of the load generator.
    connections: usize,
    /// Total rate of the open-loop runs, requests/s (below every contender's capacity).
    open_rate: f64,
    accuracy_rounds: usize,
    scale_sizes: Vec<usize>,
    kernel_rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                quick,
                rounds: 3,
                run: Duration::from_secs(3),
                connections: 32,
                open_rate: 10_000.0,
                accuracy_rounds: 1,
                scale_sizes: vec![10_000, 100_000],
                kernel_rounds: 1,
            }
        } else {
            Plan {
                quick,
                rounds: 5,
                run: Duration::from_secs(10),
                connections: 32,
                open_rate: 10_000.0,
                accuracy_rounds: 3,
                scale_sizes: vec![10_000, 100_000, 1_000_000],
                kernel_rounds: 3,
            }
        }
    }
}

/// What every scenario needs.
struct Ctx {
    root: PathBuf,
    gateway: PathBuf,
    object: PathBuf,
    plan: Plan,
    command: String,
    date: String,
}

/// Entry point of `cargo xtask bench`.
pub fn main(root: &Path, args: Args) -> Result<()> {
    // The load generator must be optimised: run the whole benchmark from a release xtask.
    if cfg!(debug_assertions) {
        crate::step("building xtask in release mode for the load generator");
        crate::run(Command::new("cargo").current_dir(root).args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "xtask",
        ]))
        .context("building the release xtask failed")?;
        let exe = crate::target_dir(root).join("release/xtask");
        let error = Command::new(&exe).args(std::env::args_os().skip(1)).exec();
        return Err(error).with_context(|| format!("cannot run {}", exe.display()));
    }
    let started = Instant::now();
    crate::setup()?;
    install_peers()?;
    let gateway = crate::build(root, true)?;
    let object = crate::ebpf_object(root);
    let mut scenarios = args.scenarios.clone();
    if scenarios.is_empty() {
        scenarios = vec![
            Scenario::Throughput,
            Scenario::Accuracy,
            Scenario::Flood,
            Scenario::Kernel,
            Scenario::Scale,
        ];
    }
    scenarios.sort();
    scenarios.dedup();
    let mut command = String::from("cargo xtask bench");
    for s in &args.scenarios {
        command.push(' ');
        command.push_str(s.name());
    }
    if args.quick {
        command.push_str(" --quick");
    }
    let ctx = Ctx {
        root: root.to_path_buf(),
        gateway,
        object,
        plan: Plan::new(args.quick),
        command,
        date: capture("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?,
    };
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results)?;
    for scenario in scenarios {
        crate::step(&format!("bench: scenario {}", scenario.name()));
        let began = Instant::now();
        let section = match scenario {
            Scenario::Throughput => throughput(&ctx)?,
            Scenario::Accuracy => accuracy(&ctx)?,
            Scenario::Kernel => kernel(&ctx)?,
            Scenario::Scale => scale(&ctx)?,
            Scenario::Flood => bench_flood::flood(&ctx)?,
        };
        let section = format!(
            "{section}\n_Produced by `{}` on {} in {:.0} s._\n",
            ctx.command,
            ctx.date,
            began.elapsed().as_secs_f64()
        );
        std::fs::write(results.join(format!("{}.md", scenario.name())), section)?;
        assemble(&ctx)?;
    }
    assemble(&ctx)?;
    crate::step(&format!(
        "bench: wrote bench/RESULTS.md in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Installs nginx and HAProxy when missing, as `setup` installs the test packages.
fn install_peers() -> Result<()> {
    let mut missing = Vec::new();
    for (command, package) in BENCH_PACKAGES {
        if crate::which(command).is_some() || Path::new("/usr/sbin").join(command).is_file() {
            crate::step(&format!("{command} ({package}): present"));
        } else {
            missing.push(*package);
        }
    }
    if !missing.is_empty() {
        crate::apt_install(&missing)?;
    }
    Ok(())
}

/// A command's stdout and stderr, trimmed.
fn capture(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{program}`"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text.trim().to_string())
}

/// Writes `bench/RESULTS.md`: the machine, the versions, and every section present.
fn assemble(ctx: &Ctx) -> Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or_else(String::new, |kib| {
            format!("{:.0} GiB", kib / 1024.0 / 1024.0)
        });
    let first = |s: String| s.lines().next().unwrap_or("").to_string();
    let mut out = String::new();
    writeln!(out, "# Benchmark results\n")?;
    writeln!(
        out,
        "Written by `cargo xtask bench` (last: `{}`, {}). Every figure is a median over \
         interleaved rounds of the contenders; ratios are to the gateway. All traffic is on \
         loopback (scenario 3: a veth between namespaces) of one machine that also runs the \
         load generator and the upstream, so absolute numbers say little: compare within a \
         table.\n",
        ctx.command, ctx.date
    )?;
    writeln!(out, "| | |\n|---|---|")?;
    writeln!(
        out,
        "| machine | {cpu}, {cores} cores, {memory} RAM, Linux {} |",
        capture("uname", &["-r"])?
    )?;
    writeln!(
        out,
        "| gateway | {} (release build) |",
        first(capture(&ctx.gateway.to_string_lossy(), &["--version"])?)
    )?;
    writeln!(
        out,
        "| nginx | {} |",
        first(capture("nginx", &["-v"])?).trim_start_matches("nginx version: ")
    )?;
    writeln!(
        out,
        "| HAProxy | {} |",
        first(capture("haproxy", &["-v"])?)
            .trim_start_matches("HAProxy version ")
            .split(' ')
            .next()
            .unwrap_or("")
    )?;
    writeln!(
        out,
        "| rustc | {} |",
        first(capture("rustc", &["--version"])?)
    )?;
    writeln!(out)?;
    let results = ctx.root.join("bench/results");
    for scenario in Scenario::value_variants() {
        let path = results.join(format!("{}.md", scenario.name()));
        match std::fs::read_to_string(&path) {
            Ok(section) => writeln!(out, "{section}")?,
            Err(_) => writeln!(
                out,
                "## {} (not run yet)\n\nRun `cargo xtask bench {}`.\n",
                scenario.title(),
                scenario.name()
            )?,
        }
    }
    std::fs::write(ctx.root.join("bench/RESULTS.md"), out)?;
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// `n` distinct API key values (24 characters and more).
fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("bench-key-{i:08}-a1b2c3d4"))
        .collect()
}

/// The contenders of scenarios 1 and 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Direct,
    Gateway,
    Nginx,
    Haproxy,
}

impl Who {
    fn label(self) -> &'static str {
        match self {
            Who::Direct => "upstream direct",
            Who::Gateway => "gateway",
            Who::Nginx => "nginx",
            Who::Haproxy => "HAProxy",
        }
    }
}

/// A running contender; its processes stop when it drops.
struct Running {
    addr: SocketAddr,
    /// The proxy's main process (none for the upstream alone).
    pid: Option<u32>,
    _procs: Vec<Proc>,
    _dir: TempDir,
}

/// Starts `who` with `threads` workers in front of `upstream`, every key in `keys` on one
/// plan of `rate`/s and `burst`.
fn start(
    ctx: &Ctx,
    who: Who,
    threads: usize,
    upstream: SocketAddr,
    keys: &[String],
    rate: u64,
    burst: u64,
) -> Result<Running> {
    let dir = TempDir::new(who.label().split(' ').next().unwrap_or("x"))?;
    let peer = |listen| PeerConfig {
        threads,
        listen,
        upstream,
        keys,
        rate,
        burst,
    };
    let (addr, procs) = match who {
        Who::Direct => (upstream, Vec::new()),
        Who::Gateway => {
            let model = bench_peers::gateway_model(upstream, keys, rate as f64, burst);
            let Gateway { proc, data, .. } =
                bench_peers::gateway(&ctx.gateway, &dir.path, &model, threads, &[])?;
            (data, vec![proc])
        }
        Who::Nginx => {
            let listen = bench_peers::free_addr()?;
            (
                listen,
                vec![bench_peers::nginx(&ctx.root, &dir.path, &peer(listen))?],
            )
        }
        Who::Haproxy => {
            let listen = bench_peers::free_addr()?;
            (
                listen,
                vec![bench_peers::haproxy(&ctx.root, &dir.path, &peer(listen))?],
            )
        }
    };
    Ok(Running {
        addr,
        pid: procs.first().map(Proc::pid),
        _procs: procs,
        _dir: dir,
    })
}

/// One contender's figures in one round of scenario 1.
#[derive(Default, Clone)]
struct Sample {
    rps: f64,
    p50: f64,
    p99: f64,
    open_p50: f64,
    open_p99: f64,
    open_p999: f64,
    /// Proxy CPU milliseconds per 1,000 requests in the closed loop.
    cpu_ms: f64,
    not_ok: u64,
}

/// Scenario 1: closed-loop requests/s and open-loop latency, 1,000 keys, limits not hit.
fn throughput(ctx: &Ctx) -> Result<String> {
    let plan = &ctx.plan;
    let keys = Arc::new(keys(1000));
    let (_upstream_proc, upstream) = bench_peers::upstream(1)?;
    let lineup: Vec<(Who, usize)> = vec![
        (Who::Direct, 0),
        (Who::Gateway, 1),
        (Who::Nginx, 1),
        (Who::Haproxy, 1),
        (Who::Gateway, 2),
        (Who::Nginx, 2),
        (Who::Haproxy, 2),
    ];
    let mut samples: BTreeMap<(Who, usize), Vec<Sample>> = BTreeMap::new();
    for round in 0..plan.rounds {
        // Rotate the order each round so no contender always runs first or last.
        let mut order = lineup.clone();
        order.rotate_left(round % lineup.len());
        for (who, threads) in order {
            let running = start(
                ctx,
                who,
                threads.max(1),
                upstream,
                &keys,
                1_000_000,
                1_000_000,
            )?;
            let spec = |mode, duration| Spec {
                addr: running.addr,
                path: bench_peers::PATH.to_string(),
                keys: keys.clone(),
                connections: plan.connections,
                duration,
                mode,
                threads: 1,
                source: None,
            };
            load::run(&spec(Mode::Closed, Duration::from_millis(500)))?;
            let cpu_before = running.pid.map(bench_peers::cpu_seconds).transpose()?;
            let closed = load::run(&spec(Mode::Closed, plan.run))?;
            let cpu_ms = match (running.pid, cpu_before) {
                (Some(pid), Some(before)) => {
                    (bench_peers::cpu_seconds(pid)? - before) * 1e6
                        / closed.answered().max(1) as f64
                }
                _ => f64::NAN,
            };
            let open = load::run(&spec(
                Mode::Open {
                    rate: plan.open_rate,
                },
                plan.run,
            ))?;
            let sample = Sample {
                rps: closed.rps(),
                p50: closed.ms(0.5),
                p99: closed.ms(0.99),
                open_p50: open.ms(0.5),
                open_p99: open.ms(0.99),
                open_p999: open.ms(0.999),
                cpu_ms,
                not_ok: closed.answered() - closed.status(200) + closed.errors + open.answered()
                    - open.status(200)
                    + open.errors,
            };
            crate::step(&format!(
                "bench: round {} {} threads={threads}: {:.0} req/s, p99 {:.2} ms; open loop p99 {:.2} ms; not 200: {}",
                round + 1,
                who.label(),
                sample.rps,
                sample.p99,
                sample.open_p99,
                sample.not_ok
            ));
            samples.entry((who, threads)).or_default().push(sample);
        }
    }
    let med = |who, threads, f: fn(&Sample) -> f64| -> f64 {
        let mut v: Vec<f64> = samples[&(who, threads)].iter().map(f).collect();
        median(&mut v)
    };
    let mut out = String::new();
    writeln!(out, "## {}\n", Scenario::Throughput.title())?;
    writeln!(
        out,
        "1,000 keys on one plan whose limits are never hit; each request picks a key at \
         random. Every contender proxies to the same upstream (a small hyper server, 1 \
         thread) over keep-alive. Closed loop: {} keep-alive connections sending back to \
         back for {} s (requests/s, latency under saturation). Open loop: {:.0} requests/s \
         on a fixed schedule for {} s, latency from the scheduled send time. The load \
         generator has 1 thread; \"threads\" are the proxy's (gateway: tokio workers, nginx: \
         worker processes, HAProxy: `nbthread`). The machine has {} cores shared by the \
         generator, the proxy and the upstream, so a second proxy thread competes with them \
         rather than adding a core. \"upstream direct\" is the floor: the generator and the \
         upstream alone (its open-loop latency includes the generator's 1 ms timer \
         granularity, which every row shares). CPU: the proxy's user + system time (nginx: \
         master and workers) per 1,000 closed-loop requests. Median of {} interleaved \
         rounds.\n",
        plan.connections,
        plan.run.as_secs(),
        plan.open_rate,
        plan.run.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        plan.rounds
    )?;
    writeln!(
        out,
        "| contender | threads | requests/s | vs gateway | p50 ms | p99 ms | CPU ms / 1k req | open-loop p50 ms | p99 ms | p99.9 ms | not 200 |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    let mut rps_bars = Vec::new();
    let mut p99_bars = Vec::new();
    for &(who, threads) in &lineup {
        let gateway_rps = med(Who::Gateway, threads.max(1), |s| s.rps);
        let rps = med(who, threads, |s| s.rps);
        let not_ok: u64 = samples[&(who, threads)].iter().map(|s| s.not_ok).sum();
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.2}x | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {} |",
            who.label(),
            if threads == 0 {
                "-".to_string()
            } else {
                threads.to_string()
            },
            rps,
            rps / gateway_rps,
            med(who, threads, |s| s.p50),
            med(who, threads, |s| s.p99),
            if threads == 0 {
                "-".to_string()
            } else {
                format!("{:.0}", med(who, threads, |s| s.cpu_ms))
            },
            med(who, threads, |s| s.open_p50),
            med(who, threads, |s| s.open_p99),
            med(who, threads, |s| s.open_p999),
            not_ok
        )?;
        let label = if threads == 0 {
            who.label().to_string()
        } else {
            format!("{} ({}t)", who.label(), threads)
        };
        rps_bars.push(Bar {
            label: label.clone(),
            value: rps,
        });
        p99_bars.push(Bar {
            label,
            value: med(who, threads, |s| s.open_p99),
        });
    }
    let winner = |threads: usize| -> Vec<(&'static str, f64)> {
        let gw = med(Who::Gateway, threads, |s| s.rps);
        [Who::Nginx, Who::Haproxy]
            .into_iter()
            .map(|w| (w.label(), med(w, threads, |s| s.rps) / gw))
            .filter(|&(_, ratio)| ratio > 1.05)
            .collect()
    };
    writeln!(out)?;
    for threads in [1, 2] {
        let winners = winner(threads);
        if winners.is_empty() {
            writeln!(
                out,
                "- With {threads} thread(s) no peer is more than 5% faster than the gateway."
            )?;
        } else {
            writeln!(
                out,
                "- **Where a peer wins:** with {threads} {}, {} {} more requests/s than the gateway ({}).",
                if threads == 1 { "thread" } else { "threads" },
                winners
                    .iter()
                    .map(|(w, _)| *w)
                    .collect::<Vec<_>>()
                    .join(" and "),
                if winners.len() == 1 {
                    "serves"
                } else {
                    "serve"
                },
                winners
                    .iter()
                    .map(|(w, r)| format!("{w} {r:.2}x"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
    }
    writeln!(out)?;
    bench_report::bars(
        &ctx.root.join("bench/throughput.svg"),
        "Closed loop: requests/s (1,000 keys; higher is better)",
        "requests/s",
        &rps_bars,
    )?;
    bench_report::bars(
        &ctx.root.join("bench/latency.svg"),
        &format!(
            "Open loop at {:.0} req/s: p99 latency (lower is better)",
            plan.open_rate
        ),
        "p99 ms",
        &p99_bars,
    )?;
    writeln!(out, "![requests per second](throughput.svg)\n")?;
    writeln!(out, "![open-loop p99 latency](latency.svg)\n")?;
    Ok(out)
}

/// Scenario 2: one key at rate 50 / burst 100 hammered for 10 s; admitted vs the ideal.
fn accuracy(ctx: &Ctx) -> Result<String> {
    const RATE: u64 = 50;
    const BURST: u64 = 100;
    const TIME: Duration = Duration::from_secs(10);
    let ideal = (BURST + RATE * TIME.as_secs()) as f64;
    let keys = Arc::new(keys(1));
    let (_upstream_proc, upstream) = bench_peers::upstream(1)?;
    let lineup = [Who::Gateway, Who::Nginx, Who::Haproxy];
    let mut admitted: BTreeMap<Who, Vec<f64>> = BTreeMap::new();
    let mut refused: BTreeMap<Who, Vec<f64>> = BTreeMap::new();
    for round in 0..ctx.plan.accuracy_rounds {
        let mut order = lineup;
        order.rotate_left(round % lineup.len());
        for who in order {
            let running = start(ctx, who, 2, upstream, &keys, RATE, BURST)?;
            let report = load::run(&Spec {
                addr: running.addr,
                path: bench_peers::PATH.to_string(),
                keys: keys.clone(),
                connections: 8,
                duration: TIME,
                mode: Mode::Closed,
                threads: 1,
                source: None,
            })?;
            crate::step(&format!(
                "bench: round {} {}: admitted {} (ideal {ideal:.0}), 429: {}, other: {}",
                round + 1,
                who.label(),
                report.status(200),
                report.status(429),
                report.answered() - report.status(200) - report.status(429) + report.errors
            ));
            admitted
                .entry(who)
                .or_default()
                .push(report.status(200) as f64);
            refused
                .entry(who)
                .or_default()
                .push(report.status(429) as f64);
        }
    }
    let mut out = String::new();
    writeln!(out, "## {}\n", Scenario::Accuracy.title())?;
    writeln!(
        out,
        "One key on a plan of rate {RATE}/s, burst {BURST}, hammered for {} s by 8 keep-alive \
         connections sending back to back. A token bucket that starts full admits \
         {BURST} + {RATE} x {} = {ideal:.0}. nginx: `limit_req rate={RATE}r/s burst={BURST} \
         nodelay`. HAProxy has no token bucket: its stick-table counts admitted requests in a \
         sliding window, set to {BURST} per {} s (the same long-run rate, a burst of {BURST}). \
         Each contender runs with 2 threads. Median of {} round(s).\n",
        TIME.as_secs(),
        TIME.as_secs(),
        BURST / RATE,
        ctx.plan.accuracy_rounds
    )?;
    writeln!(
        out,
        "| contender | admitted | ideal | error | refused (429) |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    let mut bars = Vec::new();
    for who in lineup {
        let a = median(admitted.get_mut(&who).context("measured")?);
        let r = median(refused.get_mut(&who).context("measured")?);
        writeln!(
            out,
            "| {} | {a:.0} | {ideal:.0} | {:+.1}% | {r:.0} |",
            who.label(),
            (a - ideal) / ideal * 100.0
        )?;
        bars.push(Bar {
            label: who.label().to_string(),
            value: a,
        });
    }
    writeln!(out)?;
    bars.push(Bar {
        label: "ideal".into(),
        value: ideal,
    });
    bench_report::bars(
        &ctx.root.join("bench/accuracy.svg"),
        &format!(
            "Admitted in {} s at rate {RATE}, burst {BURST} (ideal {ideal:.0})",
            TIME.as_secs()
        ),
        "admitted requests",
        &bars,
    )?;
    writeln!(out, "![admitted vs ideal](accuracy.svg)\n")?;
    Ok(out)
}

/// Scenario 4: the XDP program's cost per packet on each path, from the privileged
/// `per_path_cost` test (BPF_PROG_TEST_RUN with repeat).
fn kernel(ctx: &Ctx) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "## {}\n", Scenario::Kernel.title())?;
    if capture("id", &["-u"])? != "0" {
        writeln!(out, "Not measured: loading the XDP program needs root.\n")?;
        return Ok(out);
    }
    let mut costs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for round in 0..ctx.plan.kernel_rounds {
        let output = Command::new("cargo")
            .current_dir(&ctx.root)
            .env("GATEWAY_EBPF_OBJECT", &ctx.object)
            .env("GATEWAY_REQUIRE_PRIVILEGED", "1")
            .args([
                "test",
                "--quiet",
                "--release",
                "--package",
                "gateway-userspace",
                "--test",
                "xdp_test_run",
                "--",
                "--exact",
                "per_path_cost",
                "--nocapture",
            ])
            .output()
            .context("cannot run the per-path cost test")?;
        if !output.status.success() {
            bail!(
                "the per-path cost test failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let text = String::from_utf8_lossy(&output.stderr);
        let mut section = "";
        for line in text.lines() {
            if line.starts_with("per-path cost, average") {
                section = "repeat";
            } else if line.starts_with("per-path cost, median") {
                section = "single";
            } else if let Some(ns) = line.trim_end().strip_suffix(" ns")
                && line.starts_with("  ")
            {
                let (name, value) = ns.trim().rsplit_once(' ').context("a cost line")?;
                let name = format!("{} | {}", name.trim(), section);
                if round == 0 {
                    order.push(name.clone());
                }
                costs.entry(name).or_default().push(value.trim().parse()?);
            }
        }
    }
    writeln!(
        out,
        "The XDP program loaded (not attached) and run on crafted frames with \
         `BPF_PROG_TEST_RUN`: \"repeat\" is the kernel's average over 1,000,000 runs of one \
         frame (best of 3); \"single\" is the median of 20,000 single runs of distinct frames, \
         which includes the kernel's per-call timer overhead (an admitted request start \
         changes state, so it cannot be repeated). From \
         `gateway-userspace/tests/xdp_test_run.rs` (`per_path_cost`), median of {} run(s).\n",
        ctx.plan.kernel_rounds
    )?;
    writeln!(out, "| path | measured by | ns per packet |\n|---|---|---|")?;
    for name in order {
        let (path, how) = name.split_once(" | ").unwrap_or((&name, ""));
        let value = median(costs.get_mut(&name).context("measured")?);
        writeln!(out, "| {path} | {how} | {value:.0} |")?;
    }
    writeln!(out)?;
    Ok(out)
}

/// Polls the gateway's `/metrics` in `netns` until a kernel key sync after the `after`-th one
/// wrote `written` slots; returns that sync's duration in seconds and the syncs so far.
fn await_key_sync(
    netns: &str,
    admin: std::net::SocketAddr,
    after: f64,
    written: usize,
) -> Result<(f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let exposition = bench_flood::metrics(netns, admin)?;
        let syncs = bench_flood::sample(&exposition, "gateway_xdp_key_syncs_total");
        let last = bench_flood::sample(&exposition, "gateway_xdp_key_sync_last_written");
        if syncs > after && last as usize == written {
            let took = bench_flood::sample(&exposition, "gateway_xdp_key_sync_last_seconds");
            return Ok((took, syncs));
        }
        if Instant::now() > deadline {
            bail!("no kernel key sync writing {written} slots within 600 s (last wrote {last})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One gateway of the scale scenario, started and measured.
struct ScaleRound {
    startup: f64,
    rss_mib: f64,
    sync: f64,
    import: f64,
    import_sync: f64,
}

/// Scenario 5: the gateway with many keys, its XDP program attached: start-up time, RSS, CSV
/// import, kernel map sync.
fn scale(ctx: &Ctx) -> Result<String> {
    const IMPORT: usize = 10_000;
    let net = bench_flood::Net::create()?;
    let (_upstream_proc, upstream) = bench_peers::upstream_in(1, Some(&net.gateway))?;
    let mut out = String::new();
    writeln!(out, "## {}\n", Scenario::Scale.title())?;
    writeln!(
        out,
        "The gateway started with `--config` holding N keys on one plan (2 worker threads) in a \
         network namespace, its XDP program attached natively to a veth with `--xdp-key-slots` \
         above N + {IMPORT}. Start-up: from spawn to both `listening` lines (the configuration \
         is validated and written to the store first). Kernel sync: the first walk of every key \
         that writes each key's bucket into the kernel maps (`gateway_xdp_key_sync_last_seconds`; \
         it begins within 250 ms of start). RSS: `VmRSS` once that sync is done. Import: \
         `POST /apikeys?mode=import&format=csv` of {IMPORT} new keys on the plan, through the \
         admin API (validated, fsynced, applied), and the kernel sync that follows it (a walk of \
         all N + {IMPORT} keys writing the {IMPORT} new slots). Median of {}.\n",
        if ctx.plan.quick {
            "1 round".to_string()
        } else {
            "3 rounds (1 for 1,000,000 keys)".to_string()
        }
    )?;
    writeln!(
        out,
        "| keys | start-up s | kernel sync of N keys s | RSS MiB | import of {IMPORT} keys s | kernel sync after import s |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    let dir = TempDir::new("scale")?;
    let csv = dir.path.join("import.csv");
    let mut rows = String::from("Name,Key,Enabled,UsagePlanIds\n");
    for i in 0..IMPORT {
        writeln!(rows, "imported-{i},bench-import-{i:08}-e5f6a7b8,true,bench")?;
    }
    std::fs::write(&csv, rows)?;
    let mut bars = Vec::new();
    for &n in &ctx.plan.scale_sizes {
        let keys = keys(n);
        let model = bench_peers::gateway_model(upstream, &keys, 100.0, 200);
        let slots = (n + IMPORT).next_power_of_two().to_string();
        let rounds = if ctx.plan.quick || n >= 1_000_000 {
            1
        } else {
            3
        };
        let mut runs = Vec::new();
        for round in 0..rounds {
            let run = TempDir::new("scale-gw")?;
            let gw = bench_peers::gateway_in(
                &ctx.gateway,
                &run.path,
                &model,
                2,
                Some(&net.gateway),
                &format!("{}:0", bench_flood::GATEWAY_IP),
                &[
                    "--xdp-iface",
                    &net.gateway_if,
                    "--xdp-mode",
                    "native",
                    "--xdp-key-slots",
                    &slots,
                ],
            )?;
            let (sync, syncs) = await_key_sync(&net.gateway, gw.admin, 0.0, n)?;
            let rss_mib = gw.proc.rss_kib()? as f64 / 1024.0;
            let began = Instant::now();
            let url = format!(
                "http://{}/apikeys?mode=import&format=csv&failonwarnings=true",
                gw.admin
            );
            let code = capture(
                "ip",
                &[
                    "netns",
                    "exec",
                    &net.gateway,
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "600",
                    "-X",
                    "POST",
                    "-H",
                    "content-type: text/csv",
                    "--data-binary",
                    &format!("@{}", csv.display()),
                    &url,
                ],
            )?;
            let import = began.elapsed().as_secs_f64();
            if !code.starts_with('2') {
                bail!("the CSV import into a gateway with {n} keys answered {code}");
            }
            let (import_sync, _) = await_key_sync(&net.gateway, gw.admin, syncs, IMPORT)?;
            let r = ScaleRound {
                startup: gw.startup.as_secs_f64(),
                rss_mib,
                sync,
                import,
                import_sync,
            };
            crate::step(&format!(
                "bench: round {} {n} keys: start-up {:.2} s, kernel sync {:.2} s, RSS {:.0} MiB, import {:.2} s, kernel sync after import {:.2} s",
                round + 1,
                r.startup,
                r.sync,
                r.rss_mib,
                r.import,
                r.import_sync
            ));
            runs.push(r);
        }
        let med = |f: fn(&ScaleRound) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let rss = med(|r| r.rss_mib);
        writeln!(
            out,
            "| {n} | {:.2} | {:.2} | {rss:.0} | {:.2} | {:.2} |",
            med(|r| r.startup),
            med(|r| r.sync),
            med(|r| r.import),
            med(|r| r.import_sync),
        )?;
        bars.push(Bar {
            label: format!("{n} keys"),
            value: rss,
        });
    }
    writeln!(out)?;
    bench_report::bars(
        &ctx.root.join("bench/scale.svg"),
        "Gateway RSS by number of keys (MiB)",
        "RSS MiB",
        &bars,
    )?;
    writeln!(out, "![RSS by keys](scale.svg)\n")?;
    Ok(out)
}
