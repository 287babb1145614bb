//! Content guards: pure, fast checks of every string in a JSON document for
//! personal information, credentials, prompt-injection phrasing and injection
//! patterns, each with an action (`refuse`, `redact`, `flag`). Rule sets are
//! versioned data files under `src/guards/rules/`. Also here: per-caller
//! anomaly scoring ([`anomaly`]) and client-address allow-lists ([`client_addr`]).

pub mod anomaly;
pub mod client_addr;
mod fold;
mod injection;
mod malicious;
mod pii;
mod rules;
pub(crate) mod secrets;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::LazyLock;

use serde::Serialize;
use serde_json::Value;

pub use crate::api::{GuardAction, GuardDecl, GuardKind, HttpGuard};
use rules::RuleMask;

/// Why a guard declaration cannot be used; `index` is its position in its list.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GuardError {
    #[error("field `{field}` is not a JSON pointer (it must be empty or start with `/`)")]
    InvalidField { index: usize, field: String },
    #[error("`{category}` is not a {kind} rule or category (known: {known})")]
    UnknownCategory {
        index: usize,
        kind: &'static str,
        category: String,
        known: String,
    },
    #[error("http options go with kind: http, and kind: http needs them")]
    HttpOptionsMismatch { index: usize },
    #[error("a {kind} guard cannot {action}")]
    ActionUnsupported {
        index: usize,
        kind: &'static str,
        action: &'static str,
    },
    #[error("built-in rule set {file} is invalid: {reason}")]
    RuleSet { file: &'static str, reason: String },
}

impl GuardError {
    /// Stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            GuardError::InvalidField { .. } => "GuardFieldInvalid",
            GuardError::UnknownCategory { .. } => "GuardCategoryUnknown",
            GuardError::HttpOptionsMismatch { .. } => "GuardHttpOptionsMismatch",
            GuardError::ActionUnsupported { .. } => "GuardActionUnsupported",
            GuardError::RuleSet { .. } => "GuardRuleSetInvalid",
        }
    }

    /// Position of the declaration in its list; `None` for a broken built-in rule set.
    pub fn index(&self) -> Option<usize> {
        match self {
            GuardError::InvalidField { index, .. }
            | GuardError::UnknownCategory { index, .. }
            | GuardError::HttpOptionsMismatch { index }
            | GuardError::ActionUnsupported { index, .. } => Some(*index),
            GuardError::RuleSet { .. } => None,
        }
    }
}

/// Something a detector found in one string: the rule and, where the match
/// maps onto the original text, its byte range (else the whole string).
pub(crate) struct Hit<'a> {
    pub rule: &'a str,
    pub span: Option<Range<usize>>,
}

/// How the detectors run: the fast path (NFKC only of the runs that need
/// it, table-driven folding, prefilters that rule out what cannot match), or,
/// in tests, the straightforward path it must agree with finding for finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    Fast,
    #[cfg(test)]
    Straightforward,
}

/// One string being checked, normalised (NFKC) at most once for all the
/// detectors that match on normalised text.
pub(crate) struct Text<'t> {
    raw: &'t str,
    path: Path,
    nfkc: std::cell::OnceCell<Cow<'t, str>>,
}

impl<'t> Text<'t> {
    pub fn new(raw: &'t str, path: Path) -> Text<'t> {
        Text {
            raw,
            path,
            nfkc: std::cell::OnceCell::new(),
        }
    }

    pub fn raw(&self) -> &'t str {
        self.raw
    }

    pub fn path(&self) -> Path {
        self.path
    }

    pub fn nfkc(&self) -> &str {
        self.nfkc.get_or_init(|| match self.path {
            Path::Fast => fold::nfkc(self.raw),
            #[cfg(test)]
            Path::Straightforward => Cow::Owned(fold::straightforward::nfkc(self.raw)),
        })
    }
}

