//! The pipeline: the incremental translator and where its output goes.
//! Each flush publishes what changed as one new config version (nothing
//! when nothing changed) and returns the policy conditions translated
//! again, for the caller to write back or log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use model::MeshConfig;

use crate::cluster::PolicyStatus;
use crate::metrics::Metrics;
use crate::stream::ConfigServer;
use crate::translator::Translator;

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

    /// Translates what changed, publishes it, and returns the conditions
    /// of the policies translated again.
    pub fn flush(&mut self) -> Vec<PolicyStatus> {
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
        delta.statuses
    }
}

fn write_atomic(path: &Path, config: &MeshConfig) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_yaml::to_string(config)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
