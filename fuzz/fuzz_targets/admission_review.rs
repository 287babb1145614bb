//! The webhook's whole review path on arbitrary bodies: parsing, dispatch and
//! every validator, against stores holding the examples. It must answer or
//! refuse, never panic. Seeds: fuzz/seeds/admission_review (real reviews).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use toolwarden::api::manifest::Manifests;
use toolwarden::webhook::{Admission, ClusterView, Config};

static ADMISSION: LazyLock<Admission> = LazyLock::new(|| {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let examples = Manifests::load(&[root.join("examples"), root.join("examples/violations")], false)
        .expect("the examples load");
    let namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "agents",
        "labels": {"kubernetes.io/metadata.name": "agents", "team": "agents"}}}))
    .expect("a namespace");
    Admission::new(
        Config::new("toolwarden", "toolwarden-controller"),
        ClusterView::from_objects(
            examples.policies.into_iter().map(|p| p.object).collect(),
            vec![namespace],
            examples.tools.into_iter().map(|t| t.object).collect(),
        ),
    )
});

fuzz_target!(|body: &[u8]| {
    if let Ok(review) = ADMISSION.review(body) {
        // Whatever came in, the answer serializes (the server sends it as JSON).
        serde_json::to_vec(&review).expect("a review serializes");
    }
});
