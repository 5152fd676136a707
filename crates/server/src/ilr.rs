//! Item-level recovery over the API: browse a recovery point's volumes and folders
//! (any role), download one file (role restore or higher). The work (datastore reads,
//! decompression) runs on blocking threads; a file streams in 1 MiB pieces, never
//! whole in memory.

use crate::auth::{Read, Restore};
use crate::http::{ApiErr, ApiResult, St, bad, blocking, json, not_found};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::io::Write;

#[derive(Deserialize)]
pub struct IlrQuery {
    disk: Option<u32>,
    partition: Option<u32>,
    path: Option<String>,
    /// `disk` (default) or `online:NAME`: where to read the point.
    from: Option<String>,
}

impl From<recovery::Error> for ApiErr {
    fn from(e: recovery::Error) -> Self {
        let code = if e.is_not_found() {
            StatusCode::NOT_FOUND
        } else if e.is_bad_request() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiErr(code, e.to_string())
    }
}

pub(crate) fn open(
    st: &crate::state::AppState,
    from: Option<&str>,
    id: &str,
    disk: u32,
) -> ApiResult<crate::caches::Opened> {
    let from = crate::online::parse_from(from)?;
    // Checked against the catalog first: an unknown id is a 404, and a pruned point
    // is gone at once even while its disk is cached.
    let store = crate::online::point_store(st, from.as_deref(), id)?;
    let place = from.as_deref().unwrap_or("");
    if let Some(hit) = st.open_disks.get(place, id, disk) {
        return Ok(hit);
    }
    let m = store.point(id).map_err(|e| match e {
        datastore::Error::Missing { .. } => not_found(format!("no recovery point {id}")),
        e => e.into(),
    })?;
    if disk as usize >= m.disks.len() {
        return Err(not_found(format!(
            "recovery point {id} has {} disk(s); there is no disk {disk} (numbered from 0)",
            m.disks.len()
        )));
    }
    let vd = recovery::open_disk(&store, &m, disk as usize)?;
    let m = std::sync::Arc::new(m);
    st.open_disks.put(place, disk, m.clone(), vd.clone());
    Ok((m, vd))
}

/// `GET /recovery-points/{id}/browse?disk=N&partition=P&path=/x`
pub async fn browse(
    State(st): St,
    _caller: Read,
    Path(id): Path<String>,
    Query(q): Query<IlrQuery>,
) -> ApiResult<Response> {
    let listing = blocking(move || {
        let disk = q.disk.unwrap_or(0);
        let (m, d) = open(&st, q.from.as_deref(), &id, disk)?;
        let path = q.path.as_deref().unwrap_or("/");
        Ok(recovery::browse(d, &m, disk as usize, q.partition, path)?)
    })
    .await?;
    Ok(json(&listing))
}

