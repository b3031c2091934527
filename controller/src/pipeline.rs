//! The pipeline: the incremental translator and where its output goes.
//! Each flush publishes what changed as one new config version (nothing
//! when nothing changed) and returns the conditions translated again, for
//! the caller to write back or log, and the waypoints to deploy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use model::MeshConfig;

use crate::cluster::ObjectStatus;
use crate::metrics::Metrics;
use crate::stream::ConfigServer;
use crate::translator::{Name, Translator};

/// What a flush leaves to the caller.
#[derive(Debug, Default)]
pub struct Flushed {
    pub statuses: Vec<ObjectStatus>,
    /// Waypoints whose resources are to be applied.
    pub waypoints: Vec<Name>,
}

#[derive(Debug)]
pub struct Pipeline {
    pub translator: Translator,
    trust_domain: String,
    config: ConfigServer,
    metrics: Arc<Metrics>,
    mesh_file: Option<PathBuf>,
}

impl Pipeline {
    pub fn new(
        trust_domain: &str,
        config: ConfigServer,
        metrics: Arc<Metrics>,
        mesh_file: Option<PathBuf>,
    ) -> Self {
        Self {
            translator: Translator::new(trust_domain),
            trust_domain: trust_domain.to_string(),
            config,
            metrics,
            mesh_file,
        }
    }

    /// Translates what changed and publishes it.
    pub fn flush(&mut self) -> Flushed {
        let delta = self.translator.flush();
        self.metrics.translated(delta.took);
        self.metrics.set_objects(self.translator.object_counts());
        let (before, changes) = (self.config.version(), delta.changes.len());
        let version = self.config.apply(&self.trust_domain, delta.changes);
        if version != before {
            tracing::info!(version, changes, translated = delta.translated, took = ?delta.took, "config published");
            if let Some(path) = &self.mesh_file
                && let Err(error) = write_atomic(path, &self.config.config())
            {
                tracing::warn!(%error, path = %path.display(), "mesh file not written");
            }
        }
        Flushed {
            statuses: delta.statuses,
            waypoints: delta.waypoints,
        }
    }
}

fn write_atomic(path: &Path, config: &MeshConfig) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_yaml::to_string(config)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
