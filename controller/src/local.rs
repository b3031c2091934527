//! Local manifests mode: a directory of manifests kept translated into a
//! mesh config file, which ztunnels follow with their file source. The
//! same translation as in a cluster; until the config stream exists, the
//! file is how it reaches data planes without an API server.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kube::ResourceExt;

use crate::crd::Condition;
use crate::manifests;
use crate::translate;

/// Keeps `mesh_file` equal to the translation of `manifests`.
#[derive(Debug)]
pub struct LocalMode {
    pub manifests: PathBuf,
    pub mesh_file: PathBuf,
    pub trust_domain: String,
    /// The config written last (to skip unchanged writes).
    written: Option<String>,
    /// Each policy's status line, to log changes only.
    statuses: BTreeMap<String, String>,
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    Written,
    Unchanged,
}

fn status_line(accepted: &Condition, enforced: &Condition) -> String {
    format!(
        "Accepted={} ({}), Enforced={} ({}: {})",
        accepted.status, accepted.reason, enforced.status, enforced.reason, enforced.message
    )
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
        let mut statuses = BTreeMap::new();
        for ap in &cluster.authorization_policies {
            let t = translate::authorization_policy(ap);
            let key = format!(
                "AuthorizationPolicy {}/{}",
                ap.namespace().unwrap_or_default(),
                ap.name_any()
            );
            statuses.insert(key, status_line(&t.accepted, &t.enforced));
        }
        for pa in &cluster.peer_authentications {
            let t = translate::peer_authentication(pa);
            let key = format!(
                "PeerAuthentication {}/{}",
                pa.namespace().unwrap_or_default(),
                pa.name_any()
            );
            statuses.insert(key, status_line(&t.accepted, &t.enforced));
        }
        for (key, line) in &statuses {
            if self.statuses.get(key) != Some(line) {
                eprintln!("{key}: {line}");
            }
        }
        self.statuses = statuses;
        let config = cluster.mesh_config();
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
