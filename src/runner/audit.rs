//! The audit trail: one JSON line per event, chained and keyed, written and
//! flushed before the caller hears anything. When the sink fails the runner
//! refuses every call (fails closed) until a write succeeds again.
//!
//! Line format: `{...fields,"hash":"<hex>"}`. `hash` is the HMAC-SHA256, under
//! the audit key, of the line's own text without the `,"hash":...` suffix
//! (closing brace restored). That text carries `prevHash`, the `hash` of the
//! record before (64 zeros for the first), and `seq`. Sealing the text, not a
//! re-serialization, keeps the check independent of JSON key order; keying it
//! means nobody without the key can edit a record and reseal the rest.
//!
//! `checkpoint` records anchor the chain: one opens every run (`start`, the
//! first record of a log is one), one follows every [`Cadence`] of records or
//! time (`interval`), one closes a clean shutdown (`shutdown`) and one marks
//! recovery from a failed sink (`recovered`). After each checkpoint of a file
//! log the runner writes the checkpoint's seq and hash, sealed, to the anchor
//! file beside the log; the next start records that anchor, so a tail cut
//! before a restart names a checkpoint that is no longer there. Bytes that are
//! not a record (a write cut short by a full disk or a crash) are acknowledged
//! by the next checkpoint with their length and SHA-256 (`discarded`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::egress::{EgressAudit, EgressEvent};

/// `prevHash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The largest record line written (without its newline).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// Longest string field kept whole; longer ones are cut with a marker.
const MAX_STRING_BYTES: usize = 4096;
/// Most array items or object keys kept at any level.
const MAX_ITEMS: usize = 32;
/// Deepest nesting kept.
const MAX_DEPTH: usize = 8;
/// Room left for `seq`, `time`, `prevHash`, `hash` and `truncated` around the event.
const ENVELOPE_BYTES: usize = 320;
/// Event fields the size bound never replaces (small by construction).
const KEPT_FIELDS: &[&str] = &["event", "invocationId"];
/// Shortest audit key accepted.
pub const MIN_KEY_BYTES: usize = 32;
/// How far back from the end of a log the runner looks for its last record.
const MAX_TAIL_SCAN_BYTES: u64 = 64 << 20;
/// Background retries of a failed sink: first after this, doubling up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

type HmacSha256 = Hmac<Sha256>;

// ---------------------------------------------------------------------------
// The key

/// The audit key: HMAC-SHA256 keyed once, cloned per record. Never printed;
/// records and messages name it by [`AuditKey::id`].
#[derive(Clone)]
pub struct AuditKey {
    mac: HmacSha256,
    id: String,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey(id {})", self.id)
    }
}

/// Why an audit key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    #[error("audit key {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "audit key {path}: {len} byte(s); at least {MIN_KEY_BYTES} are needed (e.g. `head -c 32 /dev/urandom > FILE`)"
    )]
    TooShort { path: PathBuf, len: usize },
    #[error("cannot create the audit key {path}: {source}")]
    NotCreated {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AuditKeyError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuditKeyError::Unreadable { .. } => "AuditKeyUnreadable",
            AuditKeyError::TooShort { .. } => "AuditKeyTooShort",
            AuditKeyError::NotCreated { .. } => "AuditKeyNotCreated",
        }
    }
}

impl AuditKey {
    /// A key from its bytes; `None` when shorter than [`MIN_KEY_BYTES`].
    pub fn new(bytes: &[u8]) -> Option<AuditKey> {
        if bytes.len() < MIN_KEY_BYTES {
            return None;
        }
        let mut id = Sha256::new();
        id.update(b"toolwarden audit key id\n");
        id.update(bytes);
        Some(AuditKey {
            mac: HmacSha256::new_from_slice(bytes).ok()?,
            id: hex::encode(&id.finalize()[..8]),
        })
    }

    /// Reads a key file (a mounted Secret, say). One trailing newline is not
    /// part of the key, so `openssl rand -hex 32 > FILE` works too.
    pub fn from_file(path: &Path) -> Result<AuditKey, AuditKeyError> {
        let bytes = std::fs::read(path).map_err(|source| AuditKeyError::Unreadable {
            path: path.into(),
            source,
        })?;
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        AuditKey::new(bytes).ok_or(AuditKeyError::TooShort {
            path: path.into(),
            len: bytes.len(),
        })
    }

    /// Reads `path`, or creates it (mode 0600, 32 random bytes) when it does
    /// not exist. `true` when it was created.
    pub fn load_or_create(path: &Path) -> Result<(AuditKey, bool), AuditKeyError> {
        let not_created = |source| AuditKeyError::NotCreated {
            path: path.into(),
            source,
        };
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        let mut file = match created {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Ok((AuditKey::from_file(path)?, false));
            }
            Err(e) => return Err(not_created(e)),
        };
        // The kernel's CSPRNG directly: one read at startup needs no crate.
        let mut bytes = [0u8; MIN_KEY_BYTES];
        let written = File::open("/dev/urandom")
            .and_then(|mut r| r.read_exact(&mut bytes))
            .and_then(|()| file.write_all(&bytes))
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(path);
            return Err(not_created(e));
        }
        let key = AuditKey::new(&bytes).expect("MIN_KEY_BYTES bytes");
        Ok((key, true))
    }

    /// A short public name of the key (a hash prefix), recorded in checkpoints.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn seal(&self, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    fn check(&self, body: &[u8], hash: &str) -> bool {
        let Ok(expected) = hex::decode(hash) else {
            return false;
        };
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    }

    /// The anchor's seal: its own domain, so no record line can pass for an anchor.
    fn seal_anchor(&self, seq: u64, hash: &str) -> String {
        self.seal(format!("toolwarden audit anchor\n{seq}\n{hash}").as_bytes())
    }
}

// ---------------------------------------------------------------------------
// Records

/// Builds the sealed line (without newline) of one record. Pure.
pub fn seal(
    key: &AuditKey,
    seq: u64,
    time: &str,
    prev_hash: &str,
    event: Map<String, Value>,
) -> (String, String) {
    let mut record = Map::new();
    record.insert("seq".into(), seq.into());
    record.insert("time".into(), time.into());
    record.insert("prevHash".into(), prev_hash.into());
    record.extend(event);
    record.remove("hash");
    let body = Value::Object(record).to_string();
    let hash = key.seal(body.as_bytes());
    let line = format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1]);
    (line, hash)
}

/// Bounds an event so its sealed line stays within [`MAX_RECORD_BYTES`]: long
/// strings, arrays and objects are cut with a `…[truncated …]` marker, and if
/// the whole is still too large its largest fields are replaced by one.
/// Returns whether anything was cut (the record then says `truncated: true`).
pub fn bound(event: &mut Map<String, Value>) -> bool {
    let mut cut = false;
    let mut most = 0;
    for (key, value) in event.iter_mut() {
        let (field_cut, field_most) = shrink(value, 1);
        cut |= field_cut;
        most += most_json_bytes(key) + field_most;
    }
    let budget = MAX_RECORD_BYTES - ENVELOPE_BYTES;
    // Serializing to measure only when the bound allows too much (rare): not on every record.
    if most > budget {
        let mut size = serde_json::to_string(&*event).map_or(usize::MAX, |s| s.len());
        while size > budget {
            let largest = event
                .iter()
                .filter(|(k, _)| !KEPT_FIELDS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.to_string().len()))
                .max_by_key(|(_, len)| *len);
            let Some((field, len)) = largest else { break };
            let marker = Value::String(format!("…[truncated {len} bytes]"));
            let saved = len.saturating_sub(marker.to_string().len());
            if saved == 0 {
                break;
            }
            event.insert(field, marker);
            size -= saved;
            cut = true;
        }
    }
    if cut {
        event.insert("truncated".into(), true.into());
    }
    cut
}

/// An upper bound of a string's JSON size: escaping takes at most 6 bytes per byte.
fn most_json_bytes(s: &str) -> usize {
    6 * s.len() + 4
}

