//! Online protection. Each storage target holds a datastore of its own, in the same
//! format as the server's: always encrypted, with a key of its own that the server keeps
//! in its secret store (`DATA_DIR/secrets/NAME.online-key.secret`) and the administrator keeps
//! apart (`holdfast storage key`). Copies of recovery points go there (only the blobs it
//! lacks), reads come from there (`--from online:NAME`), and a new server attaches it
//! after a disaster with nothing but that key.

use crate::http::{ApiErr, ApiResult, not_found};
use crate::state::AppState;
use axum::http::StatusCode;
use datastore::{CopyOptions, Datastore, Retention, StoreOptions, Throttle};
use protocol::{JobKind, OnlinePolicy, Severity, StorageInfo, StorageKind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The secret holding the key file of target `name`'s online copy.
pub(crate) fn key_name(name: &str) -> String {
    format!("{name}.online-key")
}

/// Where the server keeps the key of target `name`'s online copy
/// (`DATA_DIR/secrets/NAME.online-key.secret`, mode 0600).
pub(crate) fn key_path(st: &AppState, name: &str) -> ApiResult<PathBuf> {
    st.secrets.file(&key_name(name)).map_err(secret_err)
}

fn gateway(name: &str, e: impl std::fmt::Display) -> ApiErr {
    ApiErr(
        StatusCode::BAD_GATEWAY,
        format!("storage target {name}: {e}"),
    )
}

fn secret_err(e: pki::Error) -> ApiErr {
    ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// The target `t` as the object-storage crate opens it, with its secret.
pub(crate) fn target(st: &AppState, t: &StorageInfo) -> ApiResult<objstore::Target> {
    let l = &t.location;
    let missing = |what: &str| {
        ApiErr(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "storage target {}: {what} is missing from the catalog",
                t.name
            ),
        )
    };
    let secret = || -> ApiResult<objstore::Secret> {
        Ok(objstore::Secret::new(
            st.secrets.get(&t.name).map_err(secret_err)?,
        ))
    };
    Ok(match t.kind {
        StorageKind::Azure => objstore::Target::Azure {
            account: l.account.clone().ok_or_else(|| missing("account"))?,
            container: l.container.clone().ok_or_else(|| missing("container"))?,
            endpoint: l.endpoint.clone(),
            access_key: secret()?,
        },
        StorageKind::S3 => objstore::Target::S3 {
            bucket: l.bucket.clone().ok_or_else(|| missing("bucket"))?,
            endpoint: l.endpoint.clone(),
            region: l.region.clone().ok_or_else(|| missing("region"))?,
            access_key_id: l
                .access_key_id
                .clone()
                .ok_or_else(|| missing("access_key_id"))?,
            secret_access_key: secret()?,
        },
        StorageKind::Folder => objstore::Target::Folder {
            path: l.path.clone().ok_or_else(|| missing("path"))?.into(),
        },
    })
}

/// Target `name`'s online datastore. With `create`, an empty target gets a new one
/// (encrypted with a new key, the server's block size); a target holding a datastore
/// this server has no key for must be attached (`holdfast storage attach`).
pub(crate) fn store(st: &AppState, name: &str, create: bool) -> ApiResult<Arc<Datastore>> {
    let mut open = st.online.lock();
    if let Some(ds) = open.get(name) {
        return Ok(ds.clone());
    }
    let info = st.cat().storage(name)?;
    let key = key_path(st, name)?;
    let backend = objstore::open(&target(st, &info)?).map_err(|e| gateway(name, e))?;
    let ds = if key.exists() {
        Datastore::open_on(backend, &info.url, Some(&key)).map_err(|e| gateway(name, e))?
    } else if !create {
        return Err(ApiErr(
            StatusCode::CONFLICT,
            format!(
                "storage target {name} holds no online copy this server has the key of: attach it with `holdfast storage attach {name} --key-file FILE`"
            ),
        ));
    } else {
        let holds = backend.list("").map_err(|e| gateway(name, e))?;
        if let Some(first) = holds.first() {
            return Err(ApiErr(
                StatusCode::CONFLICT,
                format!(
                    "storage target {name} ({}) is not empty ({} exists): if it holds an online copy, attach it with `holdfast storage attach {name} --key-file FILE`; else give an empty container, bucket or folder",
                    info.url, first.key
                ),
            ));
        }
        let c = st.datastore.config();
        let opts = StoreOptions {
            key_file: Some(key.clone()),
            zstd_level: c.zstd_level,
            block_size: c.block_size,
        };
        match Datastore::create_on(backend, &info.url, &opts) {
            Ok(ds) => ds,
            Err(e) => {
                // No key without its datastore: the next try starts clean.
                let _ = std::fs::remove_file(&key);
                return Err(gateway(name, e));
            }
        }
    };
    let ds = Arc::new(ds);
    open.insert(name.to_string(), ds.clone());
    Ok(ds)
}

/// Forgets an opened target (removed, or attached anew).
pub(crate) fn forget(st: &AppState, name: &str) {
    st.online.lock().remove(name);
}

/// `from` of a read: none or `disk` is the server's datastore, `online:NAME` a target.
pub(crate) fn parse_from(from: Option<&str>) -> ApiResult<Option<String>> {
    match from {
        None | Some("disk") => Ok(None),
        Some(f) => match f.strip_prefix("online:") {
            Some(name) if !name.is_empty() => Ok(Some(name.to_string())),
            _ => Err(crate::http::bad(format!(
                "from: {f:?} is not `disk` or `online:NAME`"
            ))),
        },
    }
}

/// The datastore to read point `id` from: the server's (the point must be on disk) or
/// target `from`'s (it must hold a copy).
pub(crate) fn point_store(
    st: &AppState,
    from: Option<&str>,
    id: &str,
) -> ApiResult<Arc<Datastore>> {
    match from {
        None => {
            // The catalog knows every point the server holds: an unknown id is a 404,
            // and a pruned point is gone at once.
            st.cat().recovery_point(id)?;
            Ok(st.datastore.clone())
        }
        Some(name) => {
            if st.cat().online_point(name, id)?.is_none() {
                return Err(not_found(format!(
                    "recovery point {id} has no copy on online:{name}"
                )));
            }
            store(st, name, false)
        }
    }
}

/// Queues an online copy of data source `ds` unless one is already waiting or running.
pub(crate) fn queue_copy(
    st: &AppState,
    now: i64,
    ds: &str,
    trigger: &str,
) -> Result<i64, catalog::Error> {
    let cat = st.cat();
    if let Some(j) = cat.active_job_for(ds)?
        && j.kind == JobKind::OnlineCopy
    {
        return Ok(j.id);
    }
    crate::state::add_job(&cat, now, JobKind::OnlineCopy, Some(ds), trigger)
}

/// Queues an online copy of every member of `group` that has a recovery point.
pub(crate) fn queue_group(
    st: &AppState,
    now: i64,
    group: &str,
    trigger: &str,
) -> Result<Vec<i64>, catalog::Error> {
    let g = st.cat().group(group)?;
    let mut jobs = Vec::new();
    for m in &g.members {
        if st.cat().recovery_points(Some(&m.datasource_id))?.is_empty() {
            continue;
        }
        jobs.push(queue_copy(st, now, &m.datasource_id, trigger)?);
    }
    Ok(jobs)
}

/// The settings row holding an online verify job's target and sample.
pub(crate) fn verify_key(job: i64) -> String {
    format!("online-verify:{job}")
}

fn retention(o: &OnlinePolicy) -> Retention {
    let nz = |n: u32| (n > 0).then_some(n);
    Retention {
        daily: nz(o.retention.daily),
        weekly: nz(o.retention.weekly),
        monthly: nz(o.retention.monthly),
        yearly: nz(o.retention.yearly),
        ..Retention::default()
    }
}

/// Checks every two seconds whether job `job` was cancelled.
struct CancelWatch<'a> {
    st: &'a AppState,
    job: i64,
    flag: AtomicBool,
    looked: Mutex<Instant>,
}

