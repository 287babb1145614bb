//! `toolwarden manifests`: the install as plain YAML, for `kubectl apply -f`.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;

use crate::webhook::install::{Install, to_yaml};

#[derive(Args, Debug)]
pub struct ManifestsArgs {
    /// Namespace toolwarden is installed in (excluded from its own webhook).
    #[arg(long, default_value_t = Install::default().namespace, value_name = "NS")]
    pub namespace: String,
    /// The toolwarden image both Deployments run.
    #[arg(long, default_value_t = Install::default().image, value_name = "REF")]
    pub image: String,
    /// The controller's ServiceAccount (the only writer of runner workloads).
    #[arg(long, default_value_t = Install::default().controller_service_account, value_name = "NAME")]
    pub controller_service_account: String,
    /// Webhook replicas (a PodDisruptionBudget keeps one up).
    #[arg(long, default_value_t = Install::default().webhook_replicas, value_name = "N")]
    pub webhook_replicas: u32,
    /// Take the webhook's certificate from cert-manager (an Issuer and a Certificate)
    /// instead of the webhook managing its own.
    #[arg(long)]
    pub cert_manager: bool,
    /// Add a cluster-wide ToolPolicy `default`: the full checklist in warn mode.
    #[arg(long)]
    pub default_policy: bool,
    /// Also emit ValidatingAdmissionPolicies (CEL, evaluated by the API server itself) for
    /// every checklist rule CEL can express, so those hold while the webhook is down.
    #[arg(long)]
    pub admission_policies: bool,
}

pub fn run(args: &ManifestsArgs) -> ExitCode {
    let install = Install {
        namespace: args.namespace.clone(),
        image: args.image.clone(),
        controller_service_account: args.controller_service_account.clone(),
        webhook_replicas: args.webhook_replicas,
        cert_manager: args.cert_manager,
        default_policy: args.default_policy,
        admission_policies: args.admission_policies,
        ..Install::default()
    };
    let yaml = to_yaml(&install.objects());
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(yaml.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the manifests: {e}");
            ExitCode::from(2)
        }
    }
}
