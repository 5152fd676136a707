//! A queued recovery's plan: what the server keeps of it (settings row
//! `recovery:{job}`), and the plan an agent gets when the job is handed out. Shared by
//! the recovery handlers, agent authorization and the scheduler.

use crate::state::AppState;
use protocol::{RecoveryPlan, RecoveryTarget};
use serde::{Deserialize, Serialize};

/// What the server keeps of a queued recovery (settings row `recovery:{job}`): the
/// target host, and the point (the manifest is read again when the job is handed out).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub host: String,
    pub point: String,
    pub target: RecoveryTarget,
    #[serde(default)]
    pub throttle_kbps: Option<u64>,
    /// The storage target read from (`--from online:NAME`); none = the datastore.
    #[serde(default)]
    pub from: Option<String>,
}

/// The datastore job `s` reads, and its master key when encrypted.
pub(crate) fn source(
    st: &AppState,
    s: &Stored,
) -> Result<(std::sync::Arc<datastore::Datastore>, Option<[u8; 32]>), String> {
    match &s.from {
        None => Ok((st.datastore.clone(), st.master_key)),
        Some(name) => {
            let ds = crate::online::store(st, name, false).map_err(|e| e.1)?;
            let key = crate::online::key_path(st, name).map_err(|e| e.1)?;
            let master = datastore::crypto::read_key_file(&key)
                .map_err(|e| format!("the key of online:{name}: {e}"))?;
            Ok((ds, Some(master)))
        }
    }
}

pub(crate) fn key(job: i64) -> String {
    format!("recovery:{job}")
}

/// The stored plan of recovery job `job`.
pub(crate) fn stored(cat: &catalog::Catalog, job: i64) -> Result<Stored, catalog::Error> {
    let v = cat
        .setting(&key(job))?
        .ok_or_else(|| catalog::Error::NotFound(format!("the plan of recovery job {job}")))?;
    serde_json::from_str(&v)
        .map_err(|e| catalog::Error::Corrupt(format!("the plan of recovery job {job}: {e}")))
}

/// The plan an agent gets: the point's manifest and the datastore's parameters.
pub(crate) fn plan(st: &AppState, s: &Stored) -> Result<RecoveryPlan, String> {
    let (store, master_key) = source(st, s)?;
    let manifest = store
        .point(&s.point)
        .map_err(|e| format!("recovery point {}: {e}", s.point))?;
    let p = store.block_params();
    Ok(RecoveryPlan {
        target: s.target.clone(),
        manifest: manifest.into(),
        block_size: p.block_size,
        piece_blocks: p.piece_blocks,
        master_key: master_key.map(|k| k.iter().map(|b| format!("{b:02x}")).collect()),
        throttle_kbps: s.throttle_kbps,
        throttle_schedule: if s.throttle_kbps.is_some() {
            None
        } else {
            st.config.recovery.schedule()
        },
    })
}
