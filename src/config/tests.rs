use super::*;

fn env(vars: &[(&str, &str)]) -> impl Fn() -> Vec<(String, String)> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move || vars.clone()
}

fn load_str(
    toml_text: &str,
    vars: &[(&str, &str)],
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let dir = std::env::temp_dir().join(format!("dynamix-config-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let path = dir.join("c.toml");
    std::fs::write(&path, toml_text).expect("the config file written");
    let result = load(Some(&path), &env(vars), overrides);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn kv_router_settings_layer_and_validate() {
    let kv = "[router]\nmode = \"kv\"\n[engine]\nkind = \"mocker\"\n";
    let config = load_str(kv, &[], &Overrides::default()).expect("kv + mocker is valid");
    assert_eq!(config.router.kv_overlap_score_weight, 1.0);
    assert!(config.router.use_kv_events);

    let config = load_str(
        kv,
        &[
            ("DYN_ROUTER_TEMPERATURE", "0.5"),
            ("DYN_OVERLAP_SCORE_WEIGHT", "2"),
            ("DYN_ROUTER_USE_KV_EVENTS", "false"),
        ],
        &Overrides::default(),
    )
    .expect("env");
    assert_eq!(config.router.temperature, 0.5);
    assert_eq!(config.router.kv_overlap_score_weight, 2.0);
    assert!(!config.router.use_kv_events);

    let flags = Overrides {
        settings: vec![
            (
                "router.use_kv_events".into(),
                Value::Boolean(true),
                "--use-kv-events".into(),
            ),
            (
                "router.temperature".into(),
                Value::Float(0.25),
                "--router-temperature".into(),
            ),
        ],
        ..Overrides::default()
    };
    let config = load_str(kv, &[("DYN_ROUTER_USE_KV_EVENTS", "false")], &flags).expect("flags");
    assert!(config.router.use_kv_events, "flags beat the environment");
    assert_eq!(config.router.temperature, 0.25);

    for (text, needle) in [
        (
            "[router]\nmode = \"kv\"\nkv_cache_block_size = 32\n[engine]\nkind = \"mocker\"\n"
                .to_string(),
            "kv_cache_block_size",
        ),
        (
            "[router]\nmode = \"kv\"\n".to_string(),
            "emits no KV events",
        ),
        (format!("{kv}[mocker]\nblock_size = 1\n"), "block_size"),
        (
            "[router]\ntemperature = -1.0\n".to_string(),
            "router.temperature",
        ),
        (
            "[router]\nprune_target_ratio = 1.5\n".to_string(),
            "router.prune_target_ratio",
        ),
    ] {
        let err = load_str(&text, &[], &Overrides::default())
            .expect_err(&text)
            .to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
    // Approximate mode works with engines that emit no events.
    load_str(
        "[router]\nmode = \"kv\"\nuse_kv_events = false\n",
        &[],
        &Overrides::default(),
    )
    .expect("approximate kv over echo");
}

#[test]
fn embedded_default_loads() {
    let config = load(None, &env(&[]), &Overrides::default()).expect("default config is valid");
    assert_eq!(config.http.port, 8000);
}

#[test]
fn layering_order_is_defaults_file_env_flags() {
    let file = "[http]\nport = 9001\nhost = \"127.0.0.1\"\n[echo]\ntoken_delay_ms = 3\n";
    let c = load_str(file, &[], &Overrides::default()).expect("valid");
    assert_eq!(
        (c.http.port, c.echo.token_delay_ms, c.http.body_limit_mb),
        (9001, 3, 45)
    );
    let c = load_str(file, &[("DYN_HTTP_PORT", "9002")], &Overrides::default()).expect("valid");
    assert_eq!(c.http.port, 9002);
    let c = load_str(
        file,
        &[("DYN_HTTP__PORT", "9003"), ("DYN_HTTP_PORT", "9002")],
        &Overrides::default(),
    )
    .expect("valid");
    assert_eq!(c.http.port, 9003, "the generic form is more specific");
    let flags = Overrides {
        http_port: Some(9004),
        ..Overrides::default()
    };
    let c = load_str(file, &[("DYN_HTTP_PORT", "9002")], &flags).expect("valid");
    assert_eq!(c.http.port, 9004);
    let c =
        load_str(file, &[("DYN_HTTP_PORT", "")], &Overrides::default()).expect("empty env ignored");
    assert_eq!(c.http.port, 9001);
}

#[test]
fn env_values_are_typed_by_their_key() {
    let c = load_str(
        "",
        &[
            ("DYN_MODEL_NAME", "1234"),
            ("DYN_ENGINE__DEVICES", "[\"cpu:0\", \"cpu:1\"]"),
            ("DYN_IGNORE_OPENAI_FE_UNSUPPORTED_FIELDS", "1"),
            ("DYN_HTTP_SVC_CHAT_PATH", "/chat"),
        ],
        &Overrides::default(),
    )
    .expect("valid");
    assert_eq!(c.model.name, "1234");
    assert_eq!(c.engine.devices, vec!["cpu:0", "cpu:1"]);
    assert!(c.validator.ignore_unsupported_fields);
    assert_eq!(c.http.paths.chat, "/chat");
}

#[test]
fn errors_name_key_value_and_source() {
    let err = load_str("[http]\nprot = 1\n", &[], &Overrides::default())
        .expect_err("unknown key")
        .to_string();
    assert!(
        err.contains("`http.prot`") && err.contains("c.toml"),
        "{err}"
    );
    let err = load_str("", &[("DYN_HTTP_PORT", "abc")], &Overrides::default())
        .expect_err("bad type")
        .to_string();
    assert!(
        err.contains("`http.port`") && err.contains("DYN_HTTP_PORT=\"abc\""),
        "{err}"
    );
    let err = load_str("[http]\nport = 70000\n", &[], &Overrides::default())
        .expect_err("range")
        .to_string();
    assert!(
        err.contains("`http.port`") && err.contains("70000"),
        "{err}"
    );
    let err = load_str("", &[("DYN_ENGINE__WHEELS", "4")], &Overrides::default())
        .expect_err("unknown env key")
        .to_string();
    assert!(
        err.contains("`engine.wheels`") && err.contains("DYN_ENGINE__WHEELS"),
        "{err}"
    );
    let err = load_str(
        "[http]\noverload_status_code = 100\n",
        &[],
        &Overrides::default(),
    )
    .expect_err("1xx")
    .to_string();
    assert!(err.contains("http.overload_status_code"), "{err}");
    let err = load_str("[router]\nmode = \"fastest\"\n", &[], &Overrides::default())
        .expect_err("variant")
        .to_string();
    assert!(
        err.contains("router.mode") && err.contains("fastest"),
        "{err}"
    );
    let err = load_str("not toml [", &[], &Overrides::default())
        .expect_err("syntax")
        .to_string();
    assert!(err.contains("not valid TOML"), "{err}");
}

#[test]
fn embeddings_settings_layer_and_validate() {
    let defaults = load(None, &env(&[]), &Overrides::default()).expect("default");
    assert!(
        defaults.embeddings.enabled,
        "configs/default.toml serves embeddings"
    );
    assert_eq!(defaults.embeddings.model_name, "all-MiniLM-L6-v2");
    assert_eq!(defaults.http.paths.embeddings, "/v1/embeddings");
    let config = load_str(
        "[embeddings]\nmax_batch_size = 8\n",
        &[
            ("DYN_EMBEDDINGS__THREADS", "2"),
            ("DYN_HTTP_SVC_EMB_PATH", "/emb"),
        ],
        &Overrides::default(),
    )
    .expect("valid");
    assert_eq!(
        (config.embeddings.max_batch_size, config.embeddings.threads),
        (8, 2)
    );
    assert_eq!(config.http.paths.embeddings, "/emb");
    let flags = Overrides {
        settings: vec![(
            "embeddings.enabled".into(),
            Value::Boolean(false),
            "--no-embeddings".into(),
        )],
        ..Overrides::default()
    };
    let config = load_str("", &[("DYN_EMBEDDINGS__ENABLED", "true")], &flags).expect("valid");
    assert!(!config.embeddings.enabled, "the flag beats env");
    for (text, needle) in [
        (
            "[embeddings]\nmax_batch_size = 0\n",
            "embeddings.max_batch_size",
        ),
        ("[embeddings]\nthreads = 0\n", "embeddings.threads"),
        (
            "[embeddings]\nmax_batch_tokens = 0\n",
            "embeddings.max_batch_tokens",
        ),
        (
            "[embeddings]\nmodel_name = \" \"\n",
            "embeddings.model_name",
        ),
        ("[embeddings]\nbatch = 4\n", "embeddings.batch"),
        (
            "[http.paths]\nembeddings = \"v1/emb\"\n",
            "http.paths.embeddings",
        ),
    ] {
        let err = load_str(text, &[], &Overrides::default())
            .expect_err(text)
            .to_string();
        assert!(err.contains(needle), "{text:?} → {err}");
    }
}

#[test]
fn migration_supervision_and_fault_settings_layer_and_validate() {
    let config = load_str(
        "[migration]\nlimit = 1\n",
        &[("DYN_MIGRATION_LIMIT", "4")],
        &Overrides::default(),
    )
    .expect("valid");
    assert_eq!(
        config.migration.limit, 4,
        "Dynamo's env name beats the file"
    );
    let overrides = Overrides {
        settings: vec![(
            "migration.limit".into(),
            Value::Integer(7),
            "--migration-limit".into(),
        )],
        ..Overrides::default()
    };
    let config = load_str("", &[("DYN_MIGRATION_LIMIT", "4")], &overrides).expect("valid");
    assert_eq!(config.migration.limit, 7, "the flag beats env");
    assert_eq!(Config::default().migration.limit, 0, "off by default");
    assert!(!Config::default().faults.enabled, "faults off by default");

    for (text, needle) in [
        ("[migration]\nlimit = -1\n", "migration.limit"),
        (
            "[migration]\nstall_timeout_secs = -1.0\n",
            "migration.stall_timeout_secs",
        ),
        (
            "[supervisor]\nrestart_window_secs = 0.0\n",
            "supervisor.restart_window_secs",
        ),
        (
            "[faults]\nenabled = true\nprobability = 2.0\n",
            "faults.probability",
        ),
        ("[faults]\nadmin_endpoint = true\n", "faults.admin_endpoint"),
        (
            "[faults]\nenabled = true\nkinds = [\"meteor\"]\n",
            "faults.kinds",
        ),
        (
            "[faults]\nenabled = true\n[[faults.inject]]\nkind = \"router_panic\"\nengine = 1\n",
            "faults.inject[0]",
        ),
    ] {
        let err = load_str(text, &[], &Overrides::default())
            .expect_err(text)
            .to_string();
        assert!(err.contains(needle), "{text:?} → {err}");
    }
}

#[test]
fn every_variable_outside_the_strict_layers_is_read_by_the_loader_too() {
    let config = load_str(
        "",
        &[
            ("DYN_TCP_MAX_MESSAGE_SIZE", "1024"),
            ("GMS_SOCKET_DIR", "/run/gms"),
            ("DYN_METRICS_REQUEST_DURATION_MAX", "30"),
            ("DYN_SYSTEM_ENABLED", "true"),
        ],
        &Overrides::default(),
    )
    .expect("valid");
    assert_eq!(config.distributed.max_message_size, 1024);
    assert_eq!(
        config.model_engine.gms_socket_dir.as_deref(),
        Some(Path::new("/run/gms"))
    );
    let duration =
        config.metrics.histograms[&dynamix_actors::metrics::HistogramKind::RequestDuration];
    assert_eq!(duration.max, 30.0);
    assert_eq!(
        config.log.deprecated.len(),
        1,
        "{:?}",
        config.log.deprecated
    );

    for (raw, needle) in [
        ("lots", "DYN_TCP_MAX_MESSAGE_SIZE"),
        (
            "0",
            "distributed.max_message_size = 0 must be a positive number of bytes",
        ),
    ] {
        let err = load_str(
            "",
            &[("DYN_TCP_MAX_MESSAGE_SIZE", raw)],
            &Overrides::default(),
        )
        .expect_err("rejected");
        assert!(err.to_string().contains(needle), "{raw}: {err}");
    }
}

#[test]
fn the_memory_service_subcommand_reads_its_variables_through_the_loader() {
    assert_eq!(gms_env(&[]).expect("no variables"), GmsEnv::default());
    let read = gms_env(&env(&[
        ("DYN_GMS_VMM_GRANULARITY", " 2097152 "),
        ("GMS_SOCKET_DIR", "/run/gms"),
    ])())
    .expect("valid");
    assert_eq!(read.granularity, Some(2 << 20));
    assert_eq!(read.socket_dir.as_deref(), Some(Path::new("/run/gms")));
    let err = gms_env(&env(&[("DYN_GMS_VMM_GRANULARITY", "2MiB")])())
        .expect_err("not a number")
        .to_string();
    assert!(err.contains("DYN_GMS_VMM_GRANULARITY=\"2MiB\""), "{err}");
}
