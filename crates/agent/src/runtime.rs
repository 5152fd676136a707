//! The agent's loop: enroll, report the inventory, long-poll for jobs, run each job on
//! its own thread (bounded), report progress, commit or fail.

use crate::provider::{Instance, Provider, View};
use crate::recover::Recovered;
use crate::remote::{RETRY_BUDGET, RemoteTarget, Transport, retry};
use crate::{Error, Result};
use client::{Auth, Client};
use datastore::crypto::Keys;
use datastore::{BlockParams, DiskInput, backup_disks};
use pki::AgentIdentity;
use protocol::{
    AgentJob, Commit, CommitResponse, EnrollRequest, EnrollResponse, Failure, Inventory,
    JobProgress, JobProgressReply, PollResponse, SessionStart, VmInfo,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the agent runs.
pub struct AgentOptions {
    /// `https://HOST:PORT` of the server.
    pub server: String,
    /// Where the agent's key, certificate and pinned CA live.
    pub data_dir: PathBuf,
    /// Enrolls with this token first when the agent is not enrolled yet.
    pub enroll_token: Option<String>,
    pub providers: Vec<Box<dyn Provider>>,
    /// Worker threads of each backup pipeline.
    pub threads: usize,
    /// Jobs run at once (default 2).
    pub max_jobs: usize,
    /// How often the inventory is sent (default 60 s).
    pub inventory_every: Duration,
    /// Leave page, hibernation and swap files out of backups (found on each view's NTFS
    /// volumes and Linux swap partitions; stored as zeros). Default on.
    pub skip_page_files: bool,
    /// Most bytes per second a backup reads from the host's disks, KiB (None: no
    /// limit): spares the host's storage.
    pub read_limit_kbps: Option<u64>,
}

impl AgentOptions {
    /// Options with the defaults: no token, [`default_threads`] pipeline threads, 2 jobs
    /// at once, inventory every minute.
    pub fn new(
        server: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        providers: Vec<Box<dyn Provider>>,
    ) -> AgentOptions {
        AgentOptions {
            server: server.into(),
            data_dir: data_dir.into(),
            enroll_token: None,
            providers,
            threads: default_threads(),
            max_jobs: 2,
            inventory_every: Duration::from_secs(60),
            skip_page_files: true,
            read_limit_kbps: None,
        }
    }
}

/// Pipeline workers per backup: one per core plus four, because each worker waits a
/// network round trip per segment (asking which blocks the server lacks) and the
/// extra ones keep the cores busy meanwhile. Measured with the 4 GiB benchmark image,
/// the agent on one core and the server on another: 6.6 s with one worker, 5.6 s with
/// three, 5.4 s with six.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) + 4
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("holdfast agent: {msg}");
}

/// Enrolls this agent with `token` (`hf1.<ca-fingerprint>.<secret>`): keeps or makes the
/// key in `data_dir`, sends the public key only to the server whose CA the token pins,
/// and stores the certificate it returns. Enrolling again replaces the certificate.
/// Returns the host name the server knows this agent by.
pub fn enroll(server: &str, data_dir: &Path, token: &str) -> Result<String> {
    let (ca_fp, secret) = pki::parse_token(token)?;
    let public_key_pem = AgentIdentity::prepare(data_dir)?;
    let resp = send_enrollment(server, &ca_fp, token, public_key_pem)?;
    AgentIdentity::store(data_dir, &resp.certificate_pem, &resp.ca_pem)?;
    AgentIdentity::record_token(data_dir, &pki::secret_hash(&secret))?;
    Ok(resp.host)
}

/// Enrolls an agent that already has an identity again, with a new key: the key,
/// certificate and CA in `data_dir` are replaced together, and only once the server
/// has accepted the enrollment (until then the current identity stays as it is).
/// `Ok(None)` when `token` is the one the identity was enrolled with (a service that
/// keeps `--enroll TOKEN` on its command line restarts without enrolling again).
pub fn reenroll(server: &str, data_dir: &Path, token: &str) -> Result<Option<String>> {
    let (ca_fp, secret) = pki::parse_token(token)?;
    let hash = pki::secret_hash(&secret);
    if AgentIdentity::enrolled_with(data_dir, &hash) {
        return Ok(None);
    }
    let key = pki::PendingKey::generate()?;
    let resp = send_enrollment(server, &ca_fp, token, key.public_key_pem())?;
    AgentIdentity::replace(data_dir, &key, &resp.certificate_pem, &resp.ca_pem)?;
    AgentIdentity::record_token(data_dir, &hash)?;
    Ok(Some(resp.host))
}

