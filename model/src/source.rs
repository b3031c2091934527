//! Where config comes from. Every source feeds a [`ConfigSink`], which
//! validates each config whole and publishes it atomically; an invalid one
//! is refused with its reason and the last good config keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::MeshConfig;
use crate::snapshot::{ConfigError, Snapshot};

/// A producer of configs: a watched file, or the controller's stream.
#[async_trait]
pub trait ConfigSource: Send + 'static {
    /// Feeds `sink` until `stop`.
    async fn run(self: Box<Self>, sink: ConfigSink, stop: CancellationToken);
}

/// Validates and publishes configs; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConfigSink {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
    versions: Arc<AtomicU64>,
    rejected: Arc<AtomicU64>,
}

impl Default for ConfigSink {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigSink {
    /// Starts with the empty config.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::empty()));
        Self {
            tx: Arc::new(tx),
            versions: Arc::new(AtomicU64::new(0)),
            rejected: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Follows the current config.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Configs refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Validates `config` and, if good, makes it current.
    pub fn apply(&self, config: MeshConfig) -> Result<Arc<Snapshot>, ConfigError> {
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        match Snapshot::new(config, version) {
            Ok(snapshot) => {
                let snapshot = Arc::new(snapshot);
                self.tx.send_replace(snapshot.clone());
                tracing::info!(
                    version,
                    workloads = snapshot.config().workloads.len(),
                    services = snapshot.config().services.len(),
                    "config applied"
                );
                Ok(snapshot)
            }
            Err(error) => self.refuse(error),
        }
    }

    /// Counts and logs a config that could not be used.
    pub fn refuse(&self, error: ConfigError) -> Result<Arc<Snapshot>, ConfigError> {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, "config refused; the last good config stays in use");
        Err(error)
    }
}

/// A YAML or JSON file of [`MeshConfig`], re-read when it changes.
#[derive(Debug, Clone)]
pub struct FileSource {
    pub path: PathBuf,
    pub poll: Duration,
    /// The version [`Self::read_first`] read, which [`ConfigSource::run`]
    /// then does not read again.
    read_first: Option<FileStamp>,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            poll: Duration::from_millis(250),
            read_first: None,
        }
    }

    /// [`Self::read`], for a config to start with before [`ConfigSource::run`]:
    /// the version read is not read, applied (a new config version, every
    /// open connection judged again) or refused (logged) a second time.
    pub fn read_first(&mut self) -> Result<MeshConfig, ConfigError> {
        let before = self.stamp();
        let read = self.read();
        if before.is_some() && self.stamp() == before {
            self.read_first = before;
        }
        read
    }

    /// Reads and parses the file once (JSON is valid YAML).
    pub fn read(&self) -> Result<MeshConfig, ConfigError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| ConfigError::Parse(format!("{}: {e}", self.path.display())))?;
        let config: Option<MeshConfig> = serde_yaml::from_str(&text)
            .map_err(|e| ConfigError::Parse(format!("{}: {e}", self.path.display())))?;
        // As a plain `MeshConfig`, an empty document reads as a config with
        // nothing in it, which drops every policy and every meshed
        // destination. A file caught between truncation and write looks
        // just like that, so only an explicit `{}` empties the mesh.
        config.ok_or_else(|| {
            ConfigError::Parse(format!(
                "{}: the file has no document (write `{{}}` for an empty config)",
                self.path.display()
            ))
        })
    }
}

#[async_trait]
impl ConfigSource for FileSource {
    async fn run(self: Box<Self>, sink: ConfigSink, stop: CancellationToken) {
        let mut applied: Option<FileStamp> = self.read_first;
        let mut last: Option<FileStamp> = self.read_first;
        loop {
            let now = self.stamp();
            // A file written in place is read only once it has stopped
            // changing for a whole poll and did not change while it was
            // read: a writer caught half-way often leaves valid YAML that
            // lacks its last policies. (Written elsewhere and renamed into
            // place, as Kubernetes does for mounted ConfigMaps, it is
            // complete at once and read on the next poll.)
            if now.is_some() && now != applied && now == last {
                let read = self.read();
                if self.stamp() == now {
                    applied = now;
                    // Either way the outcome is logged and counted by the sink.
                    let _ = match read {
                        Ok(config) => sink.apply(config),
                        Err(error) => sink.refuse(error),
                    };
                }
            }
            last = now;
            tokio::select! {
                () = tokio::time::sleep(self.poll) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// What tells one version of the file from the next: its modification
/// time, its length (a rewrite within one tick of the clock that stamps
/// files keeps the time) and its inode (a file renamed into place).
type FileStamp = (SystemTime, u64, u64);

impl FileSource {
    fn stamp(&self) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&self.path).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    }
}
