//! A compiled tool: an AgentTool checked and compiled once per generation
//! (schema, CEL rules, rate limiter), with its secrets read from the secrets
//! folder and how each is delivered to a run.

use std::path::PathBuf;
use std::sync::Arc;

use crate::api::{
    AgentTool, AgentToolSpec, AuthorizationRule, BadQuantity, EgressCidr, SecretUse, parse_quantity,
};
use crate::guards::client_addr::{InvalidCidr, IpAllowList};
use crate::guards::{GuardError, GuardSet};

use super::authorize::{self, CompiledRule, RuleError};
use super::images::{ImageError, RootfsResolver};
use super::ratelimit::{LimiterClock, ToolLimiter};
use super::redact::{Redactor, RedactorError};
use super::validate::{self, InvalidSchema};

/// Why a tool cannot be served; [`prepare`] reports every one it finds.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("spec.runtime.image: {0}")]
    Image(#[from] ImageError),
    #[error("spec.inputSchema: {0}")]
    Schema(#[from] InvalidSchema),
    #[error("spec.outputSchema: {0}")]
    OutputSchema(InvalidSchema),
    #[error("spec.{0}")]
    Authorization(RuleError),
    #[error("spec.approval.when: {0}")]
    ApprovalWhen(RuleError),
    #[error(
        "spec.secrets[{index}]: secret {secret}/{key} is not available{}",
        if *no_secrets_dir { " (no --secrets-dir)" } else { "" }
    )]
    SecretUnavailable {
        index: usize,
        secret: String,
        key: String,
        no_secrets_dir: bool,
    },
    #[error("spec.secrets: {0}")]
    Redactor(#[from] RedactorError),
    #[error("spec.guards.{side}{}: {source}", source.index().map(|i| format!("[{i}]")).unwrap_or_default())]
    Guard {
        side: &'static str,
        source: GuardError,
    },
    #[error("spec.callers.ipAllowList: {0}")]
    AllowList(#[from] InvalidCidr),
    #[error("spec.alerts.memory: {0}")]
    AlertMemory(#[from] BadQuantity),
}

impl ToolError {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            ToolError::Image(e) => e.reason(),
            ToolError::Schema(e) => e.reason(),
            ToolError::OutputSchema(_) => "OutputSchemaInvalid",
            ToolError::Authorization(e) | ToolError::ApprovalWhen(e) => e.reason(),
            ToolError::SecretUnavailable { .. } => "SecretUnavailable",
            ToolError::Redactor(e) => e.reason(),
            ToolError::Guard { source, .. } => source.reason(),
            ToolError::AllowList(e) => e.reason(),
            ToolError::AlertMemory(_) => "BadQuantity",
        }
    }
}

/// A tool ready to be called.
pub struct PreparedTool {
    pub name: String,
    /// Bumped each time the spec changes; recorded with every call.
    pub generation: u64,
    pub spec: AgentToolSpec,
    pub validator: jsonschema::Validator,
    /// `outputSchema`, compiled: every answer is checked against it.
    pub output_validator: Option<jsonschema::Validator>,
    pub rules: Vec<CompiledRule>,
    /// `approval.when`, compiled.
    pub approval_when: Option<CompiledRule>,
    /// Shared with the tool's next version when only its secrets rotate.
    pub limiter: Option<Arc<ToolLimiter>>,
    /// Env and file secrets, handed to the executor.
    pub secrets: Vec<SecretDelivery>,
    /// `inject` secrets and their values: only the egress proxy uses them.
    pub injected: Vec<InjectedSecret>,
    /// `sandboxing.allowedEgressCidrs` of the ToolPolicies that select the
    /// tool: the non-public ranges its egress proxy may connect to.
    pub allowed_egress_cidrs: Vec<EgressCidr>,
    /// Every secret value the tool has now (injected ones too).
    pub secret_values: Vec<Vec<u8>>,
    /// Finds `secret_values` and the values rotation retired in output.
    pub redactor: Redactor,
    /// Bumped each time the tool is prepared again (rotated secrets or a new
    /// spec), so that executors know their warm sandboxes hold stale secrets.
    pub secrets_revision: u64,
    /// Root file system of `runtime.image`, when the runner resolves images.
    pub rootfs: Option<PathBuf>,
    /// `guards.input` and `guards.output`, compiled; `None` when none are declared.
    pub input_guards: Option<GuardSet>,
    pub output_guards: Option<GuardSet>,
    /// `callers.ipAllowList`; empty allows every address.
    pub ip_allow_list: IpAllowList,
    /// `alerts.memory` in bytes.
    pub memory_alert_bytes: Option<u64>,
}

