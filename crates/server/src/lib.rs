//! Holdfast's backup server: the HTTPS API (mutual TLS for agents, a bearer token for
//! admins), the catalog, the datastore, the scheduler and its jobs.
//!
//! First start in an empty data dir creates everything: `catalog.db`, `datastore/`,
//! the certificate authority (`ca.pem`, `ca.key`), the server certificate and
//! `admin.token`. Nothing needs configuring; `holdfast.toml` can change the defaults.

pub mod allocation;
pub mod api;
mod auth;
mod caches;
pub mod config;
mod http;
mod ilr;
mod instant;
mod maintenance;
pub mod notify;
mod online;
pub mod recover;
mod recovery_plan;
pub mod scheduler;
pub mod state;
mod tls;

use catalog::Catalog;
use datastore::backend::LeaseHold;
use datastore::{Datastore, Manifest, StoreOptions};
use protocol::{RecoveryPointInfo, VmDisk};
use state::AppState;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error(transparent)]
    Datastore(#[from] datastore::Error),
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error(transparent)]
    Notify(#[from] notify::Error),
    #[error(transparent)]
    Storage(#[from] objstore::Error),
    #[error("{what}: {err}")]
    Io {
        what: String,
        #[source]
        err: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How `holdfast server` was started.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub data_dir: PathBuf,
    pub listen: Option<std::net::SocketAddr>,
    /// `--config FILE` (must exist); default `DIR/holdfast.toml` if present.
    pub config_file: Option<PathBuf>,
    /// `--datastore-url`: the datastore on object storage rather than in a folder.
    pub datastore_target: Option<objstore::Target>,
    /// Key file of an encrypted datastore on object storage (default
    /// `DIR/datastore.key`: object storage has no folder to keep it beside).
    pub datastore_key_file: Option<PathBuf>,
    /// The lease length on object storage (default 60 s).
    pub lease: Option<std::time::Duration>,
}

impl ServerOptions {
    /// A server on `data_dir` with every other option at its default.
    pub fn new(data_dir: &Path) -> ServerOptions {
        ServerOptions {
            data_dir: data_dir.to_path_buf(),
            listen: None,
            config_file: None,
            datastore_target: None,
            datastore_key_file: None,
            lease: None,
        }
    }
}

/// What a started server tells its operator.
#[derive(Debug, Clone)]
pub struct Started {
    pub url: String,
    pub ca_fingerprint: String,
    pub admin_token_file: PathBuf,
    pub ca_file: PathBuf,
    /// The datastore's folder, or its URL on object storage.
    pub datastore: String,
}

/// A recovery point as the catalog lists it.
pub fn rp_info(m: &Manifest, job_id: Option<i64>) -> RecoveryPointInfo {
    RecoveryPointInfo {
        id: m.id.clone(),
        vm: m.source.name.clone(),
        datasource_id: m.source.id.clone(),
        created: m.created.clone(),
        created_unix: m.created_unix,
        consistency: m.consistency.into(),
        base: m.base.clone(),
        disks: m
            .disks
            .iter()
            .map(|d| VmDisk {
                name: d.name.clone(),
                format: d.format.clone(),
                virtual_size: d.virtual_size,
            })
            .collect(),
        stats: m.stats.into(),
        job_id,
        volumes: None,
        locations: vec!["disk".into()],
    }
}

fn load_config(opts: &ServerOptions) -> Result<config::Config> {
    let mut cfg = match &opts.config_file {
        Some(f) => config::Config::load(f, true),
        None => config::Config::load(&opts.data_dir.join("holdfast.toml"), false),
    }
    .map_err(Error::Config)?;
    if let Some(l) = opts.listen {
        cfg.listen = l;
    }
    Ok(cfg)
}

fn datastore_dir(opts: &ServerOptions, cfg: &config::Config) -> PathBuf {
    cfg.datastore
        .clone()
        .unwrap_or_else(|| opts.data_dir.join("datastore"))
}

/// Opens the datastore, creating it on first start.
fn open_datastore(dir: &Path, encrypt: bool) -> Result<(Datastore, Option<[u8; 32]>)> {
    let key_path = datastore::default_key_path(dir);
    if !dir.join("holdfast-datastore.json").exists() {
        let opts = StoreOptions {
            key_file: encrypt.then(|| key_path.clone()),
            ..StoreOptions::default()
        };
        Datastore::create(dir, &opts)?;
    }
    // The datastore's configuration says whether it is encrypted; its key is then
    // the default one beside it (a stray key file beside a plain one is not used).
    let ds = Datastore::open(dir, None)?;
    let master = if ds.keys().encrypted() {
        if let Some(w) = datastore::crypto::key_file_exposure(&key_path) {
            eprintln!("holdfast server: warning: {w}");
        }
        Some(datastore::crypto::read_key_file(&key_path)?)
    } else {
        None
    };
    Ok((ds, master))
}

/// The datastore's configuration object (`Datastore::create` writes it first).
const DATASTORE_CONFIG: &str = "holdfast-datastore.json";

/// An open datastore, and on object storage the lease hold that keeps other servers
/// out while it lives.
struct Opened {
    ds: Datastore,
    master: Option<[u8; 32]>,
    hold: Option<Box<dyn LeaseHold>>,
    /// The folder or the URL, for messages.
    location: String,
}

/// The file in the data dir that records the URL of a datastore on object storage,
/// so the catalog is never paired with another datastore by mistake.
pub const DATASTORE_URL_FILE: &str = "datastore.url";

/// The datastore URL `data_dir` records, if its datastore is on object storage.
pub fn recorded_datastore_url(data_dir: &Path) -> Result<Option<String>> {
    let path = data_dir.join(DATASTORE_URL_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(Error::Io {
            what: format!("reading {}", path.display()),
            err,
        }),
    }
}

/// Refuses a datastore other than the one the data dir's catalog describes: a start
/// without `--datastore-url` would otherwise create an empty folder datastore beside
/// a catalog of points on object storage.
fn check_recorded(opts: &ServerOptions) -> Result<()> {
    let file = opts.data_dir.join(DATASTORE_URL_FILE);
    let given = opts.datastore_target.as_ref().map(|t| t.location());
    match (recorded_datastore_url(&opts.data_dir)?, given) {
        (Some(r), None) => Err(Error::Config(format!(
            "{}: this server's datastore is on object storage, {r} (recorded in {}); give --datastore-url {r}",
            opts.data_dir.display(),
            file.display()
        ))),
        (Some(r), Some(g)) if r != g => Err(Error::Config(format!(
            "{}: this server's catalog describes the datastore {r}, not {g}; to move to {g}, remove {} and run --rebuild-catalog",
            opts.data_dir.display(),
            file.display()
        ))),
        _ => Ok(()),
    }
}

/// Records the URL (once the lease is held), written whole under a temporary name.
fn record_url(opts: &ServerOptions, url: &str) -> Result<()> {
    let path = opts.data_dir.join(DATASTORE_URL_FILE);
    let tmp = opts.data_dir.join(format!(".{DATASTORE_URL_FILE}.tmp"));
    std::fs::create_dir_all(&opts.data_dir)
        .and_then(|_| std::fs::write(&tmp, format!("{url}\n")))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|err| Error::Io {
            what: format!("writing {}", path.display()),
            err,
        })
}

/// Opens (creating on first start) the datastore in its folder or on object storage.
/// On object storage the lease is taken without waiting: another server holding it
/// is an error naming that server and when its lease expires.
/// `rebuilding`: for `--rebuild-catalog`, which may pair the catalog with a new datastore.
fn open_any(opts: &ServerOptions, cfg: &config::Config, rebuilding: bool) -> Result<Opened> {
    check_recorded(opts)?;
    let folder = datastore_dir(opts, cfg);
    if opts.datastore_target.is_some()
        && !rebuilding
        && recorded_datastore_url(&opts.data_dir)?.is_none()
        && folder.join(DATASTORE_CONFIG).exists()
    {
        // The catalog describes the folder's points, which the URL does not hold.
        return Err(Error::Config(format!(
            "{}: this server's datastore is the folder {}; to use --datastore-url instead, run --rebuild-catalog with it first (the catalog then lists the URL's recovery points)",
            opts.data_dir.display(),
            folder.display()
        )));
    }
    let Some(target) = &opts.datastore_target else {
        let (ds, master) = open_datastore(&folder, cfg.encrypt_datastore)?;
        return Ok(Opened {
            ds,
            master,
            hold: None,
            location: folder.display().to_string(),
        });
    };
    let location = target.location();
    let mut o = objstore::Options::default();
    if let Some(l) = opts.lease {
        o.lease = l;
    }
    let backend = objstore::open_with(target, &o)?;
    let key_path = opts
        .datastore_key_file
        .clone()
        .unwrap_or_else(|| opts.data_dir.join("datastore.key"));
    let ds = if backend.exists(DATASTORE_CONFIG)? {
        // Whether it is encrypted decides whether the key file is used (as in a
        // folder, a stray key file beside a plain datastore is not).
        let body = backend.get(DATASTORE_CONFIG)?;
        let encrypted = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("encryption").map(|e| !e.is_null()))
            .unwrap_or(false);
        let key = encrypted.then_some(key_path.as_path());
        Datastore::open_on(backend, &location, key)?
    } else {
        // Write-once configuration: of two servers creating it at once, one wins and
        // the other fails here; neither writes anything else before the lease below.
        let so = StoreOptions {
            key_file: cfg.encrypt_datastore.then(|| key_path.clone()),
            ..StoreOptions::default()
        };
        Datastore::create_on(backend, &location, &so)?
    };
    let hold = ds.backend().hold()?;
    record_url(opts, &location)?;
    let master = if ds.keys().encrypted() {
        if let Some(w) = datastore::crypto::key_file_exposure(&key_path) {
            eprintln!("holdfast server: warning: {w}");
        }
        Some(datastore::crypto::read_key_file(&key_path)?)
    } else {
        None
    };
    Ok(Opened {
        ds,
        master,
        hold,
        location,
    })
}

