//! Storage targets (`holdfast storage`): added, listed and removed by administrators
//! only; a target's secret reaches the server once and is never shown, logged or put
//! in the catalog.

mod common;

use client::{Auth, Client};
use common::cluster::*;
use common::*;
use protocol::*;

const AZURE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const S3_SECRET: &str = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY";

/// Every file under `dir` (the server's folder), searched for `needle`; secrets files
/// excepted.
fn files_holding(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "secrets") {
                    continue;
                }
                todo.push(p);
            } else if let Ok(b) = std::fs::read(&p)
                && b.windows(needle.len()).any(|w| w == needle.as_bytes())
            {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

#[test]
fn storage_targets_are_admin_only_and_their_secrets_never_shown() {
    let t = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(t.path(), FAST);
    let keys = t.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let az_key = keys.join("azure.key");
    std::fs::write(&az_key, format!("{AZURE_KEY}\n")).unwrap();
    let s3_key = keys.join("s3.key");
    std::fs::write(&s3_key, format!("AKIDHOLDFAST\n{S3_SECRET}\n")).unwrap();
    let nas = t.path().join("nas");

    let out = c.cli_ok(&[
        "storage",
        "add",
        "offsite",
        "--kind",
        "azure",
        "--account",
        "devstoreaccount1",
        "--container",
        "holdfast",
        "--endpoint",
        "http://127.0.0.1:10000/devstoreaccount1",
        "--key-file",
        s(&az_key),
    ]);
    assert_eq!(
        out.trim(),
        "storage target offsite (azure): az://devstoreaccount1/holdfast"
    );
    c.cli_ok(&[
        "storage",
        "add",
        "s3-copy",
        "--kind",
        "s3",
        "--bucket",
        "backups",
        "--region",
        "us-east-1",
        "--endpoint",
        "http://127.0.0.1:5000",
        "--access-key-file",
        s(&s3_key),
    ]);
    c.cli_ok(&[
        "storage",
        "add",
        "nas",
        "--kind",
        "folder",
        "--path",
        s(&nas),
    ]);

    let json = c.cli_ok(&["storage", "list", "--json"]);
    let list: Vec<StorageInfo> = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["nas", "offsite", "s3-copy"]);
    assert_eq!(list[2].url, "s3://backups");
    assert_eq!(
        list[2].location.access_key_id.as_deref(),
        Some("AKIDHOLDFAST")
    );
    assert_eq!(list[0].location.path.as_deref(), Some(s(&nas)));
    let table = c.cli_ok(&["storage", "list"]);
    for secret in [AZURE_KEY, S3_SECRET] {
        assert!(!json.contains(secret) && !table.contains(secret));
        // Not in the catalog, its journal or anything else of the server's but the
        // secret store.
        assert_eq!(files_holding(&c.server_dir(), secret), Vec::<String>::new());
    }
    let sfile = c.server_dir().join("secrets/offsite.secret");
    assert_eq!(std::fs::read_to_string(&sfile).unwrap(), AZURE_KEY);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sfile).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // A second `add` of a name in use is refused and leaves the first's secret alone.
    let other = keys.join("other.key");
    std::fs::write(&other, "b3RoZXI=\n").unwrap();
    let o = c.cli(&[
        "storage",
        "add",
        "offsite",
        "--kind",
        "azure",
        "--account",
        "acct",
        "--container",
        "c",
        "--key-file",
        s(&other),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("\"offsite\" already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&sfile).unwrap(), AZURE_KEY);

    // Bad input: the field is named, nothing is kept.
    for (args, want) in [
        (
            vec![
                "storage",
                "add",
                "x",
                "--kind",
                "azure",
                "--account",
                "a",
                "--key-file",
                s(&az_key),
            ],
            "container: needed for kind azure",
        ),
        (
            vec![
                "storage",
                "add",
                "x",
                "--kind",
                "s3",
                "--bucket",
                "b",
                "--region",
                "r",
                "--access-key-file",
                s(&az_key),
            ],
            "must hold two lines",
        ),
        (
            vec![
                "storage",
                "add",
                "x",
                "--kind",
                "folder",
                "--path",
                "relative/dir",
            ],
            "path: ",
        ),
        (
            vec![
                "storage", "add", "a/b", "--kind", "folder", "--path", "/srv",
            ],
            "name: ",
        ),
        (
            vec!["storage", "add", "x", "--kind", "gcs", "--path", "/srv"],
            "invalid value 'gcs'",
        ),
    ] {
        let o = c.cli(&args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A folder target may not overlap the server's own folders.
    let ds_dir = c.datastore();
    let inside = ds_dir.join("online");
    for p in [s(&ds_dir), s(&inside), "/", s(&c.server_dir())] {
        let o = c.cli(&["storage", "add", "mine", "--kind", "folder", "--path", p]);
        assert!(!o.status.success(), "{p}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("a storage target needs a folder of its own"),
            "{p}: {err}"
        );
    }

    // The API refuses what the CLI would (a client that skips the CLI's checks).
    let admin = c.admin();
    let e = admin
        .post::<_, StorageInfo>(
            "/storage",
            &AddStorage {
                name: "y".into(),
                kind: StorageKind::S3,
                location: StorageLocation {
                    bucket: Some("b".into()),
                    region: Some("us-east-1".into()),
                    access_key_id: Some("id".into()),
                    ..StorageLocation::default()
                },
                secret: None,
            },
        )
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("secret: needed for kind s3"), "{e}");
    assert_eq!(admin.get::<Vec<StorageInfo>>("/storage").unwrap().len(), 3);

    // Agents and anonymous callers may not see or change targets.
    std::fs::create_dir_all(t.path().join("vms")).unwrap();
    let adir = c.agent("hv01", &t.path().join("vms"));
    wait_until(
        "the agent enrolls",
        std::time::Duration::from_secs(30),
        || pki::AgentIdentity::load(&adir).is_ok(),
    );
    let id = pki::AgentIdentity::load(&adir).unwrap();
    let agent = Client::new(&c.url, id.client_config().unwrap(), Auth::ClientCert).unwrap();
    let e = agent.get::<Vec<StorageInfo>>("/storage").unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = agent
        .post::<_, StorageInfo>(
            "/storage",
            &AddStorage {
                name: "evil".into(),
                kind: StorageKind::Folder,
                location: StorageLocation {
                    path: Some("/tmp/evil".into()),
                    ..StorageLocation::default()
                },
                secret: None,
            },
        )
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = agent.delete::<StorageInfo>("/storage/offsite").unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    // The online copy's key, attaching another key, verifying and copying now are the
    // administrator's too: an agent gets 403 and an anonymous caller 401 on each.
    for anyone in [&agent, &c.anonymous()] {
        let want = if std::ptr::eq(anyone, &agent) {
            403
        } else {
            401
        };
        let e = anyone
            .get::<StorageKey>("/storage/offsite/key")
            .unwrap_err();
        assert_eq!(e.status(), Some(want), "{e}");
        let e = anyone
            .post::<_, AttachReport>(
                "/storage/offsite/attach",
                &AttachStorage {
                    key: "planted".into(),
                },
            )
            .unwrap_err();
        assert_eq!(e.status(), Some(want), "{e}");
        let e = anyone
            .post::<_, JobInfo>("/storage/offsite/verify", &VerifyStorage::default())
            .unwrap_err();
        assert_eq!(e.status(), Some(want), "{e}");
        let e = anyone
            .post::<_, OnlineCopyQueued>("/protection-groups/g/online-copy", &())
            .unwrap_err();
        assert_eq!(e.status(), Some(want), "{e}");
        let e = anyone
            .get_bytes("/recovery-points/x/browse?from=online:offsite")
            .unwrap_err();
        assert_eq!(e.status(), Some(want), "{e}");
    }
    let e = c
        .anonymous()
        .get::<Vec<StorageInfo>>("/storage")
        .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");

    // Remove forgets the target and its secret; a second remove is a 404.
    let out = c.cli_ok(&["storage", "remove", "offsite"]);
    assert!(out.contains("offsite removed"), "{out}");
    assert!(!sfile.exists());
    let o = c.cli(&["storage", "remove", "offsite"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));

    // Targets survive a restart (they are in the catalog).
    c.kill_server();
    c.start_server();
    let list: Vec<StorageInfo> = c.admin().get("/storage").unwrap();
    assert_eq!(list.len(), 2);
}

/// Adds target `name` through the CLI; `extra` are its location flags.
fn add(c: &Cluster, name: &str, kind: &str, extra: &[String]) {
    let mut args = vec!["storage", "add", name, "--kind", kind];
    args.extend(extra.iter().map(String::as_str));
    c.cli_ok(&args);
}

fn flags(pairs: &[(&str, &str)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| [format!("--{k}"), v.to_string()])
        .collect()
}

#[test]
fn storage_test_probes_azurite_s3_and_a_folder_and_names_what_fails() {
    let t = tempfile::tempdir().unwrap();
    let c = Cluster::start(t.path(), FAST);
    let azurite = testkit::Azurite::start();
    azurite.create_container("holdfast");
    let moto = testkit::Moto::start();
    moto.create_bucket("holdfast");
    let keys = t.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let az_key = keys.join("azure.key");
    std::fs::write(&az_key, testkit::AZURITE_KEY).unwrap();
    let s3_key = keys.join("s3.key");
    std::fs::write(&s3_key, "AKIDHOLDFAST\nmoto-accepts-any-secret\n").unwrap();
    let wrong_key = keys.join("wrong.key");
    std::fs::write(&wrong_key, "d3Jvbmcta2V5LXdyb25nLWtleQ==").unwrap();
    let az_endpoint = azurite.endpoint();
    let azure = |key: &std::path::Path, container: &str| {
        flags(&[
            ("account", testkit::AZURITE_ACCOUNT),
            ("container", container),
            ("endpoint", &az_endpoint),
            ("key-file", s(key)),
        ])
    };
    let s3 = |endpoint: &str| {
        flags(&[
            ("bucket", "holdfast"),
            ("region", "us-east-1"),
            ("endpoint", endpoint),
            ("access-key-file", s(&s3_key)),
        ])
    };
    add(&c, "azurite", "azure", &azure(&az_key, "holdfast"));
    add(&c, "moto", "s3", &s3(&moto.endpoint()));
    add(
        &c,
        "nas",
        "folder",
        &flags(&[("path", s(&t.path().join("nas")))]),
    );

    for name in ["azurite", "moto", "nas"] {
        let out = c.cli_ok(&["storage", "test", name]);
        assert!(out.contains("4 MiB probe written in"), "{out}");
        let r: StorageTestReport =
            serde_json::from_str(&c.cli_ok(&["storage", "test", name, "--json"])).unwrap();
        assert_eq!(r.bytes, 4 << 20);
        assert!(
            r.write_bytes_per_sec > 0 && r.read_bytes_per_sec > 0,
            "{r:?}"
        );
        assert!(r.put_ms > 0.0 && r.get_ms > 0.0, "{r:?}");
    }
    // The probe leaves nothing behind.
    let left: Vec<_> = std::fs::read_dir(t.path().join("nas/probe"))
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // What fails is named, with a non-zero exit and in bounded time: a wrong key, a
    // container that does not exist, a server that is not there.
    add(&c, "wrong-key", "azure", &azure(&wrong_key, "holdfast"));
    add(
        &c,
        "no-container",
        "azure",
        &azure(&az_key, "no-such-container"),
    );
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    add(
        &c,
        "dead",
        "s3",
        &s3(&format!("http://127.0.0.1:{dead_port}")),
    );
    for (name, url) in [
        ("wrong-key", "az://devstoreaccount1/holdfast"),
        ("no-container", "az://devstoreaccount1/no-such-container"),
        ("dead", "s3://holdfast"),
    ] {
        let started = std::time::Instant::now();
        let o = c.cli(&["storage", "test", name]);
        assert!(!o.status.success(), "{name}");
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("{name} ({:?}): {}", started.elapsed(), err.trim());
        assert!(err.contains(url) && err.contains("502"), "{name}: {err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(90),
            "{name} took {:?}",
            started.elapsed()
        );
    }
}

/// `holdfast ARGS` with `env` set; must succeed; its stdout.
fn local(env: &[(&str, String)], args: &[&str]) -> String {
    let o = local_out(env, args);
    assert!(
        o.status.success(),
        "holdfast {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn local_out(env: &[(&str, String)], args: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new(BIN);
    c.args(args)
        .env_remove("HOLDFAST_STORAGE_KEY_FILE")
        .env_remove("HOLDFAST_STORAGE_ENDPOINT")
        .env_remove("HOLDFAST_STORAGE_REGION");
    for (k, v) in env {
        c.env(k, v);
    }
    run_bounded(c, &format!("holdfast {args:?}"), HANG)
}

#[test]
fn a_local_datastore_lives_on_azurite_and_s3_with_the_same_commands() {
    let t = tempfile::tempdir().unwrap();
    let azurite = testkit::Azurite::start();
    azurite.create_container("store");
    let moto = testkit::Moto::start();
    moto.create_bucket("store");
    let az_key = t.path().join("azure.key");
    std::fs::write(&az_key, testkit::AZURITE_KEY).unwrap();
    let s3_key = t.path().join("s3.key");
    std::fs::write(&s3_key, "AKIDHOLDFAST\nmoto-accepts-any-secret\n").unwrap();
    let disk = t.path().join("disk.raw");
    make_disk(&disk, 16 << 20, 6 << 20, 7);
    let enc_key = t.path().join("store.key");

    let azure_env = vec![
        ("HOLDFAST_STORAGE_KEY_FILE", s(&az_key).to_string()),
        ("HOLDFAST_STORAGE_ENDPOINT", azurite.endpoint()),
    ];
    let s3_env = vec![
        ("HOLDFAST_STORAGE_KEY_FILE", s(&s3_key).to_string()),
        ("HOLDFAST_STORAGE_ENDPOINT", moto.endpoint()),
    ];
    let az_url = format!("az://{}/store", testkit::AZURITE_ACCOUNT);
    // Encrypted on Azure (the key file must be named), plain on S3.
    let o = local_out(&azure_env, &["datastore", "create", &az_url, "--encrypt"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs --key-file"));
    local(
        &azure_env,
        &[
            "datastore",
            "create",
            &az_url,
            "--encrypt",
            "--key-file",
            s(&enc_key),
        ],
    );
    local(&s3_env, &["datastore", "create", "s3://store"]);
    // A second create on a store in use is refused.
    let o = local_out(&s3_env, &["datastore", "create", "s3://store"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not empty"));

    for (env, url, key) in [
        (&azure_env, az_url.as_str(), Some(s(&enc_key))),
        (&s3_env, "s3://store", None),
    ] {
        let with_key = |args: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            if let Some(k) = key {
                v.extend(["--key-file".to_string(), k.to_string()]);
            }
            v
        };
        let run = |args: &[&str]| {
            let v = with_key(args);
            local(env, &v.iter().map(String::as_str).collect::<Vec<_>>())
        };
        run(&["backup", "-d", url, "--source", "vm1", s(&disk)]);
        let points = run(&["recovery-points", "-d", url, "--json"]);
        assert!(points.contains("\"vm1\""), "{points}");
        let out = t.path().join(format!("restored-{}.raw", url.len()));
        run(&["restore", "-d", url, "--source", "vm1", "-o", s(&out)]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&disk).unwrap(),
            "{url}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&run(&["verify", "-d", url, "--json"])).unwrap();
        assert_eq!(v["points"], 1, "{v}");
        assert_eq!(v["damaged_files"], serde_json::json!([]), "{v}");
        assert_eq!(v["damaged_points"], serde_json::json!([]), "{v}");
        run(&["gc", "-d", url]);
    }

    // Two writers at once: one holds the lease, the other waits for it; both finish
    // and both points are there.
    let writers: Vec<_> = ["vm2", "vm3"]
        .into_iter()
        .map(|src| {
            let env = s3_env.clone();
            let disk = disk.clone();
            std::thread::spawn(move || {
                local(
                    &env,
                    &["backup", "-d", "s3://store", "--source", src, s(&disk)],
                )
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let points = local(&s3_env, &["recovery-points", "-d", "s3://store", "--json"]);
    for src in ["vm1", "vm2", "vm3"] {
        assert!(points.contains(&format!("\"{src}\"")), "{points}");
    }

    // What is missing or malformed is named.
    let o = local_out(&[], &["recovery-points", "-d", "s3://store"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("HOLDFAST_STORAGE_KEY_FILE"));
    let o = local_out(
        &azure_env,
        &["recovery-points", "-d", "az://only-an-account"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("az://ACCOUNT/CONTAINER"));
    let o = local_out(&azure_env, &["recovery-points", "-d", &az_url]);
    assert!(
        !o.status.success(),
        "an encrypted store opened without its key"
    );
}

#[test]
fn a_backup_killed_on_object_storage_leaves_garbage_that_gc_removes() {
    let t = tempfile::tempdir().unwrap();
    let moto = testkit::Moto::start();
    moto.create_bucket("store");
    let s3_key = t.path().join("s3.key");
    std::fs::write(&s3_key, "AKIDHOLDFAST\nmoto-accepts-any-secret\n").unwrap();
    let env = vec![
        ("HOLDFAST_STORAGE_KEY_FILE", s(&s3_key).to_string()),
        ("HOLDFAST_STORAGE_ENDPOINT", moto.endpoint()),
    ];
    let store = objstore::open(&objstore::Target::S3 {
        bucket: "store".into(),
        endpoint: Some(moto.endpoint()),
        region: "us-east-1".into(),
        access_key_id: "AKIDHOLDFAST".into(),
        secret_access_key: objstore::Secret::new("moto-accepts-any-secret"),
    })
    .unwrap();
    local(&env, &["datastore", "create", "s3://store"]);
    // Random data does not compress: many 8 MiB packs, so the kill lands mid-backup.
    let disk = t.path().join("big.raw");
    make_disk(&disk, 96 << 20, 96 << 20, 11);

    let mut c = std::process::Command::new(BIN);
    c.args(["backup", "-d", "s3://store", "--source", "vm", s(&disk)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in &env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    wait_until("a pack lands", std::time::Duration::from_secs(60), || {
        !store.list("packs/").unwrap().is_empty()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let orphans = store.list("packs/").unwrap();
    assert!(!orphans.is_empty());
    assert!(
        store.list("points/").unwrap().is_empty(),
        "no point may appear"
    );
    let points = local(&env, &["recovery-points", "-d", "s3://store", "--json"]);
    assert!(!points.contains("\"vm\""), "{points}");

    // The killed writer's lease expires (60 s) or is taken over; gc then removes
    // every pack no manifest refers to.
    let report = local(&env, &["gc", "-d", "s3://store", "--json"]);
    assert!(
        store.list("packs/").unwrap().is_empty(),
        "gc left {:?} ({report})",
        store.list("packs/").unwrap()
    );

    // And the store works: a backup, a byte-identical restore.
    local(
        &env,
        &["backup", "-d", "s3://store", "--source", "vm", s(&disk)],
    );
    let out = t.path().join("out.raw");
    local(
        &env,
        &[
            "restore",
            "-d",
            "s3://store",
            "--source",
            "vm",
            "-o",
            s(&out),
        ],
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());
}
