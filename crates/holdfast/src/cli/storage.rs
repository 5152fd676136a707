//! `holdfast storage`: named targets for online copies (Azure Blob, S3, a folder).

use super::admin::{ServerArgs, print_json};
use anyhow::bail;
use clap::{Args, Subcommand};
use client::seg;
use protocol::{
    AddStorage, AttachReport, AttachStorage, StorageInfo, StorageKind, StorageLocation,
    StorageTestReport,
};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Add a storage target. Azure: --account, --container, --key-file (the account
    /// key), --endpoint for Azurite or a sovereign cloud. S3: --bucket, --region,
    /// --access-key-file (two lines: the access key id, then the secret key),
    /// --endpoint for an S3-compatible server. Folder: --path on the server.
    Add(AddArgs),
    /// List storage targets (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Write, read back, list and delete a 4 MiB probe object on the target (from the
    /// server), and report latency and throughput; exit 1 when the target fails.
    Test {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Forget a storage target and its secret (refused while a protection group uses it;
    /// the objects in it stay).
    Remove { name: String },
    /// Save the key of the target's online copy to a new file (mode 0600). Keep it away
    /// from the server: a new server needs it to attach the copy after a disaster.
    Key {
        name: String,
        /// The file to write (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Attach the online copy on a target (a new server after a disaster, or another
    /// server's copy): the server keeps the key, opens the copy and lists its recovery
    /// points as `online:NAME`; `recover`, `ilr` and `export-nbd` then read them with
    /// `--from online:NAME`.
    Attach {
        name: String,
        /// The key file saved with `holdfast storage key` (or `pg ... --online-key-file`).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Letters, digits, `-`, `.` and `_` (it becomes `online:NAME`).
    pub name: String,
    #[arg(long)]
    pub kind: StorageKind,
    #[arg(long)]
    pub account: Option<String>,
    #[arg(long)]
    pub container: Option<String>,
    #[arg(long)]
    pub bucket: Option<String>,
    #[arg(long)]
    pub region: Option<String>,
    /// Service URL (http:// or https://).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Azure: a file holding the account key (one line).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// S3: a file holding the access key id and the secret access key, one per line.
    #[arg(long, value_name = "FILE")]
    pub access_key_file: Option<PathBuf>,
    /// Folder: an absolute path on the server.
    #[arg(long)]
    pub path: Option<String>,
    #[arg(long)]
    pub json: bool,
}

fn request(a: AddArgs) -> anyhow::Result<AddStorage> {
    let mut location = StorageLocation {
        account: a.account,
        container: a.container,
        bucket: a.bucket,
        region: a.region,
        endpoint: a.endpoint,
        access_key_id: None,
        path: a.path,
    };
    let secret = match (a.kind, a.key_file, a.access_key_file) {
        (StorageKind::Azure, Some(f), None) => match super::location::key_lines(&f)?.as_slice() {
            [key] => Some(key.clone()),
            _ => bail!(
                "--key-file {}: must hold one line, the account key",
                f.display()
            ),
        },
        (StorageKind::Azure, None, _) => bail!("--kind azure needs --key-file (the account key)"),
        (StorageKind::S3, None, Some(f)) => match super::location::key_lines(&f)?.as_slice() {
            [id, secret] => {
                location.access_key_id = Some(id.clone());
                Some(secret.clone())
            }
            _ => bail!(
                "--access-key-file {}: must hold two lines, the access key id and the secret access key",
                f.display()
            ),
        },
        (StorageKind::S3, _, None) => {
            bail!("--kind s3 needs --access-key-file (access key id and secret key)")
        }
        (StorageKind::Folder, None, None) => None,
        (kind, _, _) => bail!("--kind {kind} takes only its own key file option"),
    };
    let req = AddStorage {
        name: a.name,
        kind: a.kind,
        location,
        secret,
    };
    // The same checks as the server's, with the same messages, before anything is sent.
    req.validate().map_err(anyhow::Error::msg)?;
    Ok(req)
}

fn show(t: &StorageInfo) {
    println!("storage target {} ({}): {}", t.name, t.kind, t.url);
}

pub fn run(s: &ServerArgs, c: StorageCommand) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    match c {
        StorageCommand::Add(a) => {
            let json = a.json;
            let t: StorageInfo = cl.post("/storage", &request(a)?)?;
            if json {
                print_json(&t)?;
            } else {
                show(&t);
            }
        }
        StorageCommand::List { json } => {
            let list: Vec<StorageInfo> = cl.get("/storage")?;
            if json {
                return print_json(&list).map(|_| ExitCode::SUCCESS);
            }
            if list.is_empty() {
                println!("no storage targets");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<20} {:<7} {:<21} {:<40} USED BY",
                "NAME", "KIND", "ADDED", "WHERE"
            );
            for t in list {
                println!(
                    "{:<20} {:<7} {:<21} {:<40} {}",
                    t.name,
                    t.kind,
                    t.created,
                    t.url,
                    t.used_by.join(", ")
                );
            }
        }
        StorageCommand::Test { name, json } => {
            let r: StorageTestReport = cl.post(&format!("/storage/{}/test", seg(&name)), &())?;
            if json {
                return print_json(&r).map(|_| ExitCode::SUCCESS);
            }
            let mib = |b: u64| b as f64 / f64::from(1 << 20);
            println!(
                "storage target {} ({}): {} MiB probe written in {:.1} ms ({:.1} MiB/s), read back in {:.1} ms ({:.1} MiB/s), listed in {:.1} ms, deleted in {:.1} ms",
                r.name,
                r.url,
                mib(r.bytes),
                r.put_ms,
                mib(r.write_bytes_per_sec),
                r.get_ms,
                mib(r.read_bytes_per_sec),
                r.list_ms,
                r.delete_ms
            );
        }
        StorageCommand::Remove { name } => {
            let t: StorageInfo = cl.delete(&format!("/storage/{}", seg(&name)))?;
            println!("storage target {} removed (its objects stay)", t.name);
        }
        StorageCommand::Key { name, out } => super::online::save_key(&cl, &name, &out)?,
        StorageCommand::Attach {
            name,
            key_file,
            json,
        } => {
            let key = super::location::read_key_file(&key_file)?;
            let r: AttachReport = cl.post(
                &format!("/storage/{}/attach", seg(&name)),
                &AttachStorage { key },
            )?;
            if json {
                return print_json(&r).map(|_| ExitCode::SUCCESS);
            }
            println!(
                "attached the online copy on {} ({}): {} recovery points of {}",
                r.name,
                r.url,
                r.recovery_points,
                if r.sources.is_empty() {
                    "no VM".to_string()
                } else {
                    r.sources.join(", ")
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `holdfast verify --storage NAME [--sample P]`: an online verify job on the server,
/// waited for; exit 1 when it finds damage or fails.
pub fn verify(
    s: &ServerArgs,
    name: &str,
    sample: Option<u8>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    let j: protocol::JobInfo = cl.post(
        &format!("/storage/{}/verify", seg(name)),
        &protocol::VerifyStorage {
            sample_percent: sample,
        },
    )?;
    super::admin::started(&cl, j, true, json)
}
