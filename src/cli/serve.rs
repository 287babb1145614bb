//! `toolwarden serve DIR` (standalone) and `toolwarden runner` (in the pods the
//! controller creates): load tools, check them, serve REST and MCP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use jsonwebtoken::Algorithm;

use crate::runner::audit::AuditLog;
use crate::runner::auth::{Authenticator, JwtKey, TokenReviewer, parse_token_file};
use crate::runner::executor::{ToolExecutor, UnsandboxedProcessExecutor};
use crate::runner::image_volumes::ImageVolumes;
use crate::runner::images::ImageStore;
use crate::runner::metrics::Metrics;
use crate::runner::pipeline::Runner;
use crate::runner::ratelimit::LimiterClock;
use crate::runner::registry::{LoadReport, Registry, SecretsDir, is_manifest, manifest_files};
use crate::runner::rest;
use crate::runner::sandbox_executor::{SandboxExecutor, VolumesDir};
use crate::sandbox::{EngineConfig, Sandboxes};

const EXIT_FAILED: u8 = 2;

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
    /// Required `aud` claim of JWTs.
    #[arg(long, value_name = "AUD")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim of JWTs.
    #[arg(long, value_name = "ISS")]
    pub jwt_issuer: Option<String>,
    /// Calls without a token: `auto` allows them only on a loopback address with no other auth configured.
    #[arg(long, value_enum, default_value_t = Anonymous::Auto)]
    pub anonymous: Anonymous,
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
}

#[derive(Args, Debug)]
pub struct CommonArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Append audit records to FILE (the hash chain continues); default: stdout.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Secret values as `DIR/<secretName>/<key>` files (a mounted Secret volume layout).
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
    /// Where unpacked root file systems are cached.
    #[arg(long, value_name = "DIR")]
    pub image_cache: Option<PathBuf>,
    /// Volumes tools mount: `DIR/pvc/<claim>` for persistentVolumeClaim and
    /// `DIR/configmap/<name>` for configMap. Default: `volumes/` beside the
    /// manifests, when it exists.
    #[arg(long, value_name = "DIR")]
    pub volumes: Option<PathBuf>,
    /// Sandbox state (container state, bundles, file secrets).
    #[arg(long, value_name = "DIR", default_value = "/run/toolwarden")]
    pub state_dir: PathBuf,
    /// DANGER: run tools as plain child processes with NO ISOLATION. For trying
    /// the HTTP API with trusted tools only; never with real agents.
    #[arg(long)]
    pub unsandboxed_dev: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anonymous {
    Auto,
    Allow,
    Deny,
}

pub fn serve(args: ServeArgs) -> ExitCode {
    let auth = match standalone_auth(&args) {
        Ok(auth) => auth,
        Err(e) => return fail(&e),
    };
    match tokio::runtime::Runtime::new() {
        Ok(tokio) => run(&args.dir, &args.common, auth, "serve", tokio),
        Err(e) => fail(&e.to_string()),
    }
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
    let auth = Authenticator {
        token_review: Some(TokenReviewer {
            client,
            audience: args.audience.clone(),
        }),
        ..Authenticator::default()
    };
    // The same runtime: the client's background tasks live on it.
    run(&args.tools, &args.common, auth, "runner", tokio)
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

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_FAILED)
}

fn standalone_auth(args: &ServeArgs) -> Result<Authenticator, String> {
    let mut auth = Authenticator::default();
    if let Some(path) = &args.tokens {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        auth.tokens = parse_token_file(&text).map_err(|e| format!("{}: {e}", path.display()))?;
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
        Anonymous::Auto => loopback && auth.tokens.is_empty() && auth.jwt_keys.is_empty(),
    };
    if auth.allow_anonymous {
        eprintln!(
            "warning: anonymous calls are allowed{}; configure --tokens or --jwt-* before exposing this runner",
            if loopback {
                " (loopback only)"
            } else {
                " ON A NON-LOOPBACK ADDRESS"
            }
        );
    }
    Ok(auth)
}

