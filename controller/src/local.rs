//! Local manifests mode: a directory of manifests, re-read and translated
//! with the same pipeline as a cluster's objects, for setups without an
//! API server (`ambit lab`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::manifests;

/// Follows a manifests directory.
#[derive(Debug)]
pub struct LocalMode {
    pub manifests: PathBuf,
    pub trust_domain: String,
    /// The config translated last (to report changes only).
    last: Option<model::MeshConfig>,
    /// Each policy object's status line, to log changes only.
    statuses: BTreeMap<String, String>,
}

/// A new valid config.
#[derive(Debug)]
pub struct Translated {
    pub config: model::MeshConfig,
    pub snapshot: model::Snapshot,
    pub objects: [(&'static str, u64); 7],
    /// Reading and translating the manifests.
    pub took: Duration,
}

impl LocalMode {
    pub fn new(manifests: PathBuf, trust_domain: String) -> Self {
        Self {
            manifests,
            trust_domain,
            last: None,
            statuses: BTreeMap::new(),
        }
    }

    /// Reads, translates and validates the manifests: the config when it
    /// changed, `None` when not. On an error the last good config stays
    /// and the error says why. Policy status changes go to stderr.
    pub fn sync(&mut self) -> Result<Option<Translated>, String> {
        let started = Instant::now();
        let cluster =
            manifests::read_dir(&self.manifests, &self.trust_domain).map_err(|e| e.to_string())?;
        let (config, statuses) = cluster.translate();
        let took = started.elapsed();
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
        if self.last.as_ref() == Some(&config) {
            return Ok(None);
        }
        // The data planes would refuse an invalid config whole; refuse it
        // here, with the same reason, and keep the last good one.
        let snapshot = model::Snapshot::new(config.clone(), 0)
            .map_err(|e| format!("mesh config refused: {e}"))?;
        self.last = Some(config.clone());
        Ok(Some(Translated {
            config,
            snapshot,
            objects: cluster.object_counts(),
            took,
        }))
    }
}
