//! Links the deployed ztunnel (the static musl release build, ADR 0021) with
//! the code it runs placed together (ADR 0022).
//!
//! The kernel maps 64 KiB of a cached binary around every page a process
//! touches, so code spread over the whole binary keeps most of it resident.
//! `link-order.txt` lists the functions and data an idle and a loaded
//! ztunnel touch; lld puts them first in their sections, so those pages are
//! few and adjacent. The list is measured by the `link_order` example of
//! `integration-tests`. A symbol it names that no longer exists is skipped by
//! the linker, so a stale list costs memory, never correctness.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The target the deployed ztunnel is built for.
const DEPLOYED_TARGET: &str = "x86_64-unknown-linux-musl";

fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    let target = env::var("TARGET").unwrap_or_default();
    if target == DEPLOYED_TARGET {
        // musl's memmove of a region onto itself is wrapped (src/memmove.rs).
        println!("cargo:rustc-link-arg-bin=ztunnel=-Wl,--wrap=memmove");
    }
    // Release and bench builds; symbol names of other profiles differ from
    // those in the list anyway.
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    if target != DEPLOYED_TARGET || !release {
        return;
    }
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let order = manifest.join("link-order.txt");
    // For this target rustc links through the C compiler with the system
    // linker, which has no symbol ordering; the toolchain's own lld does.
    let lld_dir = toolchain_lld_dir();
    println!("cargo:rustc-link-arg-bin=ztunnel=-B{}", lld_dir.display());
    println!("cargo:rustc-link-arg-bin=ztunnel=-fuse-ld=lld");
    println!(
        "cargo:rustc-link-arg-bin=ztunnel=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo:rustc-link-arg-bin=ztunnel=-Wl,--no-warn-symbol-ordering");
}

/// The directory holding the toolchain's `ld.lld` wrapper for the C
/// compiler's `-B` (rustup ships it with every toolchain).
fn toolchain_lld_dir() -> PathBuf {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .expect("running rustc --print sysroot");
    assert!(out.status.success(), "rustc --print sysroot failed");
    let sysroot = PathBuf::from(
        String::from_utf8(out.stdout)
            .expect("sysroot path is UTF-8")
            .trim(),
    );
    let host = env::var("HOST").expect("cargo sets HOST");
    let dir = sysroot.join("lib/rustlib").join(host).join("bin/gcc-ld");
    assert!(
        dir.join("ld.lld").exists(),
        "{} has no ld.lld: the toolchain's linker component is missing",
        dir.display()
    );
    dir
}
