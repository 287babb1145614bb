//! `toolwarden webhook`: the admission webhook server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::webhook::certs::{self, CertStore};
use crate::webhook::server::{self, Limits};
use crate::webhook::{Admission, ClusterView, Config};

#[derive(Args, Debug)]
pub struct WebhookArgs {
    /// Address the HTTPS server listens on.
    #[arg(long, default_value = "0.0.0.0:8443", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The namespace toolwarden is installed in (the Secret, the Service, the controller).
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "toolwarden",
        value_name = "NS"
    )]
    pub namespace: String,
    /// The controller's ServiceAccount in --namespace: the only user allowed to change runner workloads.
    #[arg(long, default_value = "toolwarden-controller", value_name = "NAME")]
    pub controller_service_account: String,
    /// Serving certificate chain (PEM), e.g. cert-manager's `tls.crt`; reloaded when it changes.
    /// Without it the webhook manages its own CA and certificate in --tls-secret.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The serving certificate's private key (PEM), with --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Secret (in --namespace) holding the self-managed CA and serving certificate.
    #[arg(long, default_value = "toolwarden-webhook-tls", value_name = "NAME")]
    pub tls_secret: String,
    /// ValidatingWebhookConfiguration whose CA bundle the self-managed mode keeps current.
    #[arg(long, default_value = "toolwarden", value_name = "NAME")]
    pub webhook_configuration: String,
    /// The webhook's Service: the serving certificate is issued for its DNS names.
    #[arg(long, default_value = "toolwarden-webhook", value_name = "NAME")]
    pub service: String,
    /// Extra DNS name (or IP) in the self-managed certificate, e.g. when registered by URL. Repeatable.
    #[arg(long = "tls-dns-name", value_name = "NAME")]
    pub tls_dns_names: Vec<String>,
    /// How often the certificate is checked for renewal (or its files for changes), in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub cert_check_seconds: u64,
    /// Reviews evaluated at once.
    #[arg(long, default_value_t = Limits::default().max_in_flight, value_name = "N")]
    pub max_in_flight: usize,
    /// Deadline of one review (waiting for a slot plus evaluating), in milliseconds;
    /// keep it below the configuration's timeoutSeconds.
    #[arg(long, default_value_t = 3000, value_name = "MS")]
    pub deadline_ms: u64,
}

pub fn run(args: WebhookArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("starting the async runtime: {error}")),
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ExitCode {
    tracing::error!("{message}");
    ExitCode::from(2)
}

async fn serve(args: WebhookArgs) -> Result<(), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes client: {e}"))?;
    let certs = Arc::new(CertStore::default());
    let check_every = Duration::from_secs(args.cert_check_seconds.max(1));
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = certs::Files {
                cert: cert.clone(),
                key: key.clone(),
                check_every,
            };
            let loaded = files.load(&certs).map_err(|e| e.to_string())?;
            tokio::spawn(files.watch(Arc::clone(&certs), loaded));
        }
        _ => {
            let ns = &args.namespace;
            let svc = &args.service;
            let mut dns_names = vec![
                format!("{svc}.{ns}.svc"),
                format!("{svc}.{ns}.svc.cluster.local"),
                format!("{svc}.{ns}"),
                svc.clone(),
            ];
            dns_names.extend(args.tls_dns_names.iter().cloned());
            let manager = certs::SelfManaged {
                namespace: ns.clone(),
                secret: args.tls_secret.clone(),
                webhook_configuration: args.webhook_configuration.clone(),
                dns_names,
                check_every,
            };
            tokio::spawn(manager.run(client.clone(), Arc::clone(&certs)));
        }
    }
    let (view, reflectors) = ClusterView::watch(&client);
    tokio::spawn(reflectors);
    let config = Config::new(&args.namespace, &args.controller_service_account);
    let limits = Limits {
        max_in_flight: args.max_in_flight.max(1),
        deadline: Duration::from_millis(args.deadline_ms.max(1)),
        ..Limits::default()
    };
    let router = server::router(
        Arc::new(Admission::new(config, view)),
        Arc::clone(&certs),
        &limits,
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", args.listen))?;
    tracing::info!(listen = %args.listen, "webhook serving");
    server::serve(
        listener,
        certs::tls_config(certs),
        router,
        limits,
        super::shutdown::shutdown_signal(),
    )
    .await;
    Ok(())
}