/// Replaces the catalog's recovery points with what the datastore holds.
pub fn rebuild_catalog(opts: &ServerOptions) -> Result<(u64, u64)> {
    let cfg = load_config(opts)?;
    let Opened { ds, hold, .. } = open_any(opts, &cfg, true)?;
    let data_dir = &opts.data_dir;
    let cat = Catalog::open(&data_dir.join("catalog.db"))?;
    let (points, damaged) = ds.points()?;
    let rps: Vec<RecoveryPointInfo> = points.iter().map(|m| rp_info(m, None)).collect();
    cat.replace_recovery_points(&rps)?;
    cat.audit(
        utc::now(),
        "admin",
        "rebuild-catalog",
        &format!(
            "{} recovery points, {} unreadable",
            rps.len(),
            damaged.len()
        ),
    )?;
    drop(hold);
    Ok((rps.len() as u64, damaged.len() as u64))
}

/// Starts the server and runs until the process is stopped. `on_start` receives the
/// URL and fingerprint once the listener is bound.
pub fn run(opts: ServerOptions, on_start: impl FnOnce(&Started)) -> Result<()> {
    let cfg = load_config(&opts)?;
    let io = |what: String| move |err| Error::Io { what, err };
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(io(format!("creating {}", opts.data_dir.display())))?;
    let ds_dir = datastore_dir(&opts, &cfg);
    let Opened {
        mut ds,
        master,
        hold,
        location,
    } = open_any(&opts, &cfg, false)?;
    if hold.is_some() {
        eprintln!(
            "holdfast server: datastore {location} on object storage (no fixed capacity: free space is not checked); this server holds its lease"
        );
    }
    ds.backend().remove_leftovers()?;
    let cat = Catalog::open(&opts.data_dir.join("catalog.db"))?;
    if cat.users()?.is_empty() {
        eprintln!(
            "holdfast server: no console users yet; create the first with \
             `holdfast users create NAME --role admin` (the CLI uses the admin token in {}), \
             then sign in with that name and password",
            opts.data_dir.join("admin.token").display()
        );
    }
    let mut names = cfg.public_names.clone();
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    if !cfg.listen.ip().is_unspecified() {
        names.push(cfg.listen.ip().to_string());
    }
    let pki = pki::ServerPki::load_or_create(&opts.data_dir, &names)?;
    let admin_token = pki::load_or_create_admin_token(&opts.data_dir)?;
    let threads = cfg
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    ds.set_threads(threads);
    let notifier = notify::Notifier::start(&cfg)?;
    requeue_interrupted(&cat, &notifier)?;
    let tls = pki.server_config()?;
    let mut started = Started {
        url: String::new(),
        ca_fingerprint: pki.ca_fingerprint(),
        admin_token_file: opts.data_dir.join("admin.token"),
        ca_file: opts.data_dir.join("ca.pem"),
        datastore: location,
    };
    let listen = cfg.listen;
    let http = cfg.http.clone();
    let mut st = AppState::new(
        cfg,
        cat,
        state::OpenStore {
            datastore: Arc::new(ds),
            dir: ds_dir,
            master_key: master,
        },
        state::ServerKeys {
            pki,
            admin_token,
            secrets: pki::SecretStore::new(opts.data_dir.join("secrets")),
        },
        threads,
        notifier,
    );
    st.datastore_url = opts.datastore_target.as_ref().map(|t| t.location());
    let st = Arc::new(st);
    let hold = match hold {
        Some(h) => Some(watch_lease(st.clone(), h)?),
        None => None,
    };
    let on_object_storage = hold.is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io("starting the runtime".into()))?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(io(format!("listening on {listen}")))?;
        // The bound address: `--listen 127.0.0.1:0` picks a free port.
        let bound = listener.local_addr().unwrap_or(listen);
        started.url = format!("https://{}", display_addr(bound));
        st.notify.set_url(&started.url);
        on_start(&started);
        tokio::spawn(scheduler::run(st.clone()));
        let serve = tls::serve(
            listener,
            tls,
            console::router(api::router(st.clone())),
            http,
        );
        if on_object_storage {
            // SIGTERM/SIGINT release the lease, so a restart need not wait for it to
            // expire; on a folder the process just ends, as flock needs nothing more.
            tokio::select! {
                _ = serve => {}
                _ = stop_signal() => {}
            }
        } else {
            serve.await;
        }
        Ok(())
    });
    // Stopping: running jobs' datastore sessions end (they run again at the next
    // start), blocking work gets a few seconds, then the lease is deleted if nothing
    // still holds it.
    locks::lock(&st.sessions).clear();
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    if let Some(slot) = hold {
        drop(locks::lock(&slot).take());
        eprintln!(
            "holdfast server: stopped; the lease on {} is released",
            started.datastore
        );
    }
    served
}

