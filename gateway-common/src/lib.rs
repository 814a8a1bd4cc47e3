//! Types shared across the kernel boundary.
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of `bool`, enums and floats, padded
//! explicitly to a multiple of 8 bytes, and checked by compile-time size asserts, so
//! that the XDP program and the gateway agree on every byte of every map key and value.
//! Multi-byte network fields are kept as byte arrays in network order.
#![no_std]

/// Names of the maps the XDP program defines; the loader looks them up by these names.
pub mod maps {
    /// `PerCpuArray<u64>` of [`crate::stats`] counters.
    pub const STATS: &str = "STATS";
    /// `HashMap<[u8; 2], u32>`: TCP destination ports (network order) of the data plane.
    pub const DATA_PORTS: &str = "DATA_PORTS";
}

/// Indexes into the per-CPU `STATS` array.
pub mod stats {
    /// TCP segments to a data-plane port (any flags, any payload).
    pub const DATA_PORT_PACKETS: u32 = 0;
    /// Frames that were not TCP to a data-plane port and passed untouched.
    pub const OTHER_PASSED: u32 = 1;
    /// Frames the parser could not read (truncated, malformed); passed (fail open).
    pub const PARSE_FAILURES: u32 = 2;
    /// IPv4/IPv6 fragments; passed, since only the first carries the TCP header.
    pub const FRAGMENTS_PASSED: u32 = 3;
    /// Number of counters in `STATS`.
    pub const COUNT: u32 = 4;

    /// Metric-friendly names, indexed like the counters above.
    pub const NAMES: [&str; COUNT as usize] = [
        "data_port_packets",
        "other_passed",
        "parse_failures",
        "fragments_passed",
    ];
}

/// Value stored in `DATA_PORTS`: non-zero marks the port as served by the gateway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortConfig {
    /// 1 when the port is a data-plane port.
    pub enabled: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<PortConfig>() == 8);

#[cfg(feature = "user")]
// SAFETY: `PortConfig` is `#[repr(C)]`, `Copy`, has no padding bytes (explicit `_pad`)
// and every bit pattern is valid.
unsafe impl aya::Pod for PortConfig {}

pub mod gcra;
