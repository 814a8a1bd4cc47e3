//! The gateway's XDP program.
//!
//! It reads Ethernet (up to two VLAN tags), IPv4 (with options) or IPv6 (with a bounded
//! extension-header walk) and TCP (with `doff`), and counts the segments addressed to the
//! gateway's data-plane ports. It never drops anything it cannot classify: every parse
//! failure is `XDP_PASS` and counted (fail open).
#![no_std]
#![no_main]

use core::mem;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use gateway_common::{PortConfig, stats};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr, tcp::TcpHdr, vlan::VlanHdr};

/// Per-CPU counters, indexed by `gateway_common::stats`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// TCP destination ports (network byte order) that the data plane listens on.
#[map]
static DATA_PORTS: HashMap<[u8; 2], PortConfig> = HashMap::with_max_entries(64, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const MAX_VLAN_TAGS: usize = 2;
const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Upper bound of any header offset we compute; keeps offsets provably bounded for the verifier.
const MAX_OFFSET: usize = 4096;

/// Why a frame was passed without being classified as data-plane TCP.
enum Pass {
    /// Not TCP to a data-plane port (ARP, UDP, other ports, ...).
    Other,
    /// An IP fragment: only the first one carries the TCP header, so all pass.
    Fragment,
    /// The frame ended before a header it announced.
    Malformed,
}

#[xdp]
pub fn gateway(ctx: XdpContext) -> u32 {
    match classify(&ctx) {
        Ok(()) => count(stats::DATA_PORT_PACKETS),
        Err(Pass::Other) => count(stats::OTHER_PASSED),
        Err(Pass::Fragment) => count(stats::FRAGMENTS_PASSED),
        Err(Pass::Malformed) => count(stats::PARSE_FAILURES),
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the map lookup and points at this CPU's slot,
        // which no other CPU writes.
        unsafe { *counter += 1 };
    }
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

/// `Ok` when the frame is a TCP segment to a data-plane port.
#[inline(always)]
fn classify(ctx: &XdpContext) -> Result<(), Pass> {
    let mut offset = EthHdr::LEN;
    let mut ether_type = read_u16_be(ctx, mem::offset_of!(EthHdr, ether_type))?;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        ether_type = read_u16_be(ctx, offset + mem::offset_of!(VlanHdr, ether_type))?;
        offset += VlanHdr::LEN;
    }

    let tcp_offset = match ether_type {
        ETH_P_IP => ipv4_payload(ctx, offset)?,
        ETH_P_IPV6 => ipv6_payload(ctx, offset)?,
        _ => return Err(Pass::Other),
    };

    let tcp: *const TcpHdr = ptr_at(ctx, tcp_offset)?;
    // SAFETY: `ptr_at` checked that the whole fixed TCP header lies inside the frame.
    let (dest, doff) = unsafe { ((*tcp).dest, (*tcp).doff()) };
    if doff < 5 {
        return Err(Pass::Malformed);
    }
    if DATA_PORTS.get_ptr(dest).is_none() {
        return Err(Pass::Other);
    }
    debug!(
        ctx,
        "tcp segment to data-plane port {}",
        u16::from_be_bytes(dest)
    );
    Ok(())
}

/// Offset of the TCP header inside an IPv4 packet starting at `offset`.
#[inline(always)]
fn ipv4_payload(ctx: &XdpContext, offset: usize) -> Result<usize, Pass> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the fixed IPv4 header lies inside the frame.
    let (vihl, frags, proto) = unsafe { ((*ip).vihl, (*ip).frags, (*ip).proto) };
    let header_len = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(Pass::Malformed);
    }
    // More-fragments flag or a non-zero fragment offset.
    if (u16::from_be_bytes(frags) & 0x3fff) != 0 {
        return Err(Pass::Fragment);
    }
    if proto != IPPROTO_TCP {
        return Err(Pass::Other);
    }
    Ok(offset + header_len)
}

/// Offset of the TCP header inside an IPv6 packet starting at `offset`, after walking at
/// most `MAX_IPV6_EXT_HEADERS` extension headers.
#[inline(always)]
fn ipv6_payload(ctx: &XdpContext, offset: usize) -> Result<usize, Pass> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the fixed IPv6 header lies inside the frame.
    let mut next = unsafe { (*ip).next_hdr };
    let mut offset = offset + Ipv6Hdr::LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return Ok(offset),
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
    if next == IPPROTO_TCP {
        Ok(offset)
    } else {
        // Longer chains than we walk: pass them rather than guess.
        Err(Pass::Other)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