/// Cuts `value` to the per-field bounds. Returns whether it cut, and an upper
/// bound of the JSON size of what is left.
fn shrink(value: &mut Value, depth: usize) -> (bool, usize) {
    match value {
        Value::String(s) if s.len() > MAX_STRING_BYTES => {
            let mut end = MAX_STRING_BYTES;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            let cut = s.len() - end;
            s.truncate(end);
            s.push_str(&format!("…[truncated {cut} bytes]"));
            (true, most_json_bytes(s))
        }
        Value::String(s) => (false, most_json_bytes(s)),
        Value::Array(_) | Value::Object(_) if depth > MAX_DEPTH => {
            let len = value.to_string().len();
            *value = Value::String(format!("…[truncated {len} bytes nested too deep]"));
            (true, 64)
        }
        Value::Array(items) => {
            let mut cut = false;
            if items.len() > MAX_ITEMS {
                let dropped = items.len() - MAX_ITEMS;
                items.truncate(MAX_ITEMS);
                items.push(Value::String(format!("…[truncated {dropped} items]")));
                cut = true;
            }
            let mut most = 2;
            for item in items.iter_mut() {
                let (item_cut, item_most) = shrink(item, depth + 1);
                cut |= item_cut;
                most += item_most + 1;
            }
            (cut, most)
        }
        Value::Object(map) => {
            let mut cut = false;
            if map.len() > MAX_ITEMS {
                let dropped = map.len() - MAX_ITEMS;
                let extra: Vec<String> = map.keys().skip(MAX_ITEMS).cloned().collect();
                for k in extra {
                    map.remove(&k);
                }
                map.insert(
                    "…".into(),
                    Value::String(format!("[truncated {dropped} keys]")),
                );
                cut = true;
            }
            let mut most = 2;
            for (key, item) in map.iter_mut() {
                let (item_cut, item_most) = shrink(item, depth + 1);
                cut |= item_cut;
                most += most_json_bytes(key) + item_most + 2;
            }
            (cut, most)
        }
        // Numbers, booleans and null: at most 24 bytes.
        _ => (false, 24),
    }
}

/// The `discarded` field of a checkpoint: bytes between the last record and
/// the checkpoint that are not a record.
#[derive(Clone, Default)]
struct Discarded {
    bytes: u64,
    sha256: Sha256,
}

impl Discarded {
    fn add(&mut self, raw: &[u8]) {
        self.bytes += raw.len() as u64;
        self.sha256.update(raw);
    }

    fn to_json(&self) -> Value {
        json!({"bytes": self.bytes, "sha256": hex::encode(self.sha256.clone().finalize())})
    }
}

/// A parsed record: enough to chain and check it.
struct Parsed {
    record: Value,
    seq: u64,
    prev_hash: String,
    hash: String,
    /// The sealed text: the line without its `hash` suffix.
    body: String,
}

/// Why a line of a log is not a record.
#[derive(Debug, thiserror::Error)]
enum MalformedRecord {
    #[error("not UTF-8: {0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    #[error("not a JSON record: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("no `{0}` field")]
    MissingField(&'static str),
    #[error("`hash` is not the last field")]
    HashNotLast,
}

fn parse(text: &str) -> Result<Parsed, MalformedRecord> {
    let record: Value = serde_json::from_str(text)?;
    let field = |name: &'static str| {
        record
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(MalformedRecord::MissingField(name))
    };
    let hash = field("hash")?;
    let suffix = format!(",\"hash\":\"{hash}\"}}");
    let body = text
        .strip_suffix(&suffix)
        .map(|b| format!("{b}}}"))
        .ok_or(MalformedRecord::HashNotLast)?;
    let seq = record
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or(MalformedRecord::MissingField("seq"))?;
    let prev_hash = field("prevHash")?;
    Ok(Parsed {
        record,
        seq,
        prev_hash,
        hash,
        body,
    })
}

// ---------------------------------------------------------------------------
// Verification

/// What kind of damage [`verify`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Damage {
    /// A record's MAC does not match: edited, or resealed without the key.
    Altered,
    /// A record does not follow the one before (`prevHash` or `seq`): removed, reordered or inserted.
    Unlinked,
    /// The log does not begin with its genesis checkpoint: the head was dropped.
    MissingStart,
    /// A checkpoint the runner anchored is not in the log: the tail was cut.
    Truncated,
    /// Bytes that are not a record, acknowledged by no checkpoint.
    Incomplete,
    /// Checkpoints name another key than the one given.
    WrongKey,
}

/// The first place a log is broken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct BrokenChain {
    /// 1-based line number (one past the last line for damage at the end).
    pub line: usize,
    pub damage: Damage,
    pub message: String,
}

impl BrokenChain {
    pub fn reason(&self) -> &'static str {
        match self.damage {
            Damage::Altered => "Altered",
            Damage::Unlinked => "Unlinked",
            Damage::MissingStart => "MissingStart",
            Damage::Truncated => "Truncated",
            Damage::Incomplete => "Incomplete",
            Damage::WrongKey => "WrongKey",
        }
    }
}

/// An intact log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verified {
    pub records: usize,
    pub checkpoints: usize,
    /// Runs of the runner (start checkpoints).
    pub runs: usize,
    /// Whether MACs were checked (a key was given).
    pub macs_checked: bool,
    /// Things that are not damage but limit what the check proves.
    pub notes: Vec<String>,
}

/// The anchor file: the seq and hash of the latest checkpoint, sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
    mac: String,
}

/// Why a text is not an anchor.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("not an anchor: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("not an anchor: needs seq, hash and mac")]
    MissingFields,
}

impl AnchorError {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        "AuditAnchorInvalid"
    }
}

impl Anchor {
    pub fn parse(text: &str) -> Result<Anchor, AnchorError> {
        let value: Value = serde_json::from_str(text.trim())?;
        let text = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
        match (
            value.get("seq").and_then(Value::as_u64),
            text("hash"),
            text("mac"),
        ) {
            (Some(seq), Some(hash), Some(mac)) => Ok(Anchor { seq, hash, mac }),
            _ => Err(AnchorError::MissingFields),
        }
    }

    /// Whether `key` sealed this anchor.
    pub fn sealed_by(&self, key: &AuditKey) -> bool {
        self.mac == key.seal_anchor(self.seq, &self.hash)
    }

    fn to_json(&self) -> Value {
        json!({"seq": self.seq, "hash": self.hash})
    }
}

/// The anchor file of the log at `log`.
pub fn anchor_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".anchor");
    PathBuf::from(name)
}

/// Checks a whole log. With `key`, every MAC is checked; without, only the
/// links (a log resealed by someone without the key then passes). With
/// `anchor` (the anchor file's content), the log must still hold the
/// checkpoint it names.
pub fn verify(
    reader: impl Read,
    key: Option<&AuditKey>,
    anchor: Option<&Anchor>,
) -> Result<Verified, BrokenChain> {
    let mut verifier = Verifier {
        key,
        report: Verified {
            macs_checked: key.is_some(),
            ..Verified::default()
        },
        ..Verifier::default()
    };
    let mut reader = BufReader::new(reader);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        let read = reader
            .read_until(b'\n', &mut raw)
            .map_err(|e| BrokenChain {
                line: verifier.line + 1,
                damage: Damage::Incomplete,
                message: format!("unreadable: {e}"),
            })?;
        if read == 0 {
            break;
        }
        verifier.line += 1;
        verifier.line_bytes(&raw)?;
    }
    verifier.finish(anchor)
}

#[derive(Default)]
struct Verifier<'k> {
    key: Option<&'k AuditKey>,
    line: usize,
    /// seq and hash of the last record.
    last: Option<(u64, String)>,
    /// The reason of the last checkpoint.
    last_checkpoint: Option<String>,
    /// Non-record bytes since the last record: (first line, why, bytes).
    garbage: Option<(usize, MalformedRecord, Discarded)>,
    /// Every checkpoint seen: seq -> hash.
    checkpoints: HashMap<u64, String>,
    report: Verified,
}

