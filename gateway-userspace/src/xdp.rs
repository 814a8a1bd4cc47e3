//! Loading, attaching and driving the XDP program.
//!
//! Owns the program's life on one interface: load the embedded object, size its maps,
//! tell it the data-plane ports, attach it, bridge its aya-log records into `tracing`,
//! expose its per-CPU counters, and detach it again (explicitly on shutdown, and on drop
//! as a backstop, so a gateway that exits never leaves its program behind).
//!
//! [`XdpMaps`] is the handle the rest of the gateway writes through, shareable across
//! tasks: the proxy binds connections to key slots ([`XdpMaps::bind_flow`],
//! [`XdpMaps::unbind_flow`]); the map sync writes each slot's bucket parameters and
//! block mark ([`XdpMaps::set_key`], [`XdpMaps::clear_key`]), the SYN guard and the
//! source block list. The kernel owns the bucket state: the gateway only zeroes it when a
//! slot changes hands. Times are nanoseconds on the kernel's `CLOCK_MONOTONIC_COARSE`
//! ([`kernel_now_ns`]).
//!
//! Bucket parameters are taken as given: any headroom over the plan's limits is the
//! sync's business.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode as AyaXdpMode, xdp::XdpLinkId},
    sys::SyscallError,
};
use gateway_common::{
    Bucket, Config, FlowKey, FlowValue, KeyLimit, PortConfig, SYN_GUARD_DEFAULT, SourceBlock,
    config_flags, gcra::GcraParams, key_flags, maps, sizes, stats, v4_mapped,
};
use tokio::io::unix::AsyncFd;

use crate::fastpath::KernelMaps;

/// The XDP object embedded at build time (empty when built without `cargo xtask build`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway.bpf.o"));

const PROGRAM: &str = "gateway";

/// Whether this binary carries the XDP program (built with `cargo xtask build`).
pub fn object_embedded() -> bool {
    !OBJECT.is_empty()
}

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

/// Map sizes fixed at load time. The defaults come from `gateway_common::sizes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpOptions {
    /// Key slots (distinct API keys the kernel can limit at once), 1 or more.
    pub key_slots: u32,
    /// Bound connections tracked at once, 1 or more; keep it above the proxy's
    /// connection limit (the least recently used binding is evicted when full).
    pub flows: u32,
    /// Source addresses the SYN guard tracks at once (least recently used evicted).
    pub syn_sources: u32,
    /// Source addresses that can be blocked at once (least recently used evicted).
    pub blocked_sources: u32,
}

impl Default for XdpOptions {
    fn default() -> Self {
        Self {
            key_slots: sizes::KEY_SLOTS,
            flows: sizes::FLOWS,
            syn_sources: sizes::SYN_SOURCES,
            blocked_sources: sizes::BLOCKED_SOURCES,
        }
    }
}

impl XdpOptions {
    /// Checks every size is at least 1 (the kernel refuses empty maps).
    pub fn validate(self) -> Result<Self, XdpError> {
        for (name, value) in [
            ("key_slots", self.key_slots),
            ("flows", self.flows),
            ("syn_sources", self.syn_sources),
            ("blocked_sources", self.blocked_sources),
        ] {
            if value == 0 {
                return Err(XdpError::InvalidOption(name));
            }
        }
        Ok(self)
    }
}

/// What can go wrong while loading, attaching or driving the program.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(
        "this gateway binary was built without the XDP program; build it with `cargo xtask build`"
    )]
    NotEmbedded,
    #[error("interface name `{0}` is not valid (1-15 bytes, no `/`, whitespace or NUL)")]
    BadInterface(String),
    #[error("XDP option `{0}` must be at least 1")]
    InvalidOption(&'static str),
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
    #[error("key slot {slot} is out of range (the program has {slots} slots)")]
    SlotOutOfRange { slot: u32, slots: u32 },
}

/// What the XDP program returned for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAction {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    /// A value outside the kernel's `xdp_action` enum.
    Other(u32),
}

impl From<u32> for XdpAction {
    fn from(action: u32) -> Self {
        match action {
            0 => Self::Aborted,
            1 => Self::Drop,
            2 => Self::Pass,
            3 => Self::Tx,
            4 => Self::Redirect,
            other => Self::Other(other),
        }
    }
}

/// Result of [`XdpProgram::test_run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The verdict of the last run.
    pub action: XdpAction,
    /// Average time per run, as the kernel measured it.
    pub per_run: Duration,
}

