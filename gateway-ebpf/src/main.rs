//! The gateway's XDP program: the kernel fast path of the usage-plan throttles.
//!
//! It reads Ethernet (up to two VLAN tags), IPv4 (with options) or IPv6 (with a bounded
//! extension-header walk) and TCP (with `doff`), and judges the segments addressed to the
//! gateway's data-plane ports:
//!
//! - a SYN from a blocked source, or over its source's SYN rate, drops;
//! - a *request start* (payload beginning with an HTTP/1.x method token) from a blocked
//!   source drops; on a connection the proxy bound to a key slot it drops while the key
//!   carries a block mark, and otherwise takes one token from the key's bucket, dropping
//!   when the bucket is empty;
//! - everything else passes: ACK-only, FIN and RST segments, continuation segments,
//!   retransmissions of a request start that already took a token, unbound connections.
//!
//! Invariants:
//! - A drop never changes state: it takes no token and does not record the segment, so
//!   the client's retransmission of it is judged afresh.
//! - Everything fails open: a frame it cannot read, or a segment whose state is missing,
//!   passes and is counted.
//! - Bucket state changes only by compare-and-swap, so concurrent CPUs charging one key
//!   never admit more than the bucket holds.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "BPF has no core::sync::atomic compare-and-swap"
)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg},
    mem, ptr,
};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_load_bytes},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use gateway_common::{
    Bucket, Config, FlowKey, FlowValue, KeyLimit, PortConfig, SourceBlock, config_flags,
    flow_flags,
    gcra::{self, GcraParams},
    is_request_start, key_flags, sizes, stats, v4_mapped,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr, tcp::TcpHdr, vlan::VlanHdr};

/// Per-CPU counters, indexed by `gateway_common::stats`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// TCP destination ports (network byte order) that the data plane listens on.
#[map]
static DATA_PORTS: HashMap<[u8; 2], PortConfig> = HashMap::with_max_entries(64, 0);

/// Connections the proxy bound to a key slot. LRU, so a binding the proxy never removed
/// is eventually evicted instead of filling the map.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(sizes::FLOWS, 0);

/// Per key slot: parameters and block mark (written by the gateway).
#[map]
static KEY_LIMITS: Array<KeyLimit> = Array::with_max_entries(sizes::KEY_SLOTS, 0);

/// Per key slot: bucket state (written here, by compare-and-swap).
#[map]
static KEY_BUCKETS: Array<Bucket> = Array::with_max_entries(sizes::KEY_SLOTS, 0);

/// SYN-rate bucket per source address (IPv4 as IPv4-mapped IPv6).
#[map]
static SYN_RATES: LruHashMap<[u8; 16], Bucket> =
    LruHashMap::with_max_entries(sizes::SYN_SOURCES, 0);

/// Sources whose SYNs and request starts drop until a deadline.
#[map]
static BLOCKED_SOURCES: LruHashMap<[u8; 16], SourceBlock> =
    LruHashMap::with_max_entries(sizes::BLOCKED_SOURCES, 0);

/// Run-time settings, one entry.
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const MAX_VLAN_TAGS: usize = 2;
const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Upper bound of any header offset we compute; keeps offsets provably bounded for the verifier.
const MAX_OFFSET: usize = 4096;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Bytes of payload read to recognise a request start (the longest token, `OPTIONS `).
const HEAD_LEN: usize = 8;
/// Compare-and-swap attempts on one bucket before giving up (and passing). Each failed
/// attempt means another CPU changed the bucket in between, so running out takes a burst
/// of simultaneous updates to one key that a bounded loop cannot outwait.
const CAS_ATTEMPTS: usize = 8;

/// Why a frame was passed without being classified as data-plane TCP.
enum Pass {
    /// Not TCP to a data-plane port (ARP, UDP, other ports, ...).
    Other,
    /// An IP fragment: only the first one carries the TCP header, so all pass.
    Fragment,
    /// The frame ended before a header or payload it announced.
    Malformed,
}

/// A TCP segment to a data-plane port, as far as the verdict needs it.
struct Segment {
    key: FlowKey,
    /// The TCP flags byte (CWR ECE URG ACK PSH RST SYN FIN).
    flags: u8,
    /// Sequence number, host order.
    seq: u32,
    /// Whether the payload begins with an HTTP/1.x method token.
    request_start: bool,
    /// Whether the segment carries any payload.
    has_payload: bool,
}

/// The verdict on a data-port segment and the counter that says why.
enum Outcome {
    /// Pass; `Some(counter)` details the reason beyond `DATA_PORT_PASSED`.
    Pass(Option<u32>),
    /// Drop, counted under this counter.
    Drop(u32),
}