impl Verifier<'_> {
    fn broken(&self, line: usize, damage: Damage, message: String) -> BrokenChain {
        BrokenChain {
            line,
            damage,
            message,
        }
    }

    fn line_bytes(&mut self, raw: &[u8]) -> Result<(), BrokenChain> {
        let text = raw.strip_suffix(b"\n").unwrap_or(raw);
        let parsed = std::str::from_utf8(text)
            .map_err(MalformedRecord::from)
            .and_then(parse);
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(why) => {
                let (_, _, bytes) = self
                    .garbage
                    .get_or_insert_with(|| (self.line, why, Discarded::default()));
                bytes.add(raw);
                return Ok(());
            }
        };
        self.record(parsed)
    }

    fn record(&mut self, p: Parsed) -> Result<(), BrokenChain> {
        let line = self.line;
        let event = p.record["event"].as_str().unwrap_or_default();
        let checkpoint = (event == "checkpoint").then(|| p.record["reason"].as_str().unwrap_or(""));
        if let Some(key) = self.key {
            if let Some(id) = checkpoint.and(p.record["keyId"].as_str())
                && id != key.id()
            {
                return Err(self.broken(
                    line,
                    Damage::WrongKey,
                    format!("sealed with key id {id}; the key given has id {}", key.id()),
                ));
            }
            if !key.check(p.body.as_bytes(), &p.hash) {
                return Err(self.broken(
                    line,
                    Damage::Altered,
                    "the MAC does not match: the record was altered (or resealed without the key)"
                        .into(),
                ));
            }
        }
        if let Some((first, why, bytes)) = self.garbage.take() {
            let acknowledged =
                checkpoint.is_some() && p.record.get("discarded") == Some(&bytes.to_json());
            if !acknowledged {
                return Err(self.broken(first, Damage::Incomplete, why.to_string()));
            }
            if self.last.is_none() {
                return Err(self.broken(
                    first,
                    Damage::MissingStart,
                    format!("the log begins with {} byte(s) that are not records: its head was replaced", bytes.bytes),
                ));
            }
            self.report.notes.push(format!(
                "line(s) {first}-{}: {} byte(s) of incomplete record(s) (a write cut short), acknowledged by the checkpoint on line {line}",
                line - 1,
                bytes.bytes
            ));
        }
        match &self.last {
            None if p.seq != 0 || p.prev_hash != GENESIS || checkpoint != Some("start") => {
                return Err(self.broken(
                    line,
                    Damage::MissingStart,
                    format!(
                        "the log does not begin with its genesis checkpoint (seq 0, a `start` checkpoint with the genesis prevHash); the first record is seq {}: the head was dropped",
                        p.seq
                    ),
                ));
            }
            Some((_, hash)) if p.prev_hash != *hash => {
                return Err(self.broken(
                    line,
                    Damage::Unlinked,
                    format!(
                        "prevHash {} does not match the previous record's hash {hash}: a record was removed, reordered or inserted",
                        p.prev_hash
                    ),
                ));
            }
            Some((seq, _)) if p.seq != seq + 1 => {
                return Err(self.broken(
                    line,
                    Damage::Unlinked,
                    format!("seq {} does not follow {seq}", p.seq),
                ));
            }
            _ => {}
        }
        if let Some(reason) = checkpoint {
            if reason == "start" {
                self.restart(&p)?;
            }
            self.checkpoints.insert(p.seq, p.hash.clone());
            self.last_checkpoint = Some(reason.to_string());
            self.report.checkpoints += 1;
        }
        self.last = Some((p.seq, p.hash));
        self.report.records += 1;
        Ok(())
    }

    /// A start checkpoint after the first: the run before it must still be whole.
    fn restart(&mut self, p: &Parsed) -> Result<(), BrokenChain> {
        self.report.runs += 1;
        let anchor = &p.record["anchor"];
        let Some((last_seq, _)) = &self.last else {
            if anchor.is_null() {
                return Ok(());
            }
            return Err(self.broken(
                self.line,
                Damage::Truncated,
                format!(
                    "the runner started this new chain while the anchor of an earlier one was present ({anchor}): that log was emptied or replaced"
                ),
            ));
        };
        if self.last_checkpoint.as_deref() != Some("shutdown") {
            self.report.notes.push(format!(
                "line {}: the run before ended without a shutdown checkpoint (crashed or killed); records it wrote after its last checkpoint could have been cut without trace",
                self.line
            ));
        }
        let (Some(seq), Some(hash)) = (anchor["seq"].as_u64(), anchor["hash"].as_str()) else {
            return Err(self.broken(
                self.line,
                Damage::Truncated,
                format!(
                    "the runner restarted here without the anchor of the run before ({anchor}): the log's tail after seq {last_seq} may have been cut"
                ),
            ));
        };
        if self.checkpoints.get(&seq).map(String::as_str) != Some(hash) {
            return Err(self.broken(
                self.line,
                Damage::Truncated,
                format!(
                    "the runner restarted here after anchoring checkpoint seq {seq} (hash {hash}), which is not in the log: records after seq {last_seq} were cut"
                ),
            ));
        }
        Ok(())
    }

    fn finish(mut self, anchor: Option<&Anchor>) -> Result<Verified, BrokenChain> {
        let end = self.line + 1;
        if let Some((first, why, _)) = self.garbage.take() {
            return Err(self.broken(
                first,
                Damage::Incomplete,
                format!("{why}: the log ends with an incomplete record (a write cut short, or the tail was cut)"),
            ));
        }
        if self.last.is_none() {
            return Err(self.broken(
                end,
                Damage::MissingStart,
                "the log is empty: not even its genesis checkpoint is there".into(),
            ));
        }
        match anchor {
            Some(anchor) => {
                if let Some(key) = self.key
                    && !anchor.sealed_by(key)
                {
                    return Err(self.broken(
                        end,
                        Damage::Altered,
                        "the anchor file's MAC does not match the key".into(),
                    ));
                }
                if self.checkpoints.get(&anchor.seq) != Some(&anchor.hash) {
                    let (last_seq, _) = self.last.as_ref().expect("checked above");
                    return Err(self.broken(
                        end,
                        Damage::Truncated,
                        format!(
                            "the anchor names checkpoint seq {} (hash {}), which is not in the log: records after seq {last_seq} were cut",
                            anchor.seq, anchor.hash
                        ),
                    ));
                }
            }
            None => self.report.notes.push(
                "no anchor file: a tail cut after the last checkpoint cannot be detected".into(),
            ),
        }
        if self.last_checkpoint.as_deref() != Some("shutdown") {
            let (last_seq, _) = self.last.as_ref().expect("checked above");
            self.report.notes.push(format!(
                "the log ends without a shutdown checkpoint (runner still running, crashed or killed): records after the last checkpoint (up to seq {last_seq}) could have been cut without trace"
            ));
        }
        Ok(self.report)
    }
}

// ---------------------------------------------------------------------------
// Writing

/// The log is unusable for now; calls are refused until a write succeeds again.
#[derive(Clone, Debug, thiserror::Error)]
#[error("the audit log failed: {0}")]
pub struct AuditFailed(pub String);

/// Why an existing log cannot be continued.
#[derive(Debug, thiserror::Error)]
pub enum AuditOpenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: none of its last {records} record(s) verifies with this audit key (id {key_id}): it was sealed with another key. Pass the key that sealed it (--audit-key), or move the log and its anchor aside to start a new one; `toolwarden audit verify --key FILE` tells more"
    )]
    WrongKey {
        path: PathBuf,
        records: usize,
        key_id: String,
    },
    #[error(
        "{path}: no record in its last {MAX_TAIL_SCAN_BYTES} bytes; move the log aside to start a new one"
    )]
    NoRecord { path: PathBuf },
}

impl AuditOpenError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuditOpenError::Io { .. } => "AuditLogUnreadable",
            AuditOpenError::WrongKey { .. } => "AuditLogWrongKey",
            AuditOpenError::NoRecord { .. } => "AuditLogNoRecord",
        }
    }
}

/// How often an `interval` checkpoint is written: after this many records or
/// this much time with records, whichever comes first.
#[derive(Clone, Copy, Debug)]
pub struct Cadence {
    pub records: u64,
    pub interval: Duration,
}

impl Default for Cadence {
    fn default() -> Self {
        Cadence {
            records: 1000,
            interval: Duration::from_secs(10),
        }
    }
}

enum Output {
    /// A file: checkpoints are synced and anchored in `anchor`.
    File {
        file: File,
        anchor: PathBuf,
    },
    Stream(Box<dyn Write + Send>),
}

