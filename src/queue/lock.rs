//! Lock file names and the owner record a lock file holds, parsed as hostile input: anyone
//! with write access to the queue can plant or rewrite a lock, and every path the daemon then
//! builds for the job comes from it. So the job id is taken from the lock's own file name and
//! must have the form daemons generate; the record must agree with that name, and every name it
//! carries must be a base name. A record that does not is *damaged* (see [`LockRecordError`]);
//! what the queue does with one is in `claim.rs` and docs/QUEUE.md.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::layout::is_manifest_name;
use crate::host::{self, Identity};

/// Suffix of a lock file; anything else in `locks/` is a lock being taken over.
pub const LOCK_SUFFIX: &str = ".lock";

/// Infix of a lock moved aside (`<job>.lock.taken-<random>`) by a takeover, release or sweep.
pub const ASIDE_INFIX: &str = ".lock.taken-";

/// Largest lock file read, in bytes. A record is about 300 bytes; a planted multi-gigabyte
/// "lock" must not be read whole.
pub const MAX_LOCK_RECORD_BYTES: u64 = 16 << 10;

/// Longest string field (host, boot id, instance, manifest name) accepted in a record, in bytes:
/// the file name limit, which every one of them fits in when written by a daemon.
pub const MAX_FIELD_BYTES: usize = 255;

/// Format of the time part of a job id.
const JOB_TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// Length of the time part (`20260101T000000Z`) and of the random part (16 hex digits).
const JOB_TIME_LEN: usize = 16;
const JOB_RANDOM_LEN: usize = 16;

/// The owner record stored in a lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// The job, `<YYYYMMDDTHHMMSSZ>-<16 hex digits>`; must match the lock's file name.
    pub job_id: String,
    /// The daemon holding the claim (host, boot id, pid, instance), as flat fields.
    #[serde(flatten)]
    pub owner: Identity,
    /// Raised by each takeover; a daemon whose generation is superseded must not publish.
    pub generation: u64,
    /// When this owner took the claim (the first claim or its takeover), UTC.
    pub claimed_at: DateTime<Utc>,
    /// The manifest's file name in WATCH_DIR before the claim.
    pub manifest_name: String,
}

