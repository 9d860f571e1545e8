//! The settle wait with inotify on: a manifest renamed into WATCH_DIR (the contract's
//! recommended `name.tmp` then rename) is taken without waiting SETTLE_SECONDS; one written in
//! place, as HyperSDK does, still waits for it.

mod common;

use std::time::Duration;

use common::fixtures::small_raw;
use common::*;

/// Far longer than the test's waits, so that anything claimed within them skipped the wait.
const SETTLE_SECONDS: &str = "30";

/// How long the renamed-in manifest may take to be claimed: a poll round on a busy machine,
/// with room to spare, and well inside SETTLE_SECONDS.
const CLAIM_LIMIT: Duration = Duration::from_secs(20);

#[test]
fn a_manifest_renamed_in_skips_the_settle_wait_and_one_written_in_place_does_not() {
    let env = Env::new();
    let source = small_raw(&env.exports.join("renamed/disk-0.raw"));
    let mut daemon = Daemon::start(&env, &[("USE_INOTIFY", "true"), ("SETTLE_SECONDS", SETTLE_SECONDS)], &[]);
    wait_for(&daemon, Duration::from_secs(30), "the daemon to create the watch and output directories", || {
        env.queue.is_dir() && env.output.is_dir()
    });

    let in_place = env.queue.join("in-place.json");
    let bytes = |vm: &str| serde_json::to_vec_pretty(&manifest(vm, vec![disk("disk-0", "raw", &source)])).unwrap();
    write_like_hypersdk(&in_place, &bytes("in-place-vm"));
    let renamed = env.queue.join("renamed.json");
    let temp = env.queue.join("renamed.json.tmp");
    std::fs::write(&temp, bytes("renamed-vm")).unwrap();
    std::fs::rename(&temp, &renamed).unwrap();

    wait_for(&daemon, CLAIM_LIMIT, "the renamed-in manifest to be claimed before SETTLE_SECONDS", || !renamed.exists());
    // Written first, in place, and settling still: the daemon has not taken it.
    assert!(in_place.exists(), "the manifest written in place was claimed before SETTLE_SECONDS");
    let records = files_under(&env.queue.join(".hyper2kvm"));
    assert!(
        !records.iter().any(|p| std::fs::read(p).is_ok_and(|b| b == bytes("in-place-vm"))),
        "the manifest written in place is under the state directory: {records:?}"
    );
    match hypersdk_wait(&daemon, &env, "renamed-vm", &[]) {
        Outcome::Success { .. } => {}
        Outcome::Failed(text) => daemon.fail(&format!("the renamed-in job failed:\n{text}")),
    }
    daemon.stop();
}
