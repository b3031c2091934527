//! Ambit's capture programs. They stay tiny: parse, look up, act; every
//! decision about what a connection may do is made by ztunnel in userspace.
//!
//! Outbound: `cgroup/connect4` on a pod's cgroup sends TCP connects to
//! non-loopback destinations (other than the pod itself) to ztunnel's
//! 127.0.0.1:15001 listener in the pod's netns and remembers the original
//! destination by socket cookie; `sockops` moves that record, once the
//! connection is established and its source port known, to a key ztunnel can
//! compute from the accepted socket's peer address. Destinations in the
//! node's excluded networks or ports are left alone.
//!
//! Inbound: a TC program (TCX) on the pod's `eth0` ingress leaves established
//! flows to their own sockets and assigns each new TCP connection to the pod
//! IP, on any port but ztunnel's own, to ztunnel's 15006 listener in the pod
//! (`bpf_sk_assign`), even where the application listens on that port.
#![no_std]
#![no_main]

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{
    BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, TC_ACT_OK, TC_ACT_SHOT, bpf_sock,
    bpf_sock_tuple,
};
use aya_ebpf::helpers::generated::{
    bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_lookup_elem,
    bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp,
};
use aya_ebpf::macros::{cgroup_sock_addr, classifier, map, sock_ops};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{HashMap, LpmTrie, LruHashMap, SockMap};
use aya_ebpf::programs::{SockAddrContext, SockOpsContext, TcContext};
use capture_common::{ClientKey, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, OrigDst, PodConfig};

/// Captured pods, by cgroup id.
#[map]
static PODS: HashMap<u64, PodConfig> = HashMap::pinned(4096, 0);

/// Original destinations by socket cookie, between connect and established.
#[map]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

/// Original destinations by the client end ztunnel sees on 15001.
#[map]
static ORIG_DST: LruHashMap<ClientKey, OrigDst> = LruHashMap::pinned(65536, 0);

/// Captured pods' inbound listener slot (in `INBOUND`), by pod IP.
#[map]
static INBOUND_SLOTS: HashMap<u32, u32> = HashMap::pinned(4096, 0);

/// ztunnel's 15006 listeners, one per captured pod.
#[map]
static INBOUND: SockMap = SockMap::pinned(4096, 0);

/// Destination networks outbound capture leaves alone (node-wide), keyed by
/// network-order address bytes.
#[map]
static EXCLUDED_NETS: LpmTrie<u32, u8> = LpmTrie::pinned(256, 0);

/// Destination ports (host order) outbound capture leaves alone.
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(256, 0);

const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const LOOPBACK: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let dst_ip = addr.user_ip4;
    // The first octet is the lowest byte of the network-order address.
    if dst_ip & 0xff == 127 {
        return ALLOW;
    }
    // SAFETY: helper without arguments, valid in this program type.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the map value is only read.
    let Some(pod) = (unsafe { PODS.get(&cgroup) }) else {
        return ALLOW;
    };
    if pod.enabled == 0 || dst_ip == pod.ip {
        return ALLOW;
    }
    let dst_port = u16::from_be(addr.user_port as u16);
    if EXCLUDED_PORTS.get_ptr(&dst_port).is_some()
        || EXCLUDED_NETS.get(Key::new(32, dst_ip)).is_some()
    {
        return ALLOW;
    }
    // SAFETY: the context pointer is the one the kernel passed in.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst {
        ip: dst_ip,
        port: addr.user_port as u16,
        _pad: 0,
    };
    if PENDING.insert(&cookie, &orig, 0).is_err() {
        // Without a record ztunnel could not route the connection: refuse
        // it rather than let it bypass the mesh.
        return 0;
    }
    // Separate stores: the verifier rejects one wide store over both fields.
    // SAFETY: writing the fields the connect4 context allows.
    unsafe {
        core::ptr::write_volatile(&mut addr.user_ip4, LOOPBACK);
        core::ptr::write_volatile(&mut addr.user_port, u32::from(OUTBOUND_PORT.to_be()));
    }
    ALLOW
}

