//! Types shared across the kernel boundary.
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of `bool`, enums and floats, padded
//! explicitly to a multiple of 8 bytes, and checked by compile-time size asserts, so
//! that the XDP program and the gateway agree on every byte of every map key and value.
//! Multi-byte network fields are kept as byte arrays in network order; addresses are
//! always 16 bytes, IPv4 stored as its IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), so one
//! key type serves both families and a dual-stack socket's view of an IPv4 peer maps to
//! the same key as the packet on the wire.
#![no_std]

pub mod gcra;

use gcra::GcraParams;

/// Names of the maps the XDP program defines; the loader looks them up by these names.
pub mod maps {
    /// `PerCpuArray<u64>` of [`crate::stats`] counters.
    pub const STATS: &str = "STATS";
    /// `HashMap<[u8; 2], PortConfig>`: TCP destination ports (network order) of the data plane.
    pub const DATA_PORTS: &str = "DATA_PORTS";
    /// `LruHashMap<FlowKey, FlowValue>`: TCP connections the proxy bound to a key slot.
    pub const FLOWS: &str = "FLOWS";
    /// `Array<KeyLimit>` indexed by key slot: bucket parameters and block mark, written by
    /// the gateway only.
    pub const KEY_LIMITS: &str = "KEY_LIMITS";
    /// `Array<Bucket>` indexed by key slot: the bucket state (TAT), written by the XDP
    /// program only (the gateway zeroes it when a slot changes hands).
    pub const KEY_BUCKETS: &str = "KEY_BUCKETS";
    /// `LruHashMap<[u8; 16], Bucket>`: SYN-rate state per source address.
    pub const SYN_RATES: &str = "SYN_RATES";
    /// `LruHashMap<[u8; 16], SourceBlock>`: sources whose SYNs and request starts drop.
    pub const BLOCKED_SOURCES: &str = "BLOCKED_SOURCES";
    /// `Array<Config>` with one entry (index 0): settings the gateway may change at run time.
    pub const CONFIG: &str = "CONFIG";
}

/// Default sizes (`max_entries`) of the maps the loader may resize at load time.
pub mod sizes {
    /// Key slots in `KEY_LIMITS`/`KEY_BUCKETS`: distinct API keys the kernel can limit at
    /// once (40 bytes per slot: 2.5 MiB).
    pub const KEY_SLOTS: u32 = 65_536;
    /// Bound TCP connections in `FLOWS`; keep it above the proxy's connection limit
    /// (the least recently used binding is evicted when it is full).
    pub const FLOWS: u32 = 65_536;
    /// Source addresses tracked by the SYN guard (least recently used evicted).
    pub const SYN_SOURCES: u32 = 65_536;
    /// Source addresses that can be blocked at once (least recently used evicted).
    pub const BLOCKED_SOURCES: u32 = 16_384;
}

/// Indexes into the per-CPU `STATS` array.
///
/// Every frame bumps exactly one of `DATA_PORT_PACKETS`, `OTHER_PASSED`,
/// `PARSE_FAILURES`, `FRAGMENTS_PASSED`. Every data-port segment then bumps exactly one
/// of `DATA_PORT_PASSED`, `DROPPED_OVER_RATE`, `DROPPED_BLOCKED_KEY`, `SYN_DROPPED_GUARD`,
/// `DROPPED_BLOCKED_SOURCE`; the remaining counters detail passes.
pub mod stats {
    /// TCP segments to a data-plane port (any flags, any payload, any verdict).
    pub const DATA_PORT_PACKETS: u32 = 0;
    /// Frames that were not TCP to a data-plane port and passed untouched.
    pub const OTHER_PASSED: u32 = 1;
    /// Frames the parser could not read (truncated, malformed); passed (fail open).
    pub const PARSE_FAILURES: u32 = 2;
    /// IPv4/IPv6 fragments; passed, since only the first carries the TCP header.
    pub const FRAGMENTS_PASSED: u32 = 3;
    /// Data-port segments passed (everything of `DATA_PORT_PACKETS` not dropped).
    pub const DATA_PORT_PASSED: u32 = 4;
    /// Request starts of bound flows that took a token from their key's bucket.
    pub const REQUEST_STARTS_COUNTED: u32 = 5;
    /// Retransmitted request starts (same sequence number as the last counted one):
    /// passed without taking a token.
    pub const RETRANSMISSIONS_PASSED: u32 = 6;
    /// Request starts dropped because their key's bucket was empty.
    pub const DROPPED_OVER_RATE: u32 = 7;
    /// Request starts dropped because their key carries a block mark.
    pub const DROPPED_BLOCKED_KEY: u32 = 8;
    /// SYNs dropped by the per-source SYN guard.
    pub const SYN_DROPPED_GUARD: u32 = 9;
    /// SYNs and request starts dropped because their source is blocked.
    pub const DROPPED_BLOCKED_SOURCE: u32 = 10;
    /// Segments passed because an entry they needed was missing (a key slot outside the
    /// key arrays, a missing config entry): fail open.
    pub const MISSING_STATE_PASSED: u32 = 11;
    /// Request starts passed because the bucket kept changing under concurrent updates
    /// from other CPUs for every attempt: fail open.
    pub const CONTENTION_PASSED: u32 = 12;
    /// Compare-and-swap attempts on a bucket that lost to another CPU and retried
    /// (a measure of contention on hot keys; not a verdict).
    pub const CAS_RETRIES: u32 = 13;
    /// Number of counters in `STATS`.
    pub const COUNT: u32 = 14;