/// The loaded XDP program, attached to an interface unless loaded for tests. Dropping it
/// detaches the program; its maps live on while an [`XdpMaps`] handle does.
pub struct XdpProgram {
    ebpf: Ebpf,
    maps: Arc<XdpMaps>,
    link: Option<XdpLinkId>,
    interface: Option<String>,
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

/// Now, in nanoseconds on the clock the XDP program reads (`CLOCK_MONOTONIC_COARSE`, the
/// kernel's `bpf_ktime_get_coarse_ns`). Block deadlines are `kernel_now_ns() + duration`.
pub fn kernel_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; the clock id is a constant the kernel
    // has supported since 2.6.32, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

impl XdpProgram {
    /// Loads the embedded program with default map sizes, registers `ports` as data-plane
    /// ports and attaches it to `interface`. Must run inside a tokio runtime (the log
    /// bridge is a task).
    pub fn attach(interface: &str, mode: XdpMode, ports: &[u16]) -> Result<Self, XdpError> {
        Self::attach_with(interface, mode, ports, XdpOptions::default())
    }

    /// [`XdpProgram::attach`] with explicit map sizes.
    pub fn attach_with(
        interface: &str,
        mode: XdpMode,
        ports: &[u16],
        options: XdpOptions,
    ) -> Result<Self, XdpError> {
        validate_interface(interface)?;
        let mut program = Self::load(ports, options)?;
        program.logger = match aya_log::EbpfLogger::init_with_logger(&mut program.ebpf, TracingLog)
        {
            Ok(logger) => Some(tokio::spawn(bridge_logs(logger))),
            Err(error) => {
                // The program logs nothing at this level, so there is no map to read.
                tracing::debug!(%error, "no XDP log records to bridge");
                None
            }
        };
        let link = program.xdp_mut()?.attach(interface, mode.into())?;
        program.link = Some(link);
        program.interface = Some(interface.to_owned());
        tracing::info!(interface, ?mode, ?ports, ?options, "XDP program attached");
        Ok(program)
    }

    /// Loads the embedded program with default map sizes and `ports` as data-plane ports,
    /// without attaching it anywhere: for [`XdpProgram::test_run`]. Needs no tokio runtime.
    pub fn load_for_test(ports: &[u16]) -> Result<Self, XdpError> {
        Self::load(ports, XdpOptions::default())
    }

    /// [`XdpProgram::load_for_test`] with explicit map sizes.
    pub fn load_for_test_with(ports: &[u16], options: XdpOptions) -> Result<Self, XdpError> {
        Self::load(ports, options)
    }

    fn load(ports: &[u16], options: XdpOptions) -> Result<Self, XdpError> {
        if OBJECT.is_empty() {
            return Err(XdpError::NotEmbedded);
        }
        let options = options.validate()?;
        // Debug records from the per-packet path stay off unless tracing wants them.
        let log_level: u8 = if tracing::enabled!(target: "xdp", tracing::Level::DEBUG) {
            aya_log::Level::Debug as u8
        } else {
            aya_log::Level::Info as u8
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &log_level, false)
            .map_max_entries(maps::KEY_LIMITS, options.key_slots)
            .map_max_entries(maps::KEY_BUCKETS, options.key_slots)
            .map_max_entries(maps::FLOWS, options.flows)
            .map_max_entries(maps::SYN_RATES, options.syn_sources)
            .map_max_entries(maps::BLOCKED_SOURCES, options.blocked_sources)
            .load(OBJECT)?;

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
        let maps = Arc::new(XdpMaps::take(&mut ebpf, options.key_slots)?);
        maps.set_syn_guard(Some(SYN_GUARD_DEFAULT))?;

        let mut program = Self {
            ebpf,
            maps,
            link: None,
            interface: None,
            logger: None,
        };
        program.xdp_mut()?.load()?;
        Ok(program)
    }

