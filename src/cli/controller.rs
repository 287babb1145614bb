//! `toolwarden controller`: the operator process.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;

use crate::controller::build::{Settings, ToolRootfs};
use crate::controller::run::{self, LeaseOptions, Options};

#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// The toolwarden image runner pods run (the chart sets it to its own image).
    #[arg(long, env = "TOOLWARDEN_RUNNER_IMAGE", value_name = "IMAGE")]
    pub runner_image: String,
    /// Watch only these namespaces (comma-separated or repeated), for multi-tenant
    /// clusters; default: every namespace. ToolPolicies and namespace labels are always
    /// read cluster-wide.
    #[arg(long, value_name = "NS,...", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
    pub listen: SocketAddr,
    /// Run without leader election: only when exactly one replica runs.
    #[arg(long)]
    pub no_leader_election: bool,
    /// Namespace of the leader Lease (in a pod: its own namespace).
    #[arg(
        long,
        env = "POD_NAMESPACE",
        value_name = "NS",
        default_value = "default"
    )]
    pub lease_namespace: String,
    /// Name of the leader Lease; replicas sharing it elect one leader.
    #[arg(long, value_name = "NAME", default_value = "toolwarden-controller")]
    pub lease_name: String,
    /// This replica's identity in the Lease (in a pod: its name).
    #[arg(long, env = "POD_NAME", value_name = "ID")]
    pub identity: Option<String>,
    /// How a tool's image becomes its sandboxes' root file system in the runner pods:
    /// `image-volume` (Kubernetes image volumes, nothing copied) or, on clusters without
    /// them, `copy` (an init container running the tool's image copies its file system
    /// into an emptyDir; the image needs /bin/sh and cp). The tool's status says which.
    #[arg(long, value_enum, default_value_t = ToolRootfs::ImageVolume, value_name = "HOW")]
    pub tool_rootfs: ToolRootfs,
}

pub fn run(args: ControllerArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("starting the async runtime: {e}")),
    };
    runtime.block_on(async {
        let client = match kube::Client::try_default().await {
            Ok(client) => client,
            Err(e) => return fail(&format!("no Kubernetes client: {e}")),
        };
        let identity = args
            .identity
            .clone()
            .unwrap_or_else(|| format!("toolwarden-controller-{}", uuid::Uuid::new_v4()));
        let options = Options {
            settings: Settings {
                runner_image: args.runner_image.clone(),
                // Discovered from the cluster.
                api_server: Vec::new(),
                tool_rootfs: args.tool_rootfs,
            },
            namespaces: args.namespaces.clone(),
            lease: (!args.no_leader_election).then(|| LeaseOptions {
                namespace: args.lease_namespace.clone(),
                name: args.lease_name.clone(),
                identity,
            }),
        };
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(listener) => listener,
            Err(e) => return fail(&format!("listening on {}: {e}", args.listen)),
        };
        tracing::info!(namespaces = ?options.namespaces, listen = %args.listen, "controller starting");
        match run::run(client, options, listener, shutdown_signal()).await {
            Ok(()) => {
                tracing::info!("controller stopped");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        }
    })
}

/// The shared shutdown signal, then a word on what happens next.
async fn shutdown_signal() {
    super::shutdown::shutdown_signal().await;
    tracing::info!("shutting down: finishing reconciles in flight");
}

fn fail(message: &str) -> ExitCode {
    tracing::error!("{message}");
    ExitCode::from(2)
}
