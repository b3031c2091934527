//! Local manifests mode: a directory of manifests, re-read and given to
//! the same pipeline as a cluster's objects (only what differs from the
//! last reading is translated again), for setups without an API server
//! (`ambit lab`).

use std::path::PathBuf;

use crate::manifests;
use crate::pipeline::Pipeline;

/// Follows a manifests directory.
#[derive(Debug)]
pub struct LocalMode {
    pub manifests: PathBuf,
    pub trust_domain: String,
}

impl LocalMode {
    pub fn new(manifests: PathBuf, trust_domain: String) -> Self {
        Self {
            manifests,
            trust_domain,
        }
    }

    /// Reads the manifests and publishes what changed; the error names a
    /// broken file (and nothing of that reading is taken). Policy
    /// conditions that changed go to stderr (there is no API server to
    /// write them to).
    pub fn sync(&self, pipeline: &mut Pipeline) -> Result<(), String> {
        let cluster =
            manifests::read_dir(&self.manifests, &self.trust_domain).map_err(|e| e.to_string())?;
        pipeline.translator.sync(&cluster);
        // Waypoints are not deployed here: there is nothing to deploy to.
        for status in pipeline.flush().statuses {
            eprintln!("{status}");
        }
        Ok(())
    }
}