/// Jobs that were running when the server stopped: failed, alerted, and (but
/// recoveries) queued again.
fn requeue_interrupted(cat: &Catalog, notifier: &notify::Notifier) -> Result<()> {
    let now = utc::now();
    for j in cat.fail_interrupted_jobs(now, "the server stopped while the job ran")? {
        let subject = j
            .host
            .as_deref()
            .zip(j.vm.as_deref())
            .map(|(h, v)| format!("{h}/{v}"))
            .unwrap_or_else(|| "datastore".into());
        if j.kind == protocol::JobKind::Recovery {
            // Recoveries are never rerun on their own: what they write is the
            // operator's decision. The partial files were removed by the agent.
            let vm = cat.job(j.id)?.vm.map_or(subject, |v| v.to_string());
            notifier.raise_alert(
                cat,
                now,
                protocol::Severity::Error,
                &vm,
                "recovery-failed",
                &format!(
                    "recovery job {} was interrupted by a server restart; start it again",
                    j.id
                ),
            )?;
            continue;
        }
        notifier.raise_alert(
            cat,
            now,
            protocol::Severity::Warning,
            &subject,
            "interrupted",
            &format!(
                "job {} ({}) was interrupted by a server restart; it runs again",
                j.id,
                j.kind.as_str()
            ),
        )?;
        let id = cat.add_job(
            now,
            &catalog::NewJob {
                kind: j.kind,
                datasource_id: j.datasource_id.clone(),
                trigger: format!("rerun of {} (server restart)", j.id),
                not_before: None,
                attempt: j.attempt + 1,
                rerun_of: Some(j.id),
            },
        )?;
        cat.job_log(now, id, "queued after a server restart")?;
        // A job that asked for e-mail hears of its end now.
        let key = format!("notify:{}", j.id);
        match state::job_recipients(cat, &key) {
            Ok(to) if !to.is_empty() => {
                cat.delete_setting(&key)?;
                notifier.job_finished(&cat.job(j.id)?, to);
            }
            Ok(_) => {}
            Err(e) => eprintln!("holdfast server: notify: job {}: {e}", j.id),
        }
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT; never when the handlers cannot be installed.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!(
                "holdfast server: no stop signal handler ({e}); the lease is left to expire at exit"
            );
            std::future::pending::<()>().await;
        }
    }
}

