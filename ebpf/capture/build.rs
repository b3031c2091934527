//! Builds the eBPF programs (`ebpf/capture-programs`) for the BPF target and
//! leaves the objects in OUT_DIR for `include_bytes_aligned!`.
//! Needs bpf-linker and rust-src, which `scripts/setup` installs; there is
//! no silent fallback: without them the build fails and says so.
//!
//! Cargo runs this script once per feature set and build mode of the
//! capture crate (four times in a workspace test build), each with its own
//! OUT_DIR. The programs do not depend on either, so the nested build
//! shares one target directory beside the outer one: core for the BPF
//! target is built once (a minute and 300 MB) instead of once per run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The programs' binaries, copied into OUT_DIR under these names.
const PROGRAMS: &[&str] = &["capture-programs", "verifier-probe"];

fn main() -> anyhow::Result<()> {
    let manifest = env("CARGO_MANIFEST_DIR")?;
    let programs = Path::new(&manifest).join("../capture-programs");
    let programs = programs
        .canonicalize()
        .with_context(|| format!("{} is missing", programs.display()))?;
    for dir in [&programs, &Path::new(&manifest).join("../capture-common")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    if which("bpf-linker").is_none() {
        bail!(
            "bpf-linker is not installed: run scripts/setup (it installs llvm-22-dev, rust-src and bpf-linker)"
        );
    }
    let endian = env("CARGO_CFG_TARGET_ENDIAN")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("no BPF target for endianness {other}"),
    };
    // aya-ebpf picks its register layout (pt_regs) by this cfg, which
    // names every RISC-V 64 variant alike.
    let arch = env("CARGO_CFG_TARGET_ARCH")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        &arch
    };
    let out_dir = PathBuf::from(env("OUT_DIR")?);
    let target_dir = shared_target_dir(&out_dir);

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&programs)
        .args(["build", "--release", "--bins", "--target", target])
        // core for the BPF target (-Z build-std) is allowed on the stable
        // toolchain only with RUSTC_BOOTSTRAP, set for the nested cargo
        // alone, not for the workspace.
        .args(["-Z", "build-std=core"])
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("--target-dir")
        .arg(&target_dir)
        // BTF lets the kernel's verifier name types in its messages.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                format!("--cfg=bpf_target_arch=\"{arch}\""),
                "-Cdebuginfo=2".to_owned(),
                "-Clink-arg=--btf".to_owned(),
            ]
            .join("\x1f"),
        )
        // The outer build's compiler settings are for the host target.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let output = cmd
        .output()
        .with_context(|| format!("start the eBPF build: {cmd:?}"))?;
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={line}");
        }
        bail!("the eBPF build failed ({}): {cmd:?}", output.status);
    }
    let built = target_dir.join(target).join("release");
    for name in PROGRAMS {
        // Through a temporary name: another run of this script may read the
        // previous copy while this one writes.
        let (from, tmp, to) = (
            built.join(name),
            out_dir.join(format!("{name}.tmp")),
            out_dir.join(name),
        );
        std::fs::copy(&from, &tmp)
            .with_context(|| format!("copy {} to {}", from.display(), tmp.display()))?;
        std::fs::rename(&tmp, &to).with_context(|| format!("rename to {}", to.display()))?;
    }
    Ok(())
}

/// `<target>/bpf` beside the outer build's profile directories, found from
/// OUT_DIR (`<target>[/<triple>]/<profile>/build/capture-<hash>/out`); OUT_DIR
/// itself where the layout is not that one.
fn shared_target_dir(out_dir: &Path) -> PathBuf {
    let build = out_dir.ancestors().nth(2);
    match build {
        Some(build) if build.file_name().is_some_and(|n| n == "build") => build
            .parent()
            .and_then(Path::parent)
            .map_or_else(|| out_dir.join("bpf"), |target| target.join("bpf")),
        _ => out_dir.join("bpf"),
    }
}

fn env(key: &str) -> anyhow::Result<String> {
    std::env::var(key).with_context(|| format!("{key} is not set"))
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}