#[xdp]
pub fn gateway(ctx: XdpContext) -> u32 {
    let segment = match parse(&ctx) {
        Ok(segment) => segment,
        Err(reason) => {
            count(match reason {
                Pass::Other => stats::OTHER_PASSED,
                Pass::Fragment => stats::FRAGMENTS_PASSED,
                Pass::Malformed => stats::PARSE_FAILURES,
            });
            return xdp_action::XDP_PASS;
        }
    };
    count(stats::DATA_PORT_PACKETS);
    match judge(&segment) {
        Outcome::Pass(detail) => {
            count(stats::DATA_PORT_PASSED);
            if let Some(detail) = detail {
                count(detail);
            }
            xdp_action::XDP_PASS
        }
        Outcome::Drop(reason) => {
            count(reason);
            debug!(
                &ctx,
                "drop reason {} sport {} seq {}",
                reason,
                u16::from_be_bytes(segment.key.sport),
                segment.seq
            );
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the map lookup and points at this CPU's slot,
        // which no other CPU writes.
        unsafe { *counter += 1 };
    }
}

/// The verdict on one data-port segment.
#[inline(always)]
fn judge(segment: &Segment) -> Outcome {
    if segment.flags & (TCP_FIN | TCP_RST) != 0 {
        return Outcome::Pass(None);
    }
    if segment.flags & TCP_SYN != 0 {
        if segment.flags & TCP_ACK != 0 {
            return Outcome::Pass(None);
        }
        return syn(segment);
    }
    if !segment.has_payload || !segment.request_start {
        // ACK-only or a continuation of something already under way.
        return Outcome::Pass(None);
    }
    request_start(segment)
}

/// Run-time settings and the current time, read once per judged segment.
#[inline(always)]
fn settings() -> Option<(Config, u64)> {
    let config = *CONFIG.get(0)?;
    let now = if config.fake_now_ns != 0 {
        config.fake_now_ns
    } else {
        // SAFETY: the helper takes no arguments and only reads the clock.
        unsafe { bpf_ktime_get_coarse_ns() }
    };
    Some((config, now))
}

#[inline(always)]
fn source_blocked(source: &[u8; 16], now: u64) -> bool {
    let Some(block) = BLOCKED_SOURCES.get_ptr(source) else {
        return false;
    };
    // SAFETY: the pointer comes from the lookup; a concurrent update of this 8-byte value
    // at worst shows the old or the new deadline.
    let until_ns = unsafe { ptr::read_volatile(&raw const (*block).until_ns) };
    until_ns > now
}

/// A client SYN: blocked sources drop, then the per-source SYN guard applies.
#[inline(always)]
fn syn(segment: &Segment) -> Outcome {
    let Some((config, now)) = settings() else {
        return Outcome::Pass(Some(stats::MISSING_STATE_PASSED));
    };
    let source = &segment.key.saddr;
    if source_blocked(source, now) {
        return Outcome::Drop(stats::DROPPED_BLOCKED_SOURCE);
    }
    if config.flags & config_flags::SYN_GUARD == 0 {
        return Outcome::Pass(None);
    }
    let bucket = match SYN_RATES.get_ptr_mut(source) {
        Some(bucket) => bucket,
        None => {
            // First SYN from this source (or it was evicted): start it with a full bucket.
            // `BPF_NOEXIST` keeps a racing CPU's entry, and its tokens, if it won the race.
            let _ = SYN_RATES.insert(source, Bucket { tat_ns: 0 }, u64::from(BPF_NOEXIST));
            match SYN_RATES.get_ptr_mut(source) {
                Some(bucket) => bucket,
                // Evicted again at once by a flood of new sources: fail open.
                None => return Outcome::Pass(Some(stats::MISSING_STATE_PASSED)),
            }
        }
    };
    match take(&config.syn_guard, bucket, now) {
        Take::Admitted => Outcome::Pass(None),
        Take::Denied => Outcome::Drop(stats::SYN_DROPPED_GUARD),
        Take::Contended => Outcome::Pass(Some(stats::CONTENTION_PASSED)),
    }
}

/// A request start: blocked sources drop; on a bound connection the key's block mark and
/// bucket decide.
#[inline(always)]
fn request_start(segment: &Segment) -> Outcome {
    let Some((_, now)) = settings() else {
        return Outcome::Pass(Some(stats::MISSING_STATE_PASSED));
    };
    if source_blocked(&segment.key.saddr, now) {
        return Outcome::Drop(stats::DROPPED_BLOCKED_SOURCE);
    }
    let Some(flow) = FLOWS.get_ptr_mut(segment.key) else {
        // Not bound (yet): the proxy judges it.
        return Outcome::Pass(None);
    };
    // SAFETY: the pointer comes from the lookup. RSS steers one connection to one CPU, so
    // its entry has one writer here; a binding replaced or removed meanwhile by the proxy
    // at worst charges this one segment to the old slot.
    let FlowValue {
        slot,
        flags,
        last_counted_seq,
        ..
    } = unsafe { *flow };
    if flags & flow_flags::SEQ_VALID != 0 && last_counted_seq == segment.seq {
        return Outcome::Pass(Some(stats::RETRANSMISSIONS_PASSED));
    }
    let Some(limit) = KEY_LIMITS.get(slot) else {
        return Outcome::Pass(Some(stats::MISSING_STATE_PASSED));
    };
    let KeyLimit {
        params,
        blocked_until_ns,
        flags: limit_flags,
        ..
    } = *limit;
    if blocked_until_ns > now {
        return Outcome::Drop(stats::DROPPED_BLOCKED_KEY);
    }
    if limit_flags & key_flags::LIMITED == 0 {
        return Outcome::Pass(None);
    }
    let Some(bucket) = KEY_BUCKETS.get_ptr_mut(slot) else {
        return Outcome::Pass(Some(stats::MISSING_STATE_PASSED));
    };
    match take(&params, bucket, now) {
        Take::Admitted => {
            // SAFETY: as above; only this CPU writes this connection's entry.
            unsafe {
                (*flow).last_counted_seq = segment.seq;
                (*flow).flags = flags | flow_flags::SEQ_VALID;
            }
            Outcome::Pass(Some(stats::REQUEST_STARTS_COUNTED))
        }
        Take::Denied => Outcome::Drop(stats::DROPPED_OVER_RATE),
        Take::Contended => Outcome::Pass(Some(stats::CONTENTION_PASSED)),
    }
}

enum Take {
    /// A token was taken.
    Admitted,
    /// The bucket is empty; nothing changed.
    Denied,
    /// Other CPUs changed the bucket on every attempt; nothing changed.
    Contended,
}

/// Takes one token from the GCRA bucket at `bucket`: reads the TAT, decides with
/// [`gcra::check`], and stores the new TAT only if nobody changed it in between.
#[inline(always)]
fn take(params: &GcraParams, bucket: *mut Bucket, now: u64) -> Take {
    // SAFETY: `bucket` comes from a map lookup and stays valid for this run; the value is
    // 8-byte aligned, so the read is never torn.
    let tat = unsafe { &raw mut (*bucket).tat_ns };
    // SAFETY: as above.
    let mut current = unsafe { ptr::read_volatile(tat) };
    for _ in 0..CAS_ATTEMPTS {
        let gcra::Verdict::Allow(next) = gcra::check(params, current, now) else {
            return Take::Denied;
        };
        // SAFETY: as above; the kernel's BPF_CMPXCHG is atomic across CPUs.
        let (seen, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                tat, current, next,
            )
        };
        if swapped {
            return Take::Admitted;
        }
        count(stats::CAS_RETRIES);
        current = seen;
    }
    Take::Contended
}