/// `POST /enroll` to the server whose CA the token pins.
fn send_enrollment(
    server: &str,
    ca_fp: &str,
    token: &str,
    public_key_pem: String,
) -> Result<EnrollResponse> {
    let http = Client::new(server, pki::pinned_ca_config(ca_fp)?, Auth::None)?;
    let req = EnrollRequest {
        token: token.trim().to_string(),
        public_key_pem,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    Ok(http.post("/enroll", &req)?)
}

/// Whether a server call was refused because of who this agent is.
fn forbidden(e: &client::Error) -> bool {
    e.status() == Some(403)
}

fn client_status(e: &Error) -> Option<u16> {
    match e {
        Error::Client(c) => c.status(),
        _ => None,
    }
}

/// Sleeps `d`, waking early when `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

/// What every job thread shares.
struct Shared {
    client: Client,
    transport: Arc<dyn Transport>,
    providers: Vec<Box<dyn Provider>>,
    /// VM name → index of the provider that listed it, from the last inventory.
    owners: Mutex<HashMap<String, usize>>,
    threads: usize,
    skip_page_files: bool,
    read_limit_kbps: Option<u64>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    /// Every provider's VMs. Fails if any provider fails: a partial inventory would
    /// tell the server that VMs vanished.
    fn collect_inventory(&self) -> Result<Vec<VmInfo>> {
        let mut owners = HashMap::new();
        let mut vms = Vec::new();
        for (i, p) in self.providers.iter().enumerate() {
            for vm in p.inventory()? {
                if owners.contains_key(&vm.name) {
                    log(format_args!(
                        "provider {}: VM {} is also listed by another provider; ignored",
                        p.name(),
                        vm.name
                    ));
                    continue;
                }
                owners.insert(vm.name.clone(), i);
                vms.push(vm);
            }
        }
        *locks::lock(&self.owners) = owners;
        Ok(vms)
    }

    fn send_inventory(&self) -> Result<()> {
        let vms = self.collect_inventory()?;
        self.client
            .post_ok("/agent/inventory", &Inventory { vms })?;
        Ok(())
    }

    fn provider_for(&self, vm: &str) -> Result<&dyn Provider> {
        let known = |s: &Shared| locks::lock(&s.owners).get(vm).copied();
        let i = match known(self) {
            Some(i) => Some(i),
            None => {
                // The VM may be newer than the last inventory.
                self.collect_inventory()?;
                known(self)
            }
        };
        i.and_then(|i| self.providers.get(i))
            .map(|p| p.as_ref())
            .ok_or_else(|| Error::VmMissing(vm.to_string()))
    }
}

/// Runs the agent until `stop` is set: enrolls first if needed (and a token is given),
/// sends the inventory at start and every `inventory_every`, long-polls for jobs and
/// runs up to `max_jobs` at once. When `stop` is set, running jobs are cancelled
/// (reported as cancelled) and waited for. Returns an error when the agent cannot run
/// at all: not enrolled, bad identity, or revoked.
pub fn run(opts: AgentOptions, stop: Arc<AtomicBool>) -> Result<()> {
    if !AgentIdentity::enrolled(&opts.data_dir) {
        let Some(token) = &opts.enroll_token else {
            return Err(Error::Invalid(format!(
                "this agent is not enrolled ({} holds no certificate); enroll it with a token from `holdfast agent-token create --host HOST` (agent --enroll TOKEN)",
                opts.data_dir.display()
            )));
        };
        let host = enroll(&opts.server, &opts.data_dir, token)?;
        log(format_args!("enrolled as host {host}"));
    } else if let Some(token) = &opts.enroll_token {
        // Enrolled already: a new token enrolls again (a revoked or expiring
        // certificate is replaced). A refused one leaves the current identity, which
        // the server then accepts or refuses as before.
        match reenroll(&opts.server, &opts.data_dir, token) {
            Ok(Some(host)) => log(format_args!(
                "enrolled again as host {host}: new key and certificate in {}",
                opts.data_dir.display()
            )),
            Ok(None) => {}
            Err(e @ (Error::Identity(_) | Error::Invalid(_))) => return Err(e),
            Err(e) => log(format_args!(
                "--enroll: enrolling again failed ({e}); keeping the current certificate"
            )),
        }
    }
    let identity = AgentIdentity::load(&opts.data_dir)?;
    let client = Client::new(&opts.server, identity.client_config()?, Auth::ClientCert)?;
    let shared = Arc::new(Shared {
        transport: Arc::new(client.clone()),
        client,
        providers: opts.providers,
        owners: Mutex::new(HashMap::new()),
        threads: opts.threads.max(1),
        skip_page_files: opts.skip_page_files,
        read_limit_kbps: opts.read_limit_kbps,
        stop: stop.clone(),
    });
    let max_jobs = opts.max_jobs.max(1);
    let mut jobs: Vec<(JoinHandle<()>, Arc<AtomicBool>)> = Vec::new();
    // The inventory runs on its own thread: a VM whose QEMU stops answering costs the
    // inventory its deadline, never the polls that hand out other VMs' jobs.
    let revoked = Arc::new(AtomicBool::new(false));
    let inv_stop = Arc::new(AtomicBool::new(false));
    let inventory = {
        let (shared, revoked, inv_stop) = (shared.clone(), revoked.clone(), inv_stop.clone());
        let every = opts.inventory_every;
        std::thread::spawn(move || inventory_loop(&shared, every, &inv_stop, &revoked))
    };
    let mut backoff = Duration::from_secs(1);
    let outcome = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        if revoked.load(Ordering::Relaxed) {
            break Err(Error::Revoked);
        }
        jobs.retain(|(h, _)| !h.is_finished());
        if jobs.len() >= max_jobs {
            sleep_unless(&stop, Duration::from_millis(200));
            continue;
        }
        match shared
            .client
            .post::<_, PollResponse>("/agent/poll", &serde_json::json!({}))
        {
            Ok(PollResponse { job }) => {
                backoff = Duration::from_secs(1);
                if let Some(job) = job {
                    let cancel = Arc::new(AtomicBool::new(false));
                    let (s, c) = (shared.clone(), cancel.clone());
                    jobs.push((std::thread::spawn(move || run_job(&s, job, c)), cancel));
                }
            }
            Err(e) if forbidden(&e) => break Err(Error::Revoked),
            Err(e) => {
                log(format_args!(
                    "poll: {e}; retrying in {}s",
                    backoff.as_secs()
                ));
                sleep_unless(&stop, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    inv_stop.store(true, Ordering::Relaxed);
    for (_, cancel) in &jobs {
        cancel.store(true, Ordering::Relaxed);
    }
    for (h, _) in jobs {
        let _ = h.join();
    }
    let _ = inventory.join();
    outcome
}

/// Sends the inventory at once and then every `every` (sooner again after a failure)
/// until `stop`; sets `revoked` and ends when the server refuses this agent.
fn inventory_loop(shared: &Shared, every: Duration, stop: &AtomicBool, revoked: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) && !shared.stop.load(Ordering::Relaxed) {
        let wait = match shared.send_inventory() {
            Ok(()) => every,
            Err(Error::Client(e)) if forbidden(&e) => {
                revoked.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                log(format_args!("inventory: {e}"));
                every.min(Duration::from_secs(10))
            }
        };
        let end = Instant::now() + wait;
        while Instant::now() < end
            && !stop.load(Ordering::Relaxed)
            && !shared.stop.load(Ordering::Relaxed)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What a job reports while running.
#[derive(Default)]
struct Counters {
    done: AtomicU64,
    total: AtomicU64,
    read: AtomicU64,
    /// What the job is doing now (sent with progress: the server's watchdog names it
    /// when a job stalls).
    step: Mutex<Option<String>>,
    /// Ends the progress reports.
    finished: AtomicBool,
}

impl Counters {
    fn set_step(&self, step: impl Into<String>) {
        *locks::lock(&self.step) = Some(step.into());
    }

    fn step(&self) -> Option<String> {
        locks::lock(&self.step).clone()
    }
}

/// Runs one job to its end and tells the server how it ended.
fn run_job(shared: &Shared, job: AgentJob, cancel: Arc<AtomicBool>) {
    let label = format!("job {} ({} {})", job.job_id, job.kind.as_str(), job.vm);
    log(format_args!("{label}: started"));
    let prefix = format!("/agent/jobs/{}", job.job_id);
    let outcome = if job.kind == protocol::JobKind::Recovery {
        recovery_job(shared, &job, &prefix, &label, &cancel)
    } else {
        job_inner(shared, &job, &prefix, &label, &cancel)
    };
    match outcome {
        Ok(what) => log(format_args!("{label}: {what}")),
        // 409: the job ended on the server meanwhile (cancelled, or failed by the
        // watchdog): there is nothing left to report.
        Err(e) if matches!(client_status(&e), Some(403 | 404 | 409)) => {
            log(format_args!(
                "{label}: the server no longer accepts this job ({e}); dropping it"
            ));
        }
        Err(e) => {
            log(format_args!("{label}: failed: {e}"));
            let body = Failure {
                error: e.to_string(),
                kind: e.kind().to_string(),
            };
            let never = || false;
            let path = format!("{prefix}/fail");
            if let Err(e) = retry(RETRY_BUDGET, never, || shared.client.post_ok(&path, &body)) {
                log(format_args!("{label}: reporting the failure: {e}"));
            }
        }
    }
}

/// The datastore parameters of a session, checked (they come from the network).
pub(crate) fn block_params(start: &SessionStart) -> Result<BlockParams> {
    let keys = keys_from(start.master_key.as_deref(), "session")?;
    let p = BlockParams {
        block_size: start.block_size,
        piece_blocks: start.piece_blocks,
        zstd_level: start.zstd_level,
        keys,
    };
    p.check()
        .map_err(|e| Error::Server(format!("session parameters: {e}")))?;
    Ok(p)
}

/// The keys of a session or recovery (`what`) from the master key the server sent
/// (none for an unencrypted datastore).
fn keys_from(master_key: Option<&str>, what: &str) -> Result<Keys> {
    let Some(hex) = master_key else {
        return Ok(Keys::plain());
    };
    let key = decode_key(hex)
        .ok_or_else(|| Error::Server(format!("the {what}'s master key is not 64 hex digits")))?;
    Keys::from_master(&key).map_err(Error::Backup)
}

pub(crate) fn decode_key(hex: &str) -> Option<[u8; 32]> {
    let b = hex.trim().as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let s = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn job_inner(
    shared: &Shared,
    job: &AgentJob,
    prefix: &str,
    label: &str,
    cancel: &Arc<AtomicBool>,
) -> Result<String> {
    if !job.kind.on_agent() {
        return Err(Error::Invalid(format!(
            "job kind {} does not run on an agent",
            job.kind.as_str()
        )));
    }
    let never = || false;
    let path = format!("{prefix}/start");
    let start: SessionStart = retry(RETRY_BUDGET, never, || {
        shared.client.post(&path, &serde_json::json!({}))
    })?;
    let params = block_params(&start)?;
    let provider = shared.provider_for(&job.vm)?;
    let remote = RemoteTarget::new(shared.transport.clone(), job.job_id, params, cancel.clone());
    let counters = Counters::default();
    let sent = remote.sent_counter();
    let lost: Mutex<Option<client::Error>> = Mutex::new(None);
    // Progress (and the server's cancel) flow for the whole job, from the view to its
    // release, so that a job stuck in any step is seen and can be stopped.
    let result = std::thread::scope(|s| {
        s.spawn(|| report_progress(shared, prefix, label, &counters, &sent, cancel, &lost));
        let r = backup_job(
            shared, job, prefix, label, &start, provider, &remote, &counters, cancel,
        );
        counters.finished.store(true, Ordering::Relaxed);
        r
    });
    match result {
        Ok(rp) => Ok(rp),
        Err(e) => {
            if let Some(l) = lock_take(&lost) {
                return Err(Error::Client(l));
            }
            Err(e)
        }
    }
}

/// A backup job from the view to its release; the view is released (with failure)
/// on every error path.
#[allow(clippy::too_many_arguments)]
fn backup_job(
    shared: &Shared,
    job: &AgentJob,
    prefix: &str,
    label: &str,
    start: &SessionStart,
    provider: &dyn Provider,
    remote: &RemoteTarget,
    counters: &Counters,
    cancel: &Arc<AtomicBool>,
) -> Result<String> {
    counters.set_step("taking the point-in-time view");
    let t0 = Instant::now();
    let snap = provider.open_view(&job.vm, job.kind, start.base.as_ref())?;
    let t_view = t0.elapsed();
    let consistency = snap.consistency();
    let mut notes = snap.notes();
    let special = if shared.skip_page_files {
        counters.set_step("looking for page and swap files");
        page_files(snap.as_ref(), &mut notes)
    } else {
        Vec::new()
    };
    let fail = |snap: Box<dyn View>, e: Error| {
        counters.set_step("releasing the view after a failure");
        if let Err(re) = snap.release(false) {
            log(format_args!("{label}: releasing the view: {re}"));
        }
        Err(e)
    };
    if cancel.load(Ordering::Relaxed) {
        return fail(snap, cancelled(shared, "by the server"));
    }
    snap.start_reading(cancel);
    let result = backup(
        shared,
        start,
        snap.as_ref(),
        &special,
        remote,
        counters,
        cancel,
    );
    let t_read = t0.elapsed();
    let (disks, stats) = match result {
        Ok(r) => r,
        Err(e) => return fail(snap, e),
    };
    let commit = Commit {
        consistency,
        base: start.base.as_ref().map(|b| b.id.clone()),
        disks,
        stats,
        notes,
    };
    // The server works from here; once the commit answers the job has ended there,
    // and a progress report would only be refused.
    counters.finished.store(true, Ordering::Relaxed);
    let path = format!("{prefix}/commit");
    // The view is released only once the server has the recovery point: a commit that
    // is refused (a late cancel) or lost counts as a failed backup, so a tracking
    // provider keeps every change for the next one.
    match retry(
        RETRY_BUDGET,
        || false,
        || shared.client.post::<_, CommitResponse>(&path, &commit),
    ) {
        Ok(resp) => {
            let t_commit = t0.elapsed();
            counters.set_step("releasing the view");
            snap.release(true)?;
            log(format_args!(
                "{label}: view in {} ms, backup in {} ms, commit in {} ms, release in {} ms",
                t_view.as_millis(),
                (t_read - t_view).as_millis(),
                (t_commit - t_read).as_millis(),
                (t0.elapsed() - t_commit).as_millis()
            ));
            Ok(format!("recovery point {}", resp.recovery_point))
        }
        Err(e) => fail(snap, e.into()),
    }
}

/// The error of a job cancelled by the server, or by the agent stopping.
fn cancelled(shared: &Shared, by_server: &str) -> Error {
    Error::Cancelled(if shared.stop.load(Ordering::Relaxed) {
        "the agent is stopping".into()
    } else {
        by_server.to_string()
    })
}

/// Runs a recovery job: writes the plan's disks, reporting progress, then tells the
/// server. Returns a summary for the log.
fn recovery_job(
    shared: &Shared,
    job: &AgentJob,
    prefix: &str,
    label: &str,
    cancel: &Arc<AtomicBool>,
) -> Result<String> {
    let plan = job
        .recovery
        .as_ref()
        .ok_or_else(|| Error::Server("a recovery job without a recovery plan".into()))?;
    let keys = keys_from(plan.master_key.as_deref(), "recovery")?;
    // Over the original instance: the provider's hook (disk files, stop, start) and
    // the flow in crate::original; every other target writes new files (recover.rs).
    let provider = match plan.target {
        protocol::RecoveryTarget::Original { .. } => Some(shared.provider_for(&job.vm)?),
        _ => None,
    };
    let mut instance = match &provider {
        Some(p) => Some(p.instance(&job.vm)?),
        None => None,
    };
    let fetch = crate::fetch::Fetch {
        transport: shared.transport.clone(),
        prefix: prefix.to_string(),
        keys,
        cancel: cancel.clone(),
        throttle: crate::fetch::Throttle::for_plan(
            plan.throttle_kbps,
            plan.throttle_schedule.as_ref(),
        ),
        fetched: AtomicU64::new(0),
        budget: RETRY_BUDGET,
    };
    let counters = Counters::default();
    // The job log's rates are measured over this (the server's job times are whole
    // seconds).
    let began = Instant::now();
    let run = RecoveryRun {
        shared,
        job,
        plan,
        fetch: &fetch,
        prefix,
        label,
        cancel,
        counters: &counters,
    };
    let out = run.write(instance.as_deref_mut())?;
    run.report_done(&out, began)
}

/// One recovery job's parts, shared by its phases.
struct RecoveryRun<'a> {
    shared: &'a Shared,
    job: &'a AgentJob,
    plan: &'a protocol::RecoveryPlan,
    fetch: &'a crate::fetch::Fetch,
    prefix: &'a str,
    label: &'a str,
    cancel: &'a Arc<AtomicBool>,
    counters: &'a Counters,
}

impl RecoveryRun<'_> {
    /// Writes the recovery (over `instance` when it is one over the original), with
    /// progress reports on a thread of their own until it ends.
    fn write(&self, instance: Option<&mut (dyn Instance + '_)>) -> Result<Recovered> {
        let (shared, cancel, counters, fetch) =
            (self.shared, self.cancel, self.counters, self.fetch);
        let lost: Mutex<Option<client::Error>> = Mutex::new(None);
        let sent = AtomicU64::new(0);
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                report_progress(
                    shared,
                    self.prefix,
                    self.label,
                    counters,
                    &sent,
                    cancel,
                    &lost,
                )
            });
            let progress = |done, total| {
                counters.done.store(done, Ordering::Relaxed);
                counters.total.store(total, Ordering::Relaxed);
                counters
                    .read
                    .store(fetch.fetched.load(Ordering::Relaxed), Ordering::Relaxed);
                if shared.stop.load(Ordering::Relaxed) {
                    cancel.store(true, Ordering::Relaxed);
                }
            };
            let r = match instance {
                Some(inst) => crate::original::recover(
                    fetch,
                    self.plan,
                    &self.job.vm,
                    inst,
                    &mut |d, t| progress(d, t),
                    &mut |msg: &str| self.note(msg),
                )
                .map(|files| Recovered {
                    files,
                    notes: Vec::new(),
                }),
                None => crate::recover::recover(
                    fetch,
                    self.plan,
                    self.job.job_id,
                    &self.job.vm,
                    &progress,
                ),
            };
            counters.finished.store(true, Ordering::Relaxed);
            r
        });
        if let Some(l) = lock_take(&lost) {
            return Err(Error::Client(l));
        }
        match result {
            Ok(f) => Ok(f),
            Err(e) if cancel.load(Ordering::Relaxed) => {
                Err(Error::Cancelled(if shared.stop.load(Ordering::Relaxed) {
                    "the agent is stopping".into()
                } else {
                    format!("by the server ({e})")
                }))
            }
            Err(e) => Err(e),
        }
    }

    /// A job-log line of a recovery over the original, sent as a progress message.
    fn note(&self, msg: &str) {
        let (label, counters) = (self.label, self.counters);
        log(format_args!("{label}: {msg}"));
        let p = JobProgress {
            bytes_done: counters.done.load(Ordering::Relaxed),
            bytes_total: counters.total.load(Ordering::Relaxed),
            bytes_read: self.fetch.fetched.load(Ordering::Relaxed),
            bytes_sent: 0,
            message: Some(msg.to_string()),
            step: None,
        };
        let path = format!("{}/progress", self.prefix);
        match retry(
            RETRY_BUDGET,
            || false,
            || self.shared.client.post::<_, JobProgressReply>(&path, &p),
        ) {
            // Honoured where the flow still can (before the VM stops).
            Ok(r) if r.cancel => self.cancel.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => log(format_args!("{label}: reporting {msg:?}: {e}")),
        }
    }

    /// The final figures and the server's `recovered` call; returns the log summary.
    fn report_done(&self, out: &Recovered, began: Instant) -> Result<String> {
        let (shared, prefix, counters, fetch) =
            (self.shared, self.prefix, self.counters, self.fetch);
        let elapsed_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Item copies count the bytes copied with no total known in advance.
        let total = counters
            .total
            .load(Ordering::Relaxed)
            .max(counters.done.load(Ordering::Relaxed));
        let bytes_fetched = fetch.fetched.load(Ordering::Relaxed);
        // Final figures (a short job may end before its first progress report).
        let p = JobProgress {
            bytes_done: total,
            bytes_total: total,
            bytes_read: bytes_fetched,
            bytes_sent: 0,
            message: None,
            step: None,
        };
        let path = format!("{prefix}/progress");
        let _ = shared.client.post::<_, JobProgressReply>(&path, &p);
        let done = protocol::RecoveryDone {
            files: out.files.iter().map(|f| f.display().to_string()).collect(),
            bytes_fetched,
            bytes_written: Some(total),
            elapsed_ms: Some(elapsed_ms),
            notes: out.notes.clone(),
        };
        let path = format!("{prefix}/recovered");
        retry(
            RETRY_BUDGET,
            || false,
            || shared.client.post_ok(&path, &done),
        )?;
        Ok(match out.notes.first() {
            Some(n) => n.clone(),
            None => format!("recovered {} file(s)", out.files.len()),
        })
    }
}

fn lock_take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    locks::lock(m).take()
}