/// Watches the lease hold for the server's life. A lost lease means another server
/// took the datastore over (this one went unrenewed past the lease's expiry): every
/// write already fails with "lease lost"; the server logs it, raises an alert and
/// exits (code 3), so it neither serves a stale catalog nor competes with the new
/// holder. A supervisor restarting it gets the holder's name until that one stops.
/// Returns the slot holding the hold: emptied at a clean stop, which ends the watch.
fn watch_lease(st: Arc<AppState>, hold: Box<dyn LeaseHold>) -> Result<HoldSlot> {
    let slot: HoldSlot = Arc::new(std::sync::Mutex::new(Some(hold)));
    let watched = slot.clone();
    std::thread::Builder::new()
        .name("lease-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(500));
                let why = match locks::lock(&watched).as_ref() {
                    Some(h) => h.lost(),
                    None => return,
                };
                let Some(why) = why else { continue };
                eprintln!("holdfast server: {why}; exiting");
                let cat = st.cat();
                if let Err(e) = st.notify.raise_alert(
                    &cat,
                    utc::now(),
                    protocol::Severity::Error,
                    "datastore",
                    "lease-lost",
                    &format!("{why}; the server stopped"),
                ) {
                    eprintln!("holdfast server: raising the lease alert: {e}");
                }
                std::process::exit(3);
            }
        })
        .map_err(|err| Error::Io {
            what: "starting the lease watch".into(),
            err,
        })?;
    Ok(slot)
}