impl Output {
    /// Writes `buf`; on failure also says how many bytes did get out.
    fn write(&mut self, buf: &[u8]) -> Result<(), (usize, std::io::Error)> {
        let out: &mut dyn Write = match self {
            Output::File { file, .. } => file,
            Output::Stream(out) => out,
        };
        let mut written = 0;
        while written < buf.len() {
            match out.write(&buf[written..]) {
                Ok(0) => return Err((written, std::io::ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err((written, e)),
            }
        }
        out.flush().map_err(|e| (written, e))
    }

    /// Makes checkpoint `seq`/`hash` durable and names it in the anchor file.
    fn anchor(&mut self, key: &AuditKey, seq: u64, hash: &str) -> std::io::Result<()> {
        let Output::File { file, anchor } = self else {
            return Ok(());
        };
        file.sync_data()?;
        let text = json!({"seq": seq, "hash": hash, "mac": key.seal_anchor(seq, hash)});
        let tmp = anchor.with_extension("anchor.tmp");
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        out.write_all(format!("{text}\n").as_bytes())?;
        out.sync_data()?;
        std::fs::rename(&tmp, anchor)
    }
}

/// Where the last line ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LineEnd {
    Clean,
    /// A record's text is out but not its newline.
    AfterRecord,
    /// Part of a record is out: the next write starts a new line, and that
    /// newline belongs to the discarded bytes.
    AfterGarbage,
}

struct Failure {
    error: AuditFailed,
    since: jiff::Timestamp,
    at: Instant,
    /// Records that could not be written while failed.
    unwritten: u64,
    next_retry: Instant,
    backoff: Duration,
}

struct Sink {
    out: Output,
    /// The next record's seq, and the hash it chains to.
    seq: u64,
    prev_hash: String,
    line_end: LineEnd,
    /// Non-record bytes the next checkpoint acknowledges.
    discarded: Option<Discarded>,
    /// The start checkpoint's fields until it is written.
    start: Option<Map<String, Value>>,
    cadence: Cadence,
    since_checkpoint: u64,
    checkpoint_at: Instant,
    failure: Option<Failure>,
}

struct Inner {
    sink: Mutex<Sink>,
    key: AuditKey,
    run: String,
    description: String,
    /// Calls started and not yet closed; shutdown waits for them.
    open_calls: AtomicUsize,
    closed: tokio::sync::Notify,
}

/// An append-only, keyed, checkpointed log. Cheap to clone (shared).
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

/// What the runner found at the end of an existing log.
struct Tail {
    /// seq and hash of the last record.
    last: Option<(u64, String)>,
    discarded: Option<Discarded>,
    /// Whole records after `last` that do not verify (corrupt or altered).
    set_aside: usize,
    line_end: LineEnd,
}

impl AuditLog {
    /// Appends to `path` (created 0600), continuing the chain of what is
    /// there: bytes after the last record are acknowledged as discarded, and
    /// the start checkpoint records the anchor file of the run before.
    pub fn open_file(path: &Path, key: AuditKey) -> Result<AuditLog, AuditOpenError> {
        let io = |source| AuditOpenError::Io {
            path: path.into(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let tail = read_tail(&mut file, path, &key)?;
        let anchor_file = anchor_path(path);
        let mut start = Map::new();
        // An emptied log with its anchor still beside it is a cut tail too.
        if tail.last.is_some() || anchor_file.exists() {
            start.insert("anchor".into(), found_anchor(&anchor_file, &key, &tail));
        }
        if let Some(discarded) = &tail.discarded {
            tracing::warn!(
                log = %path.display(),
                bytes = discarded.bytes,
                records_not_verifying = tail.set_aside,
                "the audit log ends with an incomplete, corrupt or altered record; continuing after its last good record (the start checkpoint acknowledges what it set aside; `audit verify` reports it)"
            );
        }
        if tail.set_aside > 0 {
            start.insert("setAside".into(), tail.set_aside.into());
        }
        let (seq, prev_hash) = tail
            .last
            .map_or((0, GENESIS.to_string()), |(seq, hash)| (seq + 1, hash));
        let mut sink = Sink::new(
            Output::File {
                file,
                anchor: anchor_file,
            },
            start,
        );
        (sink.seq, sink.prev_hash) = (seq, prev_hash);
        (sink.line_end, sink.discarded) = (tail.line_end, tail.discarded);
        Ok(AuditLog::begin(
            sink,
            key,
            format!("file {}", path.display()),
        ))
    }

    /// Any writer (stdout, or a test's sink), starting a new chain.
    pub fn to_writer(out: Box<dyn Write + Send>, description: &str, key: AuditKey) -> AuditLog {
        let sink = Sink::new(Output::Stream(out), Map::new());
        AuditLog::begin(sink, key, description.into())
    }

    /// Writes the start checkpoint; a log that cannot write it starts failed.
    fn begin(sink: Sink, key: AuditKey, description: String) -> AuditLog {
        let log = AuditLog {
            inner: Arc::new(Inner {
                sink: Mutex::new(sink),
                key,
                run: uuid::Uuid::new_v4().to_string(),
                description,
                open_calls: AtomicUsize::new(0),
                closed: tokio::sync::Notify::new(),
            }),
        };
        let _ = log.with_sink(|inner, sink| sink.recover(inner));
        log
    }

    /// Sets how often `interval` checkpoints are written.
    pub fn set_cadence(&self, cadence: Cadence) {
        self.with_sink(|_, sink| sink.cadence = cadence);
    }

    pub fn description(&self) -> &str {
        &self.inner.description
    }

    fn with_sink<T>(&self, f: impl FnOnce(&Inner, &mut Sink) -> T) -> T {
        let mut sink = self.inner.sink.lock().unwrap_or_else(|p| p.into_inner());
        f(&self.inner, &mut sink)
    }

    /// Writes and flushes one record (bounded to [`MAX_RECORD_BYTES`]). A
    /// failed log first tries to write its recovery checkpoint.
    pub fn append(&self, mut event: Map<String, Value>) -> Result<(), AuditFailed> {
        bound(&mut event);
        self.with_sink(|inner, sink| {
            let written = sink.recover(inner).and_then(|()| sink.write(inner, event));
            if written.is_err() {
                if let Some(failure) = &mut sink.failure {
                    failure.unwritten += 1;
                }
                return written;
            }
            sink.since_checkpoint += 1;
            if sink.since_checkpoint >= sink.cadence.records {
                // The record is out; a failed checkpoint fails the next write.
                let _ = sink.checkpoint(inner, "interval");
            }
            Ok(())
        })
    }

    /// `Ok` when records can be written; a failed log retries first.
    pub fn ensure_writable(&self) -> Result<(), AuditFailed> {
        self.with_sink(|inner, sink| sink.recover(inner))
    }

    /// Whether the last write succeeded (no retry).
    pub fn is_healthy(&self) -> bool {
        self.with_sink(|_, sink| sink.failure.is_none())
    }

    /// Periodic upkeep: an `interval` checkpoint when records are waiting for
    /// one, and a retry (with backoff) of a failed sink.
    pub fn tick(&self) {
        self.with_sink(|inner, sink| {
            if let Some(failure) = &sink.failure {
                if Instant::now() >= failure.next_retry {
                    let _ = sink.recover(inner);
                }
                return;
            }
            if sink.since_checkpoint > 0 && sink.checkpoint_at.elapsed() >= sink.cadence.interval {
                let _ = sink.checkpoint(inner, "interval");
            }
        })
    }

    /// Runs [`AuditLog::tick`] every second until the runtime ends.
    pub async fn maintain(self) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.tick();
        }
    }

    /// Counts a started call until its closing record is written (the guard
    /// is dropped); [`AuditLog::close`] waits for these.
    pub fn open_call(&self) -> OpenCall {
        self.inner.open_calls.fetch_add(1, Ordering::SeqCst);
        OpenCall(self.clone())
    }

