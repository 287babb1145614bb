use super::*;

fn call<'a>(input: &'a str, source: Option<&str>) -> Call<'a> {
    Call {
        tool: "agent",
        input_bytes: input.len(),
        source: source.map(|s| s.parse().unwrap()),
    }
}

fn spec(cold_start_calls: u32) -> AnomalySpec {
    AnomalySpec {
        threshold: 0.8,
        flag_above: Some(0.5),
        cold_start_calls,
    }
}

#[test]
fn the_guides_detector_test() {
    let clock = ManualClock::at(0, 9, 0);
    let mut detector = AnomalyDetector::new(clock.clone());
    detector.learn("alice", &call("Hello", None));
    clock.set(0, 9, 5);
    detector.learn("alice", &call("How are you?", None));
    clock.set(1, 3, 0);
    let a = detector.score(
        "alice",
        &call("DROP TABLE users", Some("203.0.113.66")),
        &spec(0),
    );
    assert!(a.score > 0.5, "{a:?}");
    let names: Vec<&str> = a.factors.iter().map(|f| f.name).collect();
    assert_eq!(&names[..2], &["hourOfDay", "sourceAddress"], "{a:?}");
    // The same caller at its usual hour with its usual input scores low.
    clock.set(1, 9, 2);
    let usual = detector.score("alice", &call("Hello again", None), &spec(0));
    assert!(usual.score < 0.2, "{usual:?}");
}

/// A month of weekday mornings from one office address.
fn trained(clock: &Arc<ManualClock>) -> AnomalyDetector {
    let mut detector = AnomalyDetector::new(clock.clone());
    for day in 0..30 {
        for minute in [0, 7, 19, 33] {
            clock.set(day, 10, minute);
            detector.learn(
                "bob",
                &call("{\"query\":\"weekly report\"}", Some("198.51.100.10")),
            );
            detector.record_outcome("bob", true);
        }
    }
    detector
}

#[test]
fn threshold_refuses_flags_and_allows() {
    let clock = ManualClock::at(0, 0, 0);
    let mut detector = trained(&clock);
    clock.set(31, 10, 5);
    let normal = detector.assess(
        "bob",
        &call("{\"query\":\"weekly sales\"}", Some("198.51.100.10")),
        &spec(20),
    );
    assert_eq!(normal.decision, Decision::Allow, "{normal:?}");
    // One unusual thing (a new address) is flagged at most.
    let new_address = detector.score(
        "bob",
        &call("{\"query\":\"weekly sales\"}", Some("203.0.113.9")),
        &spec(20),
    );
    assert!(new_address.decision != Decision::Refuse, "{new_address:?}");
    // Night, new address, new tool, a hundred times the input: refused.
    clock.set(31, 3, 0);
    let odd = Call {
        tool: "delete-everything",
        input_bytes: 60_000,
        source: Some("203.0.113.9".parse().unwrap()),
    };
    let refused = detector.assess("bob", &odd, &spec(20));
    assert_eq!(refused.decision, Decision::Refuse, "{refused:?}");
    assert!(refused.score > 0.8);
    // A refused call is not learned: the same call is refused again.
    assert_eq!(
        detector.assess("bob", &odd, &spec(20)).decision,
        Decision::Refuse
    );
    // With a higher threshold the same call is flagged, not refused.
    let lenient = AnomalySpec {
        threshold: 0.99,
        flag_above: Some(0.5),
        cold_start_calls: 20,
    };
    assert_eq!(
        detector.score("bob", &odd, &lenient).decision,
        Decision::Flag
    );
}

#[test]
fn cold_start_never_refuses() {
    let clock = ManualClock::at(0, 10, 0);
    let mut detector = trained(&clock);
    clock.set(31, 3, 0);
    let odd = Call {
        tool: "other",
        input_bytes: 60_000,
        source: Some("203.0.113.9".parse().unwrap()),
    };
    let a = detector.assess("bob", &odd, &spec(1000));
    assert!(
        a.cold_start && a.score > 0.8 && a.decision == Decision::Flag,
        "{a:?}"
    );
    // A caller never seen before has nothing to differ from.
    let stranger = detector.score("carol", &odd, &spec(0));
    assert_eq!((stranger.score, stranger.decision), (0.0, Decision::Allow));
}

#[test]
fn bursts_and_errors_raise_the_score() {
    let clock = ManualClock::at(0, 10, 0);
    let mut detector = trained(&clock);
    clock.set(31, 10, 0);
    let usual = call("{\"query\":\"weekly report\"}", Some("198.51.100.10"));
    for _ in 0..30 {
        detector.learn("bob", &usual);
    }
    let burst = detector.score("bob", &usual, &spec(0));
    assert!(
        burst
            .factors
            .iter()
            .any(|f| f.name == "callRate" && f.value == 1.0),
        "{burst:?}"
    );
    for _ in 0..20 {
        detector.record_outcome("bob", false);
    }
    clock.set(32, 10, 0);
    let failing = detector.score("bob", &usual, &spec(0));
    assert!(
        failing.factors.iter().any(|f| f.name == "errorRate"),
        "{failing:?}"
    );
}

#[test]
fn baselines_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anomaly.json");
    let clock = ManualClock::at(0, 10, 0);
    let before = {
        let mut detector = AnomalyDetector::open(&path, clock.clone()).unwrap();
        for day in 0..10 {
            clock.set(day, 10, 0);
            detector.learn("bob", &call("hello", Some("198.51.100.10")));
        }
        detector.save().unwrap();
        clock.set(11, 3, 0);
        detector.score("bob", &call("hello", Some("203.0.113.1")), &spec(0))
    };
    let reopened = AnomalyDetector::open(&path, clock.clone()).unwrap();
    let after = reopened.score("bob", &call("hello", Some("203.0.113.1")), &spec(0));
    assert_eq!(before, after);
    assert!(after.score > 0.5);
    // No temporary files are left beside it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_corrupt_file_is_a_typed_error_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anomaly.json");
    std::fs::write(&path, b"{not json").unwrap();
    let Err(e) = AnomalyDetector::open(&path, Arc::new(SystemClock)) else {
        panic!("opened a corrupt file")
    };
    assert_eq!(e.reason(), "AnomalyBaselinesCorrupt");
    assert_eq!(std::fs::read(&path).unwrap(), b"{not json");
}
