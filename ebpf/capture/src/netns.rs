//! Working inside a pod's network namespace from a daemon that lives in
//! another: a short-lived thread enters the namespace, creates what is
//! needed (listeners, sockets), and ends. Sockets keep their namespace.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use nix::sched::{CloneFlags, setns};

/// Runs `f` on a thread inside the network namespace at `netns` (e.g.
/// `/var/run/netns/<name>`); the caller's namespace is never changed.
pub fn run_in<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The cookie of the network namespace a socket belongs to (SO_NETNS_COOKIE).
#[allow(unsafe_code)]
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is a live socket borrowed for the call; `cookie` and
    // `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
