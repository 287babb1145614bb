//! The audit trail: one JSON line per event, hash-chained, written and flushed
//! before the caller hears anything. When the sink fails the log latches into a
//! failed state and the runner refuses every call (fails closed).
//!
//! Line format: `{...fields,"hash":"<sha256 hex>"}` where the hash covers the
//! line's own text without the `,"hash":...` suffix (closing brace restored),
//! and that text carries `prevHash`, the hash of the line before (64 zeros for
//! the first line). Hashing the text, not a re-serialization, keeps the check
//! independent of JSON key order.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prevHash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Builds the sealed line (without newline) of one record. Pure.
pub fn seal(seq: u64, time: &str, prev_hash: &str, event: Map<String, Value>) -> (String, String) {
    let mut record = Map::new();
    record.insert("seq".into(), seq.into());
    record.insert("time".into(), time.into());
    record.insert("prevHash".into(), prev_hash.into());
    record.extend(event);
    record.remove("hash");
    let body = Value::Object(record).to_string();
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    let line = format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1]);
    (line, hash)
}

/// Why a line breaks the chain.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct BrokenChain {
    /// 1-based line number of the first broken record.
    pub line: usize,
    pub message: String,
}

/// What [`verify_line`] learns from one good line.
struct Link {
    seq: u64,
    hash: String,
}

fn verify_line(text: &str, prev: Option<&Link>) -> Result<Link, String> {
    let record: Value =
        serde_json::from_str(text).map_err(|e| format!("not a JSON record: {e}"))?;
    let field = |name: &str| record.get(name).and_then(Value::as_str).map(str::to_owned);
    let hash = field("hash").ok_or("no `hash` field")?;
    let suffix = format!(",\"hash\":\"{hash}\"}}");
    let body = text
        .strip_suffix(&suffix)
        .map(|b| format!("{b}}}"))
        .ok_or("`hash` is not the last field")?;
    let actual = hex::encode(Sha256::digest(body.as_bytes()));
    if actual != hash {
        return Err(format!(
            "content was altered: hash is {hash}, content hashes to {actual}"
        ));
    }
    let seq = record
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("no `seq` field")?;
    let prev_hash = field("prevHash").ok_or("no `prevHash` field")?;
    match prev {
        Some(prev) if prev_hash != prev.hash => Err(format!(
            "prevHash {prev_hash} does not match the previous record's hash {}: a record was removed, reordered or inserted",
            prev.hash
        )),
        Some(prev) if seq != prev.seq + 1 => Err(format!("seq {seq} does not follow {}", prev.seq)),
        None if prev_hash != GENESIS && seq == 0 => {
            Err("the first record (seq 0) must have the genesis prevHash".into())
        }
        _ => Ok(Link { seq, hash }),
    }
}

/// Checks a whole log; returns the number of records or the first broken one.
/// A log that starts mid-chain (rotated) is accepted from its first record on.
pub fn verify(reader: impl Read) -> Result<usize, BrokenChain> {
    let mut prev: Option<Link> = None;
    let mut count = 0;
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let broken = |message: String| BrokenChain {
            line: i + 1,
            message,
        };
        let line = line.map_err(|e| broken(format!("unreadable: {e}")))?;
        prev = Some(verify_line(&line, prev.as_ref()).map_err(broken)?);
        count += 1;
    }
    Ok(count)
}

/// The log is unusable; calls are refused until the runner is restarted.
#[derive(Clone, Debug, thiserror::Error)]
#[error("the audit log failed: {0}")]
pub struct AuditFailed(pub String);

struct Sink {
    out: Box<dyn Write + Send>,
    seq: u64,
    prev_hash: String,
    failed: Option<AuditFailed>,
}

/// An append-only, hash-chained log.
pub struct AuditLog {
    sink: Mutex<Sink>,
    pub description: String,
}

