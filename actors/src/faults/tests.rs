use super::*;

fn enabled() -> FaultsConfig {
    FaultsConfig {
        enabled: true,
        ..FaultsConfig::default()
    }
}

#[test]
fn disabled_never_fires_and_refuses_to_arm() {
    let faults = FaultInjector::disabled();
    assert!(faults.arm(FaultSpec::new(FaultKind::RouterPanic)).is_err());
    assert_eq!(faults.on_engine_output(0, 1), None);
    assert!(!faults.on_route());
    assert_eq!(faults.injected_total(), 0);
}

#[test]
fn an_armed_engine_fault_waits_for_its_engine_and_token() {
    let faults = FaultInjector::new(enabled());
    faults
        .arm(FaultSpec {
            engine: Some(2),
            after_tokens: 3,
            ..FaultSpec::new(FaultKind::EnginePanic)
        })
        .unwrap();
    assert_eq!(faults.on_engine_output(1, 5), None, "another engine");
    assert_eq!(faults.on_engine_output(2, 2), None, "too early");
    assert_eq!(faults.on_engine_output(2, 3), Some(EngineFault::Panic));
    assert_eq!(faults.on_engine_output(2, 4), None, "one shot");
    assert_eq!(faults.injected()[&FaultKind::EnginePanic], 1);
}

#[test]
fn slow_lasts_its_token_count_then_stops() {
    let faults = FaultInjector::new(enabled());
    faults
        .arm(FaultSpec {
            duration_ms: Some(5),
            tokens: Some(3),
            ..FaultSpec::new(FaultKind::EngineSlow)
        })
        .unwrap();
    let slow = Some(EngineFault::Slow(Duration::from_millis(5)));
    assert_eq!(faults.on_engine_output(0, 1), slow);
    assert_eq!(faults.on_engine_output(0, 2), slow);
    assert_eq!(faults.on_engine_output(1, 1), None, "only that engine");
    assert_eq!(faults.on_engine_output(0, 3), slow);
    assert_eq!(faults.on_engine_output(0, 4), None);
}

#[test]
fn router_and_validator_faults_fire_once_each() {
    let faults = FaultInjector::new(enabled());
    faults.arm(FaultSpec::new(FaultKind::RouterPanic)).unwrap();
    faults
        .arm(FaultSpec {
            count: 2,
            ..FaultSpec::new(FaultKind::ValidatorPanic)
        })
        .unwrap();
    assert_eq!(faults.on_engine_output(0, 1), None, "not an engine fault");
    assert!(faults.on_route());
    assert!(!faults.on_route());
    assert!(faults.on_validate());
    assert!(faults.on_validate());
    assert!(!faults.on_validate());
    assert_eq!(faults.injected_total(), 3);
}

#[test]
fn random_faults_are_reproducible_from_the_seed() {
    let run = |seed| {
        let faults = FaultInjector::new(FaultsConfig {
            seed,
            probability: 0.05,
            ..enabled()
        });
        (0..2000)
            .map(|i| faults.on_engine_output(i % 4, 1 + (i as u32) % 7))
            .collect::<Vec<_>>()
    };
    let first = run(7);
    assert_eq!(first, run(7));
    assert_ne!(first, run(8));
    let fired = first.iter().filter(|f| f.is_some()).count();
    assert!((50..=150).contains(&fired), "about 5% of 2000: {fired}");
}

#[test]
fn bad_specs_and_configs_are_named() {
    let faults = FaultInjector::new(enabled());
    let err = faults
        .arm(FaultSpec {
            engine: Some(1),
            ..FaultSpec::new(FaultKind::RouterPanic)
        })
        .unwrap_err();
    assert_eq!(err, FaultError::EngineFieldsOn("router_panic"));
    assert!(err.to_string().contains("router_panic"), "{err}");
    let config = FaultsConfig {
        probability: 1.5,
        ..enabled()
    };
    let err = config.validate().unwrap_err();
    assert_eq!(err, FaultError::Probability(1.5));
    assert!(err.to_string().contains("faults.probability"), "{err}");
    let config = FaultsConfig {
        inject: vec![FaultSpec {
            count: 0,
            ..FaultSpec::new(FaultKind::EngineError)
        }],
        ..enabled()
    };
    let err = config.validate().unwrap_err();
    assert!(
        matches!(&err, FaultError::Inject { index: 0, problem } if **problem == FaultError::ZeroCount),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "faults.inject[0]: count must be at least 1"
    );
}