/// Sends what is written to it as body pieces of at most 1 MiB.
struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChunkSender {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(1 << 20),
        ));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min((1 << 20) - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() >= 1 << 20 {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// `GET /recovery-points/{id}/file?disk=N&partition=P&path=/x`: the file's bytes.
/// Problems found before the first byte are normal error answers; damage found later
/// breaks the transfer (the length announced does not arrive).
pub async fn file(
    State(st): St,
    _caller: Restore,
    Path(id): Path<String>,
    Query(q): Query<IlrQuery>,
) -> ApiResult<Response> {
    let path = q
        .path
        .clone()
        .ok_or_else(|| bad("path is required (the file to download)"))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<ApiResult<(u64, String)>>();
    tokio::task::spawn_blocking(move || {
        let disk = q.disk.unwrap_or(0);
        let opened = open(&st, q.from.as_deref(), &id, disk).and_then(|(m, d)| {
            let mut fs = recovery::open_fs(d, &m, disk as usize, q.partition)?;
            let e = fs.stat(&path).map_err(|e| fs_err(&path, e))?;
            if e.kind != fsview::EntryKind::File {
                return Err(ApiErr(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("{path} is a {}, not a file", e.kind.name()),
                ));
            }
            Ok((fs, e))
        });
        let (mut fs, e) = match opened {
            Ok(x) => x,
            Err(err) => {
                let _ = ready_tx.send(Err(err));
                return;
            }
        };
        if ready_tx.send(Ok((e.size, e.name.clone()))).is_err() {
            return;
        }
        let mut w = ChunkSender {
            tx: tx.clone(),
            buf: Vec::with_capacity(1 << 20),
        };
        let r = fs
            .read_file(&path, &mut w)
            .map_err(|err| std::io::Error::other(err.to_string()))
            .and_then(|_| w.flush());
        if let Err(err) = r {
            let _ = tx.blocking_send(Err(err));
        }
    });
    let (size, name) = ready_rx
        .await
        .map_err(|_| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, "worker ended".into()))??;
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let disposition = format!(
        "attachment; filename=\"{}\"",
        name.replace(
            |c: char| c == '"' || c == '\\' || c.is_control() || !c.is_ascii(),
            "_"
        )
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

fn fs_err(path: &str, e: fsview::Error) -> ApiErr {
    let code = match &e {
        fsview::Error::NotFound(_) => StatusCode::NOT_FOUND,
        fsview::Error::BadPath(_) | fsview::Error::WrongKind(_) => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiErr(code, format!("{path}: {e}"))
}

/// After a backup: opens every volume of the new recovery point from the datastore,
/// records what it found, and raises a `filesystem-unreadable` warning when a volume
/// that was readable in the previous recovery point is not any more (resolved by the
/// next backup where all are readable again). Problems checking are logged on the job,
/// never fail it: the recovery point is already safely stored.
pub async fn check_point(
    st: std::sync::Arc<crate::state::AppState>,
    job: i64,
    vm: Option<protocol::DataSourceName>,
    m: datastore::Manifest,
) {
    let st2 = st.clone();
    let r = blocking(move || {
        let mut all = Vec::new();
        for d in 0..m.disks.len() {
            let disk = recovery::open_disk(&st2.datastore, &m, d)?;
            all.extend(recovery::check_volumes(disk, d as u32));
        }
        let cat = st2.cat();
        cat.set_recovery_point_volumes(&m.id, &all)?;
        let now = utc::now();
        for v in &all {
            let what = match v.partition {
                0 => format!("disk {} (whole disk)", v.disk),
                p => format!("disk {} partition {p}", v.disk),
            };
            let state = match (&v.problem, v.readable) {
                (_, true) => format!("{} readable, {} entries in its root", v.fs, v.root_entries),
                (Some(p), false) => format!("{} not readable: {p}", v.fs),
                (None, false) => format!("{} not readable", v.fs),
            };
            cat.job_log(now, job, &format!("volume check: {what}: {state}"))?;
        }
        let Some(vm) = vm else { return Ok(()) };
        let points = cat.recovery_points(Some(&m.source.id))?;
        let prev = points
            .iter()
            .rev()
            .filter(|p| p.id != m.id && p.created_unix <= m.created_unix)
            .find_map(|p| p.volumes.as_ref());
        let lost: Vec<String> = prev
            .into_iter()
            .flatten()
            .filter(|p| p.readable)
            .filter(|p| {
                !all.iter()
                    .any(|v| v.disk == p.disk && v.partition == p.partition && v.readable)
            })
            .map(|p| {
                let now = all
                    .iter()
                    .find(|v| v.disk == p.disk && v.partition == p.partition);
                format!(
                    "disk {} partition {} had a readable {} file system; in recovery point {} {}",
                    p.disk,
                    p.partition,
                    p.fs,
                    m.id,
                    match now {
                        Some(v) => format!(
                            "it is {} ({})",
                            v.fs,
                            v.problem.as_deref().unwrap_or("not readable")
                        ),
                        None => "the volume is gone".into(),
                    }
                )
            })
            .collect();
        if lost.is_empty() {
            st2.notify
                .resolve_alerts(&cat, now, &vm, Some("filesystem-unreadable"))?;
        } else {
            st2.notify.raise_alert(
                &cat,
                now,
                protocol::Severity::Warning,
                &vm,
                "filesystem-unreadable",
                &lost.join("; "),
            )?;
        }
        Ok(())
    })
    .await;
    if let Err(e) = r {
        let line = format!("volume check failed: {}", e.1);
        let _ = st.catalog(move |c| c.job_log(utc::now(), job, &line)).await;
    }
}
