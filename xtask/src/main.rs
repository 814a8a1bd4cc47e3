//! Project tasks: `cargo xtask setup | build | run | test | bench`.
//!
//! `setup` installs what a fresh Linux machine lacks (idempotently, printing each step);
//! `build` compiles the XDP object with nightly and embeds it in the `gateway` binary;
//! `run` is setup + build + `gateway serve`; `test` is the whole CI gate; `bench` measures
//! the gateway against nginx and HAProxy and writes `bench/RESULTS.md`.

mod bench;
mod bench_peers;
mod bench_report;
mod load;

use std::{
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The one bpf-linker release the project builds with (its LLVM must match nightly's).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_PACKAGE: &str = "llvm-22-dev";
const BPF_TARGET: &str = "bpfel-unknown-none";
/// Debian packages the tests use: `ip` for namespaces and veth pairs, curl as the client.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("curl", "curl"),
    // Fleet tests start their own throwaway server on a free loopback port.
    ("redis-server", "redis-server"),
];
/// The venv (relative to the workspace) with the admin API tests' Python tools:
/// boto3, the aws CLI v1 and pytest, pinned in `PY_REQUIREMENTS`.
const PY_VENV: &str = "target/py";
const PY_REQUIREMENTS: &str = "tests/py/requirements.txt";
/// Copy of the requirements the venv was last installed from, to notice a change.
const PY_INSTALLED: &str = "requirements.installed";

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing tools: nightly rust-src, LLVM 22, bpf-linker, test packages,
    /// and the Python test tools in target/py.
    Setup,
    /// Build the XDP object and the gateway binary with it embedded.
    Build {
        /// Build the gateway in release mode (target/release/gateway).
        #[arg(long)]
        release: bool,
    },
    /// Setup, build (release) and run `gateway serve` with the given flags (`--demo` when
    /// none are given).
    Run {
        /// Flags for `gateway serve`, after `--`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Setup, fmt check, clippy, unit/integration tests and the privileged XDP tests.
    Test,
    /// Setup, install nginx and HAProxy, build (release) and run the benchmarks; writes
    /// bench/RESULTS.md and the charts in bench/.
    Bench(bench::Args),
    /// The benchmarks' upstream: answers 200 to every request (used by `bench`).
    #[command(hide = true)]
    BenchUpstream {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup(),
        Task::Build { release } => build(&root, release).map(drop),
        Task::Run { args } => {
            setup()?;
            let binary = build(&root, true)?;
            // With no flags, show the demo; with flags, the user says what to serve.
            let args = if args.is_empty() {
                vec![OsString::from("--demo")]
            } else {
                args
            };
            step(&format!("running {} serve", binary.display()));
            let error = Command::new(&binary).arg("serve").args(args).exec();
            Err(error).with_context(|| format!("cannot run {}", binary.display()))
        }
        Task::Test => test(&root),
        Task::Bench(args) => bench::main(&root, args),
        Task::BenchUpstream { listen, threads } => load::upstream(listen, threads),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

fn step(message: &str) {
    println!("xtask: {message}");
}

fn setup() -> Result<()> {
    step("checking the nightly toolchain's rust-src");
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .context("rustup is needed to build the XDP program (https://rustup.rs)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src for nightly: present");
    } else {
        step("rust-src for nightly: installing");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context(
            "installing rust-src failed; install the nightly toolchain first \
             (`rustup toolchain install nightly --component rust-src`)",
        )?;
    }

    let mut apt_packages: Vec<&str> = Vec::new();
    let linker_ok = output("bpf-linker", &["--version"])
        .map(|v| v.contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if linker_ok {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
    } else if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        apt_packages.push(LLVM_PACKAGE);
    }
    for (command, package) in TEST_PACKAGES {
        if which(command).is_some() {
            step(&format!("{command} ({package}): present"));
        } else {
            apt_packages.push(package);
        }
    }
    if !apt_packages.is_empty() {
        apt_install(&apt_packages)?;
    }

    if !linker_ok {
        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: installing with cargo (takes a few minutes)"
        ));
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
        .context("installing bpf-linker failed")?;
    }
    setup_python(&workspace_root())?;
    step("setup complete");
    Ok(())
}

