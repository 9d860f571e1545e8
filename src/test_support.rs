//! Helpers shared by the unit tests under `src/`: the `qemu-img` oracle and a deterministic
//! pseudo-random generator.
//!
//! This module owns only test scaffolding, compiled for `cargo test` alone; it must not grow
//! assertions about any one module (those stay with that module's tests). The integration
//! tests cannot reach it and have their own in `tests/common`.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `qemu-img` with `args` and returns what it did, whatever its exit status: for tests
/// that expect it to fail, or read its output either way.
pub(crate) fn qemu_img_output<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new("qemu-img").args(args).output().expect("qemu-img runs (install qemu-utils)")
}

/// Runs `args[0]` with the rest of `args` in `dir` (qemu-img and qemu-io on relative names),
/// failing the test unless it succeeds.
pub(crate) fn run_in(dir: &Path, args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `qemu-img` with `args`, fails the test unless it succeeds, and returns its standard
/// output.
pub(crate) fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = qemu_img_output(args);
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert!(
        out.status.success(),
        "qemu-img {shown:?}: exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// xorshift64* (Vigna): deterministic test data without a dependency. The state must not be
/// zero (a zero state stays zero).
#[derive(Debug, Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// The next 64 pseudo-random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_and_not_stuck() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        let first: Vec<u64> = (0..4).map(|_| a.next()).collect();
        assert_eq!(first, (0..4).map(|_| b.next()).collect::<Vec<_>>());
        assert!(first.windows(2).all(|w| w[0] != w[1]), "{first:?}");
        let mut buf = [0u8; 13];
        Rng(7).fill(&mut buf);
        assert_eq!(buf[..8], first[0].to_le_bytes());
        assert_eq!(buf[8..], first[1].to_le_bytes()[..5]);
    }
}