    /// Metric-friendly names, indexed like the counters above.
    pub const NAMES: [&str; COUNT as usize] = [
        "data_port_packets",
        "other_passed",
        "parse_failures",
        "fragments_passed",
        "data_port_passed",
        "request_starts_counted",
        "retransmissions_passed",
        "dropped_over_rate",
        "dropped_blocked_key",
        "syn_dropped_guard",
        "dropped_blocked_source",
        "missing_state_passed",
        "contention_passed",
        "cas_retries",
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

/// A TCP connection as the XDP program sees it on ingress: source = the client (peer),
/// destination = the gateway (local). Key of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address, 16 bytes (IPv4 as `::ffff:a.b.c.d`).
    pub saddr: [u8; 16],
    /// Gateway address, 16 bytes (IPv4 as `::ffff:a.b.c.d`).
    pub daddr: [u8; 16],
    /// Client port, network order.
    pub sport: [u8; 2],
    /// Gateway port, network order.
    pub dport: [u8; 2],
    /// Always zero: the kernel hashes every byte of the key.
    pub _pad: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// A key with zeroed padding.
    pub const fn new(saddr: [u8; 16], daddr: [u8; 16], sport: u16, dport: u16) -> FlowKey {
        FlowKey {
            saddr,
            daddr,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            _pad: [0; 4],
        }
    }
}

/// Bits of [`FlowValue::flags`].
pub mod flow_flags {
    /// `last_counted_seq` holds the sequence number of a counted request start.
    pub const SEQ_VALID: u32 = 1;
}

/// Value of `FLOWS`: which key slot a connection's requests are charged to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Index into `KEY_LIMITS`/`KEY_BUCKETS`.
    pub slot: u32,
    /// [`flow_flags`] bits.
    pub flags: u32,
    /// TCP sequence number (host order) of the last request start that took a token;
    /// meaningful only with [`flow_flags::SEQ_VALID`]. A segment with this sequence
    /// number is a retransmission and passes for free.
    pub last_counted_seq: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<FlowValue>() == 16);

impl FlowValue {
    /// A fresh binding to `slot` (nothing counted yet).
    pub const fn bound(slot: u32) -> FlowValue {
        FlowValue {
            slot,
            flags: 0,
            last_counted_seq: 0,
            _pad: 0,
        }
    }
}

/// Bits of [`KeyLimit::flags`].
pub mod key_flags {
    /// `params` apply: request starts of bound flows take a token. Without it the slot
    /// has no kernel limit (only the block mark applies).
    pub const LIMITED: u32 = 1;
}

/// Value of `KEY_LIMITS`: what the gateway wants enforced for one key slot. A zeroed
/// entry (the state of every slot at load) limits and blocks nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyLimit {
    /// Bucket parameters (integer ns), used with [`key_flags::LIMITED`].
    pub params: GcraParams,
    /// Request starts of the key's flows drop while `now < blocked_until_ns` (ns on the
    /// kernel's `CLOCK_MONOTONIC_COARSE`); `0` = not blocked.
    pub blocked_until_ns: u64,
    /// [`key_flags`] bits.
    pub flags: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<KeyLimit>() == 32);

/// GCRA bucket state: the theoretical arrival time (ns, kernel clock). Value of
/// `KEY_BUCKETS` and `SYN_RATES`; `0` is a full bucket. Changed only by compare-and-swap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tat_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Bucket>() == 8);

/// Value of `BLOCKED_SOURCES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceBlock {
    /// SYNs and request starts from the source drop while `now < until_ns` (kernel clock).
    pub until_ns: u64,
}

const _: () = assert!(core::mem::size_of::<SourceBlock>() == 8);

/// Bits of [`Config::flags`].
pub mod config_flags {
    /// The SYN guard is on: `Config::syn_guard` applies per source address.
    pub const SYN_GUARD: u32 = 1;
}

/// The one entry of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// SYNs per source address (used with [`config_flags::SYN_GUARD`]).
    pub syn_guard: GcraParams,
    /// Test hook: when non-zero, the program's clock reads this value (ns) instead of
    /// the kernel's. Always zero in production.
    pub fake_now_ns: u64,
    /// [`config_flags`] bits.
    pub flags: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Config>() == 32);

/// The default SYN guard: 200 SYNs per second per source address with a burst of 400,
/// far above what a browser, SDK or connection pool opens, so it only bites floods.
pub const SYN_GUARD_DEFAULT: GcraParams = GcraParams::from_interval(5_000_000, 400);

