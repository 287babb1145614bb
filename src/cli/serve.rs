//! `toolwarden serve DIR` (standalone) and `toolwarden runner` (in the pods the
//! controller creates): load tools, check them, serve REST and MCP.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use jsonwebtoken::Algorithm;

use crate::guards::anomaly::{AnomalyDetector, AnomalyError, SystemClock};
use crate::guards::client_addr::{ForwardedHeader, IpAllowList, Networks, TrustedProxies};
use crate::runner::admission::{Admission, DEFAULT_CALLS_PER_TOOL, DEFAULT_QUEUE_TIMEOUT};
use crate::runner::audit::{AuditKey, AuditKeyError, AuditLog};
use crate::runner::auth::{AuthConfigError, Authenticator, JwtKey, TokenReviewer, load_token_file};
use crate::runner::executor::ToolExecutor;
use crate::runner::image_volumes::ImageVolumes;
use crate::runner::images::ImageStore;
use crate::runner::kube_identity::{BoundPod, KubeTokenMinter, ToolIdentity};
use crate::runner::listener::{self, AllowedHosts, HttpConfig, HttpLimits};
use crate::runner::oauth::{OAuthConfigError, OAuthResource, OAuthSettings};
use crate::runner::pipeline::Runner;
use crate::runner::ratelimit::LimiterClock;
use crate::runner::registry::{Judge, Registry};
use crate::runner::reload;
use crate::runner::router;
use crate::runner::sandbox_executor::{SandboxExecutor, VolumesDir};
use crate::runner::termination::{self, StartRefusal};
use crate::runner::tool::SecretsDir;
use crate::runner::unsandboxed::UnsandboxedProcessExecutor;
use crate::runner::watch::Watch;
use crate::sandbox::model::SERVICE_ACCOUNT_DIR;
use crate::sandbox::{EngineConfig, Sandboxes};

const EXIT_FAILED: u8 = 2;

/// What `serve` and `runner` tell users who ask for the sandbox without root.
const SANDBOX_NEEDS_ROOT: &str = "it needs root (or pass --unsandboxed-dev to try the API \
                                  without isolation, trusted tools only)";

/// Why `serve` or `runner` cannot start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    AuditKey(#[from] AuditKeyError),
    #[error("{0} (or pass --audit-key)")]
    DefaultAuditKey(AuditKeyError),
    #[error("{}: {source} (or pass --audit-key)", dir.display())]
    AuditKeyDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the sandbox engine needs root; run as root, or pass --unsandboxed-dev \
         to try the API without isolation (trusted tools only)"
    )]
    NotRoot,
    #[error("the sandbox engine could not start (--state-dir {}: {source}); {SANDBOX_NEEDS_ROOT}", dir.display())]
    StateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find this binary: {0}")]
    NoExecutable(std::io::Error),
    #[error("the sandbox engine could not start ({0}); {SANDBOX_NEEDS_ROOT}")]
    Engine(crate::sandbox::Error),
    #[error("{flag}: {source}")]
    Cidr {
        flag: &'static str,
        source: crate::guards::client_addr::InvalidCidr,
    },
    #[error("--anomaly-baselines: cannot create {}: {source}", dir.display())]
    BaselinesDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Anomaly(#[from] AnomalyError),
}
const DEFAULT_STATE_DIR: &str = "/run/toolwarden";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Folder of AgentTool and ToolPolicy manifests (its *.yaml files, not sub-folders), or one file.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Bearer-token file: one `SHA256HEX SUBJECT [GROUP,GROUP]` per line
    /// (hash a token with `printf %s "$TOKEN" | sha256sum`).
    #[arg(long, value_name = "FILE")]
    pub tokens: Option<PathBuf>,
    /// Accept HS256 JWTs signed with the secret in FILE.
    #[arg(long, value_name = "FILE")]
    pub jwt_hs256_key: Option<PathBuf>,
    /// Accept RS256 JWTs verified with the PEM public key in FILE.
    #[arg(long, value_name = "FILE")]
    pub jwt_rs256_key: Option<PathBuf>,
    /// Required `aud` claim of JWTs (tokens without it are refused). Needed with
    /// any --jwt-*-key unless --jwt-any-audience is given.
    #[arg(long, value_name = "AUD")]
    pub jwt_audience: Option<String>,
    /// Accept JWTs minted for any audience (no `aud` check): only when the key
    /// signs tokens for this runner alone.
    #[arg(long, conflicts_with = "jwt_audience")]
    pub jwt_any_audience: bool,
    /// Required `iss` claim of JWTs (tokens without it are refused).
    #[arg(long, value_name = "ISS")]
    pub jwt_issuer: Option<String>,
    #[command(flatten)]
    pub oauth: OAuthArgs,
    /// Calls without a token: `auto` allows them only on a loopback address when
    /// no authentication (--tokens, --jwt-*, --oauth-*) is configured.
    #[arg(long, value_enum, default_value_t = Anonymous::Auto)]
    pub anonymous: Anonymous,
}

