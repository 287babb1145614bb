//! `toolwarden check`'s reader on arbitrary text, and the engine on whatever it
//! accepts: every error is reported, nothing panics.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use toolwarden::api::manifest::Manifests;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut manifests = Manifests::default();
    let mut errors = Vec::new();
    manifests.add_text(std::path::Path::new("fuzz.yaml"), text, &mut errors);
    for error in &errors {
        let _ = error.to_string();
    }
    let policies: Vec<_> = manifests.policies.iter().map(|p| p.object.clone()).collect();
    let labels = BTreeMap::from([("kubernetes.io/metadata.name".to_string(), "agents".to_string())]);
    for tool in &manifests.tools {
        let _ = toolwarden::policy::evaluate(&tool.object, &policies, &labels);
    }
});
