//! The runner pods' NetworkPolicy: ingress on the runner port only from the callers the
//! tool names (default: its own namespace); egress only DNS, the API server's addresses
//! (the runner's TokenReviews) and the declared ports.
//! NetworkPolicy cannot name hosts: the egress proxy narrows the ports to the declared
//! hosts.

use std::collections::BTreeSet;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::deployment::RUNNER_PORT;
use super::{ApiServerEndpoint, BuildError, ChildNames, child_meta, from_json};
use crate::api::AgentTool;
use crate::controller::labels::child_labels;

/// What an egress rule without ports allows (as in the API's documentation).
const DEFAULT_EGRESS_PORT: u16 = 443;

pub fn build(
    tool: &AgentTool,
    names: &ChildNames,
    api_server: &[ApiServerEndpoint],
) -> Result<NetworkPolicy, BuildError> {
    let callers: Vec<Value> = if tool.spec.serving.callers.is_empty() {
        vec![json!({"podSelector": {}})]
    } else {
        tool.spec
            .serving
            .callers
            .iter()
            .map(|caller| {
                let mut peer = json!({});
                if let Some(ns) = &caller.namespace_selector {
                    peer["namespaceSelector"] = json!(ns);
                }
                // An empty peer would match everything; a caller always names pods.
                peer["podSelector"] = json!(caller.pod_selector.clone().unwrap_or_default());
                peer
            })
            .collect()
    };
    let ports: BTreeSet<u16> = tool
        .spec
        .permissions
        .network
        .egress
        .iter()
        .flat_map(|rule| {
            if rule.ports.is_empty() {
                vec![DEFAULT_EGRESS_PORT]
            } else {
                rule.ports.clone()
            }
        })
        .collect();
    let mut egress = vec![json!({"ports": [
        {"protocol": "UDP", "port": 53},
        {"protocol": "TCP", "port": 53},
    ]})];
    // Endpoint IPs, not the Service's cluster IP: policies apply after the Service's DNAT.
    for endpoint in api_server {
        let prefix = if endpoint.ip.is_ipv4() { 32 } else { 128 };
        egress.push(json!({
            "to": [{"ipBlock": {"cidr": format!("{}/{prefix}", endpoint.ip)}}],
            "ports": [{"protocol": "TCP", "port": endpoint.port}],
        }));
    }
    if !ports.is_empty() {
        let ports: Vec<Value> = ports
            .iter()
            .map(|port| json!({"protocol": "TCP", "port": port}))
            .collect();
        egress.push(json!({ "ports": ports }));
    }
    let spec = from_json(
        "NetworkPolicy",
        json!({
            "podSelector": {"matchLabels": child_labels(tool)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": callers, "ports": [{"protocol": "TCP", "port": RUNNER_PORT}]}],
            "egress": egress,
        }),
    )?;
    Ok(NetworkPolicy {
        metadata: child_meta(tool, &names.runner)?,
        spec: Some(spec),
    })
}
