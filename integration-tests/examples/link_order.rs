//! Measures which functions and data of the deployed ztunnel an idle and a
//! loaded ztunnel touch, and writes `ztunnel/link-order.txt`: the order its
//! release build is linked in (ADR 0022). Needs root; run in release, so the
//! lab's other binaries are those the benchmarks run:
//!
//! ```sh
//! cargo run --release -p integration-tests --example link_order
//! ```
//!
//! A build of the deployed ztunnel with every function on a page of its own
//! runs in the benchmark lab from a file system with read-ahead off and a
//! cold page cache. The kernel then maps a page of the binary only when
//! ztunnel touches it (around a fault it maps only pages already cached), so
//! the pages mapped (`/proc/<pid>/pagemap`) name the functions that ran.
//! Symbol names do not depend on the flags that spread the functions out,
//! so the list applies to the normal build.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // A tool, not a library.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::{STATIC_TARGET as TARGET, TestLab, options, require_root};
use lab::{LabOptions, LabSpec};
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

const PAGE: u64 = 4096;

fn main() {
    if !require_root("link order measurement") {
        return;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits in the workspace")
        .to_path_buf();
    let work = workspace.join("target/link-order");
    let spread = build_spread_out(&workspace, &work);
    let mount = ColdMount::new(&work, &spread);
    let opts = LabOptions {
        ztunnel: mount.ztunnel.clone(),
        ..options()
    };
    let spec = LabSpec::from_yaml(include_str!("../../bench/mesh-lab.yaml")).unwrap();
    let t = TestLab::up_with(spec, &opts);
    // As long as the mesh benchmark waits before it reads idle memory.
    std::thread::sleep(Duration::from_secs(20));
    let idle = touched(&t, &mount.ztunnel);
    load(&t);
    let loaded = touched(&t, &mount.ztunnel);
    drop(t);
    let order = Order::new(&spread, &idle, &loaded);
    let out = workspace.join("ztunnel/link-order.txt");
    fs::write(&out, order.names.join("\n") + "\n").unwrap();
    println!(
        "{}: {} symbols touched idle ({} KiB of code, {} KiB of data), {} more under load ({} KiB of code)",
        out.display(),
        order.idle,
        order.idle_code / 1024,
        order.idle_data / 1024,
        order.names.len() - order.idle,
        order.load_code / 1024,
    );
}

/// Builds the deployed ztunnel with each function aligned to a page, in a
/// target directory of its own.
fn build_spread_out(workspace: &Path, work: &Path) -> PathBuf {
    let target_dir = work.join("build");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Cargo appends these to the target's flags in .cargo/config.toml.
    let rustflags =
        format!("target.{TARGET}.rustflags=[\"-C\", \"llvm-args=-align-all-functions=12\"]");
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--quiet", "--release", "-p", "ztunnel"])
        .args(["--target", TARGET, "--config", &rustflags])
        .arg("--target-dir")
        .arg(&target_dir)
        // The C code (aws-lc, jemalloc) too.
        .env(
            format!("CFLAGS_{}", TARGET.replace('-', "_")),
            "-falign-functions=4096",
        )
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the spread-out ztunnel failed");
    target_dir.join(TARGET).join("release/ztunnel")
}

/// A small ext4 file system holding the binary, mounted with read-ahead off
/// and nothing of it cached; unmounted on drop.
struct ColdMount {
    image: PathBuf,
    dir: PathBuf,
    ztunnel: PathBuf,
}

impl ColdMount {
    fn new(work: &Path, binary: &Path) -> ColdMount {
        let image = work.join("image.ext4");
        let dir = work.join("mnt");
        fs::create_dir_all(&dir).unwrap();
        let size = fs::metadata(binary).unwrap().len() * 2 + (64 << 20);
        let mount = ColdMount {
            ztunnel: dir.join("ztunnel"),
            image: image.clone(),
            dir,
        };
        fs::File::create(&image).unwrap().set_len(size).unwrap();
        run("mkfs.ext4", &["-q", "-F", path(&image)]);
        mount.mount(&image, "loop");
        fs::copy(binary, &mount.ztunnel).unwrap();
        // Unmounting drops the copy's cached pages.
        run("umount", &[path(&mount.dir)]);
        mount.mount(&image, "loop,ro");
        let device = fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let (dev, at) = (f.next()?, f.next()?);
                (Path::new(at) == mount.dir).then(|| dev.to_owned())
            })
            .expect("the image is mounted");
        let name = Path::new(&device).file_name().unwrap().to_string_lossy();
        fs::write(format!("/sys/block/{name}/queue/read_ahead_kb"), "0").unwrap();
        mount
    }

    fn mount(&self, image: &Path, options: &str) {
        run("mount", &["-o", options, path(image), path(&self.dir)]);
    }
}