/// `a.b.c.d` as the IPv4-mapped IPv6 address `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Whether a TCP payload of `len` bytes whose first `min(len, 8)` bytes are `head` (the rest
/// zero) may begin an HTTP/1.x request, so that a bound flow pays a token for it:
///
/// - it begins with a method token: `GET `, `POST `, `PUT `, `DELETE `, `PATCH `, `HEAD ` or
///   `OPTIONS ` (case-sensitive, RFC 9110 §9.1);
/// - it is shorter than the token and is its beginning (`GE`, `POST`): a client that splits
///   its request head over several segments still pays for the request;
/// - it begins with CR or LF: servers skip empty lines before a request line (RFC 9112 §2.2),
///   so a client could otherwise hide a request start behind them.
///
/// The last two can also match a segment in the middle of a body; such a segment costs a
/// token (never a drop while the key has tokens), which the sync's headroom absorbs.
/// A fixed-size compare (no loop, no division) so the XDP program can call it.
#[inline(always)]
pub const fn is_request_start(head: [u8; 8], len: usize) -> bool {
    if len == 0 {
        return false;
    }
    if head[0] == b'\r' || head[0] == b'\n' {
        return true;
    }
    let word = u64::from_le_bytes(head);
    // The bytes the segment has: a token is compared on its first `min(len, token)` bytes.
    let have = if len >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * len)) - 1
    };
    // Little-endian word of the method token (including its space), and how many of the
    // 8 bytes it spans.
    const fn token(bytes: &[u8]) -> (u64, u64) {
        let mut word = 0u64;
        let mut i = 0;
        while i < bytes.len() {
            word |= (bytes[i] as u64) << (8 * i);
            i += 1;
        }
        let mask = if bytes.len() == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * bytes.len())) - 1
        };
        (word, mask)
    }
    const GET: (u64, u64) = token(b"GET ");
    const PUT: (u64, u64) = token(b"PUT ");
    const POST: (u64, u64) = token(b"POST ");
    const HEAD: (u64, u64) = token(b"HEAD ");
    const PATCH: (u64, u64) = token(b"PATCH ");
    const DELETE: (u64, u64) = token(b"DELETE ");
    const OPTIONS: (u64, u64) = token(b"OPTIONS ");
    const fn starts(word: u64, have: u64, t: (u64, u64)) -> bool {
        word & t.1 & have == t.0 & have
    }
    starts(word, have, GET)
        || starts(word, have, PUT)
        || starts(word, have, POST)
        || starts(word, have, HEAD)
        || starts(word, have, PATCH)
        || starts(word, have, DELETE)
        || starts(word, have, OPTIONS)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, made of integers and
    // byte arrays with explicit `_pad` fields (no implicit padding, size asserted above),
    // and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::PortConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::KeyLimit {}
    unsafe impl aya::Pod for super::Bucket {}
    unsafe impl aya::Pod for super::SourceBlock {}
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &[u8]) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..text.len().min(8)].copy_from_slice(&text[..text.len().min(8)]);
        out
    }

    #[test]
    fn request_starts_match_every_method_token() {
        for text in [
            &b"GET / HT"[..],
            b"POST /a ",
            b"PUT /x H",
            b"DELETE /",
            b"PATCH /p",
            b"HEAD / H",
            b"OPTIONS ",
        ] {
            assert!(is_request_start(head(text), text.len()), "{text:?}");
        }
    }

    #[test]
    fn split_heads_and_leading_empty_lines_still_count() {
        for text in [
            &b"G"[..],
            b"GE",
            b"GET",
            b"POST",
            b"OPTIO",
            b"GET /",
            b"\r\nGET / ",
            b"\n",
            b"\r\n\r\n\r\n\r\n",
        ] {
            assert!(is_request_start(head(text), text.len()), "{text:?}");
        }
        for text in [&b"X"[..], b"GX", b"ge", b"HTTP", b"{\"a\":1}"] {
            assert!(!is_request_start(head(text), text.len()), "{text:?}");
        }
    }

    #[test]
    fn other_payloads_are_not_request_starts() {
        for text in [
            &b"get / HT"[..],
            b"GETX / H",
            b"GET/ HTT",
            b"POSX",
            b"OPTIONS/",
            b"HTTP/1.1",
            b"\x16\x03\x01\x02\x00\x01\x00\x01",
            b"PRI * HT",
            b"CONNECT ",
            b"",
        ] {
            assert!(!is_request_start(head(text), text.len()), "{text:?}");
        }
    }

    #[test]
    fn v4_mapped_matches_std() {
        assert_eq!(
            v4_mapped([192, 0, 2, 7]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7]
        );
    }

    #[test]
    fn syn_guard_default_is_200_per_second_burst_400() {
        assert_eq!(SYN_GUARD_DEFAULT.interval_ns, gcra::NANOS_PER_SEC / 200);
        assert_eq!(SYN_GUARD_DEFAULT.tolerance_ns, 400 * 5_000_000);
    }
}
