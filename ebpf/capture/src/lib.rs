//! Loads Ambit's eBPF capture programs (built from `ebpf/capture-programs`
//! and embedded at build time) and attaches them to pods' cgroups, and reads
//! back the original destination of each captured connection. Used by
//! ztunnel's node agent.
//!
//! Outbound capture: a pod's TCP connects to anything but loopback and its
//! own address go to ztunnel's `127.0.0.1:15001` listener in the pod's
//! network namespace; [`Destinations::original_destination`] answers where they
//! were going, keyed by the namespace and the client address ztunnel sees.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use std::os::fd::AsRawFd;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, SockMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, SockOps, TcAttachType};
use aya::{Ebpf, EbpfLoader, include_bytes_aligned};
use capture_common::{ClientKey, OrigDst, PodConfig};

pub mod netns;

pub use capture_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};

/// The programs' object, built by this crate's build script.
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture-programs"));

const CONNECT4: &str = "redirect_connect4";
const SOCKOPS: &str = "track_established";
const INBOUND: &str = "inbound_assign";
/// Programs a loaded [`Capture`] holds in the kernel.
pub const PROGRAMS: usize = 3;
/// Slots in the kernel's table of inbound listeners (one per captured pod).
const MAX_PODS: u32 = 4096;

/// Why capture could not be set up, naming what is missing.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "loading eBPF programs needs CAP_BPF and CAP_NET_ADMIN (or root): {0}; run ztunnel as root or grant them"
    )]
    Privilege(String),
    #[error("the kernel refused eBPF program {program}: {detail}")]
    Rejected {
        program: &'static str,
        detail: String,
    },
    #[error("cgroup v2 directory {} cannot be used: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attaching {program} to {}: {detail}", cgroup.display())]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        detail: String,
    },
    #[error("eBPF map {map}: {detail}")]
    Map { map: &'static str, detail: String },
    #[error(
        "{} is not a BPF filesystem; mount one (mount -t bpf bpf /sys/fs/bpf) so capture survives a ztunnel restart",
        path.display()
    )]
    NoBpffs { path: PathBuf },
    #[error("pinning in {}: {detail}", path.display())]
    Pin { path: PathBuf, detail: String },
}

/// The loaded programs and their maps.
///
/// Maps and per-pod links are pinned under a directory of a BPF filesystem,
/// so capture outlives the process: if ztunnel dies, captured pods keep
/// being redirected to listeners that no longer exist, and their
/// connections fail instead of bypassing the mesh. A restarted ztunnel with
/// the same directory adopts the pinned links and maps.
#[derive(Debug)]
pub struct Capture {
    bpf: Ebpf,
    pin_dir: PathBuf,
    free_slots: Vec<u32>,
    destinations: Arc<Destinations>,
}

/// The original destinations of captured connections, kept apart from the
/// rest of [`Capture`]: looking one up happens for every outbound
/// connection and must not wait behind a pod being captured or released.
#[derive(Debug)]
pub struct Destinations {
    map: Mutex<BpfHashMap<MapData, ClientKey, OrigDst>>,
}

impl Destinations {
    /// Where a captured connection was going: `netns_cookie` of the pod's
    /// namespace and `client`, the peer address of the accepted socket on
    /// 15001. Each record is handed out once.
    pub fn original_destination(
        &self,
        netns_cookie: u64,
        client: SocketAddrV4,
    ) -> Result<Option<SocketAddrV4>, CaptureError> {
        let key = ClientKey {
            netns_cookie,
            ip: u32::from_ne_bytes(client.ip().octets()),
            port: client.port(),
            _pad: 0,
        };
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let orig = match map.get(&key, 0) {
            Ok(orig) => orig,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(orig_dst_error(e)),
        };
        let _ = map.remove(&key);
        Ok(Some(SocketAddrV4::new(
            Ipv4Addr::from(orig.ip.to_ne_bytes()),
            u16::from_be(orig.port),
        )))
    }
}

fn orig_dst_error(e: aya::maps::MapError) -> CaptureError {
    CaptureError::Map {
        map: "ORIG_DST",
        detail: e.to_string(),
    }
}