impl PreparedTool {
    /// How much output a run must capture: `maxOutputBytes` plus room for a
    /// secret that crosses the cap, so it is redacted before the cut.
    pub fn capture_bytes(&self) -> usize {
        self.output_cap()
            .saturating_add(self.redactor.capture_margin())
    }

    /// `sandbox.maxOutputBytes`: what the caller gets at most, after redaction.
    pub fn output_cap(&self) -> usize {
        usize::try_from(self.spec.sandbox.max_output_bytes).unwrap_or(usize::MAX)
    }

    /// Takes over what outlives a new version of the tool: retired secret
    /// values stay redacted (the newest [`RETIRED_SECRETS_KEPT`], until
    /// restart: a tool may have kept an old value on a volume), and when the
    /// spec is unchanged, the rate-limit state.
    pub(crate) fn take_over_from(&mut self, previous: &PreparedTool) -> Result<(), RedactorError> {
        let mut values = self.secret_values.clone();
        let retired = previous
            .redactor
            .values()
            .iter()
            .filter(|v| !self.secret_values.contains(v))
            .take(RETIRED_SECRETS_KEPT);
        values.extend(retired.cloned());
        self.redactor = Redactor::new(values)?;
        self.secrets_revision = previous.secrets_revision + 1;
        if previous.spec == self.spec {
            self.limiter.clone_from(&previous.limiter);
        }
        Ok(())
    }
}

/// Retired secret values a tool keeps redacting.
pub const RETIRED_SECRETS_KEPT: usize = 16;

/// A tool's secrets as read from the secrets folder.
pub(crate) struct ToolSecrets {
    deliveries: Vec<SecretDelivery>,
    injected: Vec<InjectedSecret>,
    pub(crate) values: Vec<Vec<u8>>,
}

/// Where secret values come from: `DIR/<secretName>/<key>`, the layout of a
/// mounted Kubernetes Secret volume.
#[derive(Clone, Debug, Default)]
pub struct SecretsDir(pub Option<PathBuf>);

impl SecretsDir {
    /// `DIR/<secret>/<key>`, for Kubernetes names only, opened beneath DIR:
    /// symbolic links are followed (a mounted Secret's keys are links into
    /// `..data/`) but resolved inside DIR, so none leads out of it.
    fn read(&self, secret: &str, key: &str) -> Option<Vec<u8>> {
        use std::io::Read;
        let dir = self.0.as_ref()?;
        crate::api::names::dns1123_subdomain(secret).ok()?;
        crate::api::names::config_key(key).ok()?;
        let root = pathrs::Root::open(dir).ok()?;
        let mut file = root
            .resolve(format!("{secret}/{key}"))
            .and_then(|handle| handle.reopen(pathrs::flags::OpenFlags::O_RDONLY))
            .ok()?;
        let mut value = Vec::new();
        file.read_to_end(&mut value).ok()?;
        Some(value)
    }

    /// Reads every secret `spec` uses; errors name the missing ones.
    pub(crate) fn read_all(&self, spec: &AgentToolSpec) -> Result<ToolSecrets, Vec<ToolError>> {
        let mut errors = Vec::new();
        let mut deliveries = Vec::new();
        let mut injected = Vec::new();
        let mut values = Vec::new();
        for (i, use_) in spec.secrets.iter().enumerate() {
            let value = self.read(&use_.secret_name, &use_.key);
            match (value, &use_.env, &use_.file) {
                (Some(v), Some(env), _) => {
                    values.push(v.clone());
                    deliveries.push(SecretDelivery::Env {
                        name: env.clone(),
                        value: String::from_utf8_lossy(&v).into_owned(),
                    });
                }
                (Some(v), None, Some(path)) => {
                    values.push(v.clone());
                    deliveries.push(SecretDelivery::File {
                        path: path.clone(),
                        value: v,
                    });
                }
                // Injected secrets never reach the tool: the egress proxy adds them, and
                // the runner redacts them from output.
                (Some(v), None, None) => {
                    values.push(v.clone());
                    injected.push(InjectedSecret {
                        secret: use_.clone(),
                        value: v,
                    });
                }
                (None, None, None) => tracing::warn!(
                    secret = %use_.secret_name,
                    key = %use_.key,
                    "an inject secret is not available: the egress proxy will not add it"
                ),
                (None, _, _) => errors.push(ToolError::SecretUnavailable {
                    index: i,
                    secret: use_.secret_name.clone(),
                    key: use_.key.clone(),
                    no_secrets_dir: self.0.is_none(),
                }),
            }
        }
        if errors.is_empty() {
            Ok(ToolSecrets {
                deliveries,
                injected,
                values,
            })
        } else {
            Err(errors)
        }
    }
}