impl CancelWatch<'_> {
    fn look(&self) {
        let mut l = locks::lock(&self.looked);
        if l.elapsed() < Duration::from_secs(2) {
            return;
        }
        *l = Instant::now();
        if let Ok(Some(_)) = self.st.cat().setting(&format!("cancel:{}", self.job)) {
            self.flag.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs online copy job `job`: the newest recovery point of its data source goes to its
/// group's target, then the online retention prunes that source's copies there.
pub(crate) fn copy(st: &AppState, job: i64) -> Result<String, String> {
    let e = |e: catalog::Error| e.to_string();
    let a = |e: ApiErr| e.1;
    let info = st.cat().job(job).map_err(e)?;
    let ds = info
        .datasource_id
        .ok_or_else(|| format!("online copy job {job} names no data source"))?;
    let group = st
        .cat()
        .group_of(&ds)
        .map_err(e)?
        .ok_or_else(|| "the VM is no longer in a protection group".to_string())?;
    let policy = st.cat().group(&group).map_err(e)?.policy;
    let o = policy
        .online
        .ok_or_else(|| format!("protection group {group:?} has no online protection"))?;
    let point = st
        .cat()
        .recovery_points(Some(&ds))
        .map_err(e)?
        .pop()
        .ok_or_else(|| "the VM has no recovery point on disk yet".to_string())?;
    let target = store(st, &o.storage, true).map_err(a)?;
    let throttle = o
        .throttle()
        .and_then(|(kbps, sched)| Throttle::for_plan(kbps, sched.as_ref()));
    let watch = CancelWatch {
        st,
        job,
        flag: AtomicBool::new(false),
        looked: Mutex::new(Instant::now()),
    };
    let opts = CopyOptions {
        throttle: throttle.as_ref(),
        cancel: Some(&watch.flag),
    };
    let _ = st.cat().job_log(
        utc::now(),
        job,
        &format!(
            "copying recovery point {} to online:{}",
            point.id, o.storage
        ),
    );
    let r = target
        .copy_point_from(&st.datastore, &point.id, &opts, &mut |done, total| {
            watch.look();
            let _ = st.cat().set_job_progress(
                job,
                &protocol::JobProgress {
                    bytes_done: done,
                    bytes_total: total,
                    bytes_read: done,
                    bytes_sent: 0,
                    message: None,
                    step: Some("copying".into()),
                },
            );
        })
        .map_err(|e| format!("online:{}: {e}", o.storage))?;
    let now = utc::now();
    {
        let cat = st.cat();
        cat.add_online_point(&o.storage, &point, now).map_err(e)?;
        cat.set_job_recovery_point(job, &point.id).map_err(e)?;
    }
    let removed = prune_copies(st, &target, &o, &point.vm)?;
    Ok(format!(
        "{} recovery point {} on online:{} ({} new blobs, {} bytes uploaded, base {}); online retention removed {removed} older copies",
        if r.already_there {
            "already had"
        } else {
            "copied"
        },
        r.point,
        o.storage,
        r.blobs_new,
        r.bytes_uploaded,
        r.base.as_deref().unwrap_or("none"),
    ))
}

/// Applies the online retention to `source`'s copies on the target; the catalog follows.
fn prune_copies(
    st: &AppState,
    target: &Datastore,
    o: &OnlinePolicy,
    source: &str,
) -> Result<usize, String> {
    let plan = target
        .prune(&retention(o), &[source.to_string()], false)
        .map_err(|e| format!("online:{}: retention: {e}", o.storage))?;
    let gone: Vec<String> = plan.into_iter().filter(|d| !d.keep).map(|d| d.id).collect();
    st.cat()
        .remove_online_points(&o.storage, &gone)
        .map_err(|e| e.to_string())?;
    Ok(gone.len())
}

/// The recovery points target `ds` holds, as the catalog lists them.
pub(crate) fn list_points(
    ds: &Datastore,
) -> Result<Vec<protocol::RecoveryPointInfo>, datastore::Error> {
    let (points, _) = ds.points()?;
    Ok(points
        .iter()
        .map(|m| {
            let mut rp = crate::rp_info(m, None);
            rp.locations.clear();
            rp
        })
        .collect())
}

/// gc of every target this server has the key of; a summary per target.
pub(crate) fn gc_all(st: &AppState, job: i64) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let targets = st.cat().storage_targets().map_err(|e| e.to_string())?;
    for t in targets {
        if !key_path(st, &t.name).map_err(|e| e.1)?.exists() {
            continue;
        }
        let ds = store(st, &t.name, false).map_err(|e| e.1)?;
        let r = ds
            .gc(&mut |m| {
                let _ = st
                    .cat()
                    .job_log(utc::now(), job, &format!("online:{}: {m}", t.name));
            })
            .map_err(|e| format!("online:{}: {e}", t.name))?;
        out.push(format!(
            "online:{}: {} packs deleted, {} bytes freed",
            t.name, r.packs_deleted, r.bytes_freed
        ));
    }
    Ok(out)
}

/// Runs online verify job `job` on the target and sample its settings row names;
/// damage raises the same alert as on disk, under `online:NAME`.
pub(crate) fn verify(st: &AppState, job: i64) -> Result<String, String> {
    let row = st
        .cat()
        .setting(&verify_key(job))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("online verify job {job} has lost its settings"))?;
    let (name, sample): (String, Option<u8>) =
        serde_json::from_str(&row).map_err(|e| format!("online verify job {job}: {e}"))?;
    let ds = store(st, &name, false).map_err(|e| e.1)?;
    let r = ds
        .verify_sample(sample.unwrap_or(100), &mut |_, _| {})
        .map_err(|e| format!("online:{name}: {e}"))?;
    let place = format!("online:{name}");
    let now = utc::now();
    if r.damaged_files.is_empty() && r.damaged_points.is_empty() {
        let _ = st
            .notify
            .resolve_alerts(&st.cat(), now, &place, Some("damage"));
        return Ok(format!(
            "verify {place}: {} blobs in {} of {} packs, {} recovery points: no damage",
            r.blobs, r.packs_read, r.packs, r.points
        ));
    }
    let names: Vec<String> = r.damaged_points.iter().map(|p| p.id.clone()).collect();
    let msg = format!(
        "verify {place} found {} damaged files; recovery points needing damaged data: {}",
        r.damaged_files.len(),
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    );
    let _ = st
        .notify
        .raise_alert(&st.cat(), now, Severity::Error, &place, "damage", &msg);
    Err(msg)
}
