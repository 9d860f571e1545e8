//! The configuration files: `config::envfile::parse` (systemd EnvironmentFile= syntax), then the
//! whole `Config::load` with the input as `hyper2kvm.conf` of a scratch config directory and an
//! empty environment, so that every value is resolved and checked; and QEMU_CONVERT_OPTIONS.

#![no_main]

mod common;

use std::collections::BTreeMap;

use hyper2kvm::config::{self, envfile, Config, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The daemon reads the files with read_to_string: anything not UTF-8 stops there.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = config::parse_convert_options(text);
    if envfile::parse(text).is_err() {
        return;
    }
    let dir = common::scratch_dir();
    std::fs::write(dir.join("hyper2kvm.conf"), data).unwrap();
    let overrides = Overrides { config_dir: Some(dir), flags: Vec::new() };
    let _ = Config::load(&overrides, &BTreeMap::<String, String>::new());
});