/// What capture needs to know of a pod.
#[derive(Debug)]
pub struct Pod<'a, L: AsRawFd> {
    /// The pod's cgroup v2 directory (outbound programs attach here).
    pub cgroup: &'a Path,
    /// The pod's network namespace file, e.g. `/var/run/netns/<name>`.
    pub netns: &'a Path,
    /// Interface carrying the pod's traffic inside its namespace.
    pub interface: &'a str,
    pub ip: Ipv4Addr,
    /// ztunnel's 15006 listener in the pod's namespace: new inbound
    /// connections are assigned to it.
    pub inbound_listener: &'a L,
}

/// Destinations outbound capture leaves alone on the whole node: TCP
/// connects to them go direct, as if the pod were not captured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusions {
    /// IPv4 networks as (network address, prefix length).
    pub nets: Vec<(Ipv4Addr, u8)>,
    pub ports: Vec<u16>,
}

/// Entries each exclusion table holds (sized in `capture-programs`).
pub const MAX_EXCLUSIONS: usize = 256;

/// One captured pod; give it back to [`Capture::release`].
#[derive(Debug)]
pub struct PodCapture {
    cgroup: PathBuf,
    cgroup_id: u64,
    ip: Ipv4Addr,
    slot: u32,
    /// Where the pod's links are pinned.
    links: PathBuf,
}

/// Pinned link files of one pod.
const LINKS: [&str; 3] = ["inbound", "connect4", "sockops"];

impl PodCapture {
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
}

/// An error with all its causes, so that the kernel's errno is not lost.
fn chain(e: &dyn std::error::Error) -> String {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    detail
}

/// Classifies a load failure: EPERM anywhere in the chain means a missing
/// privilege, anything else a rejection; the detail carries the whole chain.
fn rejected(program: &'static str, e: impl std::error::Error) -> CaptureError {
    let detail = chain(&e);
    let mut eperm = false;
    let mut source = e.source();
    while let Some(cause) = source {
        eperm |= cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM));
        source = cause.source();
    }
    if eperm || detail.contains("Operation not permitted") {
        CaptureError::Privilege(detail)
    } else {
        CaptureError::Rejected { program, detail }
    }
}

