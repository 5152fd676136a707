//! Admin commands: everything goes through the server's API (the same calls the web
//! console will make), authenticated by the admin token over TLS pinned to the
//! server's CA.

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use client::{Auth, Client, seg};
use protocol::*;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Where the server is and how to prove we are its admin.
#[derive(Debug, Args, Clone)]
pub struct ServerArgs {
    /// Server URL, e.g. https://backup01:8443.
    #[arg(long, global = true, env = "HOLDFAST_SERVER")]
    pub server: Option<String>,
    /// File holding the admin API token (the server's DIR/admin.token).
    #[arg(long, global = true, env = "HOLDFAST_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The server's CA certificate (DIR/ca.pem): the only CA trusted.
    #[arg(long, global = true, env = "HOLDFAST_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

impl ServerArgs {
    pub fn url(&self) -> anyhow::Result<&str> {
        self.server
            .as_deref()
            .ok_or_else(|| anyhow!("no server given: use --server URL or HOLDFAST_SERVER"))
    }

    pub fn client(&self) -> anyhow::Result<Client> {
        let url = self.url()?;
        let ca_file = self.ca_file.as_ref().ok_or_else(|| {
            anyhow!("no CA file given: use --ca-file (the server's DIR/ca.pem) or HOLDFAST_CA_FILE")
        })?;
        let token_file = self.token_file.as_ref().ok_or_else(|| {
            anyhow!("no token file given: use --token-file (the server's DIR/admin.token) or HOLDFAST_TOKEN_FILE")
        })?;
        let ca = std::fs::read_to_string(ca_file)
            .with_context(|| format!("reading {}", ca_file.display()))?;
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading {}", token_file.display()))?;
        let tls = pki::client_config_trusting(&ca)?;
        Ok(Client::new(
            url,
            tls,
            Auth::Token(token.trim().to_string()),
        )?)
    }
}

pub(super) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn human(n: u64) -> String {
    super::units::human(n)
}

// ---------------------------------------------------------------------------------

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time enrollment token for a host's agent.
    Create {
        #[arg(long)]
        host: String,
        /// Minutes the token stays valid.
        #[arg(long, default_value_t = 60)]
        valid_minutes: u32,
        #[arg(long)]
        json: bool,
    },
}

