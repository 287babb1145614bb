//! One AdmissionReview in, one AdmissionReview out: the dispatcher in front of
//! the validators (one per kind), as a pure function of the request body and
//! a [`ClusterView`] snapshot, so table tests need no cluster.

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde::de::DeserializeOwned;

use super::cluster::ClusterView;
use super::{approvals, policies, tools, workloads};
use crate::api::GROUP;
use crate::policy::Engine;

/// Largest request body read. The API server stores objects up to ~1.5 MiB and
/// a review carries the object twice (new and old), plus some envelope.
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// What the webhook is told at start.
#[derive(Clone, Debug)]
pub struct Config {
    /// The Kubernetes user name of the controller, the only writer of runner
    /// workloads: `system:serviceaccount:<namespace>:<name>`.
    pub controller_user: String,
}

impl Config {
    pub fn new(controller_namespace: &str, controller_service_account: &str) -> Config {
        Config {
            controller_user: format!(
                "system:serviceaccount:{controller_namespace}:{controller_service_account}"
            ),
        }
    }
}

/// A body that is not an `admission.k8s.io/v1` AdmissionReview request: the
/// server answers `400` (the API server then fails the call closed).
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("the body is not an AdmissionReview: {0}")]
    NotAReview(#[source] serde_json::Error),
    #[error(
        "the AdmissionReview is {api_version}/{kind}; only admission.k8s.io/v1 AdmissionReview is served"
    )]
    WrongVersion { api_version: String, kind: String },
    #[error("the AdmissionReview carries no request")]
    NoRequest,
}

impl BadReview {
    pub fn reason(&self) -> &'static str {
        match self {
            BadReview::NotAReview(_) => "NotAReview",
            BadReview::WrongVersion { .. } => "WrongVersion",
            BadReview::NoRequest => "NoRequest",
        }
    }
}

/// The webhook's logic: the engine (with its analysis cache), the config and
/// the stores.
pub struct Admission {
    pub config: Config,
    pub view: ClusterView,
    pub engine: Engine,
}

impl Admission {
    pub fn new(config: Config, view: ClusterView) -> Admission {
        Admission {
            config,
            view,
            engine: Engine::default(),
        }
    }

    /// Answers one review body. Never panics on any input (fuzzed).
    pub fn review(&self, body: &[u8]) -> Result<AdmissionReview<DynamicObject>, BadReview> {
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_slice(body).map_err(BadReview::NotAReview)?;
        if review.types.api_version != "admission.k8s.io/v1"
            || review.types.kind != "AdmissionReview"
        {
            return Err(BadReview::WrongVersion {
                api_version: review.types.api_version,
                kind: review.types.kind,
            });
        }
        let request: AdmissionRequest<DynamicObject> =
            review.try_into().map_err(|_| BadReview::NoRequest)?;
        let response = self.admit(&request);
        tracing::debug!(
            uid = %request.uid,
            kind = %request.kind.kind,
            namespace = request.namespace.as_deref().unwrap_or(""),
            name = %request.name,
            user = request.user_info.username.as_deref().unwrap_or(""),
            allowed = response.allowed,
            "admission review"
        );
        Ok(response.into_review())
    }

    /// One validator per kind.
    fn admit(&self, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let kind = &request.kind;
        let sub = request.sub_resource.as_deref();
        match (kind.group.as_str(), kind.kind.as_str(), sub) {
            (GROUP, "AgentTool", None) => tools::admit(request, &self.view, &self.engine),
            (GROUP, "ToolPolicy", None) => policies::admit(request),
            (GROUP, "ToolApproval", Some("status")) => approvals::admit(request, &self.view),
            _ if workloads::is_workload_kind(&kind.group, &kind.kind) => {
                workloads::admit(request, &self.config, &self.view)
            }
            _ => deny(
                request,
                "UnsupportedKind",
                format!(
                    "toolwarden's webhook does not review {}/{} {}{}",
                    if kind.group.is_empty() {
                        "core"
                    } else {
                        &kind.group
                    },
                    kind.version,
                    kind.kind,
                    sub.map(|s| format!(" (subresource {s})"))
                        .unwrap_or_default()
                ),
            ),
        }
    }
}

/// The `request.uid` of an `admission.k8s.io/v1` AdmissionReview body, read
/// without building the objects; `None` for anything else. Used only when the
/// webhook cannot evaluate (busy), to answer that request with a denial.
pub(crate) fn request_uid(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Envelope {
        api_version: String,
        kind: String,
        request: Option<Uid>,
    }
    #[derive(serde::Deserialize)]
    struct Uid {
        uid: String,
    }
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    (envelope.api_version == "admission.k8s.io/v1" && envelope.kind == "AdmissionReview")
        .then_some(envelope.request?.uid)
        .filter(|uid| !uid.is_empty())
}

/// A denial with a reason the API server passes to the client (`403`).
pub(crate) fn deny(
    request: &AdmissionRequest<DynamicObject>,
    reason: &str,
    message: impl Into<String>,
) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request).deny(message.into());
    response.result.code = 403;
    response.result.reason = reason.to_string();
    response
}

/// The request's object, typed; a missing or mistyped object is a denial that
/// names the field.
pub(crate) fn typed_object<T: DeserializeOwned>(
    request: &AdmissionRequest<DynamicObject>,
    old: bool,
) -> Result<T, Box<AdmissionResponse>> {
    let (object, which) = if old {
        (request.old_object.as_ref(), "oldObject")
    } else {
        (request.object.as_ref(), "object")
    };
    let Some(object) = object else {
        return Err(Box::new(deny(
            request,
            "MissingObject",
            format!(
                "the {} request for {} carries no {which}",
                operation_name(request),
                request.kind.kind
            ),
        )));
    };
    typed(object).map_err(|(path, message)| {
        Box::new(deny(
            request,
            "InvalidObject",
            format!("{which} {path}: {message}"),
        ))
    })
}

/// Deserializes into the Rust type, with the exact field path of an error.
pub(crate) fn typed<T: DeserializeOwned>(object: &DynamicObject) -> Result<T, (String, String)> {
    let value =
        serde_json::to_value(object).map_err(|e| ("(object)".to_string(), e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { "(object)".into() } else { path };
        (path, e.into_inner().to_string())
    })
}

pub(crate) fn operation_name(request: &AdmissionRequest<DynamicObject>) -> &'static str {
    use kube::core::admission::Operation::*;
    match request.operation {
        Create => "CREATE",
        Update => "UPDATE",
        Delete => "DELETE",
        Connect => "CONNECT",
    }
}
