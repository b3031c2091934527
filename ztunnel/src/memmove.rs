//! `memmove` of the static musl build, wrapped (`--wrap=memmove`, see
//! `build.rs`).
//!
//! musl's x86_64 `memmove` copies a region that overlaps its destination
//! from below one byte at a time, backwards (`std; rep movsb`), and a
//! region onto itself counts as such. rustls moves the rest of its receive
//! buffer to the front after every read, also when the read completed no
//! record and there is nothing to drop: up to 16 KiB copied onto itself
//! byte by byte. In a bulk transfer through the mesh that was 4.5% of both
//! ztunnels' CPU samples (`docs/benchmarks.md`). A copy onto itself has
//! nothing to do; every other call goes to musl's.

use std::ffi::c_void;

#[allow(unsafe_code)]
unsafe extern "C" {
    /// musl's `memmove`, as the linker names it under `--wrap`.
    fn __real_memmove(dest: *mut c_void, src: *const c_void, n: usize) -> *mut c_void;
}

/// What every `memmove` call of the binary, Rust's and C's, resolves to.
///
/// # Safety
/// That of `memmove`: both regions valid for `n` bytes.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
unsafe extern "C" fn __wrap_memmove(
    dest: *mut c_void,
    src: *const c_void,
    n: usize,
) -> *mut c_void {
    if std::ptr::eq(dest.cast_const(), src) {
        return dest;
    }
    // SAFETY: the caller's arguments, passed on unchanged.
    unsafe { __real_memmove(dest, src, n) }
}
