//! Ambit's capture programs. They stay tiny: parse, look up, act; every
//! decision about what a connection may do is made by ztunnel in userspace.
//!
//! Outbound: `cgroup/connect4` on a pod's cgroup sends TCP connects to
//! non-loopback destinations (other than the pod itself) to ztunnel's
//! 127.0.0.1:15001 listener in the pod's netns and remembers the original
//! destination by socket cookie; `sockops` moves that record, once the
//! connection is established and its source port known, to a key ztunnel can
//! compute from the accepted socket's peer address.
#![no_std]
#![no_main]

use aya_ebpf::bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
use aya_ebpf::helpers::generated::{
    bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
};
use aya_ebpf::macros::{cgroup_sock_addr, map, sock_ops};
use aya_ebpf::maps::{HashMap, LruHashMap};
use aya_ebpf::programs::{SockAddrContext, SockOpsContext};
use capture_common::{ClientKey, OUTBOUND_PORT, OrigDst, PodConfig};

/// Captured pods, by cgroup id.
#[map]
static PODS: HashMap<u64, PodConfig> = HashMap::with_max_entries(4096, 0);

/// Original destinations by socket cookie, between connect and established.
#[map]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// Original destinations by the client end ztunnel sees on 15001.
#[map]
static ORIG_DST: LruHashMap<ClientKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
