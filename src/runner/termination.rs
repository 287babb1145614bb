//! Why a runner pod refuses to start, told the Kubernetes way: one line `Reason: message`
//! in the container's termination message file (`/dev/termination-log`, which the kubelet
//! mounts and copies into the pod's `status.containerStatuses[].state.terminated.message`),
//! then a non-zero exit. The controller reads the line back ([`parse`]) into the tool's
//! conditions, so both sides share this one format.

use std::io::Write;
use std::path::Path;

use super::registry::LoadReport;

/// Where the kubelet expects the message unless the pod names another path.
pub const DEFAULT_PATH: &str = "/dev/termination-log";
/// The kubelet keeps at most this many bytes of a container's termination message.
const MAX_BYTES: usize = 4096;
/// The reason when the runner was given no tool at all.
const NO_TOOLS: &str = "NoToolsServed";

/// A fatal start refusal: a stable CamelCase reason and what a human needs to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartRefusal {
    pub reason: String,
    pub message: String,
}

impl std::fmt::Display for StartRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl StartRefusal {
    /// `toolwarden runner` serves exactly the tools the controller admitted into its
    /// ConfigMap: one refused (its image lacks mount points, a secret is missing...) or
    /// none at all makes the pod useless, so it must not start and look Ready.
    /// `withdrawn`: the tools the executor cannot run, each with its reason and message.
    pub fn of(report: &LoadReport, withdrawn: &[(String, &'static str, String)]) -> Option<Self> {
        let refused = report
            .refused
            .iter()
            .map(|r| {
                let why = format!("tool {} ({}): {}", r.tool, r.origin, r.reasons.join("; "));
                (r.reason, why)
            })
            .chain(
                withdrawn
                    .iter()
                    .map(|(tool, reason, why)| (*reason, format!("tool {tool}: {why}"))),
            );
        let (reasons, messages): (Vec<&str>, Vec<String>) = refused.unzip();
        match reasons.first() {
            Some(reason) => Some(StartRefusal {
                reason: (*reason).to_string(),
                message: messages.join("; "),
            }),
            None if report.served.is_empty() => Some(StartRefusal {
                reason: NO_TOOLS.into(),
                message: "no tool manifest to serve".into(),
            }),
            None => None,
        }
    }

    /// The one line the kubelet keeps: no line breaks, at most [`MAX_BYTES`].
    pub fn line(&self) -> String {
        let line = self.to_string().replace(['\r', '\n'], " ");
        if line.len() <= MAX_BYTES {
            return line;
        }
        let mut end = MAX_BYTES - 3;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &line[..end])
    }

    /// Writes [`Self::line`] into the termination message file. The file is the kubelet's
    /// to create: outside a pod it does not exist and nothing is written (never a new file
    /// under `/dev`).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)?;
        file.write_all(self.line().as_bytes())
    }
}

/// Reads a termination message written by [`StartRefusal::write`]: `Some` only when its
/// first line starts with a CamelCase reason and `": "`. Anything else (a message some
/// other program wrote) is `None`, and its reason is not trusted.
pub fn parse(message: &str) -> Option<StartRefusal> {
    let line = message.lines().next()?;
    let (reason, text) = line.split_once(": ")?;
    let camel_case = reason.len() <= 64
        && reason.starts_with(|c: char| c.is_ascii_uppercase())
        && reason.chars().all(|c| c.is_ascii_alphanumeric());
    camel_case.then(|| StartRefusal {
        reason: reason.into(),
        message: text.trim().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::registry::Refusal;

    fn refused(reason: &'static str, why: &str) -> LoadReport {
        LoadReport {
            refused: vec![Refusal {
                tool: "grep".into(),
                origin: "/etc/toolwarden/tools/tool.yaml".into(),
                reason,
                reasons: vec![why.into()],
            }],
            ..LoadReport::default()
        }
    }

    #[test]
    fn a_refused_tool_or_none_at_all_refuses_the_start_and_the_line_reads_back() {
        let report = refused(
            "ImageLacksMountPoints",
            "spec.runtime.image: image x lacks the mount point(s) /proc, /tmp:\nsecond line",
        );
        let refusal = StartRefusal::of(&report, &[]).unwrap();
        assert_eq!(refusal.reason, "ImageLacksMountPoints");
        let line = refusal.line();
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with(
                "ImageLacksMountPoints: tool grep (/etc/toolwarden/tools/tool.yaml): \
                 spec.runtime.image: image x lacks the mount point(s) /proc, /tmp: second line"
            ),
            "{line}"
        );
        let read_back = parse(&line).unwrap();
        assert_eq!(read_back.reason, refusal.reason);
        assert_eq!(read_back.message, refusal.message.replace('\n', " "));

        let nothing = LoadReport::default();
        assert_eq!(StartRefusal::of(&nothing, &[]).unwrap().reason, NO_TOOLS);
        let served = LoadReport {
            served: vec!["grep".into()],
            ..LoadReport::default()
        };
        assert_eq!(StartRefusal::of(&served, &[]), None);
        let withdrawn = [(
            "grep".to_string(),
            "IsolationDegraded",
            "no user namespace".to_string(),
        )];
        assert_eq!(
            StartRefusal::of(&served, &withdrawn).unwrap().to_string(),
            "IsolationDegraded: tool grep: no user namespace"
        );
    }

    #[test]
    fn the_line_fits_the_kubelets_limit_and_only_a_camel_case_reason_is_read_back() {
        let long = refused("SecretUnavailable", &"é".repeat(5000));
        let line = StartRefusal::of(&long, &[]).unwrap().line();
        assert!(
            line.len() <= MAX_BYTES && line.ends_with("..."),
            "{}",
            line.len()
        );
        assert_eq!(parse(&line).unwrap().reason, "SecretUnavailable");
        for not_ours in [
            "",
            "panicked at src/main.rs: oh no",
            "error: cannot listen",
            "Image Lacks: x",
            "ImageLacksMountPoints without a colon",
            "{\"ts\":1}: json",
        ] {
            assert_eq!(parse(not_ours), None, "{not_ours}");
        }
    }
}