    fn xdp_mut(&mut self) -> Result<&mut Xdp, XdpError> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(XdpError::MissingProgram)?
            .try_into()?)
    }

    fn xdp(&self) -> Result<&Xdp, XdpError> {
        Ok(self
            .ebpf
            .program(PROGRAM)
            .ok_or(XdpError::MissingProgram)?
            .try_into()?)
    }

    /// The handle to the program's maps; clone it into whatever binds flows or syncs keys.
    pub fn maps(&self) -> &Arc<XdpMaps> {
        &self.maps
    }

    /// The maps as the fast path's interface: `FastPath::new(program.kernel_maps(), ..)`.
    pub fn kernel_maps(&self) -> Box<dyn KernelMaps> {
        Box::new(FastPathMaps(self.maps.clone()))
    }

    /// Sums the per-CPU counters; indexes follow `gateway_common::stats`.
    pub fn counters(&self) -> Result<[u64; stats::COUNT as usize], XdpError> {
        self.maps.counters()
    }

    /// Runs the program once on `frame` (a whole Ethernet frame) through
    /// `BPF_PROG_TEST_RUN`, with every map effect of a real run but no packet effect.
    pub fn test_run(&self, frame: &[u8]) -> Result<TestRunOutcome, XdpError> {
        self.test_run_repeat(frame, 1)
    }

    /// Runs the program `repeat` times on `frame` in one call; the kernel reports the
    /// average time per run. Useful to measure a path's cost.
    pub fn test_run_repeat(&self, frame: &[u8], repeat: u32) -> Result<TestRunOutcome, XdpError> {
        let result = self.xdp()?.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })?;
        Ok(TestRunOutcome {
            action: XdpAction::from(result.return_value),
            per_run: result.duration,
        })
    }

    /// Detaches the program from its interface. Idempotent.
    pub fn detach(&mut self) {
        if let Some(link) = self.link.take() {
            let result = self
                .xdp_mut()
                .and_then(|p| p.detach(link).map_err(XdpError::from));
            let interface = self.interface.as_deref().unwrap_or("?");
            match result {
                Ok(()) => tracing::info!(interface, "XDP program detached"),
                Err(error) => tracing::warn!(interface, %error, "XDP detach failed"),
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

/// The program's maps, writable from any thread. Each write is one `bpf()` syscall
/// (about a microsecond) under a per-map lock.
pub struct XdpMaps {
    key_slots: u32,
    stats: PerCpuArray<MapData, u64>,
    flows: Mutex<BpfHashMap<MapData, FlowKey, FlowValue>>,
    key_limits: Mutex<Array<MapData, KeyLimit>>,
    key_buckets: Mutex<Array<MapData, Bucket>>,
    syn_rates: BpfHashMap<MapData, [u8; 16], Bucket>,
    blocked_sources: Mutex<BpfHashMap<MapData, [u8; 16], SourceBlock>>,
    config: Mutex<Array<MapData, Config>>,
}

// The proxy and the sync share one handle across tasks and threads.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<XdpMaps>();
};

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, XdpError> {
    ebpf.take_map(name).ok_or(XdpError::MissingMap(name))
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map handle half-changed: the kernel
    // applied the syscall or not. So a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// 16-byte form of an address as the program keys it: IPv4 (and IPv4-mapped IPv6, as a
/// dual-stack socket reports IPv4 peers) as `::ffff:a.b.c.d`.
fn wire_address(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The `FLOWS` key of the connection between `local` (the gateway) and `peer` (the
/// client), as the program sees its ingress segments.
pub fn flow_key(local: SocketAddr, peer: SocketAddr) -> FlowKey {
    FlowKey::new(
        wire_address(peer.ip()),
        wire_address(local.ip()),
        peer.port(),
        local.port(),
    )
}

/// Whether a map error says the key was not there.
fn is_missing(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
                || io_error.kind() == io::ErrorKind::NotFound
        }
        _ => false,
    }
}

impl XdpMaps {
    fn take(ebpf: &mut Ebpf, key_slots: u32) -> Result<Self, XdpError> {
        Ok(Self {
            key_slots,
            stats: PerCpuArray::try_from(take_map(ebpf, maps::STATS)?)?,
            flows: Mutex::new(BpfHashMap::try_from(take_map(ebpf, maps::FLOWS)?)?),
            key_limits: Mutex::new(Array::try_from(take_map(ebpf, maps::KEY_LIMITS)?)?),
            key_buckets: Mutex::new(Array::try_from(take_map(ebpf, maps::KEY_BUCKETS)?)?),
            syn_rates: BpfHashMap::try_from(take_map(ebpf, maps::SYN_RATES)?)?,
            blocked_sources: Mutex::new(BpfHashMap::try_from(take_map(
                ebpf,
                maps::BLOCKED_SOURCES,
            )?)?),
            config: Mutex::new(Array::try_from(take_map(ebpf, maps::CONFIG)?)?),
        })
    }

    /// Number of key slots (`0..key_slots()` are valid).
    pub fn key_slots(&self) -> u32 {
        self.key_slots
    }

    fn check_slot(&self, slot: u32) -> Result<(), XdpError> {
        if slot < self.key_slots {
            Ok(())
        } else {
            Err(XdpError::SlotOutOfRange {
                slot,
                slots: self.key_slots,
            })
        }
    }

    /// Sums the per-CPU counters; indexes follow `gateway_common::stats`.
    pub fn counters(&self) -> Result<[u64; stats::COUNT as usize], XdpError> {
        let mut totals = [0u64; stats::COUNT as usize];
        for (index, total) in (0u32..).zip(totals.iter_mut()) {
            *total = self.stats.get(&index, 0)?.iter().sum();
        }
        Ok(totals)
    }

    /// Charges the request starts the client `peer` sends to the gateway's `local` address
    /// on this connection to key `slot`. Call it once the connection's key is known, and
    /// again when it changes (a rebind forgets which request start was counted last, so a
    /// retransmission of that one segment could be charged twice).
    pub fn bind_flow(
        &self,
        local: SocketAddr,
        peer: SocketAddr,
        slot: u32,
    ) -> Result<(), XdpError> {
        self.check_slot(slot)?;
        locked(&self.flows).insert(flow_key(local, peer), FlowValue::bound(slot), 0)?;
        Ok(())
    }

    /// Forgets the connection's binding (call it when the connection closes). Returns
    /// whether there was one; an evicted binding is not an error.
    pub fn unbind_flow(&self, local: SocketAddr, peer: SocketAddr) -> Result<bool, XdpError> {
        match locked(&self.flows).remove(&flow_key(local, peer)) {
            Ok(()) => Ok(true),
            Err(error) if is_missing(&error) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// The connection's binding, if any.
    pub fn flow(&self, local: SocketAddr, peer: SocketAddr) -> Result<Option<FlowValue>, XdpError> {
        match locked(&self.flows).get(&flow_key(local, peer), 0) {
            Ok(value) => Ok(Some(value)),
            Err(error) if is_missing(&error) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Sets what the kernel enforces for key `slot`: `params` (taken as given, `None` = no
    /// kernel limit) and a block mark (`blocked_until_ns` on [`kernel_now_ns`]'s clock,
    /// `0` = not blocked). The bucket state is kept, so a change of parameters does not
    /// refill the bucket.
    pub fn set_key(
        &self,
        slot: u32,
        params: Option<GcraParams>,
        blocked_until_ns: u64,
    ) -> Result<(), XdpError> {
        self.check_slot(slot)?;
        let limit = KeyLimit {
            params: params.unwrap_or_default(),
            blocked_until_ns,
            flags: if params.is_some() {
                key_flags::LIMITED
            } else {
                0
            },
            _pad: 0,
        };
        locked(&self.key_limits).set(slot, limit, 0)?;
        Ok(())
    }

    /// Frees key `slot` for another key: no limit, no block mark, a full bucket.
    pub fn clear_key(&self, slot: u32) -> Result<(), XdpError> {
        self.check_slot(slot)?;
        // Limit first: a request start landing in between sees no limit, never another
        // key's bucket state under this key's parameters.
        locked(&self.key_limits).set(slot, KeyLimit::default(), 0)?;
        locked(&self.key_buckets).set(slot, Bucket::default(), 0)?;
        Ok(())
    }

    /// Key `slot`'s settings and bucket state.
    pub fn key(&self, slot: u32) -> Result<(KeyLimit, Bucket), XdpError> {
        self.check_slot(slot)?;
        let limit = locked(&self.key_limits).get(&slot, 0)?;
        let bucket = locked(&self.key_buckets).get(&slot, 0)?;
        Ok((limit, bucket))
    }

    /// Sets the per-source SYN rate limit (`None` turns the guard off). The program
    /// starts with [`SYN_GUARD_DEFAULT`].
    pub fn set_syn_guard(&self, params: Option<GcraParams>) -> Result<(), XdpError> {
        self.update_config(|config| {
            config.syn_guard = params.unwrap_or_default();
            if params.is_some() {
                config.flags |= config_flags::SYN_GUARD;
            } else {
                config.flags &= !config_flags::SYN_GUARD;
            }
        })
    }

    /// The SYN guard's bucket state for `source`, if it has one.
    pub fn syn_bucket(&self, source: IpAddr) -> Result<Option<Bucket>, XdpError> {
        match self.syn_rates.get(&wire_address(source), 0) {
            Ok(bucket) => Ok(Some(bucket)),
            Err(error) if is_missing(&error) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Drops SYNs and request starts from `source` until `until_ns` ([`kernel_now_ns`]'s
    /// clock). A later call replaces the deadline.
    pub fn block_source(&self, source: IpAddr, until_ns: u64) -> Result<(), XdpError> {
        locked(&self.blocked_sources).insert(wire_address(source), SourceBlock { until_ns }, 0)?;
        Ok(())
    }

    /// Lifts a block on `source`; returns whether there was one.
    pub fn unblock_source(&self, source: IpAddr) -> Result<bool, XdpError> {
        match locked(&self.blocked_sources).remove(&wire_address(source)) {
            Ok(()) => Ok(true),
            Err(error) if is_missing(&error) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Test hook: makes the program's clock read `now_ns` (`None` = the kernel's clock
    /// again). Never set in production.
    pub fn set_fake_now_ns(&self, now_ns: Option<u64>) -> Result<(), XdpError> {
        self.update_config(|config| config.fake_now_ns = now_ns.unwrap_or(0))
    }

    fn update_config(&self, change: impl FnOnce(&mut Config)) -> Result<(), XdpError> {
        // The program copies the entry per segment; a copy taken during this update may
        // mix old and new fields for that one segment, which no setting here makes unsafe.
        let mut array = locked(&self.config);
        let mut config = array.get(&0, 0)?;
        change(&mut config);
        array.set(0, config, 0)?;
        Ok(())
    }
}

/// The maps as `fastpath::KernelMaps` (a separate type, so that the trait's methods never
/// shadow [`XdpMaps`]' own on an `Arc<XdpMaps>`).
struct FastPathMaps(Arc<XdpMaps>);

impl KernelMaps for FastPathMaps {
    fn bind_flow(&self, local: SocketAddr, peer: SocketAddr, slot: u32) -> Result<(), String> {
        self.0
            .bind_flow(local, peer, slot)
            .map_err(|e| e.to_string())
    }

    fn unbind_flow(&self, local: SocketAddr, peer: SocketAddr) -> Result<(), String> {
        self.0
            .unbind_flow(local, peer)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn set_key(
        &self,
        slot: u32,
        params: Option<GcraParams>,
        blocked_until_ns: u64,
    ) -> Result<(), String> {
        self.0
            .set_key(slot, params, blocked_until_ns)
            .map_err(|e| e.to_string())
    }

    fn block_source(&self, source: IpAddr, until_ns: u64) -> Result<(), String> {
        self.0
            .block_source(source, until_ns)
            .map_err(|e| e.to_string())
    }

    fn now_ns(&self) -> u64 {
        kernel_now_ns()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_key_maps_ipv4_and_dual_stack_views_to_one_key() {
        let local: SocketAddr = "192.0.2.1:8080".parse().expect("valid");
        let peer: SocketAddr = "198.51.100.7:40000".parse().expect("valid");
        let key = flow_key(local, peer);
        assert_eq!(&key.saddr[10..], &[0xff, 0xff, 198, 51, 100, 7]);
        assert_eq!(&key.daddr[10..], &[0xff, 0xff, 192, 0, 2, 1]);
        assert_eq!(key.sport, 40000u16.to_be_bytes());
        assert_eq!(key.dport, 8080u16.to_be_bytes());
        assert_eq!(key._pad, [0; 4]);
        let mapped_local: SocketAddr = "[::ffff:192.0.2.1]:8080".parse().expect("valid");
        let mapped_peer: SocketAddr = "[::ffff:198.51.100.7]:40000".parse().expect("valid");
        assert_eq!(flow_key(mapped_local, mapped_peer), key);
    }

    #[test]
    fn kernel_clock_moves_forward() {
        let a = kernel_now_ns();
        std::thread::sleep(Duration::from_millis(20));
        assert!(kernel_now_ns() > a);
    }

    #[test]
    fn options_reject_empty_maps() {
        assert!(XdpOptions::default().validate().is_ok());
        let options = XdpOptions {
            key_slots: 0,
            ..XdpOptions::default()
        };
        assert!(matches!(
            options.validate(),
            Err(XdpError::InvalidOption("key_slots"))
        ));
    }
}