    /// Clean shutdown: waits (up to `grace`) for started calls to be closed,
    /// then writes the `shutdown` checkpoint (with the calls still open).
    pub async fn close(&self, grace: Duration) -> Result<(), AuditFailed> {
        let _ = tokio::time::timeout(grace, async {
            loop {
                let closed = self.inner.closed.notified();
                if self.inner.open_calls.load(Ordering::SeqCst) == 0 {
                    break;
                }
                closed.await;
            }
        })
        .await;
        let open = self.inner.open_calls.load(Ordering::SeqCst);
        self.with_sink(|inner, sink| {
            sink.recover(inner)?;
            sink.checkpoint_with(inner, "shutdown", json!({"openCalls": open}))
        })
    }
}

/// Writes the egress proxy's events into a call's trail: one `egress` record
/// per proxied request or tunnel, carrying the call's own fields (tool,
/// invocation id, caller) and the event under `egress`.
pub struct EgressTrail {
    log: AuditLog,
    base: Map<String, Value>,
    redactor: Option<crate::runner::redact::Redactor>,
}

impl EgressTrail {
    pub fn new(log: AuditLog, base: Map<String, Value>) -> EgressTrail {
        EgressTrail {
            log,
            base,
            redactor: None,
        }
    }

    /// Records redacted with `redactor`: a tool may put a secret in a URL it asks for.
    pub fn redacting(mut self, redactor: crate::runner::redact::Redactor) -> EgressTrail {
        self.redactor = Some(redactor);
        self
    }
}

impl EgressAudit for EgressTrail {
    fn record(&self, event: EgressEvent) {
        let mut record = Map::new();
        record.insert("event".into(), "egress".into());
        record.extend(self.base.clone());
        let mut egress = json!(event);
        if let Some(redactor) = &self.redactor {
            redactor.redact_json(&mut egress);
        }
        record.insert("egress".into(), egress);
        // The proxy cannot refuse after the fact; a failed log fails the
        // call's closing record, and with it the call.
        if let Err(AuditFailed(error)) = self.log.append(record) {
            tracing::error!(%error, host = %event.host, "egress record not written");
        }
    }
}

/// See [`AuditLog::open_call`].
pub struct OpenCall(AuditLog);

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.0.inner.open_calls.fetch_sub(1, Ordering::SeqCst);
        self.0.inner.closed.notify_waiters();
    }
}

impl Sink {
    /// A sink starting a new chain, owing its start checkpoint with `start`'s fields.
    fn new(out: Output, start: Map<String, Value>) -> Sink {
        Sink {
            out,
            seq: 0,
            prev_hash: GENESIS.into(),
            line_end: LineEnd::Clean,
            discarded: None,
            start: Some(start),
            cadence: Cadence::default(),
            since_checkpoint: 0,
            checkpoint_at: Instant::now(),
            failure: None,
        }
    }

    /// Writes one sealed record; on failure the log is failed and the bytes
    /// that did get out are remembered for the next checkpoint.
    fn write(&mut self, inner: &Inner, mut event: Map<String, Value>) -> Result<(), AuditFailed> {
        let separator: &[u8] = if self.line_end == LineEnd::Clean {
            b""
        } else {
            b"\n"
        };
        let mut discarded = self.discarded.clone();
        if self.line_end == LineEnd::AfterGarbage
            && let Some(d) = &mut discarded
        {
            d.add(separator);
        }
        if let Some(d) = &discarded {
            event.insert("discarded".into(), d.to_json());
        }
        let time = jiff::Timestamp::now().to_string();
        let (line, hash) = seal(&inner.key, self.seq, &time, &self.prev_hash, event);
        let mut buf = Vec::with_capacity(separator.len() + line.len() + 1);
        buf.extend_from_slice(separator);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        match self.out.write(&buf) {
            Ok(()) => {
                self.advance(hash, LineEnd::Clean);
                Ok(())
            }
            Err((written, e)) => {
                if written + 1 >= buf.len() {
                    // The record is out, at most its newline is missing: it counts.
                    let end = if written == buf.len() {
                        LineEnd::Clean
                    } else {
                        LineEnd::AfterRecord
                    };
                    self.advance(hash, end);
                } else if written > 0 {
                    let d = self.discarded.get_or_insert_with(Discarded::default);
                    let mut out = &buf[..written];
                    if self.line_end == LineEnd::AfterRecord {
                        // That newline ends the record before: not discarded.
                        out = &out[1..];
                    }
                    d.add(out);
                    self.line_end = if buf[written - 1] == b'\n' {
                        LineEnd::Clean
                    } else {
                        LineEnd::AfterGarbage
                    };
                }
                Err(self.fail(e))
            }
        }
    }

    fn advance(&mut self, hash: String, end: LineEnd) {
        self.seq += 1;
        self.prev_hash = hash;
        self.line_end = end;
        self.discarded = None;
    }

    fn fail(&mut self, e: std::io::Error) -> AuditFailed {
        let error = AuditFailed(e.to_string());
        match &mut self.failure {
            Some(_) => {}
            None => {
                tracing::error!(error = %e, "audit log write failed: refusing calls until it can be written again");
                self.failure = Some(Failure {
                    error: error.clone(),
                    since: jiff::Timestamp::now(),
                    at: Instant::now(),
                    unwritten: 0,
                    next_retry: Instant::now() + FIRST_RETRY,
                    backoff: FIRST_RETRY,
                });
            }
        }
        error
    }

    /// Writes what a failed (or not yet started) log owes before any record:
    /// the start checkpoint, or a `recovered` checkpoint saying what was lost.
    fn recover(&mut self, inner: &Inner) -> Result<(), AuditFailed> {
        if self.start.is_none() && self.failure.is_none() {
            return Ok(());
        }
        let mut fields = self.start.clone().unwrap_or_default();
        if self.start.is_some() {
            fields.insert("version".into(), env!("CARGO_PKG_VERSION").into());
        }
        if let Some(failure) = &self.failure {
            fields.insert("failedSince".into(), failure.since.to_string().into());
            fields.insert("error".into(), failure.error.0.clone().into());
            fields.insert("unwrittenRecords".into(), failure.unwritten.into());
        }
        let reason = if self.start.is_some() {
            "start"
        } else {
            "recovered"
        };
        self.checkpoint_with(inner, reason, Value::Object(fields))?;
        self.start = None;
        Ok(())
    }

    fn checkpoint(&mut self, inner: &Inner, reason: &str) -> Result<(), AuditFailed> {
        self.checkpoint_with(inner, reason, json!({}))
    }

    fn checkpoint_with(
        &mut self,
        inner: &Inner,
        reason: &str,
        fields: Value,
    ) -> Result<(), AuditFailed> {
        let mut event = Map::new();
        event.insert("event".into(), "checkpoint".into());
        event.insert("reason".into(), reason.into());
        event.insert("keyId".into(), inner.key.id().into());
        event.insert("run".into(), inner.run.as_str().into());
        event.insert("records".into(), self.since_checkpoint.into());
        if let Value::Object(fields) = fields {
            event.extend(fields);
        }
        if let Err(e) = self.write(inner, event) {
            if let Some(failure) = &mut self.failure {
                failure.backoff = (failure.backoff * 2).min(MAX_RETRY);
                failure.next_retry = Instant::now() + failure.backoff;
            }
            return Err(e);
        }
        self.since_checkpoint = 0;
        self.checkpoint_at = Instant::now();
        if let Some(failure) = self.failure.take() {
            tracing::warn!(
                down_ms = failure.at.elapsed().as_millis() as u64,
                unwritten_records = failure.unwritten,
                "audit log writable again: serving calls"
            );
        }
        let (seq, hash) = (self.seq - 1, self.prev_hash.clone());
        if let Err(e) = self.out.anchor(&inner.key, seq, &hash) {
            // A stale anchor only narrows what a later check can prove.
            tracing::warn!(error = %e, "audit anchor not updated");
        }
        Ok(())
    }
}

