//! The lab's cgroup v2 tree: one directory per pod (eBPF capture attaches
//! there) and per node component, all under one directory per lab, so that
//! `cgroup.kill` on it ends every process the lab started.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::LabError;

pub(crate) fn create(path: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(path).map_err(LabError::io(format!("create cgroup {}", path.display())))
}

/// Whether any process lives in `path` or below.
pub(crate) fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Kills every process in `path` and below, then removes the directories.
/// Idempotent: a missing tree is fine.
pub(crate) fn kill_and_remove(path: &Path) -> Result<(), LabError> {
    if !path.exists() {
        return Ok(());
    }
    std::fs::write(path.join("cgroup.kill"), "1").map_err(LabError::io(format!(
        "kill processes of cgroup {}",
        path.display()
    )))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while populated(path) {
        if Instant::now() > deadline {
            return Err(LabError::Io {
                what: format!(
                    "processes of cgroup {} did not exit after SIGKILL",
                    path.display()
                ),
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    remove_tree(path)
}

/// cgroup directories are removed with rmdir, deepest first.
fn remove_tree(path: &Path) -> Result<(), LabError> {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path())?;
            }
        }
    }
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LabError::Io {
            what: format!("remove cgroup {}", path.display()),
            source: e,
        }),
    }
}
