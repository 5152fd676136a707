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
    let manifest = st
        .datastore
        .point(&s.point)
        .map_err(|e| format!("recovery point {}: {e}", s.point))?;
    let p = st.datastore.block_params();
    Ok(RecoveryPlan {
        target: s.target.clone(),
        manifest: manifest.into(),
        block_size: p.block_size,
        piece_blocks: p.piece_blocks,
        master_key: st
            .master_key
            .map(|k| k.iter().map(|b| format!("{b:02x}")).collect()),
        throttle_kbps: s.throttle_kbps,
        throttle_schedule: if s.throttle_kbps.is_some() {
            None
        } else {
            st.config.recovery.schedule()
        },
    })
}