/// Creates the venv `PY_VENV` and installs `PY_REQUIREMENTS` into it, unless its tools
/// already work and were installed from the same requirements.
fn setup_python(root: &Path) -> Result<()> {
    let venv = root.join(PY_VENV);
    let requirements = std::fs::read_to_string(root.join(PY_REQUIREMENTS))
        .with_context(|| format!("cannot read {PY_REQUIREMENTS}"))?;
    let installed = std::fs::read_to_string(venv.join(PY_INSTALLED)).unwrap_or_default();
    if installed == requirements && python_tools_work(&venv) {
        step(&format!("Python test tools ({PY_VENV}): present"));
        return Ok(());
    }
    if which("python3").is_none() {
        bail!(
            "python3 is not installed; the admin API tests need it (with venv and pip): \
             install it (`apt-get install -y python3 python3-venv`), then rerun"
        );
    }
    if !venv.join("bin/python").is_file() {
        step(&format!("creating the Python venv {PY_VENV}"));
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
            "`python3 -m venv` failed; on Debian or Ubuntu install python3-venv, then rerun",
        )?;
    }
    step(&format!(
        "installing boto3, awscli and pytest into {PY_VENV} (from {PY_REQUIREMENTS})"
    ));
    run(Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--requirement")
        .arg(root.join(PY_REQUIREMENTS)))
    .context("installing the Python test tools failed (is PyPI reachable?)")?;
    if !python_tools_work(&venv) {
        bail!("{PY_VENV} still cannot import boto3 and pytest or run aws after the install");
    }
    std::fs::write(venv.join(PY_INSTALLED), requirements)
        .with_context(|| format!("cannot write {PY_VENV}/{PY_INSTALLED}"))?;
    step(&format!("Python test tools ({PY_VENV}): installed"));
    Ok(())
}

/// Whether the venv's Python imports boto3 and pytest and its `aws` runs.
fn python_tools_work(venv: &Path) -> bool {
    let python = venv.join("bin/python");
    let aws = venv.join("bin/aws");
    output(&python.to_string_lossy(), &["-c", "import boto3, pytest"]).is_ok()
        && output(&aws.to_string_lossy(), &["--version"]).is_ok()
}

fn apt_install(packages: &[&str]) -> Result<()> {
    step(&format!("apt packages missing: {}", packages.join(" ")));
    if which("apt-get").is_none() {
        bail!(
            "apt-get is not available: install {} with your package manager, then rerun",
            packages.join(" ")
        );
    }
    if output("id", &["-u"])?.trim() != "0" {
        bail!(
            "installing {} needs root: run `sudo apt-get install -y {}` or rerun as root",
            packages.join(" "),
            packages.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"])).context("apt-get update failed")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install {} failed", packages.join(" ")))
}

/// The XDP object's path after `build_ebpf`.
fn ebpf_object(root: &Path) -> PathBuf {
    root.join("target/ebpf")
        .join(BPF_TARGET)
        .join("release/gateway")
}

fn build_ebpf(root: &Path) -> Result<PathBuf> {
    step("building the XDP program (nightly, build-std=core, bpfel-unknown-none)");
    run(Command::new("rustup")
        .current_dir(root)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "gateway-ebpf",
        ])
        .args(["--release", "--target", BPF_TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f"),
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS"))
    .context("building the XDP program failed (did `cargo xtask setup` run?)")?;
    let object = ebpf_object(root);
    if !object.exists() {
        bail!("the XDP build produced no object at {}", object.display());
    }
    Ok(object)
}

/// Builds the XDP object, then the gateway with it embedded; returns the binary's path.
fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let object = build_ebpf(root)?;
    step("building the gateway with the XDP object embedded");
    let mut cargo = cargo(root, &object);
    cargo.args([
        "build",
        "--package",
        "gateway-userspace",
        "--bin",
        "gateway",
    ]);
    if release {
        cargo.arg("--release");
    }
    run(&mut cargo).context("building the gateway failed")?;
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir(root).join(profile).join("gateway"))
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` when set, else `target/`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |dir| root.join(dir))
}

/// A stable `cargo` with the XDP object named for the gateway's build script.
fn cargo(root: &Path, object: &Path) -> Command {
    let mut command = Command::new("cargo");
    command.current_dir(root).env("GATEWAY_EBPF_OBJECT", object);
    command
}

fn test(root: &Path) -> Result<()> {
    setup()?;
    step("cargo fmt --check");
    run(Command::new("cargo")
        .current_dir(root)
        .args(["fmt", "--all", "--", "--check"]))
    .context("formatting differs: run `cargo fmt --all`")?;

    let object = build_ebpf(root)?;
    step("clippy (default members, all targets, warnings are errors)");
    run(cargo(root, &object).args(["clippy", "--all-targets", "--", "-D", "warnings"]))
        .context("clippy found problems")?;
    step("clippy (XDP program)");
    run(Command::new("rustup")
        .current_dir(root)
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "gateway-ebpf",
        ])
        .args(["--release", "--target", BPF_TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .args(["--", "-D", "warnings"])
        .env_remove("RUSTFLAGS"))
    .context("clippy found problems in the XDP program")?;

    // The end-to-end tests run this binary; build it with the XDP object embedded.
    build(root, false)?;
    step("unit, integration and privileged end-to-end tests");
    // The privileged and the Python-driven tests must run here, not skip: a missing
    // capability or tool is a failure.
    run(cargo(root, &object)
        .args(["test", "--no-fail-fast"])
        .env("GATEWAY_REQUIRE_PRIVILEGED", "1")
        .env("GATEWAY_REQUIRE_TOOLS", "1"))
    .context("tests failed")?;
    step("all checks passed");
    Ok(())
}

fn which(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(command))
        .find(|candidate| candidate.is_file())
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{program}`"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{:?} exited with {status}", command.get_program());
    }
    Ok(())
}
