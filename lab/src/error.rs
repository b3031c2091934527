use std::path::PathBuf;

/// Why a lab operation failed, phrased for the person running it.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("invalid lab definition: {reason}")]
    Spec { reason: String },
    #[error(
        "ambit lab needs root (it creates network namespaces, veth pairs and cgroups); run it with sudo"
    )]
    NotRoot,
    #[error(
        "`{tool}` is not installed; install the Debian package `{package}` (scripts/setup does)"
    )]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("kernel feature missing: {feature} ({detail})")]
    KernelFeature {
        feature: &'static str,
        detail: String,
    },
    #[error("lab {name:?} is already running (state in {}); run `ambit lab down --name {name}` first", state.display())]
    AlreadyRunning { name: String, state: PathBuf },
    #[error(
        "address range {range} is already used by running lab {other:?}; choose other ranges in the lab file's `network`"
    )]
    RangeInUse { range: String, other: String },
    #[error("no lab {name:?} is running (no state in {})", state.display())]
    NotRunning { name: String, state: PathBuf },
    #[error("no pod {key:?} in lab {lab:?}; pods are named namespace/name, see `ambit lab status`")]
    NoSuchPod { key: String, lab: String },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid object in {file}: {reason}")]
    Object { file: String, reason: String },
}

impl LabError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let what = what.into();
        move |source| LabError::Io { what, source }
    }
}