/// Returns a pointer to a `T` at `offset` bytes into the frame, if the frame holds it whole.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Pass> {
    if offset > MAX_OFFSET {
        return Err(Pass::Malformed);
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(Pass::Malformed);
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn read_u16_be(ctx: &XdpContext, offset: usize) -> Result<u16, Pass> {
    let bytes: *const [u8; 2] = ptr_at(ctx, offset)?;
    // SAFETY: `ptr_at` checked that both bytes lie inside the frame.
    Ok(u16::from_be_bytes(unsafe { *bytes }))
}

/// Where the IP layer put the TCP segment.
struct Ip {
    saddr: [u8; 16],
    daddr: [u8; 16],
    /// Offset of the TCP header in the frame.
    tcp_offset: usize,
    /// TCP header plus payload, from the IP length fields.
    tcp_len: usize,
}

/// The segment, when the frame is TCP to a data-plane port.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Segment, Pass> {
    let mut offset = EthHdr::LEN;
    let mut ether_type = read_u16_be(ctx, mem::offset_of!(EthHdr, ether_type))?;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        ether_type = read_u16_be(ctx, offset + mem::offset_of!(VlanHdr, ether_type))?;
        offset += VlanHdr::LEN;
    }

    let ip = match ether_type {
        ETH_P_IP => ipv4(ctx, offset)?,
        ETH_P_IPV6 => ipv6(ctx, offset)?,
        _ => return Err(Pass::Other),
    };

    let tcp: *const [u8; TcpHdr::LEN] = ptr_at(ctx, ip.tcp_offset)?;
    // SAFETY: `ptr_at` checked that the whole fixed TCP header lies inside the frame. One
    // copy through one checked pointer keeps the verifier's packet-range proof intact.
    let tcp = unsafe { *tcp };
    let source = [tcp[0], tcp[1]];
    let dest = [tcp[2], tcp[3]];
    let seq = [tcp[4], tcp[5], tcp[6], tcp[7]];
    // Data offset (high nibble of byte 12) and the flags byte (13).
    let (doff_byte, flags) = (tcp[12], tcp[13]);
    let header_len = usize::from(doff_byte >> 4) * 4;
    if header_len < TcpHdr::LEN || header_len > ip.tcp_len {
        return Err(Pass::Malformed);
    }
    if DATA_PORTS.get_ptr(dest).is_none() {
        return Err(Pass::Other);
    }
    let payload_len = ip.tcp_len - header_len;
    let payload_offset = ip.tcp_offset + header_len;
    let request_start = payload_len > 0 && {
        let mut head = [0u8; HEAD_LEN];
        // At most HEAD_LEN bytes; a shorter payload (a request head split over segments) is
        // read whole. The helper checks the bounds itself, so variable offsets (IP options,
        // extension headers, TCP options) need no packet-pointer proofs. A frame shorter than
        // its IP length fails here.
        let len = if payload_len < HEAD_LEN {
            payload_len
        } else {
            HEAD_LEN
        };
        // The helper refuses a zero-sized read and the verifier must see `1..=HEAD_LEN` at the
        // call. The compiler would drop a bounds check it can prove redundant, so the check
        // runs on a value it cannot see through.
        // SAFETY: reading a local through a reference to it.
        let len = unsafe { core::ptr::read_volatile(&len) };
        if len == 0 || len > HEAD_LEN {
            return Err(Pass::Malformed);
        }
        // SAFETY: `head` is a writable buffer of `HEAD_LEN` bytes and `len <= HEAD_LEN`.
        let loaded = unsafe {
            bpf_xdp_load_bytes(
                ctx.ctx,
                payload_offset as u32,
                head.as_mut_ptr().cast::<c_void>(),
                len as u32,
            )
        };
        if loaded != 0 {
            return Err(Pass::Malformed);
        }
        is_request_start(head, len)
    };
    Ok(Segment {
        key: FlowKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: source,
            dport: dest,
            _pad: [0; 4],
        },
        flags,
        seq: u32::from_be_bytes(seq),
        request_start,
        has_payload: payload_len > 0,
    })
}