fn run(
    dir: &Path,
    common: &CommonArgs,
    auth: Authenticator,
    command: &str,
    tokio: tokio::runtime::Runtime,
) -> ExitCode {
    let executor: Arc<dyn ToolExecutor> = if common.unsandboxed_dev {
        eprintln!(
            "WARNING: --unsandboxed-dev: tools run as plain processes of this user with NO ISOLATION."
        );
        eprintln!(
            "WARNING: use it to try the API with trusted tools only, never with real agents."
        );
        Arc::new(UnsandboxedProcessExecutor)
    } else {
        match sandbox_executor(dir, common) {
            Ok(executor) => Arc::new(executor),
            Err(e) => return fail(&e),
        }
    };
    let audit = match &common.audit_log {
        Some(path) => match AuditLog::open_file(path) {
            Ok(log) => log,
            Err(e) => return fail(&format!("audit log {}: {e}", path.display())),
        },
        None => AuditLog::to_writer(Box::new(std::io::stdout()), "stdout"),
    };
    let mut registry = Registry::new(LimiterClock::real(), SecretsDir(common.secrets_dir.clone()));
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
            registry = registry.with_images(ImageStore {
                dir: images,
                cache: image_cache(common),
            });
            line
        }
        (None, None) => {
            "not resolved (no --images folder; only the unsandboxed executor can run without one)"
                .to_string()
        }
    };
    let registry = Arc::new(registry);
    let report = load(&registry, dir);
    if !report.errors.is_empty() {
        return fail(&format!("{} could not be loaded", dir.display()));
    }
    let runner = Arc::new(Runner {
        registry: registry.clone(),
        auth,
        audit,
        executor,
        metrics: Metrics::default(),
    });
    tokio.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(common.listen).await {
            Ok(l) => l,
            Err(e) => return fail(&format!("cannot listen on {}: {e}", common.listen)),
        };
        let addr = listener.local_addr().unwrap_or(common.listen);
        banner(command, dir, &registry, &runner, addr, &images_line);
        prepare_sandboxes(&registry, runner.executor.as_ref()).await;
        let _watcher = match watch(dir, registry, runner.executor.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("warning: not watching {} for changes: {e}", dir.display());
                None
            }
        };
        match rest::serve(listener, runner, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e.to_string()),
        }
    })
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
fn sandbox_executor(dir: &Path, common: &CommonArgs) -> Result<SandboxExecutor, String> {
    if !nix::unistd::geteuid().is_root() {
        // Rootless sandboxes (user namespace without root) are not built yet.
        return Err(
            "the sandbox engine needs root; run as root, or pass --unsandboxed-dev \
                    to try the API without isolation (trusted tools only)"
                .into(),
        );
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut config = EngineConfig::new(exe);
    config.state_root = common.state_dir.join("sandbox");
    let engine = Sandboxes::start(&config).map_err(|e| {
        format!(
            "the sandbox engine could not start ({e}); it needs root (or pass --unsandboxed-dev \
             to try the API without isolation, trusted tools only)"
        )
    })?;
    let volumes = common
        .volumes
        .clone()
        .or_else(|| folder_beside(dir, "volumes"));
    Ok(SandboxExecutor::new(
        engine,
        VolumesDir(volumes),
        common.state_dir.join("secret-files"),
    ))
}

/// Fills the warm pools of the tools now served (dropping those of replaced
/// tools) and reports the tools that cannot run.
async fn prepare_sandboxes(registry: &Registry, executor: &dyn ToolExecutor) {
    let tools: Vec<_> = registry.snapshot().values().cloned().collect();
    match executor.prepare(&tools).await {
        Ok(errors) => {
            for e in errors {
                eprintln!("error: cannot run {e}");
            }
        }
        Err(e) => eprintln!("error: preparing sandboxes: {e}"),
    }
}

/// Loads `dir` into the registry and reports what is (not) served on stderr.
fn load(registry: &Registry, dir: &Path) -> LoadReport {
    let report = match manifest_files(dir) {
        Ok(files) => registry.load(&files),
        Err(e) => LoadReport {
            errors: vec![format!("{}: {e}", dir.display())],
            ..LoadReport::default()
        },
    };
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    for refusal in &report.refused {
        eprintln!(
            "refused {} ({}): fails the checklist:",
            refusal.tool, refusal.origin
        );
        for reason in &refusal.reasons {
            eprintln!("    {reason}");
        }
    }
    report
}

fn banner(
    command: &str,
    dir: &Path,
    registry: &Registry,
    runner: &Runner,
    addr: SocketAddr,
    images: &str,
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
    eprintln!("  probes:    http://{addr}/healthz  /readyz  /metrics");
    eprintln!("  isolation: {}", runner.executor.isolation());
    eprintln!("  images:    {images}");
    eprintln!("  auth:      {}", runner.auth.describe());
    eprintln!(
        "  audit:     {} (hash-chained; check with `toolwarden audit verify`)",
        runner.audit.description
    );
}

/// Reloads on any change to a manifest in `dir`, after changes settle for
/// 200 ms (editors write files in several steps).
fn watch(
    dir: &Path,
    registry: Arc<Registry>,
    executor: Arc<dyn ToolExecutor>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the files (our own reload included) raises access events:
        // reacting to those would reload forever.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
            && event.paths.iter().any(|p| is_manifest(p))
        {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    let dir = dir.to_path_buf();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            while let Ok(Some(())) =
                tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
            {}
            // Loading compiles schemas and may unpack images: keep it off the I/O threads.
            let (loading, dir) = (registry.clone(), dir.clone());
            let Ok((report, dir)) =
                tokio::task::spawn_blocking(move || (load(&loading, &dir), dir)).await
            else {
                continue;
            };
            if report.errors.is_empty() {
                eprintln!(
                    "reloaded {}: serving {}",
                    dir.display(),
                    report.served.join(", ")
                );
                prepare_sandboxes(&registry, executor.as_ref()).await;
            } else {
                eprintln!(
                    "reload of {} failed; still serving the previous tools",
                    dir.display()
                );
            }
        }
    });
    Ok(watcher)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}
