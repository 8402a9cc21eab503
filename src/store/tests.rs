use super::*;

#[test]
fn stale_temporary_files_of_dead_writers_are_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = tmp_name(std::ffi::OsStr::new("a.example.toml"), 7);
    assert_eq!(temp_writer(&ours), Some(std::process::id()));
    // pid 4194304 is above Linux's pid_max: never a live process.
    let dead = ".b.example.toml.tmp4194304.3";
    for name in [ours.as_str(), dead, "b.example.toml", ".hidden", ".x.tmp12"] {
        std::fs::write(dir.path().join(name), "x").expect("write");
    }
    assert_eq!(remove_stale_temps(dir.path()), 1);
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    left.sort();
    let mut want = vec![".hidden", ".x.tmp12", ours.as_str(), "b.example.toml"];
    want.sort_unstable();
    assert_eq!(left, want);
}

#[tokio::test]
async fn dir_store_round_trip_and_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DirStore::open(dir.path()).expect("open");
    assert_eq!(
        store.load_cert("mta-sts.a.example").await.expect("load"),
        None
    );
    store
        .save_cert("mta-sts.a.example", b"KEY+CHAIN".to_vec())
        .await
        .expect("save");
    let state = CertState {
        failures: 2,
        last_error: Some("boom".into()),
        ..CertState::default()
    };
    store
        .save_state("mta-sts.b.example", &state)
        .await
        .expect("state");
    store
        .save_account("https://ca.example/dir", b"{}".to_vec())
        .await
        .expect("account");
    assert_eq!(
        store.load_cert("mta-sts.a.example").await.expect("load"),
        Some(b"KEY+CHAIN".to_vec())
    );
    assert_eq!(
        store.load_state("mta-sts.b.example").await.expect("load"),
        Some(state)
    );
    assert_eq!(
        store
            .load_account("https://ca.example/dir")
            .await
            .expect("acct"),
        Some(b"{}".to_vec())
    );
    assert_eq!(
        store.load_account("https://other/dir").await.expect("acct"),
        None
    );
    assert_eq!(store.hosts(), ["mta-sts.a.example", "mta-sts.b.example"]);
    // Certificates only, from names: a state file or an unfinished
    // write is not a certificate.
    fs::write(
        dir.path().join("acme/certs/.mta-sts.c.example.pem.tmp1.0"),
        b"half",
    )
    .expect("tmp");
    assert_eq!(
        CertStore::cert_hosts(&store).await.expect("list"),
        ["mta-sts.a.example"]
    );
    assert_eq!(
        store
            .load_cert_blocking("mta-sts.a.example")
            .expect("blocking"),
        Some(b"KEY+CHAIN".to_vec())
    );
    #[cfg(unix)]
    assert_eq!(
        fs::metadata(dir.path().join("acme/certs/mta-sts.a.example.pem"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(matches!(
        store.load_cert("../etc/passwd").await,
        Err(StoreError::BadName(_))
    ));
}

#[test]
fn open_removes_unfinished_writes_and_reports_bad_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DirStore::open(dir.path()).expect("open");
    let tmp = dir.path().join("acme/certs/.mta-sts.a.example.pem.tmp42");
    fs::write(&tmp, b"half").expect("tmp");
    fs::write(
        dir.path().join("acme/state/mta-sts.a.example.json"),
        b"{\"failures\":",
    )
    .expect("bad json");
    let store2 = DirStore::open(dir.path()).expect("reopen");
    assert!(!tmp.exists());
    let err = store2
        .read_state("mta-sts.a.example")
        .expect_err("bad json");
    assert!(err.to_string().contains("mta-sts.a.example.json"), "{err}");
    drop(store);
}

/// Regression: a 253-character policy host (a 245-character domain)
/// made `certs/<host>.pem` and its temporary name too long for a file
/// name, so every issuance failed after the CA had signed.
#[tokio::test]
async fn longest_hosts_fit_and_short_ones_keep_their_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DirStore::open(dir.path()).expect("open");
    let label = "a".repeat(63);
    let long = format!("mta-sts.{label}.{label}.{label}.{}.example", "b".repeat(45));
    assert_eq!(long.len(), 253);
    // Same first 200 bytes: told apart by the hash.
    let also_long = long.replace(".example", ".examplf");
    let state = CertState {
        failures: 1,
        ..CertState::default()
    };
    for host in [&long, &also_long] {
        store
            .save_cert(host, format!("BUNDLE {host}").into_bytes())
            .await
            .expect("save cert");
        store.save_state(host, &state).await.expect("save state");
    }
    for host in [&long, &also_long] {
        assert_eq!(
            store.load_cert(host).await.expect("load"),
            Some(format!("BUNDLE {host}").into_bytes())
        );
        assert_eq!(
            store.load_state(host).await.expect("load"),
            Some(state.clone())
        );
        assert!(store.cert_path(host).expect("path").exists());
    }
    let mut listed = CertStore::cert_hosts(&store).await.expect("list");
    listed.sort();
    let mut expected = vec![long.clone(), also_long.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(store.hosts(), expected);
    for sub in ["certs", "state"] {
        for e in fs::read_dir(dir.path().join("acme").join(sub)).expect("dir") {
            let name = e.expect("entry").file_name();
            assert!(name.len() <= 255, "{name:?}");
            assert!(!name.to_string_lossy().contains(".tmp"), "{name:?}");
        }
    }
    // A file that names another host is refused, not served.
    fs::copy(
        store.cert_path(&long).expect("path"),
        store.cert_path(&also_long).expect("path"),
    )
    .expect("copy");
    let err = store.read_cert(&also_long).expect_err("wrong host");
    assert!(matches!(err, StoreError::WrongHost { .. }), "{err}");
    // Hosts that fit keep `<host>.pem` / `<host>.json`, as before.
    let fits = format!("{}example", "d.".repeat(120));
    assert_eq!(fits.len(), 247);
    store.save_cert(&fits, b"B".to_vec()).await.expect("save");
    store.save_state(&fits, &state).await.expect("state");
    assert!(dir.path().join(format!("acme/certs/{fits}.pem")).exists());
    assert!(dir.path().join(format!("acme/state/{fits}.json")).exists());
    assert_eq!(
        fs::read(dir.path().join(format!("acme/certs/{fits}.pem"))).expect("read"),
        b"B"
    );
}

#[test]
fn atomic_write_sets_mode_and_replaces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("key.pem");
    write_atomic(&path, b"one", KEY_MODE).expect("write");
    write_atomic(&path, b"two", KEY_MODE).expect("rewrite");
    assert_eq!(fs::read(&path).expect("read"), b"two");
    #[cfg(unix)]
    assert_eq!(
        fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
        0o600
    );
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .expect("readdir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    // The longest name a file may have: its temporary name still fits.
    let longest = dir.path().join("x".repeat(255));
    write_atomic(&longest, b"three", PUBLIC_MODE).expect("longest name");
    assert_eq!(fs::read(&longest).expect("read"), b"three");
}