/// Page, hibernation and swap files of each disk of the view (disk byte ranges), with
/// a job-log note for each; a disk that cannot be examined is backed up whole, noted.
fn page_files(snap: &dyn View, notes: &mut Vec<protocol::Note>) -> Vec<Vec<(u64, u64)>> {
    snap.disks()
        .iter()
        .enumerate()
        .map(
            |(i, d)| match fsview::scoped(d.disk, fsview::page_and_swap) {
                Ok(s) => {
                    for f in &s.found {
                        notes.push(protocol::Note::info(format!(
                            "disk {i}: {f} left out (restored as zeros)"
                        )));
                    }
                    for p in &s.problems {
                        notes.push(protocol::Note::info(format!(
                            "disk {i}: page files not looked for: {p}"
                        )));
                    }
                    let total: u64 = s.ranges.iter().map(|r| r.1).sum();
                    if total > 0 {
                        notes.push(protocol::Note::info(format!(
                            "disk {i}: {total} bytes ({:.1} MiB) of page, hibernation and swap files left out",
                            total as f64 / 1048576.0
                        )));
                    }
                    s.ranges
                }
                Err(e) => {
                    notes.push(protocol::Note::info(format!(
                        "disk {i}: page files not looked for: {e}"
                    )));
                    Vec::new()
                }
            },
        )
        .collect()
}

