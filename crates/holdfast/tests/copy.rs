//! `holdfast copy`: two recovery points of a local datastore copied to Azurite and to
//! moto (created encrypted by --create), restored from object storage byte-identical;
//! the second, incremental copy uploads a small fraction of the first.
mod common;
use common::*;

/// `holdfast ARGS` with `env` set (and no inherited storage variables); its output.
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

/// `holdfast copy --json` of the newest point of `vm`; its one copy and the requests.
fn copy_json(
    env: &[(&str, String)],
    src: &std::path::Path,
    url: &str,
    key: &std::path::Path,
    create: bool,
) -> (serde_json::Value, serde_json::Value) {
    let mut args = vec![
        "copy",
        "-d",
        s(src),
        "--to",
        url,
        "--to-key-file",
        s(key),
        "--source",
        "host/vm",
        "--json",
    ];
    if create {
        args.push("--create");
    }
    let v: serde_json::Value = serde_json::from_str(&local(env, &args)).unwrap();
    let copies = v["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 1, "{v}");
    (copies[0].clone(), v["requests"].clone())
}

#[test]
fn copies_to_azurite_and_moto_restore_identically_and_incrementally() {
    let t = tempfile::tempdir().unwrap();
    let azurite = testkit::Azurite::start();
    azurite.create_container("copy");
    let moto = testkit::Moto::start();
    moto.create_bucket("copy");
    let az_key = t.path().join("azure.key");
    std::fs::write(&az_key, testkit::AZURITE_KEY).unwrap();
    let s3_key = t.path().join("s3.key");
    std::fs::write(&s3_key, "AKIDHOLDFAST\nmoto-accepts-any-secret\n").unwrap();
    let azure_env = vec![
        ("HOLDFAST_STORAGE_KEY_FILE", s(&az_key).to_string()),
        ("HOLDFAST_STORAGE_ENDPOINT", azurite.endpoint()),
    ];
    let s3_env = vec![
        ("HOLDFAST_STORAGE_KEY_FILE", s(&s3_key).to_string()),
        ("HOLDFAST_STORAGE_ENDPOINT", moto.endpoint()),
    ];
    let az_url = format!("az://{}/copy", testkit::AZURITE_ACCOUNT);

    let src = t.path().join("local");
    create_store(&src);
    let disk = t.path().join("disk.raw");
    make_disk(&disk, 32 << 20, 12 << 20, 11);
    let p1 = backup(&src, "host/vm", &[&disk]);
    let v1 = t.path().join("v1.raw");
    std::fs::copy(&disk, &v1).unwrap();
    mutate(&disk, &mut testkit::Rng::new(12), 4);
    let p2 = backup(&src, "host/vm", &[&disk]);

    for (env, url, name) in [
        (&azure_env, az_url.as_str(), "az"),
        (&s3_env, "s3://copy", "s3"),
    ] {
        let key = t.path().join(format!("{name}-datastore.key"));
        // The first copy: point 1 only, into a new encrypted datastore.
        let first = local(
            env,
            &[
                "copy",
                "-d",
                s(&src),
                "--to",
                url,
                "--to-key-file",
                s(&key),
                "--create",
                "--point",
                &p1,
                "--json",
            ],
        );
        let first: serde_json::Value = serde_json::from_str(&first).unwrap();
        let c1 = &first["copies"][0];
        assert_eq!(c1["point"], p1.as_str(), "{first}");
        assert_eq!(c1["ranges_compared"], false);
        let up1 = c1["bytes_uploaded"].as_u64().unwrap();
        assert!(up1 > 8 << 20, "{first}");
        assert!(first["requests"]["put"].as_u64().unwrap() >= 3, "{first}");
        assert!(
            first["requests"]["bytes_up"].as_u64().unwrap() >= up1,
            "{first}"
        );
        // The second: the newest point, only the changed blocks.
        let (c2, req2) = copy_json(env, &src, url, &key, false);
        assert_eq!(c2["point"], p2.as_str());
        assert_eq!(c2["base"], p1.as_str());
        assert_eq!(c2["ranges_compared"], true);
        let up2 = c2["bytes_uploaded"].as_u64().unwrap();
        assert!(up2 * 10 < up1, "second copy uploaded {up2} of {up1}: {c2}");
        assert!(req2["put"].as_u64().unwrap() <= 4, "{req2}");
        // Again: already there, nothing uploaded.
        let (c3, req3) = copy_json(env, &src, url, &key, false);
        assert_eq!(c3["already_there"], true);
        assert_eq!(req3["put"], 0);

        // Both points restore from object storage byte for byte, under the same ids.
        let listed = local(
            env,
            &[
                "recovery-points",
                "-d",
                url,
                "--key-file",
                s(&key),
                "--json",
            ],
        );
        let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
        let ids: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [p1.as_str(), p2.as_str()]);
        for (point, want) in [(&p1, &v1), (&p2, &disk)] {
            let out = t.path().join(format!("{name}-{point}.raw"));
            local(
                env,
                &[
                    "restore",
                    "-d",
                    url,
                    "--key-file",
                    s(&key),
                    "--source",
                    "host/vm",
                    "--point",
                    point,
                    "-o",
                    s(&out),
                ],
            );
            assert_eq!(hash_file(&out), hash_file(want), "{name} {point}");
            std::fs::remove_file(&out).unwrap();
        }
    }
    // --create never overwrites a key file.
    let key = t.path().join("az-datastore.key");
    let o = local_out(
        &[],
        &[
            "copy",
            "-d",
            s(&src),
            "--to",
            s(&t.path().join("new")),
            "--to-key-file",
            s(&key),
            "--create",
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("never overwrites"));
}