impl AuditLog {
    /// Appends to `path`, continuing the chain of what is already there.
    pub fn open_file(path: &Path) -> std::io::Result<AuditLog> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let (seq, prev_hash) = last_link(&mut file)?;
        Ok(AuditLog {
            sink: Mutex::new(Sink {
                out: Box::new(file),
                seq,
                prev_hash,
                failed: None,
            }),
            description: format!("file {}", path.display()),
        })
    }

    /// Any writer (stdout, or a test's broken sink), starting a new chain.
    pub fn to_writer(out: Box<dyn Write + Send>, description: &str) -> AuditLog {
        AuditLog {
            sink: Mutex::new(Sink {
                out,
                seq: 0,
                prev_hash: GENESIS.into(),
                failed: None,
            }),
            description: description.into(),
        }
    }

    /// Writes and flushes one record. After the first failure every append fails.
    pub fn append(&self, event: Map<String, Value>) -> Result<(), AuditFailed> {
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(failed) = &sink.failed {
            return Err(failed.clone());
        }
        let time = jiff::Timestamp::now().to_string();
        let (mut line, hash) = seal(sink.seq, &time, &sink.prev_hash, event);
        line.push('\n');
        // Unbuffered: one write per record, so a killed runner leaves whole lines.
        match sink
            .out
            .write_all(line.as_bytes())
            .and_then(|()| sink.out.flush())
        {
            Ok(()) => {
                sink.seq += 1;
                sink.prev_hash = hash;
                Ok(())
            }
            Err(e) => {
                let failed = AuditFailed(e.to_string());
                sink.failed = Some(failed.clone());
                Err(failed)
            }
        }
    }

    /// `None` while records can be written.
    pub fn failure(&self) -> Option<AuditFailed> {
        self.sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed
            .clone()
    }
}

/// Seq and hash to continue from, read from the end of an existing log.
fn last_link(file: &mut File) -> std::io::Result<(u64, String)> {
    let len = file.seek(SeekFrom::End(0))?;
    let tail_len = len.min(1 << 20);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = String::new();
    file.take(tail_len).read_to_string(&mut tail).ok();
    let last = tail.lines().rev().find(|l| !l.trim().is_empty());
    let Some(last) = last else {
        return Ok((0, GENESIS.into()));
    };
    let record: Value = serde_json::from_str(last).map_err(|e| {
        std::io::Error::other(format!(
            "the last record of the existing audit log is not JSON: {e}"
        ))
    })?;
    match (record["seq"].as_u64(), record["hash"].as_str()) {
        (Some(seq), Some(hash)) => Ok((seq + 1, hash.to_string())),
        _ => Err(std::io::Error::other(
            "the last record of the existing audit log has no seq/hash",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(n: u64) -> Map<String, Value> {
        json!({"event": "received", "n": n})
            .as_object()
            .unwrap()
            .clone()
    }

    fn chain(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        (0..n)
            .map(|i| {
                let (line, hash) = seal(i, "2024-01-01T00:00:00Z", &prev, event(i));
                prev = hash;
                line
            })
            .collect()
    }

    #[test]
    fn a_sealed_chain_verifies() {
        assert_eq!(verify(chain(5).join("\n").as_bytes()), Ok(5));
    }

    #[test]
    fn edits_deletions_and_reorders_name_the_first_broken_line() {
        let lines = chain(5);
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"n\":2", "\"n\":7");
        assert_eq!(verify(edited.join("\n").as_bytes()).unwrap_err().line, 3);
        let mut removed = lines.clone();
        removed.remove(1);
        let e = verify(removed.join("\n").as_bytes()).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("removed"), "{e}");
        let mut swapped = lines;
        swapped.swap(3, 4);
        assert_eq!(verify(swapped.join("\n").as_bytes()).unwrap_err().line, 4);
    }

    #[test]
    fn a_reopened_file_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        AuditLog::open_file(&path)
            .unwrap()
            .append(event(0))
            .unwrap();
        let log = AuditLog::open_file(&path).unwrap();
        log.append(event(1)).unwrap();
        assert_eq!(verify(File::open(&path).unwrap()), Ok(2));
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_sink_latches() {
        let log = AuditLog::to_writer(Box::new(Broken), "broken");
        assert!(log.append(event(0)).is_err());
        assert!(log.failure().unwrap().0.contains("disk full"));
        assert!(log.append(event(1)).is_err());
    }
}
