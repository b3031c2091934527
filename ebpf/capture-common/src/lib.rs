//! Types of the maps shared by the eBPF capture programs (`capture-programs`)
//! and ztunnel's loader (`capture`). `no_std` and `#[repr(C)]`: both sides
//! must agree on every byte.
#![no_std]

/// Where captured outbound connections are sent, inside the pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture listener.
pub const INBOUND_PORT: u16 = 15006;
/// Inbound HBONE listener.
pub const HBONE_PORT: u16 = 15008;

/// Per pod, keyed by the pod's cgroup id (`PODS` map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    /// The pod's IPv4 address, network byte order.
    pub ip: u32,
    /// 1 while the pod is captured.
    pub enabled: u32,
}

/// The original destination of a captured connection, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// The client end of a captured connection as ztunnel sees it on 15001:
/// (network namespace cookie, client address, client port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ClientKey {
    pub netns_cookie: u64,
    /// Network byte order.
    pub ip: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding fields; every
    // bit pattern is valid.
    unsafe impl aya::Pod for super::PodConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClientKey {}
}