/// The union of two lists of sorted, disjoint `(offset, length)` ranges: sorted,
/// disjoint, touching ranges joined.
fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (o, l) in all {
        let end = o.saturating_add(l);
        match out.last_mut() {
            Some(last) if o <= last.0.saturating_add(last.1) => {
                last.1 = end.max(last.0.saturating_add(last.1)) - last.0;
            }
            _ => out.push((o, l)),
        }
    }
    out
}

/// The parts of sorted, disjoint ranges `a` outside sorted, disjoint ranges `b`.
fn difference(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(o, l) in a {
        let end = o.saturating_add(l);
        let mut at = o;
        // Ranges of `b` ending at or before `at` can't cut this or later ranges.
        while j < b.len() && b[j].0.saturating_add(b[j].1) <= at {
            j += 1;
        }
        let mut k = j;
        while at < end && k < b.len() && b[k].0 < end {
            let (bo, be) = (b[k].0, b[k].0.saturating_add(b[k].1));
            if bo > at {
                out.push((at, bo - at));
            }
            at = at.max(be);
            k += 1;
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    out
}

/// A disk that counts the bytes read through it (for progress reports).
#[derive(Debug)]
struct Counting<'a> {
    inner: &'a dyn vdisk::VirtualDisk,
    read: &'a AtomicU64,
    limit: Option<&'a crate::fetch::Throttle>,
    cancel: &'a AtomicBool,
}

impl vdisk::VirtualDisk for Counting<'_> {
    fn info(&self) -> vdisk::DiskInfo {
        self.inner.info()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        if let Some(t) = self.limit {
            t.take(buf.len() as u64, self.cancel);
        }
        self.inner.read_at(buf, offset)?;
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn map(&self, offset: u64, length: u64) -> vdisk::Result<Vec<vdisk::Extent>> {
        self.inner.map(offset, length)
    }
}

/// Reads the view's disks through the datastore pipeline into `remote`.
fn backup(
    shared: &Shared,
    start: &SessionStart,
    snap: &dyn View,
    special: &[Vec<(u64, u64)>],
    remote: &RemoteTarget,
    counters: &Counters,
    cancel: &Arc<AtomicBool>,
) -> Result<(Vec<protocol::DiskRecord>, protocol::Stats)> {
    let disks = snap.disks();
    // One bucket for all disks of the job.
    let limit = shared.read_limit_kbps.and_then(crate::fetch::Throttle::new);
    let counting: Vec<Counting> = disks
        .iter()
        .map(|d| Counting {
            inner: d.disk,
            read: &counters.read,
            limit: limit.as_ref(),
            cancel,
        })
        .collect();
    let inputs: Vec<DiskInput> = disks
        .iter()
        .zip(&counting)
        .enumerate()
        .map(|(i, (d, c))| {
            // The data source's exclusions (set on the server) win over the
            // provider's; page files found in this very view are added to them.
            let excluded = union(
                start
                    .excluded
                    .get(i)
                    .filter(|e| !e.is_empty())
                    .unwrap_or(&d.excluded),
                special.get(i).map(Vec::as_slice).unwrap_or_default(),
            );
            // Ranges the base left out and this view does not are read again: an
            // exclusion lifted since then must not leave the base's zeros in place.
            let changed = d.changed.as_ref().map(|ch| {
                let base_excl = start
                    .base
                    .as_ref()
                    .and_then(|b| b.disks.get(i))
                    .map(|r| r.excluded.as_slice())
                    .unwrap_or_default();
                union(ch, &difference(base_excl, &excluded))
            });
            DiskInput {
                disk: c,
                name: d.name.clone(),
                format: d.format.clone(),
                changed,
                excluded,
            }
        })
        .collect();
    // The base matters to the pipeline only for changed ranges (reusing its index).
    let base: Option<datastore::Manifest> = if inputs.iter().any(|d| d.changed.is_some()) {
        start.base.clone().map(Into::into)
    } else {
        None
    };
    // Where each disk ends in the job's bytes, to name the disk being read.
    let ends: Vec<u64> = inputs
        .iter()
        .scan(0u64, |end, d| {
            *end = end.saturating_add(d.disk.virtual_size());
            Some(*end)
        })
        .collect();
    // Named before the first byte arrives: a first read that never ends must still
    // say which disk it was on.
    let mut reading = 0;
    if let Some(d) = inputs.first() {
        counters.set_step(format!("reading disk 0 ({})", d.name));
    }
    let r = backup_disks(
        remote,
        base.as_ref(),
        &inputs,
        shared.threads,
        &mut |done, total| {
            counters.done.store(done, Ordering::Relaxed);
            counters.total.store(total, Ordering::Relaxed);
            let i = ends
                .partition_point(|&e| e <= done)
                .min(inputs.len().saturating_sub(1));
            if i != reading {
                reading = i;
                if let Some(d) = inputs.get(i) {
                    counters.set_step(format!("reading disk {i} ({})", d.name));
                }
            }
            // The agent stopping cancels its jobs.
            if shared.stop.load(Ordering::Relaxed) {
                cancel.store(true, Ordering::Relaxed);
            }
        },
    );
    match r {
        Ok((disks, stats)) => Ok((disks.into_iter().map(Into::into).collect(), stats.into())),
        Err(e) => {
            let own = remote.take_error();
            if let Some(Error::Client(c)) = own {
                return Err(Error::Client(c));
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(cancelled(shared, &format!("by the server ({e})")));
            }
            Err(own.unwrap_or(Error::Backup(e)))
        }
    }
}

/// Posts progress about every second until `c.finished`; sets `cancel` when the server
/// says so, or when it no longer knows the job (`lost` then holds why).
#[allow(clippy::too_many_arguments)]
fn report_progress(
    shared: &Shared,
    prefix: &str,
    label: &str,
    c: &Counters,
    sent: &AtomicU64,
    cancel: &AtomicBool,
    lost: &Mutex<Option<client::Error>>,
) {
    let path = format!("{prefix}/progress");
    let mut last_error = Instant::now() - Duration::from_secs(3600);
    loop {
        let tick = Instant::now() + Duration::from_secs(1);
        while Instant::now() < tick {
            if c.finished.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let p = JobProgress {
            bytes_done: c.done.load(Ordering::Relaxed),
            bytes_total: c.total.load(Ordering::Relaxed),
            bytes_read: c.read.load(Ordering::Relaxed),
            bytes_sent: sent.load(Ordering::Relaxed),
            message: None,
            step: c.step(),
        };
        match shared.client.post::<_, JobProgressReply>(&path, &p) {
            Ok(r) if r.cancel => {
                if !cancel.swap(true, Ordering::Relaxed) {
                    log(format_args!("{label}: cancel requested by the server"));
                }
            }
            Ok(_) => {}
            // The server no longer runs the job (it ended meanwhile: 409, e.g. failed
            // by the watchdog) or no longer lets this agent report on it.
            Err(e) if matches!(e.status(), Some(403 | 404 | 409)) => {
                if !cancel.load(Ordering::Relaxed) {
                    log(format_args!(
                        "{label}: the server ended this job ({e}); stopping"
                    ));
                }
                *locks::lock(lost) = Some(e);
                cancel.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                // Progress is best effort; don't flood the log while the server is away.
                if last_error.elapsed() > Duration::from_secs(30) {
                    log(format_args!("{label}: progress: {e}"));
                    last_error = Instant::now();
                }
            }
        }
    }
}

#[cfg(test)]
mod union_tests {
    use super::union;

    #[test]
    fn union_sorts_joins_and_keeps_disjoint_ranges() {
        assert_eq!(union(&[], &[]), vec![]);
        assert_eq!(union(&[(0, 10)], &[]), vec![(0, 10)]);
        assert_eq!(
            union(&[(0, 10), (50, 5)], &[(10, 5), (30, 1), (52, 10)]),
            vec![(0, 15), (30, 1), (50, 12)]
        );
        assert_eq!(union(&[(100, 10)], &[(0, 200)]), vec![(0, 200)]);
    }

    #[test]
    fn difference_cuts_out_every_overlap() {
        use super::difference;
        assert_eq!(difference(&[], &[(0, 10)]), vec![]);
        assert_eq!(difference(&[(0, 10)], &[]), vec![(0, 10)]);
        // The same exclusion in base and view: nothing to read again.
        assert_eq!(difference(&[(5, 10)], &[(5, 10)]), vec![]);
        // A range cut at both ends, one split in two, one untouched.
        assert_eq!(
            difference(
                &[(0, 100), (200, 10), (300, 5)],
                &[(10, 20), (50, 10), (95, 110)]
            ),
            vec![(0, 10), (30, 20), (60, 35), (205, 5), (300, 5)]
        );
        // One range of `b` spanning several of `a`.
        assert_eq!(
            difference(&[(0, 5), (10, 5), (20, 5)], &[(3, 20)]),
            vec![(0, 3), (23, 2)]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Source;

    fn start(key: Option<&str>, block_size: u32) -> SessionStart {
        SessionStart {
            block_size,
            piece_blocks: 4096,
            zstd_level: 3,
            master_key: key.map(str::to_string),
            base: None,
            source: Source {
                name: "h1/vm".into(),
                id: "vm".into(),
            },
            excluded: Vec::new(),
        }
    }

    #[test]
    fn session_parameters_are_checked() {
        let p = block_params(&start(None, 65536)).unwrap();
        assert!(!p.keys.encrypted());
        let p = block_params(&start(Some(&"ab".repeat(32)), 65536)).unwrap();
        assert!(p.keys.encrypted());
        let e = block_params(&start(Some("abc"), 65536)).unwrap_err();
        assert_eq!(e.kind(), "server");
        let e = block_params(&start(Some(&"zz".repeat(32)), 65536)).unwrap_err();
        assert_eq!(e.kind(), "server");
        let e = block_params(&start(None, 1000)).unwrap_err();
        assert!(e.to_string().contains("block size 1000"), "{e}");
    }

    #[test]
    fn run_without_identity_or_token_says_so() {
        let t = tempfile::tempdir().unwrap();
        let opts = AgentOptions::new("https://127.0.0.1:1", t.path(), vec![]);
        let e = run(opts, Arc::new(AtomicBool::new(false))).unwrap_err();
        assert!(e.to_string().contains("not enrolled"), "{e}");
    }

    #[test]
    fn enroll_refuses_a_malformed_token_before_any_network() {
        let t = tempfile::tempdir().unwrap();
        let e = enroll("https://127.0.0.1:1", t.path(), "hf1.nope").unwrap_err();
        assert!(e.to_string().contains("enrollment token"), "{e}");
        // Nothing was generated for a token that could never work.
        assert!(!t.path().join("agent.key").exists());
    }

    #[test]
    fn enroll_against_no_server_fails_cleanly_and_keeps_the_key() {
        let t = tempfile::tempdir().unwrap();
        let token = format!("hf1.{}.{}", "a".repeat(64), "b".repeat(64));
        let e = enroll("https://127.0.0.1:1", t.path(), &token).unwrap_err();
        assert_eq!(e.kind(), "server");
        assert!(t.path().join("agent.key").exists());
        assert!(!AgentIdentity::enrolled(t.path()));
    }

    #[test]
    fn run_enrolls_first_when_given_a_token() {
        // A token for an unreachable server: run tries to enroll and reports why.
        let t = tempfile::tempdir().unwrap();
        let mut opts = AgentOptions::new("https://127.0.0.1:1", t.path(), vec![]);
        opts.enroll_token = Some(format!("hf1.{}.{}", "a".repeat(64), "b".repeat(64)));
        let e = run(opts, Arc::new(AtomicBool::new(true))).unwrap_err();
        assert_eq!(e.kind(), "server");
    }
}
