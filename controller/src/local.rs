//! Local manifests mode: a directory of manifests kept translated into a
//! mesh config file, which ztunnels follow with their file source. The
//! same translation as in a cluster; until the config stream exists, the
//! file is how it reaches data planes without an API server.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::manifests;

/// Keeps `mesh_file` equal to the translation of `manifests`.
#[derive(Debug)]
pub struct LocalMode {
    pub manifests: PathBuf,
    pub mesh_file: PathBuf,
    pub trust_domain: String,
    /// The config written last (to skip unchanged writes).
    written: Option<String>,
    /// Each policy object's status line, to log changes only.
    statuses: BTreeMap<String, String>,
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    Written,
    Unchanged,
}

impl LocalMode {
    pub fn new(manifests: PathBuf, mesh_file: PathBuf, trust_domain: String) -> Self {
        Self {
            manifests,
            mesh_file,
            trust_domain,
            written: None,
            statuses: BTreeMap::new(),
        }
    }

    /// Reads, translates and validates the manifests, and rewrites the
    /// mesh file (atomically) when the config changed. On an error the file
    /// keeps the last good config and the error says why.
    pub fn sync(&mut self) -> Result<Synced, String> {
        let cluster =
            manifests::read_dir(&self.manifests, &self.trust_domain).map_err(|e| e.to_string())?;
        let (config, statuses) = cluster.translate();
        let statuses: BTreeMap<String, String> = statuses
            .into_iter()
            .map(|s| (s.object.clone(), s.to_string()))
            .collect();
        for (object, line) in &statuses {
            if self.statuses.get(object) != Some(line) {
                eprintln!("{line}");
            }
        }
        self.statuses = statuses;
        // The data planes would refuse an invalid config whole; refuse it
        // here, with the same reason, and keep the last good one.
        model::Snapshot::new(config.clone(), 0).map_err(|e| format!("mesh config refused: {e}"))?;
        let yaml = serde_yaml::to_string(&config).map_err(|e| e.to_string())?;
        if self.written.as_ref() == Some(&yaml) {
            return Ok(Synced::Unchanged);
        }
        let tmp = self.mesh_file.with_extension("tmp");
        std::fs::write(&tmp, &yaml).map_err(|e| format!("write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &self.mesh_file)
            .map_err(|e| format!("rename to {}: {e}", self.mesh_file.display()))?;
        self.written = Some(yaml);
        Ok(Synced::Written)
    }
}
