//! `toolwarden audit verify FILE`: checks an audit log's chain, MACs and anchors.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::runner::audit::{Anchor, AnchorError, AuditKey, anchor_path, verify};

const EXIT_BROKEN: u8 = 1;
const EXIT_UNREADABLE: u8 = 2;

/// Which anchor file `verify` checks the log against.
pub enum AnchorArg {
    /// `FILE.anchor`, which must exist: a log written with `--audit-log` always has one,
    /// and one that went missing may hide a cut tail.
    BesideLog,
    File(PathBuf),
    /// A log without one (collected from stdout).
    None,
}

pub fn verify_file(path: &Path, key: Option<&Path>, anchor: AnchorArg) -> ExitCode {
    let unreadable = |what: String| {
        eprintln!("error: {what}");
        ExitCode::from(EXIT_UNREADABLE)
    };
    let key = match key.map(AuditKey::from_file).transpose() {
        Ok(key) => key,
        Err(e) => return unreadable(e.to_string()),
    };
    let anchor_file = match anchor {
        AnchorArg::BesideLog => {
            let beside = anchor_path(path);
            if !beside.exists() {
                println!(
                    "{}: no anchor file {}: a cut tail cannot be ruled out (pass --anchor FILE, or --no-anchor for a log collected from stdout)",
                    path.display(),
                    beside.display()
                );
                return ExitCode::from(EXIT_BROKEN);
            }
            Some(beside)
        }
        AnchorArg::File(file) => Some(file),
        AnchorArg::None => None,
    };
    let anchor = match anchor_file.as_deref().map(read_anchor).transpose() {
        Ok(anchor) => anchor,
        Err(e) => return unreadable(e.to_string()),
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) => return unreadable(format!("{}: {e}", path.display())),
    };
    match verify(file, key.as_ref(), anchor.as_ref()) {
        Ok(verified) => {
            let macs = match &key {
                Some(key) => format!("MACs verified with key id {}", key.id()),
                None => "MACs NOT checked (no --key): a log rewritten and resealed by someone \
                         without the key is only caught with --key"
                    .into(),
            };
            println!(
                "{}: {} record(s), {} run(s), {} checkpoint(s); chain intact; {macs}",
                path.display(),
                verified.records,
                verified.runs,
                verified.checkpoints
            );
            for note in &verified.notes {
                println!("note: {note}");
            }
            ExitCode::SUCCESS
        }
        Err(broken) => {
            println!(
                "{}: chain broken ({}) at {broken}",
                path.display(),
                broken.reason()
            );
            ExitCode::from(EXIT_BROKEN)
        }
    }
}

/// Why the anchor file given to `verify` cannot be used.
#[derive(Debug, thiserror::Error)]
enum AnchorFileError {
    #[error("{}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Invalid { path: PathBuf, source: AnchorError },
}

fn read_anchor(path: &Path) -> Result<Anchor, AnchorFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| AnchorFileError::Unreadable {
        path: path.into(),
        source,
    })?;
    Anchor::parse(&text).map_err(|source| AnchorFileError::Invalid {
        path: path.into(),
        source,
    })
}
