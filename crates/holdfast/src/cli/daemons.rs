//! `holdfast server`, `holdfast agent` and `holdfast demo`: the long-running processes,
//! and the tour that starts both on loopback.

use super::admin::ServerArgs;
use anyhow::{Context, anyhow, bail};
use clap::Args;
use client::{Auth, Client};
use protocol::*;
use std::io::{Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct ServerCmd {
    /// Folder for the catalog, datastore, CA and admin token (created on first start).
    #[arg(long)]
    data_dir: PathBuf,
    /// Address to listen on (default 0.0.0.0:8443, or `listen` in the configuration).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TOML configuration (default DATA_DIR/holdfast.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Rebuild the catalog's recovery points from the datastore, then exit.
    #[arg(long)]
    rebuild_catalog: bool,
    /// Keep the datastore on object storage: az://ACCOUNT/CONTAINER or s3://BUCKET
    /// (credentials from HOLDFAST_STORAGE_KEY_FILE, see docs/cli.md); created on
    /// first start. The server holds its lease while it runs.
    #[arg(long, value_name = "URL")]
    datastore_url: Option<PathBuf>,
    /// Key file of an encrypted datastore on object storage (default
    /// DATA_DIR/datastore.key; written there when the server creates it).
    #[arg(long, requires = "datastore_url")]
    datastore_key_file: Option<PathBuf>,
    /// Lease length on object storage, in seconds (default 60): another server can
    /// take the datastore over this long after this one stops renewing.
    #[arg(long, value_name = "SECONDS", requires = "datastore_url", value_parser = clap::value_parser!(u64).range(3..=3600))]
    lease_seconds: Option<u64>,
}

pub fn server(a: ServerCmd) -> anyhow::Result<ExitCode> {
    let datastore_target = match &a.datastore_url {
        Some(url) => Some(
            super::location::object_target(url)?
                .with_context(|| format!("--datastore-url {}: write az://ACCOUNT/CONTAINER or s3://BUCKET (a folder is `datastore` in the configuration)", url.display()))?,
        ),
        None => None,
    };
    let opts = server::ServerOptions {
        data_dir: a.data_dir,
        listen: a.listen,
        config_file: a.config,
        datastore_target,
        datastore_key_file: a.datastore_key_file,
        lease: a.lease_seconds.map(Duration::from_secs),
    };
    if a.rebuild_catalog {
        let (n, bad) = server::rebuild_catalog(&opts)?;
        println!("catalog rebuilt: {n} recovery points from the datastore ({bad} unreadable)");
        return Ok(if bad > 0 {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        });
    }
    server::run(opts, |s| {
        // A closed stdout (a supervisor that stopped reading) must not stop the server.
        let text = format!(
            "holdfast server listening on {}\n  CA fingerprint (SHA-256): {}\n  datastore:   {}\n  admin token: {}\n  CA file:     {}\nadmin CLI:\n  export HOLDFAST_SERVER={}\n  export HOLDFAST_TOKEN_FILE={}\n  export HOLDFAST_CA_FILE={}\n",
            s.url,
            s.ca_fingerprint,
            s.datastore,
            s.admin_token_file.display(),
            s.ca_file.display(),
            s.url,
            s.admin_token_file.display(),
            s.ca_file.display()
        );
        let mut out = std::io::stdout();
        let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct AgentCmd {
    /// One-time enrollment token from `holdfast agent-token create`: enrolls (first
    /// start), or enrolls again with a new key and certificate (a new token on an
    /// enrolled data dir, e.g. after a revocation).
    #[arg(long)]
    enroll: Option<String>,
    /// The agent's folder: its key, certificate and pinned CA.
    #[arg(long)]
    data_dir: PathBuf,
    /// Provider `files`: a folder whose sub-folders are VMs at rest (Hyper-V export
    /// layout or any folder of VHDX/VHD/qcow2/raw disks).
    #[arg(long)]
    files_root: Option<PathBuf>,
    /// Provider `qemu`: a folder with one QMP socket per running VM (`NAME.qmp`) and
    /// optionally its guest-agent socket (`NAME.qga`); symbolic links to sockets
    /// elsewhere work, so the folder can also serve as a list.
    #[arg(long)]
    qmp_dir: Option<PathBuf>,
    /// Provider `qemu`, one VM at a time: `NAME=QMP_SOCKET[,qga=QGA_SOCKET]` (repeat).
    #[arg(long = "qmp-socket")]
    qmp_sockets: Vec<String>,
    /// Seconds the guest agent may take to freeze the guest's file systems before the
    /// VM is paused instead.
    #[arg(long, default_value_t = 10)]
    freeze_timeout_seconds: u64,
    /// Seconds QEMU may take to answer one request (a QMP command, an NBD read) before
    /// the backup fails.
    #[arg(long, default_value_t = agent::qemu::DEFAULT_IO_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    qemu_timeout_seconds: u64,
    /// Threads hashing and compressing per job (default: cores + 4, so network round
    /// trips do not leave a core idle).
    #[arg(long)]
    threads: Option<usize>,
    /// Jobs at once on this host.
    #[arg(long, default_value_t = 2)]
    max_jobs: usize,
    /// Seconds between inventory reports.
    #[arg(long, default_value_t = 60)]
    inventory_seconds: u64,
    /// Back up page, hibernation and swap files too (by default they are found in each
    /// view's NTFS volumes and Linux swap partitions, left out and restored as zeros).
    #[arg(long)]
    keep_page_files: bool,
    /// Most KiB per second a backup reads from this host's disks (spares the host's
    /// storage; default: no limit).
    #[arg(long, value_name = "KBPS")]
    read_limit_kbps: Option<u64>,
}

pub fn agent(s: &ServerArgs, a: AgentCmd) -> anyhow::Result<ExitCode> {
    let url = s.url()?.to_string();
    let mut providers: Vec<Box<dyn agent::Provider>> = Vec::new();
    if let Some(root) = &a.files_root {
        providers.push(Box::new(agent::FilesProvider::new(root)));
    }
    if a.qmp_dir.is_some() || !a.qmp_sockets.is_empty() {
        let listed = a
            .qmp_sockets
            .iter()
            .map(|s| agent::ListedVm::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        providers.push(Box::new(agent::QemuProvider::new(agent::QemuOptions {
            sockets: a.qmp_dir.clone(),
            listed,
            freeze_timeout: Duration::from_secs(a.freeze_timeout_seconds.max(1)),
            io_timeout: Duration::from_secs(a.qemu_timeout_seconds),
            ..agent::QemuOptions::new(a.data_dir.join("qemu"))
        })?));
    }
    if providers.is_empty() {
        bail!("no provider given: use --files-root VMDIR, --qmp-dir DIR or --qmp-socket NAME=PATH");
    }
    let opts = agent::AgentOptions {
        server: url,
        data_dir: a.data_dir,
        enroll_token: a.enroll,
        providers,
        threads: a.threads.unwrap_or_else(agent::default_threads),
        max_jobs: a.max_jobs.max(1),
        inventory_every: Duration::from_secs(a.inventory_seconds.max(1)),
        skip_page_files: !a.keep_page_files,
        read_limit_kbps: a.read_limit_kbps.filter(|&k| k > 0),
    };
    agent::run(opts, Arc::new(AtomicBool::new(false)))?;
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------
// The demo

#[derive(Debug, Args)]
pub struct DemoCmd {
    /// Work here instead of a new temporary folder (kept afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the temporary folder.
    #[arg(long)]
    keep: bool,
    /// Size of each sample disk in MiB.
    #[arg(long, default_value_t = 96)]
    disk_mib: u64,
}

/// Child processes stopped when the demo ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        // Last started first: agents before the server they talk to.
        for c in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_tool(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A disk with an MBR partition table and one ext4 partition (made by mke2fs -d from
/// `files`) at 1 MiB, as a raw image.
fn make_disk(raw: &Path, fs_img: &Path, files: &Path, mib: u64) -> anyhow::Result<()> {
    let part_start = 1u64 << 20;
    let size = mib << 20;
    let part_len = size - part_start;
    run_tool(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
            .arg(files)
            .arg(fs_img)
            .arg(format!("{}k", part_len >> 10)),
    )?;
    assemble(raw, fs_img, size)
}

fn assemble(raw: &Path, fs_img: &Path, size: u64) -> anyhow::Result<()> {
    let part_start = 1u64 << 20;
    let mut mbr = [0u8; 512];
    // One Linux partition (type 0x83) from LBA 2048 to the end.
    let first = (part_start / 512) as u32;
    let count = ((size - part_start) / 512) as u32;
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&first.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&count.to_le_bytes());
    mbr[446 + 1..446 + 4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    mbr[446 + 5..446 + 8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let mut f =
        std::fs::File::create(raw).with_context(|| format!("creating {}", raw.display()))?;
    f.set_len(size)?;
    f.write_all(&mbr)?;
    f.seek(SeekFrom::Start(part_start))?;
    let mut src = std::fs::File::open(fs_img)?;
    std::io::copy(&mut src, &mut f)?;
    f.sync_all()?;
    Ok(())
}

fn sample_files(dir: &Path, vm: &str, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("etc"))?;
    std::fs::create_dir_all(dir.join("var/data"))?;
    std::fs::write(dir.join("etc/hostname"), format!("{vm}\n"))?;
    let mut x = seed | 1;
    for i in 0..6 {
        let mut data = Vec::with_capacity(3 << 20);
        // Half text, half noise: realistic compression, nothing dedups by accident.
        for j in 0..(3 << 20) / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if j % 2 == 0 {
                data.extend_from_slice(&x.to_le_bytes());
            } else {
                data.extend_from_slice(format!("{:07}\n", j % 9_999_999).as_bytes());
            }
        }
        std::fs::write(dir.join(format!("var/data/file{i}.bin")), data)?;
    }
    Ok(())
}

fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {} s waiting for {what}", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Compares two images' contents (any formats) block by block.
fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let da = vdisk::open(a)?;
    let db = vdisk::open(b)?;
    if da.virtual_size() != db.virtual_size() {
        return Ok(false);
    }
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < da.virtual_size() {
        let n = ((da.virtual_size() - off) as usize).min(x.len());
        da.read_at(&mut x[..n], off)?;
        db.read_at(&mut y[..n], off)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

fn step(n: u32, what: &str) {
    println!("\n== {n}. {what}");
}

/// Waits for job `id` to end; unless it succeeded, an error naming it `what`.
fn wait_succeeded(cl: &Client, id: i64, what: &str) -> anyhow::Result<JobInfo> {
    let j = wait_for(&format!("job {id}"), Duration::from_secs(300), || {
        let j: JobInfo = cl.get(&format!("/jobs/{id}"))?;
        Ok(j.state.finished().then_some(j))
    })?;
    if j.state != JobState::Succeeded {
        bail!(
            "{what} {}: {}",
            j.state.as_str(),
            j.error.unwrap_or_default()
        );
    }
    Ok(j)
}

pub fn demo(a: DemoCmd) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the holdfast binary")?;
    let (root, temp) = match &a.dir {
        Some(d) => (d.clone(), false),
        None => {
            let d = std::env::temp_dir().join(format!("holdfast-demo-{}", std::process::id()));
            (d, !a.keep)
        }
    };
    if root.exists() && std::fs::read_dir(&root)?.next().is_some() {
        bail!(
            "{} is not empty; give an empty or new --dir",
            root.display()
        );
    }
    std::fs::create_dir_all(&root)?;
    let r = demo_in(&exe, &root, a.disk_mib);
    if temp {
        let _ = std::fs::remove_dir_all(&root);
    } else {
        println!("\n(the demo's files stay in {})", root.display());
    }
    r
}

/// A sample VM's disk: where the agent finds it, its format, and the ext4 image and
/// raw disk it was made from (the demo changes them and converts again).
struct SampleDisk {
    vm: &'static str,
    dst: PathBuf,
    fmt: &'static str,
    fs: PathBuf,
    raw: PathBuf,
}

/// What the demo's steps share.
struct Demo<'a> {
    exe: &'a Path,
    disk_mib: u64,
    server_dir: PathBuf,
    agent_dir: PathBuf,
    vms: PathBuf,
    work: PathBuf,
    disks: Vec<SampleDisk>,
    children: Children,
    url: String,
    /// The admin client, once the server answers.
    cl: Option<Client>,
    /// Recovery points in the catalog (step 6).
    points: usize,
    /// Whether every restored disk equals its source (step 8).
    all_same: bool,
}

impl Demo<'_> {
    fn cl(&self) -> anyhow::Result<&Client> {
        self.cl
            .as_ref()
            .ok_or_else(|| anyhow!("the demo's server has not started"))
    }
}

/// One step of the demo: what it shows, and what does it.
type DemoStep = (&'static str, fn(&mut Demo) -> anyhow::Result<()>);

/// The demo, in order (numbered from 1 as they run).
const DEMO_STEPS: &[DemoStep] = &[
    (
        "sample VMs: two disks with an MBR partition table and an ext4 file system",
        demo_sample_vms,
    ),
    (
        "start a server on loopback (first start creates catalog, datastore, CA, admin token)",
        demo_start_server,
    ),
    (
        "enroll an agent for host hv01 (one-time token pinning the CA, then mutual TLS)",
        demo_enroll_agent,
    ),
    (
        "protection group: both VMs, 7 days retention, hourly sync, recovery point at 20:00; initial replica now",
        demo_protect,
    ),
    (
        "change the VMs' disks (new and rewritten files), then back up again",
        demo_change_and_sync,
    ),
    ("recovery points in the catalog", demo_points),
    ("verify the datastore (a server job)", demo_verify),
    (
        "restore each VM's latest disk from the datastore and compare byte for byte",
        demo_restore,
    ),
];

fn demo_in(exe: &Path, root: &Path, disk_mib: u64) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let mut d = Demo {
        exe,
        disk_mib,
        server_dir: root.join("server"),
        agent_dir: root.join("agent"),
        vms: root.join("vms"),
        work: root.join("work"),
        disks: Vec::new(),
        children: Children(Vec::new()),
        url: String::new(),
        cl: None,
        points: 0,
        all_same: true,
    };
    std::fs::create_dir_all(&d.work)?;
    for (n, (what, run)) in (1u32..).zip(DEMO_STEPS) {
        step(n, what);
        run(&mut d)?;
    }

    println!("\n== summary");
    println!(
        "  server + agent over mutual TLS on loopback, 2 VMs protected, {} recovery points",
        d.points
    );
    println!(
        "  verify: clean; restores: {}",
        if d.all_same {
            "byte-identical"
        } else {
            "MISMATCH"
        }
    );
    println!("  took {:.1} s", t0.elapsed().as_secs_f64());
    if !d.all_same {
        return Err(anyhow!("a restored disk differs from its source"));
    }
    Ok(ExitCode::SUCCESS)
}

fn demo_sample_vms(d: &mut Demo) -> anyhow::Result<()> {
    // web01: a Hyper-V export (Virtual Hard Disks/*.vhdx, Virtual Machines/<GUID>.vmcx).
    let web = d.vms.join("web01");
    std::fs::create_dir_all(web.join("Virtual Hard Disks"))?;
    std::fs::create_dir_all(web.join("Virtual Machines"))?;
    std::fs::write(
        web.join("Virtual Machines/6c4a7d1e-2b3f-4e5a-9c8d-0f1e2d3c4b5a.vmcx"),
        b"",
    )?;
    // db01: a KVM-style folder with a qcow2 disk and a vm.toml.
    let db = d.vms.join("db01");
    std::fs::create_dir_all(&db)?;
    std::fs::write(
        db.join("vm.toml"),
        "name = \"db01\"\nid = \"3f2504e0-4f89-11d3-9a0c-0305e82c3301\"\ndisks = [\"db01-os.qcow2\"]\n",
    )?;
    let disk_mib = d.disk_mib;
    for (vm, dst, fmt, seed) in [
        (
            "web01",
            web.join("Virtual Hard Disks/web01.vhdx"),
            "vhdx",
            7u64,
        ),
        ("db01", db.join("db01-os.qcow2"), "qcow2", 11u64),
    ] {
        let files = d.work.join(format!("{vm}-files"));
        sample_files(&files, vm, seed)?;
        let fs = d.work.join(format!("{vm}.ext4"));
        let raw = d.work.join(format!("{vm}.raw"));
        make_disk(&raw, &fs, &files, disk_mib)?;
        run_tool(
            Command::new(d.exe)
                .args(["image", "convert"])
                .arg(&raw)
                .arg(&dst)
                .args(["-f", fmt]),
        )?;
        println!(
            "  {vm}: {} ({fmt}, {disk_mib} MiB, MBR + ext4 with 18 MiB of files)",
            dst.display()
        );
        d.disks.push(SampleDisk {
            vm,
            dst,
            fmt,
            fs,
            raw,
        });
    }
    Ok(())
}

fn demo_start_server(d: &mut Demo) -> anyhow::Result<()> {
    let port = free_port()?;
    let server_dir = &d.server_dir;
    std::fs::create_dir_all(server_dir)?;
    // A short scheduler tick so the demo's jobs start at once.
    std::fs::write(
        server_dir.join("holdfast.toml"),
        "[scheduler]\ntick_seconds = 1\npoll_seconds = 5\n",
    )?;
    d.children.0.push(
        Command::new(d.exe)
            .args(["server", "--data-dir"])
            .arg(server_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting holdfast server")?,
    );
    let url = format!("https://127.0.0.1:{port}");
    let (cl, status) = wait_for("the server", Duration::from_secs(60), || {
        let (Ok(ca), Ok(token)) = (
            std::fs::read_to_string(server_dir.join("ca.pem")),
            std::fs::read_to_string(server_dir.join("admin.token")),
        ) else {
            return Ok(None);
        };
        let cl = Client::new(
            &url,
            pki::client_config_trusting(&ca)?,
            Auth::Token(token.trim().into()),
        )?;
        Ok(cl
            .get::<ServerStatus>("/status")
            .ok()
            .map(|s| (cl.clone(), s)))
    })?;
    println!("  {url}  CA fingerprint {}", status.ca_fingerprint);
    d.url = url;
    d.cl = Some(cl);
    Ok(())
}

fn demo_enroll_agent(d: &mut Demo) -> anyhow::Result<()> {
    let cl = d.cl()?.clone();
    let tok: AgentTokenResponse = cl.post(
        "/agent-tokens",
        &AgentTokenRequest {
            host: "hv01".into(),
            valid_minutes: Some(10),
        },
    )?;
    d.children.0.push(
        Command::new(d.exe)
            .args([
                "agent",
                "--server",
                &d.url,
                "--enroll",
                &tok.token,
                "--data-dir",
            ])
            .arg(&d.agent_dir)
            .arg("--files-root")
            .arg(&d.vms)
            .args(["--inventory-seconds", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting holdfast agent")?,
    );
    let found = wait_for("the agent's inventory", Duration::from_secs(60), || {
        let l: Vec<DataSourceInfo> = cl.get("/datasources")?;
        Ok((l.len() >= 2).then_some(l))
    })?;
    for s in &found {
        println!(
            "  data source {} ({} provider, {} disk(s), {} bytes)",
            s.name,
            s.provider,
            s.disks.len(),
            s.size
        );
    }
    Ok(())
}

fn demo_protect(d: &mut Demo) -> anyhow::Result<()> {
    let cl = d.cl()?;
    let g: GroupInfo = cl.post(
        "/protection-groups",
        &CreateGroup {
            name: "demo".into(),
            members: vec!["hv01/web01".into(), "hv01/db01".into()],
            policy: Policy::daily_at(7, SyncFrequency::Minutes(60), "20:00"),
        },
    )?;
    println!(
        "  disk allocation review: data {} bytes, policy needs {} bytes, datastore free {} bytes",
        g.allocation.data_size, g.allocation.required, g.allocation.datastore_free
    );
    let first = wait_for("the initial replicas", Duration::from_secs(300), || {
        let jobs: Vec<JobInfo> = cl.get("/jobs?limit=20")?;
        let done: Vec<JobInfo> = jobs
            .into_iter()
            .filter(|j| j.kind == JobKind::InitialReplica && j.state.finished())
            .collect();
        Ok((done.len() >= 2).then_some(done))
    })?;
    for j in &first {
        if j.state != JobState::Succeeded {
            bail!(
                "initial replica job {} of {:?} {}: {}",
                j.id,
                j.vm,
                j.state.as_str(),
                j.error.clone().unwrap_or_default()
            );
        }
        println!(
            "  job {} initial replica of {}: {} read, {} sent -> {}",
            j.id,
            j.vm.as_deref().unwrap_or_default(),
            j.bytes_read,
            j.bytes_sent,
            j.recovery_point.clone().unwrap_or_default()
        );
    }
    Ok(())
}

fn demo_change_and_sync(d: &mut Demo) -> anyhow::Result<()> {
    demo_change_disks(d)?;
    let cl = d.cl()?;
    let mut incr = Vec::new();
    for vm in ["web01", "db01"] {
        let j: JobInfo = cl.post(
            &format!("/datasources/hv01/{vm}/backup"),
            &BackupNowRequest {
                express_full: false,
                ..Default::default()
            },
        )?;
        incr.push(j.id);
    }
    for id in incr {
        let j = wait_succeeded(cl, id, &format!("job {id}"))?;
        println!(
            "  job {} sync of {}: {} read, {} sent -> {}",
            j.id,
            j.vm.as_deref().unwrap_or_default(),
            j.bytes_read,
            j.bytes_sent,
            j.recovery_point.unwrap_or_default()
        );
    }
    Ok(())
}

/// A new file in each sample disk's ext4, the disk assembled and converted again.
fn demo_change_disks(d: &Demo) -> anyhow::Result<()> {
    for SampleDisk {
        vm,
        dst,
        fmt,
        fs,
        raw,
    } in &d.disks
    {
        let note = d.work.join(format!("{vm}-note.txt"));
        std::fs::write(
            &note,
            format!("changed by the demo at {}\n", utc::rfc3339(utc::now())),
        )?;
        run_tool(
            Command::new("debugfs")
                .args(["-w", "-R"])
                .arg(format!("write {} etc/demo-note.txt", note.display()))
                .arg(fs),
        )?;
        assemble(raw, fs, d.disk_mib << 20)?;
        let tmp = dst.with_extension("new");
        run_tool(
            Command::new(d.exe)
                .args(["image", "convert"])
                .arg(raw)
                .arg(&tmp)
                .args(["-f", fmt]),
        )?;
        std::fs::rename(&tmp, dst)?;
    }
    Ok(())
}

fn demo_points(d: &mut Demo) -> anyhow::Result<()> {
    let rps: Vec<RecoveryPointInfo> = d.cl()?.get("/recovery-points")?;
    for r in &rps {
        println!(
            "  {}  {:<12} {}  read {:>10}  stored {:>10}",
            r.id, r.vm, r.created, r.stats.bytes_read, r.stats.bytes_stored
        );
    }
    d.points = rps.len();
    Ok(())
}

fn demo_verify(d: &mut Demo) -> anyhow::Result<()> {
    let cl = d.cl()?;
    let j: JobInfo = cl.post("/jobs", &serde_json::json!({"kind": "verify"}))?;
    let j = wait_succeeded(cl, j.id, "verify")?;
    println!(
        "  {}",
        j.log
            .iter()
            .rev()
            .find(|l| l.message.starts_with("verify"))
            .map(|l| l.message.clone())
            .unwrap_or_default()
    );
    Ok(())
}

fn demo_restore(d: &mut Demo) -> anyhow::Result<()> {
    // The server and agent stop first: restore reads the datastore folder itself.
    d.children = Children(Vec::new());
    let store = d.server_dir.join("datastore");
    for SampleDisk { vm, dst, fmt, .. } in &d.disks {
        let out = d.work.join(format!("{vm}-restored.{fmt}"));
        run_tool(
            Command::new(d.exe)
                .args(["restore", "-d"])
                .arg(&store)
                .args(["--source", &format!("hv01/{vm}"), "-o"])
                .arg(&out),
        )?;
        let same = same_content(dst, &out)?;
        d.all_same &= same;
        println!(
            "  hv01/{vm}: restored {} -> {}",
            out.display(),
            if same {
                "identical to the source disk"
            } else {
                "DIFFERENT"
            }
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Offline seeding

#[derive(Debug, clap::Subcommand)]
pub enum ReplicaCommand {
    /// On the host: write a VM's first copy to removable media (manual replica
    /// creation). Uses the enrolled agent's identity to get the datastore's parameters.
    Export {
        /// The agent's folder (its certificate).
        #[arg(long)]
        data_dir: PathBuf,
        /// Provider `files`: the folder of VMs.
        #[arg(long)]
        files_root: PathBuf,
        /// The VM's name on this host.
        #[arg(long)]
        vm: String,
        /// A new or empty folder on the media.
        #[arg(long)]
        to: PathBuf,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// On the server: import an exported replica as a recovery point of the VM, dated
    /// by when the export's view of the VM was taken. A seed older than the VM's newest
    /// recovery point is refused; one already imported is left as it is.
    Import {
        /// The server's data folder.
        #[arg(long)]
        data_dir: PathBuf,
        /// The server's configuration, when not DATA_DIR/holdfast.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Accept a seed older than the VM's newest recovery point, as an older point
        /// (the newest stays the latest).
        #[arg(long)]
        as_older_point: bool,
        /// The exported folder.
        from: PathBuf,
    },
}

pub fn replica(s: &ServerArgs, c: ReplicaCommand) -> anyhow::Result<ExitCode> {
    match c {
        ReplicaCommand::Export {
            data_dir,
            files_root,
            vm,
            to,
            threads,
        } => {
            let id = pki::AgentIdentity::load(&data_dir)?;
            let cl = Client::new(s.url()?, id.client_config()?, Auth::ClientCert)?;
            let start: SessionStart = cl.post(
                "/agent/replica-params",
                &ReplicaParamsRequest { vm: vm.clone() },
            )?;
            let provider = agent::FilesProvider::new(&files_root);
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            let t = Instant::now();
            let seed = agent::seed::export(&provider, &vm, &start, &to, threads, &mut |_, _| {})?;
            println!(
                "replica of {} exported to {}: {} disk(s), {} bytes read, {} bytes in {} file(s), {:.1} s",
                seed.source.name,
                to.display(),
                seed.disks.len(),
                seed.stats.bytes_read,
                seed.stats.bytes_stored,
                seed.blob_files.len(),
                t.elapsed().as_secs_f64()
            );
            println!(
                "on the server: holdfast replica import --data-dir SERVER_DIR {}",
                to.display()
            );
        }
        ReplicaCommand::Import {
            data_dir,
            config,
            as_older_point,
            from,
        } => {
            // A datastore on object storage is where the data dir records it.
            let datastore_target = match server::recorded_datastore_url(&data_dir)? {
                Some(url) => super::location::object_target(Path::new(&url))?,
                None => None,
            };
            let opts = server::ServerOptions {
                config_file: config,
                datastore_target,
                ..server::ServerOptions::new(&data_dir)
            };
            replica_import(&opts, &from, as_older_point)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn replica_import(
    opts: &server::ServerOptions,
    from: &Path,
    as_older_point: bool,
) -> anyhow::Result<()> {
    match server::replica_import(opts, from, as_older_point)? {
        server::SeedImport::Imported { point, latest } => println!(
            "imported {} as recovery point {} of {}, {} ({} bytes stored)",
            point.vm,
            point.id,
            point.created,
            if latest {
                "its latest"
            } else {
                "an older point; the latest is unchanged"
            },
            point.stats.bytes_stored
        ),
        server::SeedImport::AlreadyImported { point } => println!(
            "{} was imported before, as recovery point {} of {} of {}: nothing imported",
            from.display(),
            point.id,
            point.vm,
            point.created
        ),
    }
    Ok(())
}