/// The server's lease hold, shared by the stop path and the watch.
type HoldSlot = Arc<std::sync::Mutex<Option<Box<dyn LeaseHold>>>>;

fn display_addr(a: std::net::SocketAddr) -> String {
    if a.ip().is_unspecified() {
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        format!("{host}:{}", a.port())
    } else {
        a.to_string()
    }
}

/// What `holdfast replica import` did.
#[derive(Debug, Clone)]
pub enum SeedImport {
    /// The seed is now this recovery point; `latest`: the VM's newest one.
    Imported {
        point: RecoveryPointInfo,
        latest: bool,
    },
    /// The seed was imported before, as this recovery point: nothing was done.
    AlreadyImported { point: RecoveryPointInfo },
}

/// How far ahead of this server's clock a seed's view time may be (clock skew between
/// the host and the server); a seed dated further ahead would stay the VM's "latest"
/// point over every backup made until then.
const SEED_CLOCK_SKEW: i64 = 300;

/// Imports a replica seed (`holdfast replica import`): replays its blobs through the
/// datastore's ingest (each verified as an agent's would be), commits the recovery
/// point, dated by the seed's view time, and records it in the catalog. Safe while the
/// server runs (the datastore's shared lock and SQLite's locking serialize with it);
/// on object storage the running server holds the lease, so stop it first.
///
/// A seed whose view is not newer than the VM's newest recovery point is refused (it
/// would become the "latest" point with older data) unless `as_older_point`: it is then
/// added as an older point, and the newest stays the latest (the base of the next
/// synchronization, what `recover` takes by default). A seed already imported is a
/// no-op ([`SeedImport::AlreadyImported`]).
pub fn replica_import(
    opts: &ServerOptions,
    seed_dir: &Path,
    as_older_point: bool,
) -> Result<SeedImport> {
    let data_dir = &opts.data_dir;
    let cfg = load_config(opts)?;
    let seed_file = seed_dir.join("seed.json");
    let text = std::fs::read(&seed_file).map_err(|err| Error::Io {
        what: format!(
            "{} (an export without it did not finish)",
            seed_file.display()
        ),
        err,
    })?;
    let seed: protocol::ReplicaSeed = serde_json::from_slice(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", seed_file.display())))?;
    if seed.format != protocol::SEED_FORMAT || !(1..=protocol::SEED_VERSION).contains(&seed.version)
    {
        return Err(Error::Config(format!(
            "{}: not a replica seed this version reads ({} v{})",
            seed_file.display(),
            seed.format,
            seed.version
        )));
    }
    // The time the point is dated by: the view's (version 2), else the only time a
    // version 1 seed has, the end of its export (later than its view).
    let (field, when) = match (&seed.viewed, seed.version) {
        (Some(v), 2..) => ("viewed", v),
        (None, 2..) => {
            return Err(Error::Config(format!(
                "{}: field \"viewed\" is missing (a version {} seed records its view time)",
                seed_file.display(),
                seed.version
            )));
        }
        (_, _) => ("created", &seed.created),
    };
    let viewed = utc::parse(when)
        .filter(|_| when.ends_with('Z'))
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: field {field:?} is {when:?}, not a UTC time YYYY-MM-DDTHH:MM:SSZ",
                seed_file.display()
            ))
        })?;
    let now = utc::now();
    if viewed > now.saturating_add(SEED_CLOCK_SKEW) {
        return Err(Error::Config(format!(
            "{}: the seed's view time {} is ahead of this server's clock ({}); check the clocks of the host and the server",
            seed_file.display(),
            utc::rfc3339(viewed),
            utc::rfc3339(now)
        )));
    }
    // On object storage this takes the lease: refused (naming the server) while the
    // server runs there.
    let Opened {
        ds, hold: _hold, ..
    } = open_any(opts, &cfg, false)?;
    let ds = Arc::new(ds);
    let cat = Catalog::open(&data_dir.join("catalog.db"))?;
    let (host, vm) = protocol::split_vm(&seed.source.name).ok_or_else(|| {
        Error::Config(format!(
            "{}: source {:?} is not HOST/VM",
            seed_file.display(),
            seed.source.name
        ))
    })?;
    let source = cat.datasource_by_name(host, vm)?;
    if source.id != seed.source.id {
        return Err(Error::Config(format!(
            "{}: the seed was made for data source {} but {} is now {}",
            seed_file.display(),
            seed.source.id,
            source.name,
            source.id
        )));
    }
    let points = cat.recovery_points(Some(&source.id))?;
    // The same seed again: a point of this VM with its view time and its disks.
    for p in points.iter().filter(|p| p.created_unix == viewed) {
        let m = ds.point(&p.id)?;
        let same = m.disks.len() == seed.disks.len()
            && m.disks.iter().zip(&seed.disks).all(|(a, b)| {
                a.virtual_size == b.virtual_size && a.pieces == b.pieces && a.name == b.name
            });
        if same {
            return Ok(SeedImport::AlreadyImported { point: p.clone() });
        }
    }
    let placed = |points: &[RecoveryPointInfo]| -> Result<bool> {
        let by_view = field == "viewed";
        seed_place(&seed_file, &seed, (viewed, by_view), points, as_older_point)
    };
    placed(&points)?;
    let ingest = ds.begin_ingest(seed.source.clone().into())?;
    for name in &seed.blob_files {
        if name.contains('/') || name.contains("..") {
            return Err(Error::Config(format!(
                "{}: blob file name {name:?} is not a plain file name",
                seed_file.display()
            )));
        }
        let path = seed_dir.join(name);
        let batch = std::fs::read(&path).map_err(|err| Error::Io {
            what: path.display().to_string(),
            err,
        })?;
        ingest.put(&batch)?;
    }
    // Again, just before the commit: a backup may have ended while the blobs were read.
    let latest = placed(&cat.recovery_points(Some(&source.id))?)?;
    let disks = seed.disks.into_iter().map(Into::into).collect();
    let m = ingest.commit_dated(
        seed.consistency.into(),
        None,
        disks,
        seed.stats.into(),
        (viewed, 0),
    )?;
    let rp = rp_info(&m, None);
    cat.add_recovery_point(&rp)?;
    // Only a newest point says anything about the replica as it is now.
    if latest {
        cat.set_replica_state(&source.id, protocol::ReplicaState::Ok)?;
    }
    cat.audit(
        utc::now(),
        "admin",
        "replica import",
        &format!(
            "{} recovery point {} (view of {}{})",
            source.name,
            m.id,
            m.created,
            if latest { "" } else { ", an older point" }
        ),
    )?;
    Ok(SeedImport::Imported { point: rp, latest })
}

