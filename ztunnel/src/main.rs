//! The `ztunnel` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use capture::Exclusions;
use clap::Parser;
use ztunnel::admin::{HeapStats, LogControl};
use ztunnel::app::{self, Config};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(target_env = "musl")]
mod memmove;

/// jemalloc's options, read before `main`. One arena per CPU instead of
/// four: every arena in use keeps its own partly filled pages and
/// bookkeeping, about 0.3 MiB of an idle ztunnel's resident memory
/// (`docs/benchmarks.md`), and the runtime has no more busy threads than
/// CPUs anyway.
#[allow(unsafe_code)] // jemalloc looks the option string up by symbol name.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf = MallocConf(c"percpu_arena:percpu".as_ptr());

/// A C string pointer that may live in a `static`.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points to a string literal that is never written.
#[allow(unsafe_code)]
unsafe impl Sync for MallocConf {}

#[derive(Debug, Parser)]
#[command(name = "ztunnel", version, about = "Ambit node proxy")]
struct Args {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// JSON file listing the pods to capture (written by `ambit lab`).
    #[arg(long)]
    pods: Option<PathBuf>,
    /// Unix socket accepting enrollment requests.
    #[arg(long)]
    enroll_socket: Option<PathBuf>,
    /// Prometheus metrics: on every address of the node, so that a
    /// Prometheus elsewhere in the cluster can scrape each node.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    /// Admin API (config dump, connections, readiness, log level).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// BPF filesystem directory for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/ambit")]
    bpf_dir: PathBuf,
    /// Log (and access log) format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: logging::Format,
    /// Mesh config file (workloads and services, YAML or JSON).
    #[arg(long)]
    mesh_config: Option<PathBuf>,
    /// Sign pods' certificates with the CA in this directory (local
    /// setups such as `ambit lab`).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The controller's address, `host:port` (config stream and CA, TLS).
    #[arg(long, requires_all = ["controller_token", "mesh_roots"])]
    controller: Option<String>,
    /// File holding the token this node presents to the controller (read
    /// for every request: a rotated token is picked up).
    #[arg(long)]
    controller_token: Option<PathBuf>,
    /// The mesh root certificate(s), PEM: the controller's certificate
    /// must chain to them.
    #[arg(long)]
    mesh_roots: Option<PathBuf>,
    /// IPv4 networks whose outbound connections are never captured
    /// (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidr: Vec<ipnet::Ipv4Net>,
    /// Destination ports whose outbound connections are never captured.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_port: Vec<u16>,
    /// Threads that run connections. One serves a small node best: on two
    /// cores a second one added wake-ups and cost CPU, latency and
    /// throughput (ADR 0030); raise it where the node's meshed traffic
    /// needs more than one core.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: u16,
}

/// The admin API's hold on the log filter.
#[derive(Debug)]
struct Logging(logging::Logging);

impl LogControl for Logging {
    fn current(&self) -> String {
        self.0.current()
    }

    fn set(&self, filter: &str) -> Result<String, String> {
        self.0.set(filter).map_err(|e| e.to_string())
    }
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.worker_threads))
        .enable_all()
        .on_thread_park(release_idle_thread_cache)
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(error) => Err(anyhow::Error::new(error).context("cannot start the async runtime")),
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let logging = Arc::new(Logging(
        logging::Logging::init(args.log_format, &initial).context("RUST_LOG")?,
    ));
    raise_open_files_limit();
    // Without a background thread jemalloc returns freed pages to the
    // kernel only when it is called again: the memory of loading the eBPF
    // programs (kernel BTF) stayed resident in an idle ztunnel, 26 MB RSS
    // instead of 12.5 (docs/benchmarks.md).
    if let Err(error) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(%error, "jemalloc background purging not enabled");
    }
    let app = app::build(Config {
        node: args.node,
        pods_file: args.pods,
        enroll_socket: args.enroll_socket,
        metrics_addr: args.metrics,
        admin_addr: args.admin,
        logging: Some(logging),
        heap_stats: Some(jemalloc_stats),
        bpf_dir: args.bpf_dir,
        mesh_config: args.mesh_config,
        ca_dir: args.ca_dir,
        trust_domain: args.trust_domain,
        controller: match (args.controller, args.controller_token, args.mesh_roots) {
            (Some(addr), Some(token_file), Some(roots_file)) => Some(app::ControllerConfig {
                addr,
                token_file,
                roots_file,
            }),
            _ => None,
        },
        exclusions: Exclusions {
            nets: args
                .exclude_outbound_cidr
                .iter()
                .map(|n| (n.network(), n.prefix_len()))
                .collect(),
            ports: args.exclude_outbound_port,
        },
    })
    .await?;
    // Start-up (the eBPF loader above all) freed thousands of small
    // allocations on this thread, which jemalloc keeps for its next ones;
    // it now only waits for a signal.
    release_thread_cache();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    app.shutdown().await;
    Ok(())
}

/// jemalloc's counters, refreshed first (they are cached per epoch).
fn jemalloc_stats() -> Result<HeapStats, String> {
    use tikv_jemalloc_ctl::{arenas, epoch, stats};
    let read = || -> Result<HeapStats, tikv_jemalloc_ctl::Error> {
        epoch::advance()?;
        Ok(HeapStats {
            allocated: stats::allocated::read()? as u64,
            thread_cached: tcache_bytes()? as u64,
            active: stats::active::read()? as u64,
            metadata: stats::metadata::read()? as u64,
            resident: stats::resident::read()? as u64,
            retained: stats::retained::read()? as u64,
            arenas: arenas::narenas::read()?,
        })
    };
    read().map_err(|e| e.to_string())
}

/// Bytes in all threads' caches of freed allocations, summed over the
/// arenas (index `MALLCTL_ARENAS_ALL`); the typed API does not cover it.
#[allow(unsafe_code)]
fn tcache_bytes() -> Result<usize, tikv_jemalloc_ctl::Error> {
    // SAFETY: the name is NUL-terminated and jemalloc documents this
    // statistic as a `size_t`, which is `usize`.
    unsafe { tikv_jemalloc_ctl::raw::read::<usize>(b"stats.arenas.4096.tcache_bytes\0") }
}

/// Hands the calling thread's cached freed allocations back to its arena.
/// jemalloc trims a thread's cache only as the thread allocates, so the
/// cache of a thread that has gone quiet stays full, 1.6 MB of an idle
/// ztunnel's 2.0 MB heap (`docs/benchmarks.md`); back in the arena, pages
/// with nothing live are returned to the kernel by the background thread.
#[allow(unsafe_code)]
fn release_thread_cache() {
    // SAFETY: a NUL-terminated name; this control takes and returns
    // nothing, so every pointer is null and the length 0.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(rc, "jemalloc thread cache not flushed");
    }
}

/// [`release_thread_cache`] for a runtime worker with nothing left to
/// run, at most once a second: a busy worker parks between most requests,
/// and keeping its cache between them is the cache's point.
fn release_idle_thread_cache() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    let due = LAST
        .get()
        .is_none_or(|last| now - last >= Duration::from_secs(1));
    if due {
        LAST.set(Some(now));
        release_thread_cache();
    }
}

/// Every proxied connection holds two or three descriptors; a node with
/// many connections needs more than the usual soft limit of 1024. Raised
/// to the hard limit the runtime grants.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, hard, "cannot raise the open files limit");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open files limit"),
    }
}
