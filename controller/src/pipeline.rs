//! One pass of the pipeline: the cluster's objects into a mesh config and
//! policy statuses, and the publication of a new config (validated whole;
//! a config data planes would refuse is not published, and the last good
//! one stays).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use model::{MeshConfig, Snapshot};
use tokio::sync::watch;

use crate::ca::Placement;
use crate::cluster::{Cluster, PolicyStatus};
use crate::metrics::Metrics;
use crate::stream::ConfigServer;

/// The outcome of translating the cluster once.
#[derive(Debug)]
pub struct Pass {
    pub config: MeshConfig,
    pub statuses: Vec<PolicyStatus>,
    pub objects: [(&'static str, u64); 7],
    pub took: Duration,
}

impl Pass {
    pub fn of(cluster: &Cluster) -> Self {
        let started = Instant::now();
        let (config, statuses) = cluster.translate();
        Self {
            config,
            statuses,
            objects: cluster.object_counts(),
            took: started.elapsed(),
        }
    }
}

/// Publishes passes to the config stream and the CA's view of the mesh.
#[derive(Debug)]
pub struct Publisher {
    config: ConfigServer,
    metrics: Arc<Metrics>,
    placement: watch::Sender<Arc<Placement>>,
    mesh_file: Option<PathBuf>,
}

impl Publisher {
    pub fn new(
        config: ConfigServer,
        metrics: Arc<Metrics>,
        placement: watch::Sender<Arc<Placement>>,
        mesh_file: Option<PathBuf>,
    ) -> Self {
        Self {
            config,
            metrics,
            placement,
            mesh_file,
        }
    }

    /// The new version, `None` when the config did not change, or why it
    /// was refused.
    pub fn publish(&mut self, pass: Pass) -> Result<Option<u64>, String> {
        self.metrics.translated(pass.took);
        self.metrics.set_objects(pass.objects);
        if !self.config.would_change(&pass.config) {
            return Ok(None);
        }
        // The data planes would refuse an invalid config whole; refuse it
        // here, with the same reason.
        let snapshot = Snapshot::new(pass.config.clone(), 0)
            .map_err(|e| format!("mesh config refused: {e}"))?;
        if let Some(path) = &self.mesh_file
            && let Err(error) = write_atomic(path, &pass.config)
        {
            tracing::warn!(%error, path = %path.display(), "mesh file not written");
        }
        self.placement
            .send_replace(Arc::new(Placement::of(&snapshot)));
        drop(snapshot);
        let version = self.config.publish(pass.config);
        tracing::info!(version, took = ?pass.took, "config published");
        Ok(Some(version))
    }
}

fn write_atomic(path: &Path, config: &MeshConfig) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_yaml::to_string(config)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
