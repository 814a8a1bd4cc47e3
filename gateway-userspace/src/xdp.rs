//! Loading, attaching and reading the XDP program.
//!
//! Owns the program's life on one interface: load the embedded object, tell it the
//! data-plane ports, attach it, bridge its aya-log records into `tracing`, expose its
//! per-CPU counters, and detach it again (explicitly on shutdown, and on drop as a
//! backstop, so a gateway that exits never leaves its program behind).

use std::str::FromStr;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode as AyaXdpMode, xdp::XdpLinkId},
};
use gateway_common::{PortConfig, maps, stats};
use tokio::io::unix::AsyncFd;

/// The XDP object embedded at build time (empty when built without `cargo xtask build`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway.bpf.o"));

const PROGRAM: &str = "gateway";

/// How the program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// Let the kernel choose: native when the driver supports it, generic otherwise.
    #[default]
    Auto,
    /// Driver (native) mode only; attaching fails when the driver lacks XDP support.
    Native,
    /// Generic (skb) mode: works everywhere, runs after the skb is allocated.
    Skb,
}

impl FromStr for XdpMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "skb" => Ok(Self::Skb),
            other => Err(format!(
                "unknown XDP mode `{other}`: expected auto, native or skb"
            )),
        }
    }
}

impl From<XdpMode> for AyaXdpMode {
    fn from(mode: XdpMode) -> Self {
        match mode {
            XdpMode::Auto => AyaXdpMode::Default,
            XdpMode::Native => AyaXdpMode::Driver,
            XdpMode::Skb => AyaXdpMode::Skb,
        }
    }
}

/// What can go wrong while loading, attaching or reading the program.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(
        "this gateway binary was built without the XDP program; build it with `cargo xtask build`"
    )]
    NotEmbedded,
    #[error("interface name `{0}` is not valid (1-15 bytes, no `/`, whitespace or NUL)")]
    BadInterface(String),
    #[error("loading the XDP object failed (are you root?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP program `{PROGRAM}` is missing from the object")]
    MissingProgram,
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("XDP map: {0}")]
    Map(#[from] MapError),
    #[error("the XDP map `{0}` is missing from the object")]
    MissingMap(&'static str),
}

/// An attached XDP program. Dropping it detaches the program.
pub struct XdpProgram {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    interface: String,
    logger: Option<tokio::task::JoinHandle<()>>,
}

/// Checks an interface name the way the kernel will (IFNAMSIZ is 16 with the NUL).
pub fn validate_interface(name: &str) -> Result<(), XdpError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && !name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(XdpError::BadInterface(name.to_owned()))
    }
}

impl XdpProgram {
    /// Loads the embedded program, registers `ports` as data-plane ports and attaches it
    /// to `interface`. Must run inside a tokio runtime (the log bridge is a task).
    pub fn attach(interface: &str, mode: XdpMode, ports: &[u16]) -> Result<Self, XdpError> {
        if OBJECT.is_empty() {
            return Err(XdpError::NotEmbedded);
        }
        validate_interface(interface)?;
        // Debug records from the per-packet path stay off unless tracing wants them.
        let log_level: u8 = if tracing::enabled!(target: "xdp", tracing::Level::DEBUG) {
            aya_log::Level::Debug as u8
        } else {
            aya_log::Level::Info as u8
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &log_level, false)
            .load(OBJECT)?;
        let logger = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, TracingLog) {
            Ok(logger) => Some(tokio::spawn(bridge_logs(logger))),
            Err(error) => {
                // The program logs nothing at this level, so there is no map to read.
                tracing::debug!(%error, "no XDP log records to bridge");
                None
            }
        };

        {
            let map = ebpf
                .map_mut(maps::DATA_PORTS)
                .ok_or(XdpError::MissingMap(maps::DATA_PORTS))?;
            let mut data_ports: BpfHashMap<_, [u8; 2], PortConfig> = BpfHashMap::try_from(map)?;
            for port in ports {
                let value = PortConfig {
                    enabled: 1,
                    _pad: 0,
                };
                data_ports.insert(port.to_be_bytes(), value, 0)?;
            }
        }

        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(XdpError::MissingProgram)?
            .try_into()?;
        program.load()?;
        let link = program.attach(interface, mode.into())?;
        tracing::info!(interface, ?mode, ?ports, "XDP program attached");
        Ok(Self {
            ebpf,
            link: Some(link),
            interface: interface.to_owned(),
            logger,
        })
    }

    /// Sums the per-CPU counters; indexes follow `gateway_common::stats`.
    pub fn counters(&self) -> Result<[u64; stats::COUNT as usize], XdpError> {
        let map = self
            .ebpf
            .map(maps::STATS)
            .ok_or(XdpError::MissingMap(maps::STATS))?;
        let array: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        let mut totals = [0u64; stats::COUNT as usize];
        for (index, total) in (0u32..).zip(totals.iter_mut()) {
            *total = array.get(&index, 0)?.iter().sum();
        }
        Ok(totals)
    }

    /// Detaches the program from its interface. Idempotent.
    pub fn detach(&mut self) {
        if let Some(link) = self.link.take() {
            let result = self
                .ebpf
                .program_mut(PROGRAM)
                .ok_or(XdpError::MissingProgram)
                .and_then(|p| <&mut Xdp>::try_from(p).map_err(XdpError::from))
                .and_then(|p| p.detach(link).map_err(XdpError::from));
            match result {
                Ok(()) => tracing::info!(interface = %self.interface, "XDP program detached"),
                Err(error) => {
                    tracing::warn!(interface = %self.interface, %error, "XDP detach failed")
                }
            }
        }
        if let Some(logger) = self.logger.take() {
            logger.abort();
        }
    }
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Forwards aya-log records from the XDP program to `tracing` under target `xdp`.
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "xdp", "{message}"),
            log::Level::Warn => tracing::warn!(target: "xdp", "{message}"),
            log::Level::Info => tracing::info!(target: "xdp", "{message}"),
            log::Level::Debug => tracing::debug!(target: "xdp", "{message}"),
            log::Level::Trace => tracing::trace!(target: "xdp", "{message}"),
        }
    }

    fn flush(&self) {}
}

async fn bridge_logs(logger: aya_log::EbpfLogger<TracingLog>) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged, until
    // it is dropped together with this `AsyncFd`.
    let mut logger = match unsafe { AsyncFd::register(logger) } {
        Ok(fd) => fd,
        Err(error) => {
            tracing::warn!(%error, "cannot poll the XDP log ring");
            return;
        }
    };
    loop {
        let mut guard = match logger.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                tracing::warn!(%error, "XDP log ring failed");
                return;
            }
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
