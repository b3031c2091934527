//! Local manifests mode: a directory of manifests, re-read and translated
//! with the same pipeline as a cluster's objects, for setups without an
//! API server (`ambit lab`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::manifests;
use crate::pipeline::Pass;

/// Follows a manifests directory.
#[derive(Debug)]
pub struct LocalMode {
    pub manifests: PathBuf,
    pub trust_domain: String,
    /// Each policy object's status line, to log changes only.
    statuses: BTreeMap<String, String>,
}

impl LocalMode {
    pub fn new(manifests: PathBuf, trust_domain: String) -> Self {
        Self {
            manifests,
            trust_domain,
            statuses: BTreeMap::new(),
        }
    }

    /// Reads and translates the manifests; the error names a broken file.
    /// Policy status changes go to stderr (there is no API server to write
    /// them to).
    pub fn sync(&mut self) -> Result<Pass, String> {
        let cluster =
            manifests::read_dir(&self.manifests, &self.trust_domain).map_err(|e| e.to_string())?;
        let pass = Pass::of(&cluster);
        let statuses: BTreeMap<String, String> = pass
            .statuses
            .iter()
            .map(|s| (s.object(), s.to_string()))
            .collect();
        for (object, line) in &statuses {
            if self.statuses.get(object) != Some(line) {
                eprintln!("{line}");
            }
        }
        self.statuses = statuses;
        Ok(pass)
    }
}
