//! `toolwarden audit verify FILE`: checks an audit log's hash chain.

use std::path::Path;
use std::process::ExitCode;

use crate::runner::audit::verify;

pub fn verify_file(path: &Path) -> ExitCode {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    match verify(file) {
        Ok(records) => {
            println!("{}: {records} record(s), hash chain intact", path.display());
            ExitCode::SUCCESS
        }
        Err(broken) => {
            println!("{}: chain broken at {broken}", path.display());
            ExitCode::from(1)
        }
    }
}