/// Whether `text` has `min` consecutive bytes that are `in_run` (`min` > 0).
/// Such a run covers an index `k * min - 1`, so only those bytes are looked
/// at first, and the run around them measured: for prose, a fraction of the
/// bytes a full scan reads.
pub(crate) fn has_run(text: &str, min: usize, in_run: impl Fn(u8) -> bool) -> bool {
    let bytes = text.as_bytes();
    (min.saturating_sub(1)..bytes.len())
        .step_by(min.max(1))
        .filter(|&at| in_run(bytes[at]))
        .any(|at| {
            let before = bytes[..at].iter().rev().take_while(|&&b| in_run(b));
            let after = bytes[at..].iter().take_while(|&&b| in_run(b));
            before.count() + after.count() >= min
        })
}

// Each kind's rule set is compiled on its first use, once per process: a runner whose
// tools declare no guards (or `toolwarden check` asking only for the secrets detector)
// never holds the others (the prompt-injection automaton alone is about 2 MB).
static PII: LazyLock<Result<pii::Pii, GuardError>> = LazyLock::new(pii::Pii::load);
static SECRETS: LazyLock<Result<secrets::Secrets, GuardError>> =
    LazyLock::new(secrets::Secrets::load);
static INJECTION: LazyLock<Result<injection::PromptInjection, GuardError>> =
    LazyLock::new(injection::PromptInjection::load);
static MALICIOUS: LazyLock<Result<malicious::Malicious, GuardError>> =
    LazyLock::new(malicious::Malicious::load);

fn loaded<T>(rule_set: &'static LazyLock<Result<T, GuardError>>) -> Result<&'static T, GuardError> {
    rule_set.as_ref().map_err(Clone::clone)
}

/// The credential detector, shared with `toolwarden check`.
pub(crate) fn secrets_detector() -> Result<&'static secrets::Secrets, GuardError> {
    loaded(&SECRETS)
}