/// The runner as an OAuth 2.0 protected resource (the MCP authorization spec).
#[derive(Args, Debug, Default)]
pub struct OAuthArgs {
    /// This server's canonical URL as clients reach it, e.g.
    /// `https://tools.example.com/mcp`: OAuth access tokens must name it in
    /// `aud` (RFC 8707; a token minted for another resource is refused), and it
    /// is the `resource` of the metadata served at
    /// /.well-known/oauth-protected-resource (RFC 9728), which 401 answers point to.
    #[arg(long, value_name = "URL", requires = "oauth_issuer")]
    pub oauth_resource: Option<String>,
    /// Authorization server whose access tokens are accepted (repeatable): its
    /// exact `issuer`, e.g. `https://keycloak.example.com/realms/agents`. Its
    /// keys come from the `jwks_uri` of its metadata (RFC 8414, then OpenID
    /// Connect discovery), are cached, and are fetched again when a token names
    /// a key id they lack (at most every 10 s).
    #[arg(long, value_name = "URL", requires = "oauth_resource")]
    pub oauth_issuer: Vec<String>,
    /// Read the issuer's keys from this JWKS file instead of fetching them (one
    /// --oauth-issuer only); re-read when a token names a key id it lacks.
    #[arg(long, value_name = "FILE", requires = "oauth_resource")]
    pub oauth_jwks: Option<PathBuf>,
    /// Scope every access token must carry (repeatable); advertised as
    /// `scopes_supported` and in the `WWW-Authenticate` challenge. A valid token
    /// without it gets 403 `insufficient_scope`.
    #[arg(long, value_name = "SCOPE", requires = "oauth_resource")]
    pub oauth_scope: Vec<String>,
}

impl OAuthArgs {
    /// The protected resource, started (its issuers' keys loaded), when configured.
    fn start(
        &self,
        tokio: &tokio::runtime::Runtime,
    ) -> Result<Option<OAuthResource>, OAuthConfigError> {
        let Some(resource) = &self.oauth_resource else {
            return Ok(None);
        };
        let settings = OAuthSettings {
            resource: resource.clone(),
            issuers: self.oauth_issuer.clone(),
            jwks_file: self.oauth_jwks.clone(),
            scopes: self.oauth_scope.clone(),
        };
        tokio.block_on(OAuthResource::start(settings)).map(Some)
    }
}

#[derive(Args, Debug)]
pub struct RunnerArgs {
    /// AgentTool manifests mounted into the pod (folder or file).
    #[arg(long, value_name = "PATH", default_value = "/etc/toolwarden/tools")]
    pub tools: PathBuf,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Audience callers' ServiceAccount tokens must be bound to (checked with TokenReview).
    #[arg(long, value_name = "AUD", default_value = "toolwarden")]
    pub audience: String,
    /// The container's termination message file. When a tool of --tools is refused at
    /// start (e.g. its image lacks the mount points /proc, /dev, /tmp) or there is none,
    /// the runner writes one line `Reason: message` here and exits non-zero instead of
    /// serving nothing; the controller shows it in the tool's conditions. Written only
    /// when the file exists (the kubelet creates it).
    #[arg(
        long,
        value_name = "FILE",
        env = "TOOLWARDEN_TERMINATION_LOG",
        default_value = termination::DEFAULT_PATH
    )]
    pub termination_log: PathBuf,
    #[command(flatten)]
    pub oauth: OAuthArgs,
    /// The tool's own ServiceAccount (the controller's `<tool>-tool`, in this pod's
    /// namespace). Each call of a tool with `permissions.kubernetes` gets a fresh token of
    /// it (TokenRequest: the API server's audience, 10 minutes, bound to this pod) as
    /// `token`, with `namespace` and `ca.crt`, in its sandbox's
    /// /var/run/secrets/kubernetes.io/serviceaccount; a call whose token cannot be minted
    /// fails. Without it such tools are not served.
    #[arg(long, value_name = "NAME", requires_all = ["pod_name", "pod_uid"])]
    pub tool_service_account: Option<String>,
    /// This runner's pod, which the tools' tokens are bound to (downward API).
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The UID of this runner's pod (downward API).
    #[arg(long, value_name = "UID", env = "POD_UID")]
    pub pod_uid: Option<String>,
}