impl Drop for ColdMount {
    fn drop(&mut self) {
        // The loop device goes with the mount (mount sets it to autoclear),
        // and the next attach sets its read-ahead afresh.
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = fs::remove_file(&self.image);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn run(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(status.success(), "{cmd} {args:?} failed");
}

/// Traffic of every kind the benchmark sends over the mesh, and what a
/// monitoring system reads.
fn load(t: &TestLab) {
    let client = "meshed/client-0";
    let server = t.lab.plan().pod("meshed/server-0").unwrap().ip.to_string();
    t.exec(
        client,
        &["ambit-load", &format!("http://{server}:8080/"), "--json"],
    );
    t.exec(
        "meshed/server-0",
        &["iperf3", "--server", "--one-off", "--daemon"],
    );
    std::thread::sleep(Duration::from_millis(500));
    t.exec(client, &["iperf3", "-c", &server, "-p", "5201", "-t", "2"]);
    let rr = format!("tcp://{server}:9000");
    t.exec(
        client,
        &["ambit-load", &rr, "--tcp-rr", "1024", "-n", "2000"],
    );
    let http = format!("http://{server}:8080/");
    let argv = [
        "ambit-load",
        &http,
        "-n",
        "300",
        "-c",
        "1",
        "--new-connections",
    ];
    t.exec(client, &argv);
    for node in &t.lab.plan().spec.nodes {
        t.lab.ztunnel_metrics(node).expect("metrics page");
        let admin = [
            "curl",
            "-sSf",
            "-o",
            "/dev/null",
            "127.0.0.1:15000/config_dump",
        ];
        let out = t.lab.node_exec_captured(node, &admin).unwrap();
        assert!(out.status.success(), "config dump on {node}");
    }
}

/// File offsets of the pages of `binary` mapped by any of the lab's
/// ztunnels.
fn touched(t: &TestLab, binary: &Path) -> HashSet<u64> {
    let mut pages = HashSet::new();
    for pid in t
        .lab
        .plan()
        .spec
        .nodes
        .iter()
        .flat_map(|n| t.lab.ztunnel_pids(n))
    {
        let mut pagemap = fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
        for line in fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .lines()
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || Path::new(f[5]) != binary {
                continue;
            }
            let (start, end) = f[0].split_once('-').unwrap();
            let start = u64::from_str_radix(start, 16).unwrap();
            let end = u64::from_str_radix(end, 16).unwrap();
            let offset = u64::from_str_radix(f[2], 16).unwrap();
            let mut entries = vec![0u8; ((end - start) / PAGE * 8) as usize];
            pagemap.seek(SeekFrom::Start(start / PAGE * 8)).unwrap();
            pagemap.read_exact(&mut entries).unwrap();
            for (i, e) in entries.chunks_exact(8).enumerate() {
                // Bit 63: present.
                if u64::from_le_bytes(e.try_into().unwrap()) >> 63 == 1 {
                    pages.insert(offset + i as u64 * PAGE);
                }
            }
        }
    }
    assert!(!pages.is_empty(), "no ztunnel mapped {}", binary.display());
    pages
}

/// The link order: symbols touched at idle, then those touched only under
/// load, each group in address order.
struct Order {
    names: Vec<String>,
    idle: usize,
    idle_code: u64,
    idle_data: u64,
    load_code: u64,
}

impl Order {
    fn new(binary: &Path, idle: &HashSet<u64>, loaded: &HashSet<u64>) -> Order {
        let data = fs::read(binary).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        // Loaded address → file offset, by segment.
        let segments: Vec<(u64, u64, u64)> = elf
            .segments()
            .map(|s| (s.address(), s.file_range().1, s.file_range().0))
            .collect();
        let file_offset = |addr: u64| {
            segments
                .iter()
                .find(|(a, len, _)| (*a..a + len).contains(&addr))
                .map(|(a, _, off)| off + addr - a)
        };
        let mut symbols: BTreeSet<(u64, u64, String, bool)> = BTreeSet::new();
        for s in elf.symbols() {
            let code = match s.kind() {
                SymbolKind::Text => true,
                SymbolKind::Data => false,
                _ => continue,
            };
            if s.is_undefined() || s.size() == 0 {
                continue;
            }
            if let (Some(off), Ok(name)) = (file_offset(s.address()), s.name()) {
                symbols.insert((off, s.size(), name.to_owned(), code));
            }
        }
        let mut order = Order {
            names: Vec::new(),
            idle: 0,
            idle_code: 0,
            idle_data: 0,
            load_code: 0,
        };
        let mut later = Vec::new();
        let mut seen = HashSet::new();
        for (off, size, name, code) in symbols {
            let mut pages = (off / PAGE * PAGE..off + size).step_by(PAGE as usize);
            if pages.clone().any(|p| idle.contains(&p)) {
                if seen.insert(name.clone()) {
                    order.names.push(name);
                    *(if code {
                        &mut order.idle_code
                    } else {
                        &mut order.idle_data
                    }) += size;
                }
            } else if pages.any(|p| loaded.contains(&p)) && code && seen.insert(name.clone()) {
                later.push(name);
                order.load_code += size;
            }
        }
        order.idle = order.names.len();
        order.names.extend(later);
        order
    }
}