impl Capture {
    /// Loads the programs into the kernel (they act only once attached),
    /// reusing maps pinned in `pin_dir` by an earlier run.
    pub fn load(pin_dir: &Path) -> Result<Self, CaptureError> {
        check_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir.join("pods")).map_err(|e| CaptureError::Pin {
            path: pin_dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .map_err(|e| rejected("object", e))?;
        let connect4: &mut CgroupSockAddr = program(&mut bpf, CONNECT4)?;
        connect4.load().map_err(|e| load_error(CONNECT4, e))?;
        let sockops: &mut SockOps = program(&mut bpf, SOCKOPS)?;
        sockops.load().map_err(|e| load_error(SOCKOPS, e))?;
        load_classifier(&mut bpf, INBOUND)?;
        // The programs hold the map through their own references; this is
        // the process's handle to it.
        let orig_dst = bpf
            .take_map("ORIG_DST")
            .ok_or_else(|| missing_map("ORIG_DST"))?;
        let destinations = Arc::new(Destinations {
            map: Mutex::new(BpfHashMap::try_from(orig_dst).map_err(orig_dst_error)?),
        });
        let mut this = Self {
            bpf,
            pin_dir: pin_dir.to_path_buf(),
            free_slots: Vec::new(),
            destinations,
        };
        let used: Vec<u32> = this
            .slots()?
            .iter()
            .filter_map(Result::ok)
            .map(|(_, slot)| slot)
            .collect();
        this.free_slots = (0..MAX_PODS).rev().filter(|s| !used.contains(s)).collect();
        Ok(this)
    }

    fn slots(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u32>, CaptureError> {
        BpfHashMap::try_from(
            self.bpf
                .map_mut("INBOUND_SLOTS")
                .ok_or_else(|| missing_map("INBOUND_SLOTS"))?,
        )
        .map_err(|e| CaptureError::Map {
            map: "INBOUND_SLOTS",
            detail: e.to_string(),
        })
    }

    /// Starts capturing a pod: inbound first (so no new connection reaches
    /// the application around ztunnel), then outbound. A pod whose links are
    /// already pinned (ztunnel restarted) keeps them; only its new listener
    /// is registered.
    pub fn capture<L: AsRawFd>(&mut self, pod: &Pod<'_, L>) -> Result<PodCapture, CaptureError> {
        let cgroup_err = |source| CaptureError::Cgroup {
            path: pod.cgroup.to_path_buf(),
            source,
        };
        let dir = File::open(pod.cgroup).map_err(cgroup_err)?;
        let cgroup_id = dir.metadata().map_err(cgroup_err)?.ino();
        let ip = u32::from_ne_bytes(pod.ip.octets());
        let map_err = |map: &'static str| {
            move |e: aya::maps::MapError| CaptureError::Map {
                map,
                detail: e.to_string(),
            }
        };
        let slot = match self.slots()?.get(&ip, 0) {
            Ok(slot) => slot,
            Err(_) => self.free_slots.pop().ok_or(CaptureError::Map {
                map: "INBOUND",
                detail: format!("all {MAX_PODS} pod slots are in use"),
            })?,
        };
        let mut listeners: SockMap<&mut MapData> = SockMap::try_from(
            self.bpf
                .map_mut("INBOUND")
                .ok_or_else(|| missing_map("INBOUND"))?,
        )
        .map_err(map_err("INBOUND"))?;
        listeners
            .set(slot, pod.inbound_listener, 0)
            .map_err(map_err("INBOUND"))?;
        self.slots()?
            .insert(ip, slot, 0)
            .map_err(map_err("INBOUND_SLOTS"))?;
        self.pods()?
            .insert(cgroup_id, PodConfig { ip, enabled: 1 }, 0)
            .map_err(map_err("PODS"))?;
        let links = self.pin_dir.join("pods").join(cgroup_id.to_string());
        if !LINKS.iter().all(|l| links.join(l).exists()) {
            self.attach(pod, &dir, &links)?;
        }
        Ok(PodCapture {
            cgroup: pod.cgroup.to_path_buf(),
            cgroup_id,
            ip: pod.ip,
            slot,
            links,
        })
    }

    /// Attaches the three programs for a pod and pins their links.
    fn attach<L: AsRawFd>(
        &mut self,
        pod: &Pod<'_, L>,
        dir: &File,
        links: &Path,
    ) -> Result<(), CaptureError> {
        let attach_err = |program: &'static str| {
            move |e: aya::programs::ProgramError| CaptureError::Attach {
                program,
                cgroup: pod.cgroup.to_path_buf(),
                detail: chain(&e),
            }
        };
        let pin_err = |e: &dyn std::fmt::Display| CaptureError::Pin {
            path: links.to_path_buf(),
            detail: e.to_string(),
        };
        // Remains of a half-done attach would make the pins below fail.
        let _ = unpin_all(links);
        std::fs::create_dir_all(links).map_err(|e| pin_err(&e))?;
        let inbound: &mut SchedClassifier = program(&mut self.bpf, INBOUND)?;
        let id = netns::run_in(pod.netns, || {
            inbound.attach(pod.interface, TcAttachType::Ingress)
        })
        .map_err(|source| CaptureError::Cgroup {
            path: pod.netns.to_path_buf(),
            source,
        })?
        .map_err(attach_err(INBOUND))?;
        let link: FdLink = inbound
            .take_link(id)
            .map_err(attach_err(INBOUND))?
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| pin_err(&e))?;
        link.pin(links.join("inbound")).map_err(|e| pin_err(&e))?;
        let connect4: &mut CgroupSockAddr = program(&mut self.bpf, CONNECT4)?;
        let id = connect4
            .attach(dir, CgroupAttachMode::Single)
            .map_err(attach_err(CONNECT4))?;
        let link: FdLink = connect4
            .take_link(id)
            .map_err(attach_err(CONNECT4))?
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| pin_err(&e))?;
        link.pin(links.join("connect4")).map_err(|e| pin_err(&e))?;
        let sockops: &mut SockOps = program(&mut self.bpf, SOCKOPS)?;
        let id = sockops
            .attach(dir, CgroupAttachMode::Single)
            .map_err(attach_err(SOCKOPS))?;
        let link: FdLink = sockops
            .take_link(id)
            .map_err(attach_err(SOCKOPS))?
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| pin_err(&e))?;
        link.pin(links.join("sockops")).map_err(|e| pin_err(&e))?;
        Ok(())
    }

    /// Stops capturing a pod: its links are unpinned (and so detached), its
    /// new connections go direct again.
    pub fn release(&mut self, pod: PodCapture) -> Result<(), CaptureError> {
        let result = unpin_all(&pod.links);
        let _ = self.pods()?.remove(&pod.cgroup_id);
        let _ = self.slots()?.remove(&u32::from_ne_bytes(pod.ip.octets()));
        if let Some(map) = self.bpf.map_mut("INBOUND")
            && let Ok(mut listeners) = SockMap::<&mut MapData>::try_from(map)
        {
            let _ = listeners.clear_index(&pod.slot);
        }
        self.free_slots.push(pod.slot);
        result
    }

    /// Releases what an earlier run left pinned for pods that are not in
    /// `live` (they left the mesh while no ztunnel was running): their links
    /// are detached and their slots freed. Returns how many pods were
    /// released.
    pub fn prune(&mut self, live: &[&PodCapture]) -> Result<usize, CaptureError> {
        let pods_dir = self.pin_dir.join("pods");
        let entries = std::fs::read_dir(&pods_dir).map_err(|e| CaptureError::Pin {
            path: pods_dir.clone(),
            detail: e.to_string(),
        })?;
        let mut released = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            if live.iter().any(|p| p.cgroup_id == id) {
                continue;
            }
            unpin_all(&entry.path())?;
            released += 1;
        }
        let mut pods = self.pods()?;
        let stale: Vec<u64> = pods
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !live.iter().any(|p| p.cgroup_id == *id))
            .collect();
        for id in stale {
            let _ = pods.remove(&id);
        }
        let mut slots = self.slots()?;
        let stale: Vec<(u32, u32)> = slots
            .iter()
            .filter_map(Result::ok)
            .filter(|(ip, _)| {
                !live
                    .iter()
                    .any(|p| u32::from_ne_bytes(p.ip.octets()) == *ip)
            })
            .collect();
        for (ip, _) in &stale {
            let _ = slots.remove(ip);
        }
        if let Some(map) = self.bpf.map_mut("INBOUND")
            && let Ok(mut listeners) = SockMap::<&mut MapData>::try_from(map)
        {
            for (_, slot) in &stale {
                let _ = listeners.clear_index(slot);
            }
        }
        self.free_slots.extend(stale.iter().map(|(_, slot)| *slot));
        Ok(released)
    }

    /// Replaces the node's outbound exclusions; connects already made are
    /// not affected.
    pub fn set_exclusions(&mut self, exclusions: &Exclusions) -> Result<(), CaptureError> {
        for (map, len) in [
            ("EXCLUDED_NETS", exclusions.nets.len()),
            ("EXCLUDED_PORTS", exclusions.ports.len()),
        ] {
            if len > MAX_EXCLUSIONS {
                return Err(CaptureError::Map {
                    map,
                    detail: format!("{len} entries, at most {MAX_EXCLUSIONS} fit"),
                });
            }
        }
        if let Some(&(net, prefix)) = exclusions.nets.iter().find(|(_, p)| *p > 32) {
            return Err(CaptureError::Map {
                map: "EXCLUDED_NETS",
                detail: format!("{net}/{prefix}: an IPv4 prefix is at most 32 bits"),
            });
        }
        let map_err = |map: &'static str| {
            move |e: aya::maps::MapError| CaptureError::Map {
                map,
                detail: e.to_string(),
            }
        };
        let mut nets: LpmTrie<&mut MapData, u32, u8> = LpmTrie::try_from(
            self.bpf
                .map_mut("EXCLUDED_NETS")
                .ok_or_else(|| missing_map("EXCLUDED_NETS"))?,
        )
        .map_err(map_err("EXCLUDED_NETS"))?;
        let wanted: Vec<(u32, u32)> = exclusions
            .nets
            .iter()
            .map(|&(net, prefix)| {
                let bits =
                    net.to_bits() & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                (u32::from(prefix), bits.to_be())
            })
            .collect();
        let old: Vec<LpmKey<u32>> = nets.keys().filter_map(Result::ok).collect();
        for key in old {
            if !wanted.contains(&(key.prefix_len(), key.data())) {
                nets.remove(&key).map_err(map_err("EXCLUDED_NETS"))?;
            }
        }
        for &(prefix, data) in &wanted {
            nets.insert(&LpmKey::new(prefix, data), 1, 0)
                .map_err(map_err("EXCLUDED_NETS"))?;
        }
        let mut ports: BpfHashMap<&mut MapData, u16, u8> = BpfHashMap::try_from(
            self.bpf
                .map_mut("EXCLUDED_PORTS")
                .ok_or_else(|| missing_map("EXCLUDED_PORTS"))?,
        )
        .map_err(map_err("EXCLUDED_PORTS"))?;
        let old: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
        for port in old {
            if !exclusions.ports.contains(&port) {
                ports.remove(&port).map_err(map_err("EXCLUDED_PORTS"))?;
            }
        }
        for &port in &exclusions.ports {
            ports
                .insert(port, 1, 0)
                .map_err(map_err("EXCLUDED_PORTS"))?;
        }
        Ok(())
    }

    /// The original destinations of captured connections, usable without
    /// holding the [`Capture`].
    pub fn destinations(&self) -> Arc<Destinations> {
        self.destinations.clone()
    }

    fn pods(&mut self) -> Result<BpfHashMap<&mut MapData, u64, PodConfig>, CaptureError> {
        BpfHashMap::try_from(
            self.bpf
                .map_mut("PODS")
                .ok_or_else(|| missing_map("PODS"))?,
        )
        .map_err(|e| CaptureError::Map {
            map: "PODS",
            detail: e.to_string(),
        })
    }
}