/// Compiles one tool; the errors are every problem found.
pub fn prepare(
    tool: &AgentTool,
    generation: u64,
    secrets: &SecretsDir,
    images: Option<&dyn RootfsResolver>,
    clock: &LimiterClock,
) -> Result<PreparedTool, Vec<ToolError>> {
    let spec = &tool.spec;
    let mut errors = Vec::new();
    let rootfs = images.and_then(|store| {
        store
            .resolve(&spec.runtime.image)
            .map_err(|e| errors.push(e.into()))
            .ok()
    });
    let validator = validate::compile(&spec.input_schema)
        .map_err(|e| errors.push(e.into()))
        .ok();
    let output_validator = spec.output_schema.as_ref().and_then(|schema| {
        validate::compile(schema)
            .map_err(|e| errors.push(ToolError::OutputSchema(e)))
            .ok()
    });
    let rules = authorize::compile(&spec.authorization)
        .map_err(|e| errors.push(ToolError::Authorization(e)))
        .ok();
    let when: Vec<AuthorizationRule> = spec
        .approval
        .iter()
        .filter_map(|a| a.when.clone())
        .map(|expression| AuthorizationRule {
            expression,
            message: None,
        })
        .collect();
    let approval_when = authorize::compile(&when)
        .map_err(|e| errors.push(ToolError::ApprovalWhen(e)))
        .ok()
        .and_then(|mut rules| rules.pop());
    let secrets = secrets
        .read_all(spec)
        .map_err(|reasons| errors.extend(reasons))
        .ok();
    let mut guards = |side, decls: &[crate::api::GuardDecl]| {
        if decls.is_empty() {
            return None;
        }
        GuardSet::compile(decls)
            .map_err(|source| errors.push(ToolError::Guard { side, source }))
            .ok()
    };
    let input_guards = guards("input", &spec.guards.input);
    let output_guards = guards("output", &spec.guards.output);
    let ip_allow_list = IpAllowList::parse(
        spec.callers
            .as_ref()
            .map_or(&[][..], |c| c.ip_allow_list.as_slice()),
    )
    .map_err(|e| errors.push(e.into()))
    .unwrap_or_default();
    let memory_alert_bytes = spec
        .alerts
        .as_ref()
        .and_then(|a| a.memory.as_ref())
        .and_then(|q| {
            parse_quantity(q)
                .map(|bytes| bytes as u64)
                .map_err(|e| errors.push(e.into()))
                .ok()
        });
    let redactor = secrets.as_ref().and_then(|s| {
        Redactor::new(s.values.clone())
            .map_err(|e| errors.push(e.into()))
            .ok()
    });
    match (validator, rules, secrets, redactor) {
        (Some(validator), Some(rules), Some(secrets), Some(redactor)) if errors.is_empty() => {
            Ok(PreparedTool {
                name: tool.metadata.name.clone().unwrap_or_default(),
                generation,
                spec: spec.clone(),
                validator,
                output_validator,
                rules,
                approval_when,
                limiter: spec
                    .rate_limit
                    .as_ref()
                    .map(|r| Arc::new(ToolLimiter::new(r, clock.clone()))),
                secrets: secrets.deliveries,
                injected: secrets.injected,
                allowed_egress_cidrs: Vec::new(),
                secret_values: secrets.values,
                redactor,
                secrets_revision: 0,
                rootfs,
                input_guards,
                output_guards,
                ip_allow_list,
                memory_alert_bytes,
            })
        }
        _ => Err(errors),
    }
}

/// A secret the egress proxy adds to requests (`secrets[].inject`): the tool
/// gets a placeholder instead.
#[derive(Clone, PartialEq)]
pub struct InjectedSecret {
    pub secret: SecretUse,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for InjectedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.secret.secret_name, self.secret.key)
    }
}

/// A secret value delivered to one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretDelivery {
    /// Set as this environment variable.
    Env { name: String, value: String },
    /// Written as a read-only file at this absolute path inside the sandbox.
    File { path: String, value: Vec<u8> },
    /// A file of this call alone in its sandbox's
    /// [`SERVICE_ACCOUNT_DIR`](crate::sandbox::model::SERVICE_ACCOUNT_DIR): the tool's
    /// Kubernetes identity (see `kube_identity`).
    CallFile(crate::sandbox::model::CallFile),
}