/// Why a runner starting on a log has no anchor to trust.
#[derive(Debug, thiserror::Error)]
enum UnusableAnchor {
    #[error("missing")]
    Missing,
    #[error("{0}")]
    Unreadable(std::io::Error),
    #[error("{0}")]
    Invalid(#[from] AnchorError),
    #[error("its MAC does not match the key")]
    WrongKey,
}

/// The anchor file as the start checkpoint records it: `{seq, hash}`, or why
/// there is none to trust.
fn found_anchor(path: &Path, key: &AuditKey, tail: &Tail) -> Value {
    let anchor = match std::fs::read_to_string(path) {
        Ok(text) => Anchor::parse(&text).map_err(UnusableAnchor::from),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(UnusableAnchor::Missing),
        Err(e) => Err(UnusableAnchor::Unreadable(e)),
    };
    let anchor = anchor.and_then(|a| {
        if a.sealed_by(key) {
            Ok(a)
        } else {
            Err(UnusableAnchor::WrongKey)
        }
    });
    match anchor {
        Ok(anchor) => {
            let last_seq = tail.last.as_ref().map_or(0, |(seq, _)| *seq);
            if anchor.seq > last_seq {
                tracing::warn!(
                    anchored = anchor.seq,
                    last = last_seq,
                    "the audit log ends before the checkpoint its anchor names: its tail was cut"
                );
            }
            anchor.to_json()
        }
        Err(why) => {
            tracing::warn!(anchor = %path.display(), %why, "no usable audit anchor: a cut tail of the log cannot be detected");
            json!({"unusable": why.to_string()})
        }
    }
}

/// Finds the last record of a log that verifies with `key`, looking back at
/// most [`MAX_TAIL_SCAN_BYTES`]. Anything after it (a record cut short, or
/// corrupt or altered ones) is returned as discarded. When records are found
/// but none verifies, the log was sealed with another key: the start stops.
fn read_tail(file: &mut File, path: &Path, key: &AuditKey) -> Result<Tail, AuditOpenError> {
    let io = |source| AuditOpenError::Io {
        path: path.into(),
        source,
    };
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    if len == 0 {
        return Ok(Tail {
            last: None,
            discarded: None,
            set_aside: 0,
            line_end: LineEnd::Clean,
        });
    }
    let mut window = len.min(64 << 10);
    loop {
        let start = len - window;
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut buf = Vec::with_capacity(window as usize);
        file.take(window).read_to_end(&mut buf).map_err(io)?;
        // Line starts in the window; the first is whole only at the file's start.
        let mut starts: Vec<usize> = buf
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i + 1)
            .filter(|i| *i < buf.len())
            .collect();
        if start == 0 {
            starts.insert(0, 0);
        }
        let mut set_aside = 0;
        for (n, &from) in starts.iter().enumerate().rev() {
            let to = starts.get(n + 1).copied().unwrap_or(buf.len());
            let raw = &buf[from..to];
            let text = raw.strip_suffix(b"\n").unwrap_or(raw);
            let Some(parsed) = std::str::from_utf8(text).ok().and_then(|t| parse(t).ok()) else {
                continue;
            };
            if !key.check(parsed.body.as_bytes(), &parsed.hash) {
                set_aside += 1;
                continue;
            }
            let rest = &buf[to..];
            let line_end = match (raw.ends_with(b"\n"), rest.is_empty()) {
                (false, _) => LineEnd::AfterRecord,
                (true, true) => LineEnd::Clean,
                (true, false) if rest.ends_with(b"\n") => LineEnd::Clean,
                (true, false) => LineEnd::AfterGarbage,
            };
            let discarded = (!rest.is_empty()).then(|| {
                let mut d = Discarded::default();
                d.add(rest);
                d
            });
            return Ok(Tail {
                last: Some((parsed.seq, parsed.hash)),
                discarded,
                set_aside,
                line_end,
            });
        }
        if set_aside > 0 && (start == 0 || window >= MAX_TAIL_SCAN_BYTES) {
            return Err(AuditOpenError::WrongKey {
                path: path.into(),
                records: set_aside,
                key_id: key.id().into(),
            });
        }
        if start == 0 {
            // Nothing but garbage: a new chain after it, which verify reports
            // as a missing start.
            let mut d = Discarded::default();
            d.add(&buf);
            return Ok(Tail {
                last: None,
                set_aside: 0,
                line_end: if buf.ends_with(b"\n") {
                    LineEnd::Clean
                } else {
                    LineEnd::AfterGarbage
                },
                discarded: Some(d),
            });
        }
        if window >= MAX_TAIL_SCAN_BYTES {
            return Err(AuditOpenError::NoRecord { path: path.into() });
        }
        window = (window * 2).min(len).min(MAX_TAIL_SCAN_BYTES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn key() -> AuditKey {
        AuditKey::new(&[7u8; 32]).unwrap()
    }

    fn event(n: u64) -> Map<String, Value> {
        json!({"event": "received", "n": n})
            .as_object()
            .unwrap()
            .clone()
    }

    /// A writer the test can read back, and make fail: after `budget` more
    /// bytes (a full disk in the middle of a line) or at once.
    #[derive(Clone, Default)]
    struct Disk {
        bytes: Arc<Mutex<Vec<u8>>>,
        full: Arc<AtomicBool>,
        budget: Arc<AtomicUsize>,
    }

    impl Disk {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
        }
        fn fill_after(&self, bytes: usize) {
            self.budget.store(bytes, Ordering::SeqCst);
            self.full.store(true, Ordering::SeqCst);
        }
        fn free(&self) {
            self.full.store(false, Ordering::SeqCst);
        }
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.full.load(Ordering::SeqCst) {
                let room = self.budget.swap(0, Ordering::SeqCst).min(buf.len());
                if room == 0 {
                    return Err(std::io::Error::other("No space left on device"));
                }
                self.bytes.lock().unwrap().extend_from_slice(&buf[..room]);
                return Ok(room);
            }
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A tool that sends its secret (a call's token) in the path of a request through
    /// its egress proxy does not get it into the audit log.
    #[test]
    fn egress_records_are_redacted_with_the_calls_secrets() {
        use crate::egress::{EgressAudit, EgressEvent, EgressOutcome};
        let disk = Disk::default();
        let log = AuditLog::to_writer(Box::new(disk.clone()), "test", key());
        let token = "eyJhbGciOi.eyJzdWIi.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg";
        let redactor = crate::runner::redact::Redactor::new(vec![token.into()]).unwrap();
        let base = event(1);
        EgressTrail::new(log, base)
            .redacting(redactor)
            .record(EgressEvent {
                outcome: EgressOutcome::Denied,
                method: "GET".into(),
                host: "exfil.example".into(),
                port: 443,
                path: format!("/collect/{token}"),
                address: None,
                status: 403,
                bytes_sent: 0,
                bytes_received: 0,
                duration_ms: 1,
                rule: None,
                injected: Vec::new(),
                reason: Some("HostNotAllowed"),
                denied_by: None,
                detail: Some(format!("GET https://exfil.example/collect/{token}")),
            });
        let text = disk.text();
        assert!(!text.contains("c2lnbmF0dXJl"), "{text}");
        assert!(text.contains("/collect/[REDACTED]"), "{text}");
    }

    fn stream_log(records: u64) -> (AuditLog, Disk) {
        let disk = Disk::default();
        let log = AuditLog::to_writer(Box::new(disk.clone()), "test", key());
        for n in 0..records {
            log.append(event(n)).unwrap();
        }
        (log, disk)
    }

    fn lines(disk: &Disk) -> Vec<String> {
        disk.text().lines().map(String::from).collect()
    }

    fn check(text: &str) -> Result<Verified, BrokenChain> {
        verify(text.as_bytes(), Some(&key()), None)
    }

    fn joined(lines: &[String]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn a_sealed_chain_starts_with_its_genesis_checkpoint_and_verifies() {
        let (_log, disk) = stream_log(5);
        let first: Value = serde_json::from_str(&lines(&disk)[0]).unwrap();
        assert_eq!(first["event"], "checkpoint");
        assert_eq!(first["reason"], "start");
        assert_eq!(first["prevHash"], GENESIS);
        assert_eq!(first["keyId"], key().id());
        let verified = check(&disk.text()).unwrap();
        assert_eq!((verified.records, verified.runs), (6, 1));
        assert!(verified.macs_checked);
    }

    #[test]
    fn edits_deletions_and_reorders_name_the_first_broken_line() {
        let (_log, disk) = stream_log(5);
        let lines = lines(&disk);
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"n\":1", "\"n\":7");
        let e = check(&joined(&edited)).unwrap_err();
        assert_eq!((e.line, e.damage), (3, Damage::Altered));
        let mut removed = lines.clone();
        removed.remove(2);
        let e = check(&joined(&removed)).unwrap_err();
        assert_eq!((e.line, e.damage), (3, Damage::Unlinked));
        assert!(e.message.contains("removed"), "{e}");
        let mut swapped = lines;
        swapped.swap(3, 4);
        assert_eq!(check(&joined(&swapped)).unwrap_err().line, 4);
    }

    /// The attacker edits a record and re-hashes every record after it, as
    /// an unkeyed chain would allow: plain SHA-256, or HMAC under a key of
    /// their own.
    #[test]
    fn an_edited_log_resealed_without_the_key_is_caught() {
        let (_log, disk) = stream_log(4);
        let mut lines = lines(&disk);
        lines[2] = lines[2].replace("\"n\":1", "\"n\":9");
        let forger = AuditKey::new(&[9u8; 32]).unwrap();
        let reseal = |lines: &[String], mac: &dyn Fn(&str) -> String| -> String {
            let mut prev = String::new();
            let mut out = String::new();
            for (i, line) in lines.iter().enumerate() {
                let p = parse(line).unwrap();
                let mut body = p.body.clone();
                if i > 0 {
                    body = body.replace(&p.prev_hash, &prev);
                }
                let hash = mac(&body);
                out.push_str(&format!(
                    "{},\"hash\":\"{hash}\"}}\n",
                    &body[..body.len() - 1]
                ));
                prev = hash;
            }
            out
        };
        let sha = reseal(&lines, &|b| hex::encode(Sha256::digest(b.as_bytes())));
        let hmac = reseal(&lines, &|b| forger.seal(b.as_bytes()));
        for forged in [sha, hmac] {
            let e = check(&forged).unwrap_err();
            assert_eq!(e.damage, Damage::Altered, "{e}");
            assert_eq!(e.line, 1, "even the genesis checkpoint was resealed");
            // Without the key only the links are checked: the report says so.
            let unkeyed = verify(forged.as_bytes(), None, None).unwrap();
            assert!(!unkeyed.macs_checked);
        }
        // A forged key id on the checkpoint is named as a wrong key.
        let wrong = lines[0].replace(key().id(), forger.id());
        let e = check(&joined(&[wrong])).unwrap_err();
        assert_eq!(e.damage, Damage::WrongKey);
    }

    #[test]
    fn a_dropped_head_is_a_missing_start() {
        let (_log, disk) = stream_log(4);
        let lines = lines(&disk);
        for dropped in 1..lines.len() {
            let e = check(&joined(&lines[dropped..])).unwrap_err();
            assert_eq!((e.line, e.damage), (1, Damage::MissingStart), "{e}");
        }
        assert_eq!(check("").unwrap_err().damage, Damage::MissingStart);
    }

    fn file_log(path: &Path, cadence: u64) -> AuditLog {
        let log = AuditLog::open_file(path, key()).unwrap();
        log.set_cadence(Cadence {
            records: cadence,
            interval: Duration::from_secs(3600),
        });
        log
    }

    fn check_file(path: &Path) -> Result<Verified, BrokenChain> {
        let anchor = Anchor::parse(&std::fs::read_to_string(anchor_path(path)).unwrap()).unwrap();
        verify(File::open(path).unwrap(), Some(&key()), Some(&anchor))
    }

    /// Cuts the log after `keep` lines (a partial line when `partial` bytes
    /// of the next are kept).
    fn cut(path: &Path, keep: usize, partial: usize) {
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
        let next = lines.get(keep).map(|l| l[..partial].to_string());
        lines.truncate(keep);
        let mut out = lines.concat();
        out.push_str(&next.unwrap_or_default());
        std::fs::write(path, out).unwrap();
    }

    #[tokio::test]
    async fn a_clean_restart_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = file_log(&path, 3);
        (0..5).for_each(|n| log.append(event(n)).unwrap());
        log.close(Duration::ZERO).await.unwrap();
        let log = file_log(&path, 3);
        log.append(event(5)).unwrap();
        let verified = check_file(&path).unwrap();
        assert_eq!(verified.runs, 2);
        // start, 5 events, 1 interval, shutdown, start, 1 event
        assert_eq!((verified.records, verified.checkpoints), (10, 4));
    }

    /// The attack: stop the runner, cut the log's tail, start it again.
    #[tokio::test]
    async fn a_cut_tail_before_a_restart_is_reported_as_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = file_log(&path, 3);
        (0..7).for_each(|n| log.append(event(n)).unwrap());
        log.close(Duration::ZERO).await.unwrap();
        drop(log);
        let full = std::fs::read_to_string(&path).unwrap();
        let count = full.lines().count();
        // Every cut that removes the shutdown checkpoint: whole lines, mid-line, everything.
        for (keep, partial) in [
            (count - 1, 0),
            (count - 4, 0),
            (count - 2, 20),
            (1, 0),
            (0, 0),
        ] {
            std::fs::write(&path, &full).unwrap();
            let anchor = std::fs::read(anchor_path(&path)).unwrap();
            cut(&path, keep, partial);
            let e = check_file(&path).unwrap_err();
            assert!(
                matches!(
                    e.damage,
                    Damage::Truncated | Damage::Incomplete | Damage::MissingStart
                ),
                "cut to {keep}+{partial}: {e}"
            );
            // The runner restarts on the cut log and writes on.
            let restarted = file_log(&path, 3);
            restarted.append(event(99)).unwrap();
            drop(restarted);
            // Without any anchor file at check time, the restart's checkpoint names it.
            let e = verify(File::open(&path).unwrap(), Some(&key()), None).unwrap_err();
            assert_eq!(e.damage, Damage::Truncated, "cut to {keep}+{partial}: {e}");
            std::fs::write(anchor_path(&path), &anchor).unwrap();
        }
    }

    #[tokio::test]
    async fn a_cut_tail_without_a_restart_is_caught_by_the_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = file_log(&path, 3);
        (0..4).for_each(|n| log.append(event(n)).unwrap());
        log.close(Duration::ZERO).await.unwrap();
        assert!(check_file(&path).is_ok());
        let count = std::fs::read_to_string(&path).unwrap().lines().count();
        cut(&path, count - 1, 0);
        let e = check_file(&path).unwrap_err();
        assert_eq!(e.damage, Damage::Truncated, "{e}");
        // A forged anchor (naming what is left) does not carry the key's MAC.
        let text = std::fs::read_to_string(&path).unwrap();
        let last = parse(text.lines().last().unwrap()).unwrap();
        let forged = json!({"seq": last.seq, "hash": last.hash, "mac": last.hash}).to_string();
        let anchor = Anchor::parse(&forged).unwrap();
        let e = verify(text.as_bytes(), Some(&key()), Some(&anchor)).unwrap_err();
        assert_eq!(e.damage, Damage::Altered, "{e}");
    }