/// Unpins (and so detaches) a pod's links and removes their directory.
fn unpin_all(links: &Path) -> Result<(), CaptureError> {
    for name in LINKS {
        let path = links.join(name);
        if let Ok(pinned) = PinnedLink::from_pin(&path) {
            // Dropping the FdLink after unpinning detaches the program.
            let _ = pinned.unpin();
        }
        let _ = std::fs::remove_file(&path);
    }
    match std::fs::remove_dir(links) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CaptureError::Pin {
            path: links.to_path_buf(),
            detail: e.to_string(),
        }),
        _ => Ok(()),
    }
}

/// BPF_FS_MAGIC from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Pins need a BPF filesystem at or above `dir`.
fn check_bpffs(dir: &Path) -> Result<(), CaptureError> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let fs = nix::sys::statfs::statfs(probe).map_err(|_| CaptureError::NoBpffs {
        path: dir.to_path_buf(),
    })?;
    if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(CaptureError::NoBpffs {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

fn missing_map(map: &'static str) -> CaptureError {
    CaptureError::Map {
        map,
        detail: "not in the object".into(),
    }
}

fn program<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = bpf.program_mut(name).ok_or(CaptureError::Rejected {
        program: name,
        detail: "not in the object".into(),
    })?;
    prog.try_into().map_err(|e| rejected(name, e))
}

fn load_classifier(bpf: &mut Ebpf, name: &'static str) -> Result<(), CaptureError> {
    let classifier: &mut SchedClassifier = program(bpf, name)?;
    classifier.load().map_err(|e| load_error(name, e))
}

/// Loads a program the verifier refuses, through the same path as the
/// capture programs, to test how a rejection is reported.
#[cfg(feature = "testing")]
pub fn load_verifier_probe() -> Result<(), CaptureError> {
    static PROBE: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/verifier-probe"));
    let mut bpf = EbpfLoader::new()
        .load(PROBE)
        .map_err(|e| rejected("object", e))?;
    load_classifier(&mut bpf, "unchecked_read")
}

/// A program the kernel did not load: the verifier's log when it refused
/// the program, the missing privilege when that was the reason.
fn load_error(program: &'static str, e: aya::programs::ProgramError) -> CaptureError {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } if io_error.raw_os_error() != Some(libc::EPERM) => CaptureError::Rejected {
            program,
            detail: format!("{io_error}; verifier log:\n{verifier_log}"),
        },
        other => rejected(program, other),
    }
}