/// The in-process detector of one guard kind.
#[derive(Clone, Copy)]
enum Detector {
    Pii(&'static pii::Pii),
    Secrets(&'static secrets::Secrets),
    PromptInjection(&'static injection::PromptInjection),
    Malicious(&'static malicious::Malicious),
}

impl Detector {
    /// The detector of `kind`, its rule set compiled if this is its first use;
    /// `None` for `http`, which runs outside the process.
    fn of(kind: GuardKind) -> Result<Option<Detector>, GuardError> {
        Ok(Some(match kind {
            GuardKind::Pii => Detector::Pii(loaded(&PII)?),
            GuardKind::Secrets => Detector::Secrets(loaded(&SECRETS)?),
            GuardKind::PromptInjection => Detector::PromptInjection(loaded(&INJECTION)?),
            GuardKind::Malicious => Detector::Malicious(loaded(&MALICIOUS)?),
            GuardKind::Http => return Ok(None),
        }))
    }

    fn rule_names(self) -> Vec<&'static str> {
        match self {
            Detector::Pii(d) => d.rule_names().collect(),
            Detector::Secrets(d) => d.rule_names().collect(),
            Detector::PromptInjection(d) => d.rule_names().collect(),
            Detector::Malicious(d) => d.rule_names().collect(),
        }
    }

    fn scan_text(self, text: &Text, mask: RuleMask, out: &mut Vec<Hit<'static>>) {
        match self {
            Detector::Pii(d) => d.scan_text(text, mask, out),
            Detector::Secrets(d) => d.scan_text(text, mask, out),
            Detector::PromptInjection(d) => d.scan_text(text, mask, out),
            Detector::Malicious(d) => d.scan_text(text, mask, out),
        }
    }
}

/// One thing a guard found.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub guard: GuardKind,
    /// Position of the guard in its list (`spec.guards.input[i]`).
    pub guard_index: usize,
    /// Rule of the kind's rule set, e.g. `paymentCard` or `instructionOverride`
    /// (for an `http` guard, the rule its classifier named).
    pub rule: Cow<'static, str>,
    /// JSON pointer of the string (of the member, when the finding is in its key).
    pub pointer: String,
    /// What is done about it; `redact` on an object key becomes `refuse`
    /// (a key cannot be redacted without changing the document's shape).
    pub action: GuardAction,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub in_key: bool,
    #[serde(skip)]
    pub span: Option<Range<usize>>,
}

struct CompiledGuard {
    index: usize,
    kind: GuardKind,
    detector: Detector,
    action: GuardAction,
    /// Unescaped-segment patterns; empty means every string.
    fields: Vec<Vec<String>>,
    mask: RuleMask,
}

impl CompiledGuard {
    fn covers(&self, segments: &[String]) -> bool {
        self.fields.is_empty()
            || self.fields.iter().any(|field| {
                field.len() <= segments.len()
                    && field.iter().zip(segments).all(|(f, s)| f == "*" || f == s)
            })
    }
}

/// The compiled guards of one list (a tool's input or output guards).
pub struct GuardSet {
    guards: Vec<CompiledGuard>,
    http: Vec<(usize, HttpGuard, GuardAction, Vec<String>)>,
}

/// The result of checking one document.
#[derive(Clone, Debug, PartialEq)]
pub struct GuardOutcome {
    pub findings: Vec<Finding>,
    /// A finding's action is `refuse`.
    pub refused: bool,
    /// The document with the `redact` findings replaced, when there are any
    /// (and the call is not refused).
    pub redacted: Option<Value>,
}

impl GuardSet {
    /// Checks the declarations and selects their rules; cheap (the rule sets
    /// themselves are compiled once per process).
    pub fn compile(decls: &[GuardDecl]) -> Result<GuardSet, GuardError> {
        let mut guards = Vec::new();
        let mut http = Vec::new();
        for (index, decl) in decls.iter().enumerate() {
            let fields = decl
                .fields
                .iter()
                .map(|field| parse_field(index, field))
                .collect::<Result<Vec<_>, _>>()?;
            if (decl.kind == GuardKind::Http) != decl.http.is_some() {
                return Err(GuardError::HttpOptionsMismatch { index });
            }
            if let Some(options) = &decl.http {
                if decl.action == GuardAction::Redact {
                    return Err(GuardError::ActionUnsupported {
                        index,
                        kind: decl.kind.as_str(),
                        action: decl.action.as_str(),
                    });
                }
                http.push((index, options.clone(), decl.action, decl.fields.clone()));
                continue;
            }
            let Some(detector) = Detector::of(decl.kind)? else {
                return Err(GuardError::HttpOptionsMismatch { index });
            };
            let mask = rule_mask(detector, index, decl)?;
            guards.push(CompiledGuard {
                index,
                kind: decl.kind,
                detector,
                action: decl.action,
                fields,
                mask,
            });
        }
        Ok(GuardSet { guards, http })
    }

    pub fn is_empty(&self) -> bool {
        self.guards.is_empty() && self.http.is_empty()
    }

    /// The `kind: http` guards, which the caller runs (they need the network):
    /// index, options, action and fields.
    pub fn http_guards(&self) -> impl Iterator<Item = (usize, &HttpGuard, GuardAction, &[String])> {
        self.http
            .iter()
            .map(|(i, options, action, fields)| (*i, options, *action, fields.as_slice()))
    }

    /// Every finding of the in-process guards in `document`, in document order.
    pub fn check(&self, document: &Value) -> Vec<Finding> {
        self.check_on(Path::Fast, document)
    }

    fn check_on(&self, path: Path, document: &Value) -> Vec<Finding> {
        let mut walk = Walk {
            set: self,
            path,
            segments: Vec::new(),
            findings: Vec::new(),
        };
        walk.value(document);
        walk.findings
    }

    /// [`check`](Self::check), plus the verdict and the redacted document.
    pub fn apply(&self, document: &Value) -> GuardOutcome {
        let findings = self.check(document);
        let refused = findings.iter().any(|f| f.action == GuardAction::Refuse);
        let redacted = (!refused && findings.iter().any(|f| f.action == GuardAction::Redact))
            .then(|| redact(document, &findings));
        GuardOutcome {
            findings,
            refused,
            redacted,
        }
    }

    fn scan(&self, guard: &CompiledGuard, text: &Text, out: &mut Vec<Hit<'static>>) {
        guard.detector.scan_text(text, guard.mask, out);
    }
}

/// `/a/b~1c` into `["a", "b/c"]`; `""` is the whole document.
fn parse_field(index: usize, field: &str) -> Result<Vec<String>, GuardError> {
    if field.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = field.strip_prefix('/') else {
        return Err(GuardError::InvalidField {
            index,
            field: field.into(),
        });
    };
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn rule_mask(detector: Detector, index: usize, decl: &GuardDecl) -> Result<RuleMask, GuardError> {
    if decl.categories.is_empty() {
        return Ok(RuleMask::ALL);
    }
    let names = detector.rule_names();
    let mut mask = RuleMask::NONE;
    for category in &decl.categories {
        let by_category = match detector {
            Detector::Malicious(d) => d.category_mask(category),
            _ => None,
        };
        mask = match (by_category, names.iter().position(|n| n == category)) {
            (Some(m), _) => RuleMask::union(mask, m),
            (None, Some(i)) => mask.with(i),
            (None, None) => {
                return Err(GuardError::UnknownCategory {
                    index,
                    kind: decl.kind.as_str(),
                    category: category.clone(),
                    known: names.join(", "),
                });
            }
        };
    }
    Ok(mask)
}

struct Walk<'s> {
    set: &'s GuardSet,
    path: Path,
    /// Unescaped segments of the current position.
    segments: Vec<String>,
    findings: Vec<Finding>,
}

impl Walk<'_> {
    fn value(&mut self, value: &Value) {
        match value {
            Value::String(text) => self.text(text, false),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.segments.push(i.to_string());
                    self.value(item);
                    self.segments.pop();
                }
            }
            Value::Object(members) => {
                for (key, member) in members {
                    self.segments.push(key.clone());
                    self.text(key, true);
                    self.value(member);
                    self.segments.pop();
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }

    fn text(&mut self, raw: &str, in_key: bool) {
        let text = Text::new(raw, self.path);
        let mut hits = Vec::new();
        for guard in &self.set.guards {
            if !guard.covers(&self.segments) {
                continue;
            }
            self.set.scan(guard, &text, &mut hits);
            if hits.is_empty() {
                continue;
            }
            let pointer = pointer(&self.segments);
            let action = match guard.action {
                GuardAction::Redact if in_key => GuardAction::Refuse,
                action => action,
            };
            self.findings.extend(hits.drain(..).map(|hit| Finding {
                guard: guard.kind,
                guard_index: guard.index,
                rule: Cow::Borrowed(hit.rule),
                pointer: pointer.clone(),
                action,
                in_key,
                span: hit.span,
            }));
        }
    }
}

fn pointer(segments: &[String]) -> String {
    segments.iter().fold(String::new(), |mut p, s| {
        p.push('/');
        p.push_str(&s.replace('~', "~0").replace('/', "~1"));
        p
    })
}

/// `document` with every `redact` finding replaced by `[REDACTED:<rule>]`
/// (its span, or the whole string when the match has none).
fn redact(document: &Value, findings: &[Finding]) -> Value {
    let mut by_pointer: BTreeMap<&str, Vec<&Finding>> = BTreeMap::new();
    for finding in findings.iter().filter(|f| f.action == GuardAction::Redact) {
        by_pointer
            .entry(&finding.pointer)
            .or_default()
            .push(finding);
    }
    let mut out = document.clone();
    for (pointer, mut found) in by_pointer {
        let Some(Value::String(text)) = out.pointer_mut(pointer) else {
            continue;
        };
        if let Some(whole) = found.iter().find(|f| f.span.is_none()) {
            *text = format!("[REDACTED:{}]", whole.rule);
            continue;
        }
        found.sort_by_key(|f| f.span.as_ref().map(|s| s.start));
        let mut redacted = String::with_capacity(text.len());
        let mut at = 0;
        for finding in found {
            let span = finding.span.clone().unwrap_or_default();
            if span.end <= at {
                continue;
            }
            redacted.push_str(&text[at..span.start.max(at)]);
            redacted.push_str(&format!("[REDACTED:{}]", finding.rule));
            at = span.end;
        }
        redacted.push_str(&text[at..]);
        *text = redacted;
    }
    out
}

#[cfg(test)]
mod tests;
