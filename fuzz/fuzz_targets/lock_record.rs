//! A lock file's owner record (`LockRecord::parse`), as anyone with write access to the queue
//! can plant one. The input is `<lock file name>\n<file contents>`. A record that parses must
//! be safe to build paths from: its job id is the file name's and of the generated form, its
//! manifest name a single file name, and a takeover can raise its generation.

#![no_main]

use hyper2kvm::internals::queue::lock::{self, LockRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (name, bytes) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let name = String::from_utf8_lossy(name);
    let job = lock::job_of_lock_file(&name);
    if let Some(job) = job {
        assert!(lock::is_job_id(job));
    }
    let Ok(record) = LockRecord::parse(bytes, &name) else { return };
    assert_eq!(Some(record.job_id.as_str()), job, "the job id is the file name's");
    assert!(lock::is_base_manifest_name(&record.manifest_name));
    assert!(!record.manifest_name.contains('/'));
    assert!(record.generation.checked_add(1).is_some());
    let again = serde_json::to_vec(&record).expect("a parsed record serialises");
    let reparsed = LockRecord::parse(&again, &name).expect("a record written back parses again");
    assert_eq!(reparsed, record);
});