    /// The attack while the runner is still writing: cut the log at a record
    /// boundary (before or after a checkpoint), then let the runner go on. Its
    /// next record names a predecessor that is no longer there.
    #[tokio::test]
    async fn a_tail_cut_under_a_running_runner_breaks_the_chain_at_its_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = file_log(&path, 3);
        (0..6).for_each(|n| log.append(event(n)).unwrap());
        let full = std::fs::read_to_string(&path).unwrap();
        let count = full.lines().count();
        for keep in [count - 1, count - 2, count - 4] {
            std::fs::write(&path, &full).unwrap();
            cut(&path, keep, 0);
            log.append(event(100 + keep as u64)).unwrap();
            let e = check_file(&path).unwrap_err();
            assert!(
                matches!(e.damage, Damage::Unlinked | Damage::Truncated),
                "cut to {keep} lines: {e}"
            );
            assert!(
                e.line <= keep + 1,
                "cut to {keep} lines, reported at {}",
                e.line
            );
        }
        log.close(Duration::ZERO).await.unwrap();
    }

    #[test]
    fn records_after_the_last_checkpoint_are_the_documented_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = file_log(&path, 3);
        (0..5).for_each(|n| log.append(event(n)).unwrap());
        drop(log); // killed: no shutdown checkpoint
        let count = std::fs::read_to_string(&path).unwrap().lines().count();
        cut(&path, count - 1, 0);
        let verified = check_file(&path).unwrap();
        assert!(
            verified
                .notes
                .iter()
                .any(|n| n.contains("without a shutdown checkpoint")),
            "{verified:?}"
        );
    }

    /// A 60 KB input in a record: the record is bounded, and a log ending in
    /// a huge or broken line is continued, not refused.
    #[test]
    fn oversized_events_are_bounded_and_marked() {
        let (log, disk) = stream_log(0);
        let huge = "x".repeat(60_000);
        let many: Vec<Value> = (0..10_000).map(|i| json!({"path": "/a", "i": i})).collect();
        let mut deep = json!("bottom");
        for _ in 0..50 {
            deep = json!([deep]);
        }
        let mut event = Map::new();
        event.insert("event".into(), "denied".into());
        event.insert("userAgent".into(), huge.clone().into());
        event.insert("errors".into(), many.into());
        event.insert(
            "input".into(),
            json!({"deep": deep, "é": "é".repeat(40_000)}),
        );
        log.append(event).unwrap();
        let line = lines(&disk).pop().unwrap();
        assert!(line.len() <= MAX_RECORD_BYTES, "{} bytes", line.len());
        let record: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(record["truncated"], true);
        assert_eq!(record["event"], "denied");
        assert!(line.contains("…[truncated"), "{line}");
        // Large only in sum, or only once escaped: still bounded.
        let mut many_fields = Map::new();
        many_fields.insert("event".into(), "denied".into());
        for i in 0..20 {
            many_fields.insert(format!("f{i}"), "z".repeat(3000).into());
        }
        many_fields.insert("control".into(), "\u{1}".repeat(4000).into());
        log.append(many_fields).unwrap();
        let line = lines(&disk).pop().unwrap();
        assert!(line.len() <= MAX_RECORD_BYTES, "{} bytes", line.len());
        let record: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(record["truncated"], true);
        assert!(
            record["control"]
                .as_str()
                .unwrap()
                .starts_with("…[truncated")
        );
        check(&disk.text()).unwrap();
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<i64>().prop_map(Value::from),
            // Escapes (controls, quotes) and multi-byte characters, up to well past the caps.
            "[\\x00-\\x1f\"\\\\aé😀]{0,20}".prop_map(|s| Value::String(s.repeat(400))),
        ];
        leaf.prop_recursive(12, 600, 40, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..40).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,8}", inner, 0..40)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// Whatever a caller manages to put into a record, the sealed line stays bounded.
        #[test]
        fn every_sealed_record_is_bounded(fields in proptest::collection::btree_map("[a-zA-Z]{1,12}", any_json(), 0..12)) {
            let mut event: Map<String, Value> = fields.into_iter().collect();
            event.insert("event".into(), "denied".into());
            bound(&mut event);
            let (line, _) = seal(&key(), u64::MAX, "2026-12-01T12:00:00.123456789Z", GENESIS, event);
            proptest::prop_assert!(line.len() <= MAX_RECORD_BYTES, "{} bytes", line.len());
        }
    }

    #[test]
    fn a_log_ending_in_an_incomplete_record_is_continued_and_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = file_log(&path, 1000);
        (0..3).for_each(|n| log.append(event(n)).unwrap());
        drop(log);
        // A 2 MB record cut short (no newline), as a killed runner leaves it.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(format!("{{\"seq\":4,\"input\":\"{}", "y".repeat(2 << 20)).as_bytes())
            .unwrap();
        drop(f);
        let log = file_log(&path, 1000);
        log.append(event(3)).unwrap();
        let verified = check_file(&path).unwrap();
        assert!(
            verified.notes.iter().any(|n| n.contains("acknowledged")),
            "{verified:?}"
        );
        // The acknowledgement covers exactly those bytes: changing them is caught.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replacen("yyyy", "yyyz", 1);
        let e = check(&text).unwrap_err();
        assert_eq!(e.damage, Damage::Incomplete, "{e}");
    }

    /// A bit flip (or an edit) in the last record: serve continues after the
    /// last good record, and verify still reports the damage.
    #[test]
    fn a_log_ending_in_a_corrupt_record_is_continued_and_still_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = file_log(&path, 1000);
        (0..3).for_each(|n| log.append(event(n)).unwrap());
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"n\":2", "\"n\":3")).unwrap();
        let log = file_log(&path, 1000);
        log.append(event(3)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let start: Value = serde_json::from_str(text.lines().nth(4).unwrap()).unwrap();
        assert_eq!(
            (&start["reason"], &start["setAside"]),
            (&json!("start"), &json!(1))
        );
        let e = check(&text).unwrap_err();
        assert_eq!((e.line, e.damage), (4, Damage::Altered), "{e}");
    }

    #[test]
    fn a_log_sealed_with_another_key_is_not_continued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        file_log(&path, 1000).append(event(0)).unwrap();
        let other = AuditKey::new(&[8u8; 32]).unwrap();
        let e = AuditLog::open_file(&path, other).err().unwrap();
        assert_eq!(e.reason(), "AuditLogWrongKey", "{e}");
    }

    /// The disk fills up in the middle of a record, then space is freed.
    #[test]
    fn a_failing_sink_refuses_then_recovers_and_says_what_was_lost() {
        let (log, disk) = stream_log(2);
        disk.fill_after(25);
        assert!(log.append(event(2)).is_err());
        assert!(log.append(event(3)).is_err());
        assert!(!log.is_healthy());
        assert!(log.ensure_writable().is_err(), "still full: still refusing");
        disk.free();
        log.ensure_writable().unwrap();
        assert!(log.is_healthy());
        log.append(event(4)).unwrap();
        let verified = check(&disk.text()).unwrap();
        assert!(
            verified.notes.iter().any(|n| n.contains("acknowledged")),
            "{verified:?}"
        );
        let recovered: Value = disk
            .text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["reason"] == "recovered")
            .unwrap();
        assert_eq!(recovered["unwrittenRecords"], 2);
        assert!(recovered["error"].as_str().unwrap().contains("No space"));
    }

    #[test]
    fn a_log_that_cannot_write_its_start_starts_failed_and_recovers() {
        let disk = Disk::default();
        disk.fill_after(0);
        let log = AuditLog::to_writer(Box::new(disk.clone()), "full", key());
        assert!(!log.is_healthy());
        disk.free();
        log.tick(); // not due yet: the background retry backs off
        assert!(!log.is_healthy());
        log.append(event(0)).unwrap();
        let first: Value = serde_json::from_str(&lines(&disk)[0]).unwrap();
        assert_eq!(first["reason"], "start");
        assert_eq!(first["unwrittenRecords"], 0);
        check(&disk.text()).unwrap();
    }

    #[test]
    fn interval_checkpoints_follow_records_or_time() {
        let (log, disk) = stream_log(0);
        log.set_cadence(Cadence {
            records: 2,
            interval: Duration::ZERO,
        });
        (0..4).for_each(|n| log.append(event(n)).unwrap());
        let reasons = |disk: &Disk| {
            disk.text()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|r| r["event"] == "checkpoint")
                .count()
        };
        assert_eq!(reasons(&disk), 3, "start + one per 2 records");
        log.tick();
        assert_eq!(reasons(&disk), 3, "nothing new since the last checkpoint");
        log.append(event(4)).unwrap();
        log.tick();
        assert_eq!(reasons(&disk), 4, "a record waited: the tick anchors it");
    }

    #[test]
    fn short_and_generated_keys() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "0123456789abcdef0123456789abcdef\n").unwrap();
        assert!(AuditKey::from_file(&short).is_ok(), "32 bytes + newline");
        std::fs::write(&short, "").unwrap();
        assert_eq!(
            AuditKey::from_file(&short).unwrap_err().reason(),
            "AuditKeyTooShort"
        );
        let path = dir.path().join("audit.key");
        let (made, created) = AuditKey::load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let (again, created) = AuditKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(made.id(), again.id());
        assert!(!format!("{made:?}").contains(&hex::encode(std::fs::read(&path).unwrap())));
    }
}