#[sock_ops]
pub fn track_established(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    // SAFETY: the context pointer is the one the kernel passed in.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(orig) = (unsafe { PENDING.get(&cookie) }).copied() else {
        return 1;
    };
    let key = ClientKey {
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        ip: ctx.local_ip4(),
        port: ctx.local_port() as u16,
        _pad: 0,
    };
    let _ = ORIG_DST.insert(&key, &orig, 0);
    let _ = PENDING.remove(&cookie);
    1
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const TCP_LISTEN: u32 = 10;

#[classifier]
pub fn inbound_assign(ctx: TcContext) -> i32 {
    match try_inbound(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_inbound(ctx: &TcContext) -> Result<i32, i32> {
    let pass = |_| TC_ACT_OK;
    if u16::from_be(ctx.load::<u16>(12).map_err(pass)?) != ETH_P_IP {
        return Ok(TC_ACT_OK);
    }
    let ihl = usize::from(ctx.load::<u8>(ETH_HLEN).map_err(pass)? & 0x0f) * 4;
    if ctx.load::<u8>(ETH_HLEN + 9).map_err(pass)? != IPPROTO_TCP {
        return Ok(TC_ACT_OK);
    }
    let daddr: u32 = ctx.load(ETH_HLEN + 16).map_err(pass)?;
    // SAFETY: the value is only read.
    let Some(slot) = (unsafe { INBOUND_SLOTS.get(&daddr) }).copied() else {
        return Ok(TC_ACT_OK); // not a captured pod
    };
    let tcp = ETH_HLEN + ihl;
    let dport: u16 = ctx.load(tcp + 2).map_err(pass)?;
    if matches!(
        u16::from_be(dport),
        OUTBOUND_PORT | INBOUND_PORT | HBONE_PORT
    ) {
        return Ok(TC_ACT_OK);
    }
    // SAFETY: an all-zero bpf_sock_tuple is a valid value of the C type.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: writing the IPv4 member of a zeroed union.
    unsafe {
        let v4 = &mut tuple.__bindgen_anon_1.ipv4;
        v4.saddr = ctx.load(ETH_HLEN + 12).map_err(pass)?;
        v4.daddr = daddr;
        v4.sport = ctx.load(tcp).map_err(pass)?;
        v4.dport = dport;
    }
    let v4_size = core::mem::size_of::<[u32; 3]>() as u32;
    // SAFETY: skb and tuple are valid; the reference is released below.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            v4_size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if !sk.is_null() {
        // SAFETY: a socket reference returned by the lookup.
        let state = unsafe { (*sk).state };
        // SAFETY: releases the reference taken by the lookup, once.
        unsafe { bpf_sk_release(sk.cast()) };
        if state != TCP_LISTEN {
            return Ok(TC_ACT_OK); // an established flow keeps its socket
        }
    }
    let flags: u8 = ctx.load(tcp + 13).map_err(pass)?;
    if flags & TCP_FLAG_SYN == 0 || flags & TCP_FLAG_ACK != 0 {
        return Ok(TC_ACT_OK); // not a new connection: the kernel answers it
    }
    // SAFETY: the map pointer is the SockMap's definition (a transparent
    // wrapper); the returned reference is released below.
    let listener = unsafe {
        bpf_map_lookup_elem(
            core::ptr::addr_of!(INBOUND).cast_mut().cast(),
            (&slot as *const u32).cast(),
        )
    } as *mut bpf_sock;
    if listener.is_null() {
        // Captured but ztunnel is not listening: drop, never bypass the mesh.
        return Err(TC_ACT_SHOT);
    }
    // SAFETY: valid skb and socket reference; released right after.
    let assigned = unsafe { bpf_sk_assign(ctx.as_ptr(), listener.cast(), 0) };
    // SAFETY: releases the reference taken by the map lookup, once.
    unsafe { bpf_sk_release(listener.cast()) };
    if assigned != 0 {
        return Err(TC_ACT_SHOT);
    }
    Ok(TC_ACT_OK)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