/// Where a seed dated `viewed` (`by_view`: its view time, not a version 1 seed's export
/// time) goes among the VM's `points`: `Ok(true)` the newest, `Ok(false)` an older
/// point (only with `as_older_point`); else why it is refused.
fn seed_place(
    seed_file: &Path,
    seed: &protocol::ReplicaSeed,
    (viewed, by_view): (i64, bool),
    points: &[RecoveryPointInfo],
    as_older_point: bool,
) -> Result<bool> {
    let Some(newest) = points
        .iter()
        .max_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)))
    else {
        return Ok(true);
    };
    if !by_view {
        return Err(Error::Config(format!(
            "{}: a version 1 seed records no view time, so it can only be the first recovery point of {}, which already has {} (newest {} of {}); export the VM again with this version",
            seed_file.display(),
            seed.source.name,
            points.len(),
            newest.id,
            newest.created
        )));
    }
    let seen = utc::rfc3339(viewed);
    if viewed > newest.created_unix {
        return Ok(true);
    }
    if viewed == newest.created_unix {
        return Err(Error::Config(format!(
            "{}: the seed's view of {} ({seen}) is as old as its newest recovery point {} ({}): neither can be ordered before the other",
            seed_file.display(),
            seed.source.name,
            newest.id,
            newest.created
        )));
    }
    if !as_older_point {
        return Err(Error::Config(format!(
            "{}: the seed's view of {} ({seen}) is older than its newest recovery point {} ({}); importing it as the latest point would roll the VM back. Give --as-older-point to add it as an older point",
            seed_file.display(),
            seed.source.name,
            newest.id,
            newest.created
        )));
    }
    Ok(false)
}