/// The IPv4 packet starting at `offset`.
#[inline(always)]
fn ipv4(ctx: &XdpContext, offset: usize) -> Result<Ip, Pass> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the fixed IPv4 header lies inside the frame.
    let (vihl, total, frags, proto, saddr, daddr) = unsafe {
        (
            (*ip).vihl,
            (*ip).tot_len,
            (*ip).frags,
            (*ip).proto,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    let header_len = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes(total));
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || total < header_len {
        return Err(Pass::Malformed);
    }
    // More-fragments flag or a non-zero fragment offset.
    if (u16::from_be_bytes(frags) & 0x3fff) != 0 {
        return Err(Pass::Fragment);
    }
    if proto != IPPROTO_TCP {
        return Err(Pass::Other);
    }
    Ok(Ip {
        saddr: v4_mapped(saddr),
        daddr: v4_mapped(daddr),
        tcp_offset: offset + header_len,
        tcp_len: total - header_len,
    })
}

/// The IPv6 packet starting at `offset`, after walking at most `MAX_IPV6_EXT_HEADERS`
/// extension headers.
#[inline(always)]
fn ipv6(ctx: &XdpContext, offset: usize) -> Result<Ip, Pass> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the fixed IPv6 header lies inside the frame.
    let (mut next, payload_len, saddr, daddr) = unsafe {
        (
            (*ip).next_hdr,
            (*ip).payload_len,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    let payload_start = offset + Ipv6Hdr::LEN;
    let payload_end = payload_start + usize::from(u16::from_be_bytes(payload_len));
    let mut offset = payload_start;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_TCP => break,
            // Hop-by-hop, routing, destination options, mobility: length in 8-octet units.
            0 | 43 | 60 | 135 => {
                let header: *const [u8; 2] = ptr_at(ctx, offset)?;
                // SAFETY: `ptr_at` checked both bytes.
                let [following, len] = unsafe { *header };
                next = following;
                offset += (usize::from(len) + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let header: *const [u8; 2] = ptr_at(ctx, offset)?;
                // SAFETY: `ptr_at` checked both bytes.
                let [following, len] = unsafe { *header };
                next = following;
                offset += (usize::from(len) + 2) * 4;
            }
            44 => return Err(Pass::Fragment),
            _ => return Err(Pass::Other),
        }
    }
    if next != IPPROTO_TCP {
        // Longer chains than we walk: pass them rather than guess.
        return Err(Pass::Other);
    }
    if offset > payload_end {
        return Err(Pass::Malformed);
    }
    Ok(Ip {
        saddr,
        daddr,
        tcp_offset: offset,
        tcp_len: payload_end - offset,
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
