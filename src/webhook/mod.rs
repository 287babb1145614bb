//! `toolwarden webhook`: the admission webhook that holds the checklist at the
//! API server. [`review::Admission::review`] is a pure function from an
//! AdmissionReview body and a [`cluster::ClusterView`] snapshot to the answer;
//! [`server`] puts it behind HTTPS with a concurrency bound and a deadline;
//! [`certs`] keeps its serving certificate.

pub mod admission_policies;
mod approvals;
pub mod certs;
pub mod cluster;
pub mod install;
mod policies;
pub mod review;
pub mod server;
mod tools;
pub mod workloads;

pub use cluster::ClusterView;
pub use policies::problems as policy_problems;
pub use review::{Admission, BadReview, Config, MAX_REVIEW_BYTES};
