//! Builds the eBPF programs (`ebpf/capture-programs`) for the BPF target with
//! aya-build and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! Needs bpf-linker and rust-src, which `scripts/setup` installs; there is
//! no silent fallback: without them the build fails and says so.
#![allow(unsafe_code)] // One env var for the nested cargo, see below.

use std::path::Path;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let programs = Path::new(&manifest).join("../capture-programs");
    let programs = programs
        .canonicalize()
        .with_context(|| format!("{} is missing", programs.display()))?;
    println!("cargo:rerun-if-changed={}", programs.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        Path::new(&manifest).join("../capture-common/src").display()
    );
    if which("bpf-linker").is_none() {
        bail!(
            "bpf-linker is not installed: run scripts/setup (it installs llvm-22-dev, rust-src and bpf-linker)"
        );
    }
    // The programs build core for the BPF target (-Z build-std), which the
    // stable toolchain allows only with RUSTC_BOOTSTRAP; it is set for the
    // nested cargo alone, not for the workspace.
    // SAFETY: build scripts run single-threaded and nothing has read the
    // environment concurrently.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    // The programs are their own workspace (BPF target): build them there.
    std::env::set_current_dir(&programs).context("enter capture-programs")?;
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    let root = programs.to_string_lossy();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "capture-programs",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}