#[derive(Args, Debug)]
pub struct CommonArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Another name clients may use in `Host` and `Origin` (repeatable), e.g. the
    /// Service's DNS name. Always allowed: the listen IP (any IP when listening on
    /// 0.0.0.0 or ::), and localhost names on loopback; any other name is refused
    /// with 403 (DNS-rebinding protection).
    #[arg(long, value_name = "NAME")]
    pub allowed_host: Vec<String>,
    /// Connections open at once; when full, the oldest idle connection is closed
    /// to make room, and new ones are refused only when every one is busy.
    #[arg(long, value_name = "N", default_value_t = HttpLimits::default().max_connections)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (an idle keep-alive
    /// connection too) before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = HttpLimits::default().header_read_timeout.as_secs())]
    pub header_read_timeout: u64,
    /// Calls of one tool running at once; further calls of that tool wait.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CALLS_PER_TOOL)]
    pub max_calls_per_tool: usize,
    /// Seconds a call waits for a run slot of its tool before it is answered
    /// 503 (problem type `overloaded`) with Retry-After.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_QUEUE_TIMEOUT.as_secs())]
    pub queue_timeout: u64,
    /// Also serve `/metrics` WITHOUT authentication on this address (for a
    /// Prometheus scraper); on --listen, `/metrics` needs a bearer token.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Append audit records to FILE (the chain continues; its anchor is FILE.anchor); default: stdout.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Key that seals the audit chain (HMAC-SHA256): a file of at least 32 bytes,
    /// e.g. a mounted Secret. Default: STATE_DIR/audit.key (for users other than
    /// root with the default state dir: ~/.local/state/toolwarden/audit.key),
    /// created (0600) when missing.
    #[arg(long, value_name = "FILE")]
    pub audit_key: Option<PathBuf>,
    /// Secret values as `DIR/<secretName>/<key>` files (a mounted Secret volume layout).
    /// Watched: rotated values (a rewritten file, kubelet's `..data` swap) reach new calls,
    /// and the old ones stay redacted until restart.
    #[arg(long, value_name = "DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// Root file systems of tool images: `NAME/` (OCI layout or plain tree) or
    /// `NAME.tar[.gz]`, NAME being the image reference with `/`, `:`, `@` as `_`.
    /// Default: `images/` beside the manifests, when it exists.
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Root file systems from Kubernetes image volumes: `DIR/NAME/` (NAME as for
    /// `--images`) is a read-only image mount used directly as the tool's root file
    /// system, nothing unpacked; it must contain empty `proc/`, `dev/` and `tmp/`.
    #[arg(long, value_name = "DIR", conflicts_with = "images")]
    pub image_volumes: Option<PathBuf>,
    /// Where unpacked root file systems are cached. Made 0711; refused when it
    /// is a symlink or another user's, or another user can write to a folder above it.
    #[arg(long, value_name = "DIR")]
    pub image_cache: Option<PathBuf>,
    /// Volumes tools mount: `DIR/pvc/<claim>` for persistentVolumeClaim and
    /// `DIR/configmap/<name>` for configMap. Default: `volumes/` beside the
    /// manifests, when it exists.
    #[arg(long, value_name = "DIR")]
    pub volumes: Option<PathBuf>,
    /// Sandbox state (container state, bundles, file secrets).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// DANGER: run tools as plain child processes with NO ISOLATION. For trying
    /// the HTTP API with trusted tools only; never with real agents.
    #[arg(long)]
    pub unsandboxed_dev: bool,
    /// Serve only clients in these networks (CIDR or address, IPv4 or IPv6;
    /// repeatable or comma-separated). Others get 403 `refused` on every
    /// endpoint but /healthz and /readyz. Tools narrow it with spec.callers.ipAllowList.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub ip_allow_list: Vec<String>,
    /// Proxies (CIDR or address; repeatable or comma-separated) whose forwarding
    /// header names the client. From anyone else the header is ignored and the
    /// client is the connection's peer.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
    /// The header the trusted proxies write the client into.
    #[arg(long, value_enum, default_value_t = ForwardedHeaderArg::XForwardedFor)]
    pub forwarded_header: ForwardedHeaderArg,
    /// Where per-caller anomaly baselines (spec.anomaly) are kept across
    /// restarts, saved every 10 s and at shutdown. Default:
    /// anomaly-baselines.json beside the default audit key (STATE_DIR, or
    /// ~/.local/state/toolwarden for users other than root with the default
    /// STATE_DIR). A corrupt file stops the start.
    #[arg(long, value_name = "FILE")]
    pub anomaly_baselines: Option<PathBuf>,
    /// Serve tools whose sandbox this host can only give weaker isolation (no
    /// user namespace, or rlimits instead of cgroups). Without it, such a tool is
    /// refused unless it sets `spec.sandbox.allowDegraded: true`. Degraded tools
    /// are named in the banner, `GET /v1/tools` and `toolwarden_sandbox_degraded`.
    #[arg(long)]
    pub allow_degraded: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardedHeaderArg {
    /// `X-Forwarded-For: client, proxy1, ...`
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`
    Forwarded,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anonymous {
    Auto,
    Allow,
    Deny,
}

pub fn serve(args: ServeArgs) -> ExitCode {
    let mut auth = match standalone_auth(&args) {
        Ok(auth) => auth,
        Err(e) => return fail(&e.to_string()),
    };
    let tokio = match tokio::runtime::Runtime::new() {
        Ok(tokio) => tokio,
        Err(e) => return fail(&e.to_string()),
    };
    match args.oauth.start(&tokio) {
        Ok(oauth) => auth.oauth = oauth,
        Err(e) => return fail(&e.to_string()),
    }
    run(
        &args.dir,
        &args.common,
        (auth, None),
        ("serve", Judge::Evaluate, None),
        tokio,
    )
}

pub fn runner(args: RunnerArgs) -> ExitCode {
    let tokio = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&e.to_string()),
    };
    let client = match tokio.block_on(kube::Client::try_default()) {
        Ok(client) => client,
        Err(e) => return fail(&format!("no Kubernetes client for TokenReview: {e}")),
    };
    let oauth = match args.oauth.start(&tokio) {
        Ok(oauth) => oauth,
        Err(e) => return fail(&e.to_string()),
    };
    let tool_identity = match tool_identity(&args, &client) {
        Ok(identity) => identity,
        Err(e) => return fail(&e.to_string()),
    };
    let auth = Authenticator {
        token_review: Some(TokenReviewer::new(client, args.audience.clone())),
        oauth,
        ..Authenticator::default()
    };
    // The same runtime: the client's background tasks live on it. The runner serves
    // what the controller admitted: it cannot see the namespace's labels or the policies.
    run(
        &args.tools,
        &args.common,
        (auth, tool_identity),
        ("runner", Judge::Admitted, Some(&args.termination_log)),
        tokio,
    )
}

/// The cluster's CA, which tools with their own identity get beside their token, is not
/// readable: the runner does not start.
#[derive(Debug, thiserror::Error)]
#[error("--tool-service-account: the cluster's CA for the tools ({}): {source}", path.display())]
pub struct ClusterCaError {
    path: PathBuf,
    source: std::io::Error,
}

/// `--tool-service-account`'s minter, in the client's namespace (in a pod, its own), with
/// the cluster's CA from the pod's credentials.
fn tool_identity(
    args: &RunnerArgs,
    client: &kube::Client,
) -> Result<Option<Arc<ToolIdentity>>, ClusterCaError> {
    let (Some(account), Some(name), Some(uid)) =
        (&args.tool_service_account, &args.pod_name, &args.pod_uid)
    else {
        return Ok(None);
    };
    let ca_file = Path::new(SERVICE_ACCOUNT_DIR).join("ca.crt");
    let ca_crt = std::fs::read_to_string(&ca_file).map_err(|source| ClusterCaError {
        path: ca_file.clone(),
        source,
    })?;
    let namespace = client.default_namespace().to_string();
    let pod = BoundPod {
        name: name.clone(),
        uid: uid.clone(),
    };
    let minter = KubeTokenMinter::new(client.clone(), &namespace, account.clone(), pod);
    Ok(Some(Arc::new(ToolIdentity::new(
        Arc::new(minter),
        namespace,
        ca_crt,
    ))))
}

/// `--image-cache`, or a cache folder: never a shared temporary folder, where
/// another user could plant a root file system. Root gets the system cache:
/// a user-namespaced sandbox cannot reach into `/root` (mode 0700), which
/// would cost every pool its user namespace.
fn image_cache(common: &CommonArgs) -> PathBuf {
    let home = std::env::var_os("HOME").filter(|_| !nix::unistd::geteuid().is_root());
    common.image_cache.clone().unwrap_or_else(|| match home {
        Some(home) => PathBuf::from(home).join(".cache/toolwarden/rootfs"),
        None => PathBuf::from("/var/cache/toolwarden/rootfs"),
    })
}

/// The command's last word when it cannot serve: a report to whoever started
/// it, on stderr like clap's usage errors, not a runtime event.
fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_FAILED)
}

/// `runner`'s last word when a tool it was given cannot be served: the refusal into the
/// termination message file for the controller (when the kubelet provides one), and on
/// stderr for the logs.
fn refuse_start(termination_log: &Path, refusal: &StartRefusal) -> ExitCode {
    match refusal.write(termination_log) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(path = %termination_log.display(), "no termination message file");
        }
        Err(e) => {
            tracing::warn!(path = %termination_log.display(), error = %e, "termination message not written");
        }
    }
    fail(&format!("refusing to start: {refusal}"))
}

fn standalone_auth(args: &ServeArgs) -> Result<Authenticator, AuthConfigError> {
    let mut auth = Authenticator::default();
    if let Some(path) = &args.tokens {
        auth.tokens = load_token_file(path)?;
    }
    let jwt_configured = args.jwt_hs256_key.is_some() || args.jwt_rs256_key.is_some();
    if jwt_configured && args.jwt_audience.is_none() && !args.jwt_any_audience {
        return Err(AuthConfigError::NoAudience);
    }
    for (algorithm, path) in [
        (Algorithm::HS256, &args.jwt_hs256_key),
        (Algorithm::RS256, &args.jwt_rs256_key),
    ] {
        if let Some(path) = path {
            auth.jwt_keys.push(JwtKey::from_file(
                algorithm,
                path,
                args.jwt_audience.as_deref(),
                args.jwt_issuer.as_deref(),
            )?);
        }
    }
    let loopback = args.common.listen.ip().is_loopback();
    auth.allow_anonymous = match args.anonymous {
        Anonymous::Allow => true,
        Anonymous::Deny => false,
        Anonymous::Auto => {
            loopback
                && args.tokens.is_none()
                && !jwt_configured
                && args.oauth.oauth_resource.is_none()
        }
    };
    if auth.allow_anonymous {
        tracing::warn!(
            loopback,
            "anonymous calls are allowed{}; configure --tokens or --jwt-* before exposing this runner",
            if loopback {
                " (loopback only)"
            } else {
                " ON A NON-LOOPBACK ADDRESS"
            }
        );
    }
    Ok(auth)
}

/// `termination_log`: `runner` only; a refused tool then stops the start (see
/// [`StartRefusal::of`]), `serve` serves the others.
fn run(
    dir: &Path,
    common: &CommonArgs,
    (auth, tool_identity): (Authenticator, Option<Arc<ToolIdentity>>),
    (command, judge, termination_log): (&str, Judge, Option<&Path>),
    tokio: tokio::runtime::Runtime,
) -> ExitCode {
    let executor: Arc<dyn ToolExecutor> = if common.unsandboxed_dev {
        tracing::warn!(
            "--unsandboxed-dev: tools run as plain processes of this user with NO ISOLATION; \
             use it to try the API with trusted tools only, never with real agents"
        );
        Arc::new(UnsandboxedProcessExecutor)
    } else {
        match sandbox_executor(dir, common) {
            Ok(executor) => Arc::new(executor),
            Err(e) => return fail(&e.to_string()),
        }
    };
    let (audit_key, key_line) = match audit_key(common) {
        Ok(key) => key,
        Err(e) => return fail(&e.to_string()),
    };
    let audit = match &common.audit_log {
        Some(path) => match AuditLog::open_file(path, audit_key) {
            Ok(log) => log,
            Err(e) => return fail(&format!("audit log: {e}")),
        },
        None => AuditLog::to_writer(Box::new(std::io::stdout()), "stdout", audit_key),
    };
    let mut registry = Registry::new(LimiterClock::real(), SecretsDir(common.secrets_dir.clone()))
        .with_judge(judge);
    let images = common
        .images
        .clone()
        .or_else(|| folder_beside(dir, "images"));
    let images_line = match (&common.image_volumes, images) {
        (Some(volumes), _) => {
            let line = format!(
                "image volumes under {} (used as they are)",
                volumes.display()
            );
            registry = registry.with_images(ImageVolumes {
                dir: volumes.clone(),
            });
            line
        }
        (None, Some(images)) => {
            let line = format!("root file systems from {}", images.display());
            registry = registry.with_images(ImageStore::new(images, image_cache(common)));
            line
        }
        (None, None) => {
            "not resolved (no --images folder; only the unsandboxed executor can run without one)"
                .to_string()
        }
    };
    let registry = Arc::new(registry);
    let report = reload::load(&registry, dir);
    if !report.errors.is_empty() {
        return fail(&format!("{} could not be loaded", dir.display()));
    }
    if let Some(log) = termination_log
        && let Some(refusal) = StartRefusal::of(&report, &[])
    {
        return refuse_start(log, &refusal);
    }
    let watch = match watch(common) {
        Ok(watch) => watch,
        Err(e) => return fail(&e.to_string()),
    };
    let runner = Arc::new(Runner {
        admission: Admission::new(
            common.max_calls_per_tool,
            Duration::from_secs(common.queue_timeout),
        ),
        watch,
        tool_identity,
        ..Runner::new(registry.clone(), auth, audit, executor)
    });
    // Clients reach an OAuth resource by the name in its URL: that name is allowed too.
    let mut allowed_hosts = common.allowed_host.clone();
    allowed_hosts.extend(runner.auth.oauth.as_ref().and_then(|o| o.host()));
    let http = http_config(common, &allowed_hosts);
    tokio.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(common.listen).await {
            Ok(l) => l,
            Err(e) => return fail(&format!("cannot listen on {}: {e}", common.listen)),
        };
        let addr = listener.local_addr().unwrap_or(common.listen);
        if let Some(metrics_addr) = common.metrics_listen {
            match tokio::net::TcpListener::bind(metrics_addr).await {
                Ok(metrics) => {
                    let config = HttpConfig {
                        limits: http.limits.clone(),
                        allowed_hosts: AllowedHosts::for_listen(metrics_addr, &common.allowed_host),
                    };
                    let router = router::metrics_router(runner.clone());
                    tokio::spawn(listener::serve(
                        metrics,
                        router,
                        config,
                        std::future::pending(),
                    ));
                }
                Err(e) => return fail(&format!("cannot listen on {metrics_addr}: {e}")),
            }
        }
        let withdrawn = reload::prepare_executor(&runner).await;
        if let Some(log) = termination_log
            && let Some(refusal) = StartRefusal::of(&report, &withdrawn)
        {
            return refuse_start(log, &refusal);
        }
        // Watching starts before the banner says what is served: a change made as soon as
        // the banner appears is never missed.
        let secrets = common.secrets_dir.as_deref();
        let _watcher = match reload::watch(dir, secrets, runner.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "not watching the manifests for changes");
                None
            }
        };
        banner(
            command,
            dir,
            &registry,
            &runner,
            addr,
            &images_line,
            &key_line,
        );
        if let Some(metrics_addr) = common.metrics_listen {
            eprintln!("  metrics:   http://{metrics_addr}/metrics   (no authentication)");
        }
        tokio::spawn(runner.audit.clone().maintain());
        tokio::spawn(save_baselines_every(runner.clone(), BASELINES_SAVE_INTERVAL));
        let served = listener::serve(
            listener,
            router::router(runner.clone()),
            http,
            super::shutdown::shutdown_signal(),
        )
        .await;
        // Calls whose callers left are still running: wait for their closing records.
        if let Err(e) = runner.audit.close(AUDIT_CLOSE_GRACE).await {
            tracing::error!(error = %e, "no shutdown checkpoint in the audit log");
        }
        if let Err(e) = runner.watch.save_baselines() {
            tracing::error!(error = %e, reason = e.reason(), "anomaly baselines not saved at shutdown");
        }
        match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e.to_string()),
        }
    })
}

/// The HTTP limits of the flags, after raising the open-files limit: every
/// connection takes a descriptor, and so does every sandbox's I/O, so at most
/// half of them go to connections.
fn http_config(common: &CommonArgs, allowed_hosts: &[String]) -> HttpConfig {
    let mut limits = HttpLimits {
        max_connections: common.max_connections,
        header_read_timeout: Duration::from_secs(common.header_read_timeout.max(1)),
        ..HttpLimits::default()
    };
    match listener::raise_fd_limit() {
        Ok(files) => {
            let fit = usize::try_from(files / 2).unwrap_or(usize::MAX);
            if limits.max_connections > fit {
                tracing::warn!(
                    open_files = files,
                    max_connections = fit,
                    "--max-connections lowered to half the open-files limit"
                );
                limits.max_connections = fit;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    HttpConfig {
        limits,
        allowed_hosts: AllowedHosts::for_listen(common.listen, allowed_hosts),
    }
}

/// How often changed anomaly baselines are written out.
const BASELINES_SAVE_INTERVAL: Duration = Duration::from_secs(10);

async fn save_baselines_every(runner: Arc<Runner>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        // The write syncs the disk: off the runtime's worker threads.
        let saving = runner.clone();
        let saved = tokio::task::spawn_blocking(move || saving.watch.save_baselines()).await;
        if let Ok(Err(e)) = saved {
            tracing::warn!(error = %e, reason = e.reason(), "anomaly baselines not saved");
        }
    }
}

/// The runner-wide allow-list, trusted proxies and the anomaly baselines of the flags.
fn watch(common: &CommonArgs) -> Result<Watch, StartError> {
    let allow_list =
        IpAllowList::parse(&common.ip_allow_list).map_err(|source| StartError::Cidr {
            flag: "--ip-allow-list",
            source,
        })?;
    let networks = Networks::parse(&common.trusted_proxies).map_err(|source| StartError::Cidr {
        flag: "--trusted-proxies",
        source,
    })?;
    let header = match common.forwarded_header {
        ForwardedHeaderArg::XForwardedFor => ForwardedHeader::XForwardedFor,
        ForwardedHeaderArg::Forwarded => ForwardedHeader::Forwarded,
    };
    let path = common
        .anomaly_baselines
        .clone()
        .unwrap_or_else(|| default_audit_key_dir(common).join("anomaly-baselines.json"));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StartError::BaselinesDir {
            dir: dir.into(),
            source,
        })?;
    }
    let anomaly = AnomalyDetector::open(&path, Arc::new(SystemClock))?;
    Ok(Watch::new(
        TrustedProxies { networks, header },
        allow_list,
        anomaly,
    ))
}

/// How long a clean shutdown waits for calls still running to be closed in the audit log.
const AUDIT_CLOSE_GRACE: Duration = Duration::from_secs(30);

/// `--audit-key`, or the key under the state dir (created when missing), and
/// how the banner describes it. The key itself is never printed.
fn audit_key(common: &CommonArgs) -> Result<(AuditKey, String), StartError> {
    if let Some(path) = &common.audit_key {
        let key = AuditKey::from_file(path)?;
        let line = format!("key id {} from {}", key.id(), path.display());
        return Ok((key, line));
    }
    let dir = default_audit_key_dir(common);
    let path = dir.join("audit.key");
    std::fs::create_dir_all(&dir).map_err(|source| StartError::AuditKeyDir {
        dir: dir.clone(),
        source,
    })?;
    let (key, created) = AuditKey::load_or_create(&path).map_err(StartError::DefaultAuditKey)?;
    if created {
        tracing::warn!(
            key = %path.display(),
            "created an audit key; keep it to verify the log, and prefer --audit-key on storage the log's writers cannot read"
        );
    }
    let line = format!("key id {} from {} (default)", key.id(), path.display());
    Ok((key, line))
}

/// Where the default audit key lives: the state dir, except for a user other
/// than root left with the default state dir (which only root can create):
/// then `$HOME/.local/state/toolwarden`.
fn default_audit_key_dir(common: &CommonArgs) -> PathBuf {
    let home = std::env::var_os("HOME").filter(|_| !nix::unistd::geteuid().is_root());
    match home {
        Some(home) if common.state_dir == Path::new(DEFAULT_STATE_DIR) => {
            PathBuf::from(home).join(".local/state/toolwarden")
        }
        _ => common.state_dir.clone(),
    }
}

/// `name/` next to the manifests (inside DIR, or beside a single file), if it exists.
fn folder_beside(manifests: &Path, name: &str) -> Option<PathBuf> {
    let beside = if manifests.is_dir() {
        manifests.join(name)
    } else {
        manifests.with_file_name(name)
    };
    beside.is_dir().then_some(beside)
}

/// Starts the sandbox engine (its zygote is this binary, re-executed).
fn sandbox_executor(dir: &Path, common: &CommonArgs) -> Result<SandboxExecutor, StartError> {
    if !nix::unistd::geteuid().is_root() {
        // Rootless sandboxes (user namespace without root) are not built yet.
        return Err(StartError::NotRoot);
    }
    // Root-owned and 0711: a user-namespaced sandbox's setup passes through it
    // to the volumes and secret files below, and nobody can list it.
    let state = &common.state_dir;
    std::fs::create_dir_all(state)
        .and_then(|()| std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o711)))
        .map_err(|source| StartError::StateDir {
            dir: state.clone(),
            source,
        })?;
    let exe = std::env::current_exe().map_err(StartError::NoExecutable)?;
    let mut config = EngineConfig::new(exe);
    config.state_root = common.state_dir.join("sandbox");
    config.json_logs = super::logging::logs_json();
    let engine = Sandboxes::start(&config).map_err(StartError::Engine)?;
    let volumes = common
        .volumes
        .clone()
        .or_else(|| folder_beside(dir, "volumes"));
    Ok(
        SandboxExecutor::new(engine, VolumesDir(volumes), common.state_dir.clone())
            .allow_degraded(common.allow_degraded),
    )
}

/// The startup report: what is served where, on stderr for whoever started the
/// command (tests and scripts read the addresses from it). Runtime events go
/// through `tracing`.
fn banner(
    command: &str,
    dir: &Path,
    registry: &Registry,
    runner: &Runner,
    addr: SocketAddr,
    images: &str,
    audit_key: &str,
) {
    let tools = registry.snapshot();
    let names: Vec<&str> = tools.keys().map(String::as_str).collect();
    eprintln!(
        "toolwarden {command}: serving {} tool(s) from {}",
        names.len(),
        dir.display()
    );
    eprintln!(
        "  tools:     {}",
        if names.is_empty() {
            "(none)".into()
        } else {
            names.join(", ")
        }
    );
    eprintln!("  REST:      http://{addr}/v1/tools   POST http://{addr}/v1/tools/{{name}}/invoke");
    eprintln!("  MCP:       http://{addr}/mcp   (streamable HTTP)");
    eprintln!("  probes:    http://{addr}/healthz  /readyz  /metrics (with a token)");
    eprintln!("  OpenAPI:   http://{addr}/openapi.json (with a token)");
    if let Some(oauth) = &runner.auth.oauth {
        eprintln!("  OAuth:     {}", oauth.metadata_url());
    }
    eprintln!("  isolation: {}", runner.executor.isolation());
    for tool in tools.values() {
        let degradations = runner.executor.degradations(tool).unwrap_or_default();
        if !degradations.is_empty() {
            let list: Vec<String> = degradations.iter().map(ToString::to_string).collect();
            eprintln!("  DEGRADED:  {} runs with {}", tool.name, list.join("; "));
        }
    }
    eprintln!("  images:    {images}");
    eprintln!("  auth:      {}", runner.auth.describe());
    eprintln!(
        "  audit:     {} (HMAC-chained, {audit_key}; check with `toolwarden audit verify --key`)",
        runner.audit.description()
    );
}