/// Why a lock file's record cannot be trusted. [`LockRecordError::Syntax`] and
/// [`LockRecordError::TooLarge`] are also what a daemon that died writing its lock leaves; every
/// other variant means the record was written by something other than a daemon.
#[derive(Debug, Error)]
pub enum LockRecordError {
    /// Over [`MAX_LOCK_RECORD_BYTES`]; not read further.
    #[error("the lock file is larger than {MAX_LOCK_RECORD_BYTES} bytes")]
    TooLarge,
    /// A symlink, FIFO, directory or device where a lock file should be.
    #[error("the lock file is not a regular file")]
    NotAFile,
    /// Not JSON, or JSON without the record's fields (also a half-written lock).
    #[error("the lock record is not an owner record: {0}")]
    Syntax(#[from] serde_json::Error),
    /// The file name does not carry a job id of the generated form.
    #[error("the lock file's name is not <job id>.lock or <job id>.lock.taken-<suffix>")]
    FileName,
    /// `job_id` differs from the job id in the file name.
    #[error("the record's job_id is not the job its file is named after")]
    JobMismatch,
    /// `manifest_name` is not a base name in WATCH_DIR's manifest form (`*.json`, no leading dot).
    #[error("the record's manifest_name is not a manifest file name in WATCH_DIR")]
    ManifestName,
    /// `generation` is 0 or `u64::MAX`, which no daemon writes.
    #[error("the record's generation is {0}; a lock's generation is 1 or more and below 2^64-1")]
    Generation(u64),
    /// The named string field is over [`MAX_FIELD_BYTES`].
    #[error("the record's {0} is longer than {MAX_FIELD_BYTES} bytes")]
    Field(&'static str),
}

impl LockRecord {
    /// Parses the record of the lock file named `file_name` (`<job>.lock` or an aside of it)
    /// and checks it against that name. Never panics, whatever the bytes.
    pub fn parse(bytes: &[u8], file_name: &str) -> Result<LockRecord, LockRecordError> {
        if bytes.len() as u64 > MAX_LOCK_RECORD_BYTES {
            return Err(LockRecordError::TooLarge);
        }
        let job_id = job_of_lock_file(file_name).ok_or(LockRecordError::FileName)?;
        let record: LockRecord = serde_json::from_slice(bytes)?;
        record.check(job_id)?;
        Ok(record)
    }

    /// Whether the record may stand for the lock of `job_id`.
    fn check(&self, job_id: &str) -> Result<(), LockRecordError> {
        if self.job_id != job_id {
            return Err(LockRecordError::JobMismatch);
        }
        if self.manifest_name.len() > MAX_FIELD_BYTES || !is_base_manifest_name(&self.manifest_name) {
            return Err(LockRecordError::ManifestName);
        }
        // u64::MAX could not be raised by a takeover; 0 is never written (a claim starts at 1).
        if self.generation == 0 || self.generation == u64::MAX {
            return Err(LockRecordError::Generation(self.generation));
        }
        let owner = &self.owner;
        for (field, value) in
            [("host", Some(&owner.host)), ("boot_id", Some(&owner.boot_id)), ("instance", owner.instance.as_ref())]
        {
            if value.is_some_and(|v| v.len() > MAX_FIELD_BYTES) {
                return Err(LockRecordError::Field(field));
            }
        }
        Ok(())
    }

    /// Whether `other` is this same holding of the job: the same owner at the same generation.
    pub fn same_holder(&self, other: &LockRecord) -> bool {
        self.owner == other.owner && self.generation == other.generation
    }
}

/// A fresh job id: UTC time for sorting, 64 random bits for uniqueness across hosts.
pub fn new_job_id() -> String {
    format!("{}-{}", Utc::now().format(JOB_TIME_FORMAT), host::random_hex())
}

/// Whether `id` has the form [`new_job_id`] gives: `<YYYYMMDDTHHMMSSZ>-<16 lower-case hex
/// digits>`. Only such ids name files in the queue's state, so no id can lead outside it.
pub fn is_job_id(id: &str) -> bool {
    let Some((time, random)) = id.split_once('-') else { return false };
    time.len() == JOB_TIME_LEN
        && NaiveDateTime::parse_from_str(time, JOB_TIME_FORMAT).is_ok()
        && random.len() == JOB_RANDOM_LEN
        && random.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The job a file in `locks/` belongs to: `<job>.lock` or `<job>.lock.taken-<suffix>`, the
/// suffix ASCII letters and digits; `None` for any other name.
pub fn job_of_lock_file(name: &str) -> Option<&str> {
    let job_id = match name.split_once(ASIDE_INFIX) {
        Some((id, suffix)) => {
            (!suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(id)?
        }
        None => name.strip_suffix(LOCK_SUFFIX)?,
    };
    is_job_id(job_id).then_some(job_id)
}

/// Whether `name` is a single file name that may be a manifest in WATCH_DIR: whatever the
/// scanner can claim (control characters included), and nothing that is a path.
pub fn is_base_manifest_name(name: &str) -> bool {
    is_manifest_name(name) && !name.contains('/') && !name.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "20260101T000000Z-00000000deadbeef";

    fn record() -> serde_json::Value {
        serde_json::json!({
            "job_id": JOB, "host": "h", "boot_id": "b", "pid": 7, "instance": "i",
            "generation": 1, "claimed_at": "2026-01-01T00:00:00Z", "manifest_name": "m.json",
        })
    }

    fn parse_with(field: &str, value: serde_json::Value) -> Result<LockRecord, LockRecordError> {
        let mut r = record();
        r[field] = value;
        LockRecord::parse(r.to_string().as_bytes(), &format!("{JOB}.lock"))
    }

    #[test]
    fn job_ids_are_the_generated_form_only() {
        assert!(is_job_id(&new_job_id()));
        assert!(is_job_id(JOB));
        for bad in [
            "",
            "orphan",
            "../../x/20260101T000000Z-00000000deadbeef",
            "20260101T000000Z-00000000DEADBEEF",
            "20260101T000000Z-00000000deadbee",
            "20261301T000000Z-00000000deadbeef",
            "20260101T000000Z-00000000deadbeef/..",
            "20260101T000000Z_00000000deadbeef",
        ] {
            assert!(!is_job_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn lock_file_names_give_their_job() {
        assert_eq!(job_of_lock_file(&format!("{JOB}.lock")), Some(JOB));
        assert_eq!(job_of_lock_file(&format!("{JOB}.lock.taken-0a1b")), Some(JOB));
        for bad in ["orphan.lock", ".clock-1", &format!("{JOB}.lock.taken-"), &format!("{JOB}.lock.taken-a/b")] {
            assert_eq!(job_of_lock_file(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_daemons_record_parses() {
        let parsed = LockRecord::parse(record().to_string().as_bytes(), &format!("{JOB}.lock.taken-x1")).unwrap();
        assert_eq!((parsed.job_id.as_str(), parsed.generation), (JOB, 1));
    }

    #[test]
    fn damaged_records_are_refused() {
        assert!(matches!(parse_with("job_id", "../../elsewhere/J".into()), Err(LockRecordError::JobMismatch)));
        assert!(matches!(parse_with("manifest_name", "/etc/cron.d/x.json".into()), Err(LockRecordError::ManifestName)));
        assert!(matches!(parse_with("manifest_name", "../x.json".into()), Err(LockRecordError::ManifestName)));
        assert!(matches!(parse_with("generation", u64::MAX.into()), Err(LockRecordError::Generation(u64::MAX))));
        assert!(matches!(parse_with("generation", 0.into()), Err(LockRecordError::Generation(0))));
        assert!(matches!(parse_with("host", "h".repeat(256).into()), Err(LockRecordError::Field("host"))));
        assert!(matches!(parse_with("instance", "i".repeat(256).into()), Err(LockRecordError::Field("instance"))));
        let bytes = record().to_string();
        assert!(matches!(LockRecord::parse(bytes.as_bytes(), "orphan.lock"), Err(LockRecordError::FileName)));
        assert!(matches!(
            LockRecord::parse(b"{\"job_id\": \"", &format!("{JOB}.lock")),
            Err(LockRecordError::Syntax(_))
        ));
        let big = vec![b' '; MAX_LOCK_RECORD_BYTES as usize + 1];
        assert!(matches!(LockRecord::parse(&big, &format!("{JOB}.lock")), Err(LockRecordError::TooLarge)));
    }
}