pub fn agent_token(s: &ServerArgs, c: TokenCommand) -> anyhow::Result<ExitCode> {
    let TokenCommand::Create {
        host,
        valid_minutes,
        json,
    } = c;
    let req = AgentTokenRequest {
        host,
        valid_minutes: Some(valid_minutes),
    };
    // The server's own check, before anything is sent.
    req.validate().map_err(|e| anyhow!(e))?;
    let r: AgentTokenResponse = s.client()?.post("/agent-tokens", &req)?;
    if json {
        print_json(&r)?;
    } else {
        println!("{}", r.token);
        eprintln!(
            "one-time token for host {:?}, valid until {}; on the host run:\n  holdfast agent --server {} --enroll {} --data-dir /var/lib/holdfast-agent --files-root VMDIR",
            r.host,
            r.expires,
            s.url()?,
            r.token
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// List enrolled agents.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent's certificate: it is refused from now on.
    Revoke { host: String },
}

pub fn agents(s: &ServerArgs, c: AgentsCommand) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    match c {
        AgentsCommand::List { json } => {
            let list: Vec<AgentInfo> = cl.get("/agents")?;
            if json {
                return print_json(&list).map(|_| ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:<10} {:<22} {:<22} FINGERPRINT",
                "HOST", "STATE", "ENROLLED", "LAST SEEN"
            );
            for a in list {
                let state = if a.revoked {
                    "revoked"
                } else if a.connected {
                    "connected"
                } else {
                    "offline"
                };
                println!(
                    "{:<24} {:<10} {:<22} {:<22} {}",
                    a.host,
                    state,
                    a.enrolled,
                    a.last_seen.unwrap_or_default(),
                    &a.cert_fingerprint[..16.min(a.cert_fingerprint.len())]
                );
            }
        }
        AgentsCommand::Revoke { host } => {
            let _: serde_json::Value = cl.post(
                &format!("/agents/{}/revoke", seg(&host)),
                &serde_json::json!({}),
            )?;
            println!("agent {host} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum DataSourcesCommand {
    /// List the VMs agents report, with their protection.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show or set the byte ranges of one disk left out of backups and stored as
    /// zeros (a page file, swap). Without --range or --clear, shows them all.
    Exclude {
        /// HOST/VM
        vm: String,
        /// Disk, 0-based in recovery-point order.
        #[arg(long, default_value_t = 0)]
        disk: usize,
        /// OFFSET+LENGTH in bytes (sorted, not overlapping); replaces the disk's list.
        #[arg(long = "range")]
        ranges: Vec<String>,
        /// Remove the disk's exclusions.
        #[arg(long, conflicts_with = "ranges")]
        clear: bool,
        #[arg(long)]
        json: bool,
    },
    /// Move a data source (group, schedule, recovery points) to the VM another host
    /// now reports under its VM id (or name): after a `vm-id-conflict` alert, once you
    /// know the VM really moved.
    Move {
        /// HOST/VM
        vm: String,
        /// The host that reports the VM now.
        #[arg(long, value_name = "NEWHOST")]
        to: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn datasources(s: &ServerArgs, c: DataSourcesCommand) -> anyhow::Result<ExitCode> {
    let json = match c {
        DataSourcesCommand::List { json } => json,
        DataSourcesCommand::Move { vm, to, json } => {
            let d: DataSourceInfo = s
                .client()?
                .post(&format!("{}/move", vm_path(&vm)?), &MoveDataSource { to })?;
            if json {
                print_json(&d)?;
            } else {
                println!(
                    "{vm} moved to {} with its group ({}) and recovery points",
                    d.name,
                    d.protection_group.as_deref().unwrap_or("none")
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        DataSourcesCommand::Exclude {
            vm,
            disk,
            ranges,
            clear,
            json,
        } => return exclude(s, &vm, disk, &ranges, clear, json),
    };
    let list: Vec<DataSourceInfo> = s.client()?.get("/datasources")?;
    if json {
        return print_json(&list).map(|_| ExitCode::SUCCESS);
    }
    println!(
        "{:<32} {:<8} {:>10} {:<16} {:<13} LAST RECOVERY POINT",
        "VM", "PROVIDER", "SIZE", "GROUP", "REPLICA"
    );
    for d in list {
        println!(
            "{:<32} {:<8} {:>10} {:<16} {:<13} {}",
            format!("{}{}", d.name, if d.present { "" } else { " (gone)" }),
            d.provider,
            human(d.size),
            d.protection_group.unwrap_or_else(|| "-".into()),
            d.replica_state,
            d.last_recovery_point.unwrap_or_else(|| "-".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn exclude(
    s: &ServerArgs,
    vm: &str,
    disk: usize,
    ranges: &[String],
    clear: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    let path = format!("{}/exclusions", vm_path(vm)?);
    let mut ex: Exclusions = cl.get(&path)?;
    if clear || !ranges.is_empty() {
        let parsed = ranges
            .iter()
            .map(|r| {
                let (o, l) = r
                    .split_once('+')
                    .and_then(|(o, l)| Some((o.trim().parse().ok()?, l.trim().parse().ok()?)))
                    .ok_or_else(|| anyhow!("--range {r:?}: OFFSET+LENGTH in bytes"))?;
                Ok((o, l))
            })
            .collect::<anyhow::Result<Vec<(u64, u64)>>>()?;
        if disk >= 64 {
            bail!("--disk {disk}: at most 64 disks");
        }
        if ex.disks.len() <= disk {
            ex.disks.resize(disk + 1, Vec::new());
        }
        ex.disks[disk] = parsed;
        while ex.disks.last().is_some_and(Vec::is_empty) {
            ex.disks.pop();
        }
        // The server's own check, against the disks it knows.
        let list: Vec<DataSourceInfo> = cl.get("/datasources")?;
        let sizes: Vec<u64> = list
            .iter()
            .find(|d| d.name == vm)
            .map(|d| d.disks.iter().map(|x| x.virtual_size).collect())
            .unwrap_or_default();
        ex.validate(&sizes).map_err(|e| anyhow!(e))?;
        ex = cl.put(&path, &ex)?;
    }
    if json {
        return print_json(&ex).map(|_| ExitCode::SUCCESS);
    }
    if ex.disks.iter().all(Vec::is_empty) {
        println!("{vm}: nothing excluded");
    }
    for (i, d) in ex.disks.iter().enumerate() {
        for (o, l) in d {
            println!("{vm} disk {i}: {o}+{l} ({}) stored as zeros", human(*l));
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------
// Protection groups

#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Short-term retention range in days (1-448).
    #[arg(long)]
    retention_days: Option<u32>,
    /// Synchronization frequency in minutes (15, 30, 60, 120, 240, 360, 720, 1440) or
    /// `just-before-recovery-point`.
    #[arg(long)]
    sync_frequency: Option<String>,
    /// Recovery point times of day, UTC: HH:MM[,HH:MM...].
    #[arg(long)]
    recovery_point_times: Option<String>,
    /// Express full backup times of day, UTC: HH:MM[,HH:MM...].
    #[arg(long)]
    express_full_times: Option<String>,
    /// Daily consistency check at HH:MM UTC.
    #[arg(long)]
    consistency_check_daily: Option<String>,
    /// Do not run a consistency check automatically when a replica is inconsistent.
    #[arg(long)]
    no_auto_consistency_check: bool,
    /// Initial replica: `now`, `manual` (offline seeding) or a UTC time
    /// (2026-11-25T22:00:00Z).
    #[arg(long)]
    replica: Option<String>,
    /// Expected daily churn in percent, for the disk allocation review.
    #[arg(long)]
    churn_percent: Option<f64>,
    #[command(flatten)]
    online: super::online::OnlineArgs,
}

fn times(s: &str) -> Vec<String> {
    s.split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

impl PolicyArgs {
    fn any(&self) -> bool {
        self.retention_days.is_some()
            || self.sync_frequency.is_some()
            || self.recovery_point_times.is_some()
            || self.express_full_times.is_some()
            || self.consistency_check_daily.is_some()
            || self.no_auto_consistency_check
            || self.replica.is_some()
            || self.churn_percent.is_some()
            || self.online.any()
    }

    /// Applies the flags given on top of `base` (a new group starts from nothing).
    fn apply(&self, base: Option<Policy>) -> anyhow::Result<Policy> {
        let sync = match self.sync_frequency.as_deref() {
            Some("just-before-recovery-point") => Some(SyncFrequency::JustBeforeRecoveryPoint),
            Some(m) => Some(SyncFrequency::Minutes(m.parse().map_err(|_| {
                anyhow!("--sync-frequency {m:?}: minutes (15, 30, 60, 120, 240, 360, 720, 1440) or just-before-recovery-point")
            })?)),
            None => None,
        };
        let replica = match self.replica.as_deref() {
            None => None,
            Some("now") => Some(ReplicaCreation::Now),
            Some("manual") => Some(ReplicaCreation::Manual),
            // Checked with the rest of the policy, as the server checks it.
            Some(t) => Some(ReplicaCreation::At(t.to_string())),
        };
        let mut p = match base {
            Some(mut p) => {
                if let Some(d) = self.retention_days {
                    p.retention_days = d;
                }
                if let Some(s) = sync {
                    p.sync_frequency = s;
                }
                if let Some(t) = &self.recovery_point_times {
                    p.recovery_point_times = times(t);
                }
                if let Some(t) = &self.express_full_times {
                    p.express_full_times = times(t);
                }
                if let Some(t) = &self.consistency_check_daily {
                    p.consistency_check_daily = Some(t.clone()).filter(|t| !t.is_empty());
                }
                if self.no_auto_consistency_check {
                    p.consistency_check_when_inconsistent = false;
                }
                if let Some(r) = replica {
                    p.replica_creation = r;
                }
                if let Some(c) = self.churn_percent {
                    p.churn_percent = c;
                }
                p
            }
            None => Policy {
                retention_days: self
                    .retention_days
                    .ok_or_else(|| anyhow!("--retention-days is required"))?,
                sync_frequency: sync.ok_or_else(|| anyhow!("--sync-frequency is required"))?,
                recovery_point_times: times(
                    self.recovery_point_times
                        .as_deref()
                        .ok_or_else(|| anyhow!("--recovery-point-times is required"))?,
                ),
                express_full_times: self
                    .express_full_times
                    .as_deref()
                    .map(times)
                    .unwrap_or_default(),
                consistency_check_when_inconsistent: !self.no_auto_consistency_check,
                consistency_check_daily: self.consistency_check_daily.clone(),
                replica_creation: replica.unwrap_or(ReplicaCreation::Now),
                churn_percent: self.churn_percent.unwrap_or(5.0),
                online: None,
            },
        };
        self.online.apply(&mut p)?;
        p.validate_request().map_err(|e| anyhow!(e))?;
        Ok(p)
    }
}

#[derive(Debug, Subcommand)]
pub enum PgCommand {
    /// Create a protection group.
    Create {
        name: String,
        /// A member VM, HOST/VM (repeat for more).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[arg(long)]
        json: bool,
    },
    /// List protection groups.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a group: members, policy, disk allocation review.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change members or policy.
    Modify {
        name: String,
        #[arg(long = "add-member")]
        add: Vec<String>,
        #[arg(long = "remove-member")]
        remove: Vec<String>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[arg(long)]
        json: bool,
    },
    /// Copy every member's newest recovery point to the group's storage target now
    /// (online protection), as the online schedule would.
    OnlineCopy {
        name: String,
        /// Wait for the copies to end; exit 1 if one fails.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop protecting a group's members. Their recovery points are kept (and expire
    /// by retention) unless --delete-data.
    Delete {
        name: String,
        #[arg(long)]
        delete_data: bool,
    },
}

fn show_group(g: &GroupInfo) {
    let p = &g.policy;
    println!("protection group {:?} (created {})", g.name, g.created);
    println!("  members:            {}", g.members.join(", "));
    println!("  retention:          {} days", p.retention_days);
    println!(
        "  synchronization:    {}",
        match p.sync_frequency {
            SyncFrequency::Minutes(m) => format!("every {m} minutes"),
            SyncFrequency::JustBeforeRecoveryPoint =>
                "just before each recovery point (express full)".into(),
        }
    );
    println!(
        "  recovery points at: {} UTC",
        p.recovery_point_times.join(", ")
    );
    if !p.express_full_times.is_empty() {
        println!(
            "  express full at:    {} UTC",
            p.express_full_times.join(", ")
        );
    }
    println!(
        "  consistency check:  {}{}",
        if p.consistency_check_when_inconsistent {
            "when inconsistent"
        } else {
            "manual"
        },
        p.consistency_check_daily
            .as_ref()
            .map(|t| format!(", daily at {t} UTC"))
            .unwrap_or_default()
    );
    if let Some(o) = &p.online {
        println!("  online protection:  {}", super::online::describe(o));
    }
    let a = &g.allocation;
    // A datastore on object storage has no fixed capacity (the server reports 0 of 0).
    let room = if a.datastore_total == 0 {
        "datastore on object storage (no fixed capacity)".to_string()
    } else {
        format!(
            "datastore {} free of {}",
            human(a.datastore_free),
            human(a.datastore_total)
        )
    };
    println!(
        "  disk allocation:    data {} -> needs {} ({}% churn x {} days); {room}{}",
        human(a.data_size),
        human(a.required),
        p.churn_percent,
        p.retention_days,
        if a.fits { "" } else { "  ** DOES NOT FIT **" }
    );
}

pub fn pg(s: &ServerArgs, c: PgCommand) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    match c {
        PgCommand::Create {
            name,
            members,
            policy,
            json,
        } => {
            let req = CreateGroup {
                name,
                members,
                policy: policy.apply(None)?,
            };
            req.validate().map_err(|e| anyhow!(e))?;
            let g: GroupInfo = cl.post("/protection-groups", &req)?;
            online_key(&cl, &g, &policy)?;
            if json {
                print_json(&g)?;
            } else {
                show_group(&g);
            }
        }
        PgCommand::List { json } => {
            let list: Vec<GroupInfo> = cl.get("/protection-groups")?;
            if json {
                return print_json(&list).map(|_| ExitCode::SUCCESS);
            }
            println!(
                "{:<20} {:>7} {:>9} {:>10} MEMBERS",
                "NAME", "MEMBERS", "RETENTION", "DATA"
            );
            for g in list {
                println!(
                    "{:<20} {:>7} {:>8}d {:>10} {}",
                    g.name,
                    g.members.len(),
                    g.policy.retention_days,
                    human(g.allocation.data_size),
                    g.members.join(", ")
                );
            }
        }
        PgCommand::Show { name, json } => {
            let g: GroupInfo = cl.get(&format!("/protection-groups/{}", seg(&name)))?;
            if json {
                print_json(&g)?;
            } else {
                show_group(&g);
            }
        }
        PgCommand::Modify {
            name,
            add,
            remove,
            policy,
            json,
        } => {
            let new_policy = if policy.any() {
                let g: GroupInfo = cl.get(&format!("/protection-groups/{}", seg(&name)))?;
                Some(policy.apply(Some(g.policy))?)
            } else {
                None
            };
            let req = ModifyGroup {
                add_members: add,
                remove_members: remove,
                policy: new_policy,
            };
            req.validate().map_err(|e| anyhow!(e))?;
            let g: GroupInfo = cl.patch(&format!("/protection-groups/{}", seg(&name)), &req)?;
            online_key(&cl, &g, &policy)?;
            if json {
                print_json(&g)?;
            } else {
                show_group(&g);
            }
        }
        PgCommand::OnlineCopy { name, wait, json } => {
            let q: OnlineCopyQueued = cl.post(
                &format!("/protection-groups/{}/online-copy", seg(&name)),
                &(),
            )?;
            if !wait {
                if json {
                    return print_json(&q).map(|_| ExitCode::SUCCESS);
                }
                println!(
                    "online copy of group {:?} queued: jobs {:?}",
                    q.group, q.jobs
                );
                return Ok(ExitCode::SUCCESS);
            }
            let mut code = ExitCode::SUCCESS;
            for id in q.jobs {
                if wait_job(&cl, id, json)? != ExitCode::SUCCESS {
                    code = ExitCode::from(1);
                }
            }
            return Ok(code);
        }
        PgCommand::Delete { name, delete_data } => {
            let r: DeleteGroupResponse = cl.delete(&format!(
                "/protection-groups/{}?delete_data={delete_data}",
                seg(&name)
            ))?;
            if delete_data {
                println!(
                    "protection group {:?} deleted with {} recovery points (space returns at the next gc)",
                    r.name, r.recovery_points_deleted
                );
            } else {
                println!(
                    "protection group {:?} deleted; its recovery points stay until their retention range ends",
                    r.name
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Saves the online key when asked (`--online-key-file`); reminds to save it when a
/// group keeps online copies and it was not asked.
fn online_key(cl: &Client, g: &GroupInfo, policy: &PolicyArgs) -> anyhow::Result<()> {
    match (&g.policy.online, policy.online.key_file()) {
        (Some(o), Some(file)) => super::online::save_key(cl, &o.storage, file),
        (None, Some(_)) => bail!("--online-key-file: the group has no online protection"),
        (Some(o), None) if policy.online.any() => {
            eprintln!(
                "online copies on {} are encrypted with a key of their own: save it apart from this server with `holdfast storage key {} --out FILE`",
                o.storage, o.storage
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------
// Jobs

fn vm_path(vm: &str) -> anyhow::Result<String> {
    let (h, v) = split_vm(vm).ok_or_else(|| anyhow!("{vm:?} is not HOST/VM"))?;
    Ok(format!("/datasources/{}/{}", seg(h), seg(v)))
}

/// Waits for a job to end, printing its progress on stderr; exit 0 only on success.
fn wait_job(cl: &Client, id: i64, json: bool) -> anyhow::Result<ExitCode> {
    let mut last = String::new();
    loop {
        // Long poll: the server answers the moment the job ends, or after a second
        // (to print progress).
        let asked = std::time::Instant::now();
        let j: JobInfo = cl.get(&format!("/jobs/{id}?wait_seconds=1"))?;
        if j.state.finished() {
            if json {
                print_json(&j)?;
            } else {
                println!(
                    "job {} ({}) {}{}{}{}",
                    j.id,
                    j.kind.as_str(),
                    j.state.as_str(),
                    j.recovery_point
                        .as_ref()
                        .map(|r| format!(": recovery point {r}"))
                        .unwrap_or_default(),
                    fetched_written(&j)
                        .map(|t| format!(": {t}"))
                        .unwrap_or_default(),
                    j.error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
            let ok = j.state == JobState::Succeeded
                && (!j.kind.on_agent() || j.recovery_point.is_some());
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        let line = match fetched_written(&j) {
            Some(t) => format!("job {} {}: {t}{}", j.id, j.state.as_str(), eta(&j)),
            None => format!(
                "job {} {}: {} of {}{}{}",
                j.id,
                j.state.as_str(),
                human(j.bytes_done),
                human(j.bytes_total),
                j.rate_bytes_per_sec
                    .map(|r| format!(", {}/s", human(r)))
                    .unwrap_or_default(),
                eta(&j)
            ),
        };
        if line != last && !json {
            eprintln!("{line}");
            last = line;
        }
        // A server that answered at once (not waiting) is not polled in a tight loop.
        if let Some(rest) = Duration::from_millis(200).checked_sub(asked.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// A recovery's bytes, fetched and written apart (holes are written, never fetched),
/// each with its rate: `fetched 1.2 MiB (250.0 KiB/s), wrote 64.0 MiB of 64.0 MiB of
/// disk, holes included (12.8 MiB/s)`. `None` for other jobs.
fn fetched_written(j: &JobInfo) -> Option<String> {
    let fetched = j.bytes_fetched?;
    let written = j.bytes_written.unwrap_or(j.bytes_done);
    let per_sec = |r: Option<u64>| r.map(|r| format!(" ({}/s)", human(r)));
    Some(format!(
        "fetched {}{}, wrote {} of {} of disk, holes included{}",
        human(fetched),
        per_sec(j.rate_bytes_per_sec).unwrap_or_default(),
        human(written),
        human(j.bytes_total),
        per_sec(j.write_rate_bytes_per_sec).unwrap_or_default()
    ))
}

/// `, 1m05s left` (when known).
fn eta(j: &JobInfo) -> String {
    match j.eta_seconds {
        None => String::new(),
        Some(e @ 0..60) => format!(", {e}s left"),
        Some(e @ 60..3600) => format!(", {}m{:02}s left", e / 60, e % 60),
        Some(e) => format!(", {}h{:02}m left", e / 3600, e % 3600 / 60),
    }
}

pub(crate) fn started(cl: &Client, j: JobInfo, wait: bool, json: bool) -> anyhow::Result<ExitCode> {
    if wait {
        return wait_job(cl, j.id, json);
    }
    if json {
        print_json(&j)?;
    } else {
        println!("job {} ({}) {}", j.id, j.kind.as_str(), j.state.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn backup_now(
    s: &ServerArgs,
    vm: &str,
    express_full: bool,
    notify: Vec<String>,
    wait: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    let j: JobInfo = cl.post(
        &format!("{}/backup", vm_path(vm)?),
        &BackupNowRequest {
            express_full,
            notify,
        },
    )?;
    started(&cl, j, wait, json)
}

pub fn consistency_check(
    s: &ServerArgs,
    vm: &str,
    wait: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    let j: JobInfo = cl.post(
        &format!("{}/consistency-check", vm_path(vm)?),
        &serde_json::json!({}),
    )?;
    started(&cl, j, wait, json)
}

/// `holdfast recover HOST/VM ...`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["original", "alternate", "copy_to"])))]
pub struct RecoverArgs {
    /// HOST/VM of the protected VM.
    pub vm: String,
    /// Recovery point id, or `latest` (default).
    #[arg(long, conflicts_with = "at")]
    pub point: Option<String>,
    /// The VM's latest recovery point at or before this UTC time, "YYYY-MM-DD HH:MM".
    #[arg(long)]
    pub at: Option<String>,
    /// Write over the VM's own disk files, in place and format, through the agent of
    /// its host. A running QEMU VM needs --stop-vm.
    #[arg(long)]
    pub original: bool,
    /// With --original: stop a running VM (QEMU: `quit`) once the restored disks are
    /// written beside the originals, then swap them in.
    #[arg(long, requires = "original")]
    pub stop_vm: bool,
    /// With --stop-vm: start the VM again afterwards, as it was started.
    #[arg(long, requires = "stop_vm")]
    pub start: bool,
    /// HOST:DIR: a new VM folder DIR/<vm>/ with a vm.toml on that host.
    #[arg(long, value_name = "HOST:DIR")]
    pub alternate: Option<String>,
    /// Disk format for --alternate: vhdx, vhd, qcow2 or raw (default: each disk's own).
    #[arg(long, requires = "alternate")]
    pub format: Option<protocol::DiskFormat>,
    /// HOST:DIR: the disk files, in their format, into DIR/holdfast_<time>_job<ID>/ on that host.
    #[arg(long, value_name = "HOST:DIR")]
    pub copy_to: Option<String>,
    /// With --copy-to: only this disk (numbered from 0).
    #[arg(long, requires = "copy_to")]
    pub disk: Option<u32>,
    /// With --copy-to: only this volume of --disk (default disk 0) as a raw image
    /// `disk<N>-part<P>.img` (partitions 1-based as in /dev/sda1; 0 = a disk without a
    /// partition table).
    #[arg(long, requires = "copy_to")]
    pub partition: Option<u32>,
    /// Limit the data fetched from the server, KiB per second (default: the server's
    /// `[recovery]` work-hours limits, if any).
    #[arg(long, value_name = "KBPS")]
    pub throttle: Option<u64>,
    /// E-mail this address when the recovery ends (repeatable; needs [smtp] on the
    /// server).
    #[arg(long, value_name = "EMAIL")]
    pub notify: Vec<String>,
    /// Recover from the copy on a storage target: online:NAME (default: the
    /// server's datastore).
    #[arg(long, value_name = "online:NAME")]
    pub from: Option<String>,
    /// Wait for the job; exit 0 only when the recovery succeeded.
    #[arg(long)]
    pub wait: bool,
    #[arg(long)]
    pub json: bool,
}

fn host_dir(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once(':') {
        Some((h, d)) if !h.is_empty() && !d.is_empty() => Ok((h.to_string(), d.to_string())),
        _ => bail!("{s:?} is not HOST:DIR"),
    }
}

pub fn recover(s: &ServerArgs, a: &RecoverArgs) -> anyhow::Result<ExitCode> {
    if split_vm(&a.vm).is_none() {
        bail!("{:?} is not HOST/VM", a.vm);
    }
    let target = if a.original {
        RecoveryTarget::Original {
            stop_vm: a.stop_vm,
            start: a.start,
        }
    } else if let Some(x) = &a.alternate {
        let (host, dir) = host_dir(x)?;
        RecoveryTarget::Alternate {
            host,
            dir,
            format: a.format.map(|f| f.as_str().to_string()),
        }
    } else if let Some(x) = &a.copy_to {
        let (host, dir) = host_dir(x)?;
        RecoveryTarget::CopyTo {
            host,
            dir,
            disk: a.disk,
            partition: a.partition,
            items: Vec::new(),
        }
    } else {
        bail!("choose --original, --alternate HOST:DIR or --copy-to HOST:DIR");
    };
    let req = RecoveryRequest {
        vm: a.vm.clone(),
        point: a.point.clone(),
        at: a.at.clone(),
        target,
        throttle_kbps: a.throttle,
        notify: a.notify.clone(),
        from: a.from.clone(),
    };
    req.validate().map_err(|e| anyhow!(e))?;
    let cl = s.client()?;
    let j: JobInfo = cl.post("/recoveries", &req)?;
    started(&cl, j, a.wait, a.json)
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first (`--kind recovery --vm HOST/VM`: a VM's recovery
    /// history).
    List {
        #[arg(long)]
        state: Option<JobState>,
        #[arg(long)]
        kind: Option<JobKind>,
        /// Only the jobs of this HOST/VM.
        #[arg(long)]
        vm: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show one job with its log; --follow waits for it to end.
    Show {
        id: i64,
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running job.
    Cancel { id: i64 },
    /// Run a server job now: verify, prune or gc.
    Run {
        kind: String,
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn jobs(s: &ServerArgs, c: JobsCommand) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    match c {
        JobsCommand::List {
            state,
            kind,
            vm,
            limit,
            json,
        } => {
            let mut path = format!("/jobs?limit={limit}");
            let (state, kind) = (state.map(|s| s.to_string()), kind.map(|k| k.to_string()));
            for (k, v) in [("state", state), ("kind", kind), ("vm", vm)] {
                if let Some(v) = v {
                    path.push_str(&format!("&{k}={}", seg(&v)));
                }
            }
            let list: Vec<JobInfo> = cl.get(&path)?;
            if json {
                return print_json(&list).map(|_| ExitCode::SUCCESS);
            }
            println!(
                "{:>6} {:<18} {:<10} {:<28} {:<21} {:>10} RESULT",
                "ID", "KIND", "STATE", "VM", "CREATED", "READ"
            );
            for j in list {
                println!(
                    "{:>6} {:<18} {:<10} {:<28} {:<21} {:>10} {}",
                    j.id,
                    j.kind.as_str(),
                    j.state.as_str(),
                    j.vm.as_deref().unwrap_or("-"),
                    j.created,
                    human(j.bytes_read),
                    j.recovery_point.or(j.error).unwrap_or_default()
                );
            }
        }
        JobsCommand::Show { id, follow, json } => {
            if follow {
                return wait_job(&cl, id, json);
            }
            let j: JobInfo = cl.get(&format!("/jobs/{id}"))?;
            if json {
                return print_json(&j).map(|_| ExitCode::SUCCESS);
            }
            println!(
                "job {} ({}) {} — trigger: {}, attempt {}",
                j.id,
                j.kind.as_str(),
                j.state.as_str(),
                j.trigger,
                j.attempt
            );
            if let Some(vm) = &j.vm {
                println!("  vm: {vm}");
            }
            match fetched_written(&j) {
                Some(t) => println!("  bytes: {t}{}", eta(&j)),
                None => println!(
                    "  bytes: {} of {} done, {} read, {} sent{}{}",
                    human(j.bytes_done),
                    human(j.bytes_total),
                    human(j.bytes_read),
                    human(j.bytes_sent),
                    j.rate_bytes_per_sec
                        .map(|r| format!(", {}/s", human(r)))
                        .unwrap_or_default(),
                    eta(&j)
                ),
            }
            if let Some(rp) = &j.recovery_point {
                println!("  recovery point: {rp}");
            }
            if let Some(e) = &j.error {
                println!("  error: {e}");
            }
            for l in &j.log {
                println!("  {} {}", l.time, l.message);
            }
        }
        JobsCommand::Cancel { id } => {
            let j: JobInfo = cl.post(&format!("/jobs/{id}/cancel"), &serde_json::json!({}))?;
            println!(
                "job {} {}",
                j.id,
                if j.state == JobState::Cancelled {
                    "cancelled"
                } else {
                    "cancel requested"
                }
            );
        }
        JobsCommand::Run { kind, wait, json } => {
            let j: JobInfo = cl.post("/jobs", &serde_json::json!({ "kind": kind }))?;
            return started(&cl, j, wait, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// List active alerts (--all: resolved ones too).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Resolve (dismiss) an active alert by id; audited.
    Resolve {
        id: i64,
        /// Why: stored with the alert and shown by `alerts list --all`.
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
    },
}

pub fn alerts(s: &ServerArgs, c: AlertsCommand) -> anyhow::Result<ExitCode> {
    let (all, json) = match c {
        AlertsCommand::List { all, json } => (all, json),
        AlertsCommand::Resolve { id, note } => {
            let req = ResolveAlert { note };
            req.validate().map_err(|e| anyhow!("--{e}"))?;
            let a: AlertInfo = s.client()?.post(&format!("/alerts/{id}/resolve"), &req)?;
            println!(
                "alert {} ({} {}) resolved at {}",
                a.id,
                a.subject,
                a.kind,
                a.resolved.unwrap_or_default()
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    let list: Vec<AlertInfo> = s.client()?.get(&format!("/alerts?all={all}"))?;
    if json {
        return print_json(&list).map(|_| ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no {}alerts", if all { "" } else { "active " });
    }
    for a in list {
        println!(
            "{:>5} {:<8} {:<24} {:<16} {}{}",
            a.id,
            a.severity.as_str(),
            a.subject,
            a.kind,
            a.message,
            a.resolved
                .map(|r| match &a.note {
                    Some(n) => format!(" (resolved {r}: {n})"),
                    None => format!(" (resolved {r})"),
                })
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum ClustersCommand {
    /// Create a cluster: hosts VMs may move between on their own (live migration).
    Create {
        name: String,
        /// A member host (repeat for more); a host is in at most one cluster.
        #[arg(long = "host", value_name = "HOST", required = true)]
        hosts: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Add hosts to a cluster.
    AddHost {
        name: String,
        /// A host to add (repeat for more); in no other cluster.
        #[arg(long = "host", value_name = "HOST", required = true)]
        hosts: Vec<String>,
    },
    /// Take a host out of a cluster.
    RemoveHost {
        name: String,
        #[arg(long)]
        host: String,
    },
    /// List clusters and their hosts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a cluster (its hosts are in none afterwards).
    Delete { name: String },
}

pub fn clusters(s: &ServerArgs, c: ClustersCommand) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    let show = |k: &ClusterInfo| println!("cluster {}: {}", k.name, k.hosts.join(", "));
    match c {
        ClustersCommand::Create { name, hosts, json } => {
            let k: ClusterInfo = cl.post("/clusters", &CreateCluster { name, hosts })?;
            if json {
                print_json(&k)?;
            } else {
                show(&k);
            }
        }
        ClustersCommand::AddHost { name, hosts } => {
            let k: ClusterInfo = cl.post(
                &format!("/clusters/{}/hosts", seg(&name)),
                &ClusterHosts { hosts },
            )?;
            show(&k);
        }
        ClustersCommand::RemoveHost { name, host } => {
            let k: ClusterInfo =
                cl.delete(&format!("/clusters/{}/hosts/{}", seg(&name), seg(&host)))?;
            show(&k);
        }
        ClustersCommand::List { json } => {
            let list: Vec<ClusterInfo> = cl.get("/clusters")?;
            if json {
                return print_json(&list).map(|_| ExitCode::SUCCESS);
            }
            if list.is_empty() {
                println!("no clusters");
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<24} {:<22} HOSTS", "CLUSTER", "CREATED");
            for k in list {
                println!("{:<24} {:<22} {}", k.name, k.created, k.hosts.join(", "));
            }
        }
        ClustersCommand::Delete { name } => {
            let _: ClusterInfo = cl.delete(&format!("/clusters/{}", seg(&name)))?;
            println!("cluster {name} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `recovery-points list` against the server.
pub fn recovery_points(s: &ServerArgs, a: &super::store::PointsArgs) -> anyhow::Result<ExitCode> {
    use super::calendar;
    let path = match &a.vm {
        Some(v) => {
            if split_vm(v).is_none() {
                bail!("--vm {v:?} is not HOST/VM");
            }
            format!("/recovery-points?vm={}", seg(v))
        }
        None => "/recovery-points".into(),
    };
    let mut list: Vec<RecoveryPointInfo> = s.client()?.get(&path)?;
    list.sort_by(|x, y| (x.created_unix, &x.id).cmp(&(y.created_unix, &y.id)));
    if let Some(t) = &a.at {
        list = calendar::at(list, calendar::parse_at(t)?);
        if list.is_empty() {
            bail!("no recovery point at or before {t}");
        }
    }
    if a.days {
        let d = calendar::days(&list);
        if a.json {
            return print_json(&d).map(|_| ExitCode::SUCCESS);
        }
        calendar::print_days(&d);
        return Ok(ExitCode::SUCCESS);
    }
    if a.json {
        return print_json(&list).map(|_| ExitCode::SUCCESS);
    }
    println!(
        "{:<33} {:<28} {:<21} {:<17} {:>5} {:>10} {:>10} LOCATIONS",
        "ID", "VM", "CREATED", "CONSISTENCY", "DISKS", "READ", "STORED"
    );
    let mut headers = calendar::DayHeaders::new();
    for r in list {
        headers.row(r.created_unix);
        println!(
            "{:<33} {:<28} {:<21} {:<17} {:>5} {:>10} {:>10} {}",
            r.id,
            r.vm,
            r.created,
            serde_json::to_value(r.consistency)?.as_str().unwrap_or("?"),
            r.disks.len(),
            human(r.stats.bytes_read),
            human(r.stats.bytes_stored),
            r.locations.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}
