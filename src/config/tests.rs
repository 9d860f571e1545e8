use super::*;

use tempfile::TempDir;

/// A configuration directory plus an environment, loaded the way the daemon does.
struct Setup {
    dir: TempDir,
    env: BTreeMap<String, String>,
    flags: Vec<(String, String)>,
}

impl Setup {
    fn new() -> Self {
        Setup { dir: tempfile::tempdir().unwrap(), env: BTreeMap::new(), flags: Vec::new() }
    }

    /// Writes `hyper2kvm.conf` (instance `None`) or `hyper2kvm-NAME.conf`, returning its path.
    fn file(&self, instance: Option<&str>, text: &str) -> PathBuf {
        let name = match instance {
            Some(i) => format!("hyper2kvm-{i}.conf"),
            None => "hyper2kvm.conf".to_string(),
        };
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn env(&mut self, key: &str, value: &str) -> &mut Self {
        self.env.insert(key.into(), value.into());
        self
    }

    fn flag(&mut self, key: &str, value: &str) -> &mut Self {
        self.flags.push((key.into(), value.into()));
        self
    }

    fn load(&self) -> Result<Config, ConfigError> {
        let overrides = Overrides { config_dir: Some(self.dir.path().to_owned()), flags: self.flags.clone() };
        Config::load(&overrides, &self.env)
    }

    fn ok(&self) -> Config {
        self.load().unwrap_or_else(|e| panic!("configuration refused: {e}"))
    }

    fn err(&self) -> ConfigError {
        match self.load() {
            Ok(config) => panic!("configuration accepted: {config:?}"),
            Err(e) => e,
        }
    }
}

/// Loads with only `KEY=value` set in the environment.
fn with_env(key: &str, value: &str) -> Result<Config, ConfigError> {
    let mut setup = Setup::new();
    setup.env(key, value);
    setup.load()
}

fn assert_mentions(err: &ConfigError, needles: &[&str]) {
    let text = err.to_string();
    for needle in needles {
        assert!(text.contains(needle), "error {text:?} does not mention {needle:?}");
    }
}

fn paths(list: &[&str]) -> Vec<PathBuf> {
    list.iter().map(PathBuf::from).collect()
}

// ---- defaults ----

#[test]
fn defaults_without_files_or_environment() {
    let config = Setup::new().ok();
    assert_eq!(config.instance, None);
    assert_eq!(config.watch_dir, Path::new("/var/lib/hyper2kvm/queue"));
    assert_eq!(config.output_dir, Path::new("/var/lib/hyper2kvm/output"));
    assert_eq!(config.temp_dir, Path::new("/var/lib/hyper2kvm/output/.hyper2kvm-tmp"));
    assert_eq!(config.poll_interval, Duration::from_secs(5));
    assert_eq!(config.max_concurrent, 2);
    assert_eq!(config.lease, Duration::from_secs(90));
    assert_eq!(config.conversion_timeout, Duration::from_secs(60 * 60));
    // The parent of the watch directory is the state root itself: listed once.
    assert_eq!(config.source_roots, paths(&["/var/lib/hyper2kvm"]));
    assert_eq!(config.log_level, LogLevel::Info);
    assert_eq!(config.compress_level, 6);
    assert_eq!(
        config.convert_options,
        ConvertOptions { compress: false, compression_type: CompressionType::Zlib, progress: false }
    );
    assert!(!config.cleanup_source);
    assert!(!config.libvirt_integration);
    assert_eq!(config.libvirt_uri, "qemu:///system");
    assert_eq!(config.libvirt_bridge, "virbr0");
    assert_eq!(config.libvirt_network, None);
    assert_eq!(config.libvirt_pool, "default");
    assert_eq!(config.retention_days, 7);
    assert_eq!(config.failed_retention_days, 3);
    assert_eq!(config.metrics_addr, None);
    assert_eq!(config.boot_check, BootCheck::Off);
    assert_eq!(config.boot_check_seconds, Duration::from_secs(600));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn boot_check_is_off_warn_or_require() {
    for (value, expected) in
        [("off", BootCheck::Off), ("warn", BootCheck::Warn), ("Require", BootCheck::Require), ("no", BootCheck::Off)]
    {
        assert_eq!(with_env("BOOT_CHECK", value).unwrap().boot_check, expected, "{value}");
    }
    let err = with_env("BOOT_CHECK", "always").unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { key: "BOOT_CHECK", .. }), "{err:?}");
    assert_mentions(&err, &["BOOT_CHECK", "always", "off, warn or require"]);
    assert_eq!(with_env("BOOT_CHECK_SECONDS", "90").unwrap().boot_check_seconds, Duration::from_secs(90));
    for bad in ["5", "100000", "soon"] {
        let err = with_env("BOOT_CHECK_SECONDS", bad).unwrap_err();
        assert_mentions(&err, &["BOOT_CHECK_SECONDS", bad, "10 to 86400"]);
    }
}

#[test]
fn instance_flag_selects_template_defaults() {
    let mut setup = Setup::new();
    setup.flag("INSTANCE_NAME", "vsphere");
    let config = setup.ok();
    assert_eq!(config.instance.as_deref(), Some("vsphere"));
    assert_eq!(config.watch_dir, Path::new("/var/lib/hyper2kvm/vsphere/queue"));
    assert_eq!(config.output_dir, Path::new("/var/lib/hyper2kvm/vsphere/output"));
    assert_eq!(config.temp_dir, Path::new("/var/lib/hyper2kvm/vsphere/output/.hyper2kvm-tmp"));
    assert_eq!(config.source_roots, paths(&["/var/lib/hyper2kvm/vsphere", "/var/lib/hyper2kvm"]));
}

#[test]
fn derived_defaults_follow_the_directories_they_depend_on() {
    let mut setup = Setup::new();
    setup.env("WATCH_DIR", "/nfs/exports/queue").env("OUTPUT_DIR", "/srv/vms");
    let config = setup.ok();
    assert_eq!(config.temp_dir, Path::new("/srv/vms/.hyper2kvm-tmp"));
    assert_eq!(config.source_roots, paths(&["/nfs/exports", "/var/lib/hyper2kvm"]));
}

// ---- layers ----

#[test]
fn later_layers_win_one_step_at_a_time() {
    let mut setup = Setup::new();
    setup.file(None, "INSTANCE_NAME=vsphere\nLOG_LEVEL=error\nPOLL_INTERVAL=7\n");
    assert_eq!(setup.ok().log_level, LogLevel::Error, "base conf over the default");

    setup.file(Some("vsphere"), "LOG_LEVEL=warn\n");
    assert_eq!(setup.ok().log_level, LogLevel::Warn, "instance conf over the base conf");

    setup.env("LOG_LEVEL", "debug");
    assert_eq!(setup.ok().log_level, LogLevel::Debug, "environment over the instance conf");

    setup.flag("LOG_LEVEL", "trace");
    let config = setup.ok();
    assert_eq!(config.log_level, LogLevel::Trace, "flag over the environment");
    // Keys set only in a lower layer are still read.
    assert_eq!(config.poll_interval, Duration::from_secs(7));
    assert_eq!(config.instance.as_deref(), Some("vsphere"));
}

#[test]
fn invalid_value_reports_the_layer_it_came_from() {
    let mut setup = Setup::new();
    let base = setup.file(None, "INSTANCE_NAME=vsphere\nPOLL_INTERVAL=base\n");
    let err = setup.err();
    assert!(matches!(&err, ConfigError::Invalid { origin: Origin::File { path, line: 2 }, .. } if *path == base));

    let instance = setup.file(Some("vsphere"), "\n\nPOLL_INTERVAL=inst\n");
    let err = setup.err();
    assert!(matches!(&err, ConfigError::Invalid { origin: Origin::File { path, line: 3 }, .. } if *path == instance));

    setup.env("POLL_INTERVAL", "env");
    assert!(matches!(setup.err(), ConfigError::Invalid { origin: Origin::Environment, .. }));

    setup.flag("POLL_INTERVAL", "flag");
    let err = setup.err();
    assert!(matches!(err, ConfigError::Invalid { origin: Origin::Flag, .. }));
    assert_mentions(&err, &["\"flag\"", "the command line"]);
}

#[test]
fn instance_named_only_in_the_base_file_selects_its_file() {
    let setup = Setup::new();
    setup.file(None, "INSTANCE_NAME=aws\n");
    setup.file(Some("aws"), "OUTPUT_DIR=/srv/aws-out\nMAX_CONCURRENT=5\n");
    setup.file(Some("other"), "MAX_CONCURRENT=9\n");
    let config = setup.ok();
    assert_eq!(config.instance.as_deref(), Some("aws"));
    assert_eq!(config.output_dir, Path::new("/srv/aws-out"));
    assert_eq!(config.watch_dir, Path::new("/var/lib/hyper2kvm/aws/queue"));
    assert_eq!(config.max_concurrent, 5);
}

#[test]
fn instance_from_the_environment_selects_its_file() {
    let mut setup = Setup::new();
    setup.file(None, "INSTANCE_NAME=aws\n");
    setup.file(Some("aws"), "MAX_CONCURRENT=5\n");
    setup.file(Some("azure"), "MAX_CONCURRENT=7\n");
    setup.env("INSTANCE_NAME", "azure");
    assert_eq!(setup.ok().max_concurrent, 7);
    setup.flag("INSTANCE_NAME", "aws");
    assert_eq!(setup.ok().max_concurrent, 5);
}

#[test]
fn empty_values_count_as_unset_at_every_layer() {
    let mut setup = Setup::new();
    setup.file(None, "INSTANCE_NAME=vsphere\nLOG_LEVEL=debug\nWATCH_DIR=/q\n");
    setup.file(Some("vsphere"), "LOG_LEVEL=\nWATCH_DIR=\"\"\n");
    setup.env("LOG_LEVEL", "").env("WATCH_DIR", "").env("INSTANCE_NAME", "");
    // What systemd passes for `--log-level=${LOG_LEVEL}` when LOG_LEVEL is not set.
    setup.flag("LOG_LEVEL", "").flag("WATCH_DIR", "").flag("INSTANCE_NAME", "");
    let config = setup.ok();
    assert_eq!(config.log_level, LogLevel::Debug);
    assert_eq!(config.watch_dir, Path::new("/q"));
    assert_eq!(config.instance.as_deref(), Some("vsphere"));

    // And an empty value never replaces a built-in default either.
    let mut setup = Setup::new();
    setup.flag("LOG_LEVEL", "").flag("OUTPUT_DIR", "").env("POLL_INTERVAL", "");
    let config = setup.ok();
    assert_eq!(config.log_level, LogLevel::Info);
    assert_eq!(config.output_dir, Path::new("/var/lib/hyper2kvm/output"));
    assert_eq!(config.poll_interval, Duration::from_secs(5));
}

// ---- invalid values ----

#[test]
fn invalid_number_in_instance_file_names_key_file_line_and_range() {
    let mut setup = Setup::new();
    setup.flag("INSTANCE_NAME", "vsphere");
    let path = setup.file(Some("vsphere"), "# comment\nLOG_LEVEL=info\nPOLL_INTERVAL=abc\n");
    let err = setup.err();
    assert!(
        matches!(&err, ConfigError::Invalid { key: "POLL_INTERVAL", value, origin: Origin::File { line: 3, .. }, .. } if value == "abc"),
        "{err:?}"
    );
    assert_mentions(&err, &["POLL_INTERVAL", "\"abc\"", &format!("{}:3", path.display()), "0.05 to 3600"]);
}

#[test]
fn out_of_range_numbers_are_refused() {
    let setup = Setup::new();
    let path = setup.file(None, "MAX_CONCURRENT=999\n");
    let err = setup.err();
    assert!(matches!(err, ConfigError::Invalid { key: "MAX_CONCURRENT", .. }), "{err:?}");
    assert_mentions(&err, &["MAX_CONCURRENT", "999", &format!("{}:1", path.display()), "0 to 256"]);

    let setup = Setup::new();
    setup.file(None, "COMPRESS_LEVEL=12\n");
    let err = setup.err();
    assert!(matches!(err, ConfigError::Invalid { key: "COMPRESS_LEVEL", .. }), "{err:?}");
    assert_mentions(&err, &["COMPRESS_LEVEL", "12", "0 to 9"]);

    for (key, value, range) in [
        ("LEASE_SECONDS", "1", "3 to 86400"),
        ("CONVERSION_TIMEOUT", "0", "minutes from 0.01 to 10080"),
        ("POLL_INTERVAL", "-1", "0.05 to 3600"),
        ("POLL_INTERVAL", "NaN", "0.05 to 3600"),
        ("RETENTION_DAYS", "1.5", "0 to 36500"),
        ("CLEANUP_SOURCE", "maybe", "true or false"),
    ] {
        let err = with_env(key, value).unwrap_err();
        assert!(matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key), "{key}: {err:?}");
        assert_mentions(&err, &[key, value, "the environment", range]);
    }
}

#[test]
fn bad_log_level_from_environment() {
    let err = with_env("LOG_LEVEL", "loud").unwrap_err();
    assert!(matches!(&err, ConfigError::Invalid { key: "LOG_LEVEL", origin: Origin::Environment, .. }), "{err:?}");
    assert_mentions(&err, &["LOG_LEVEL", "\"loud\"", "the environment", "trace, debug, info, warn, error"]);
}

#[test]
fn relative_directories_are_refused() {
    for key in ["WATCH_DIR", "OUTPUT_DIR", "TEMP_DIR"] {
        let err = with_env(key, "relative/dir").unwrap_err();
        assert!(matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key), "{err:?}");
        assert_mentions(&err, &[key, "relative/dir", "absolute"]);
    }
}

#[test]
fn metrics_address_must_be_a_socket_address() {
    for bad in ["127.0.0.1", "localhost:abc", ":9109"] {
        let err = with_env("METRICS_ADDR", bad).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { key: "METRICS_ADDR", .. }), "{err:?}");
        assert_mentions(&err, &["METRICS_ADDR", bad, "127.0.0.1:9109"]);
    }
    let config = with_env("METRICS_ADDR", "127.0.0.1:9109").unwrap();
    assert_eq!(config.metrics_addr, Some("127.0.0.1:9109".parse().unwrap()));
    let config = with_env("METRICS_ADDR", "[::1]:9109").unwrap();
    assert_eq!(config.metrics_addr, Some("[::1]:9109".parse().unwrap()));
}

#[test]
fn unsafe_instance_names_are_refused() {
    for bad in ["../x", "a/b", ".hidden", "x y"] {
        let mut setup = Setup::new();
        setup.flag("INSTANCE_NAME", bad);
        let err = setup.err();
        assert!(
            matches!(&err, ConfigError::Invalid { key: "INSTANCE_NAME", value, origin: Origin::Flag, .. } if value == bad),
            "{bad}: {err:?}"
        );
        assert_mentions(&err, &["INSTANCE_NAME", bad, "the command line", "letters, digits"]);
    }
    let setup = Setup::new();
    let path = setup.file(None, "INSTANCE_NAME=../x\n");
    let err = setup.err();
    assert_mentions(&err, &["INSTANCE_NAME", "../x", &format!("{}:1", path.display())]);
}

#[test]
fn instance_name_set_inside_the_instance_file_is_checked_too() {
    let setup = Setup::new();
    setup.file(None, "INSTANCE_NAME=vsphere\n");
    let path = setup.file(Some("vsphere"), "INSTANCE_NAME=../../etc\n");
    let err = setup.err();
    assert!(matches!(err, ConfigError::Invalid { key: "INSTANCE_NAME", .. }), "{err:?}");
    assert_mentions(&err, &["../../etc", &format!("{}:1", path.display())]);
}

// ---- log levels ----

#[test]
fn log_levels_are_case_insensitive_and_accept_warning() {
    for (text, level) in [
        ("TRACE", LogLevel::Trace),
        ("Debug", LogLevel::Debug),
        ("info", LogLevel::Info),
        ("WARN", LogLevel::Warn),
        ("warning", LogLevel::Warn),
        ("Warning", LogLevel::Warn),
        ("ERROR", LogLevel::Error),
        (" error ", LogLevel::Error),
    ] {
        assert_eq!(with_env("LOG_LEVEL", text).unwrap().log_level, level, "{text:?}");
    }
    assert_eq!(LogLevel::parse("warning").map(LogLevel::as_str), Some("warn"));
    assert_eq!(LogLevel::parse("fatal"), None);
}

// ---- unknown keys ----

#[test]
fn unknown_keys_in_files_are_warned_about_not_fatal() {
    let mut setup = Setup::new();
    let base = setup.file(None, "# comment\nWATCH_DIRECTORY=/q\nLOG_LEVEL=debug\nFOO=\n");
    setup.env("SOME_OTHER_VAR", "x");
    let config = setup.ok();
    assert_eq!(config.log_level, LogLevel::Debug);
    assert_eq!(config.watch_dir, Path::new("/var/lib/hyper2kvm/queue"));
    assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);
    let first = format!("{}:2", base.display());
    let second = format!("{}:4", base.display());
    assert!(
        config.warnings.iter().any(|w| w.contains(&first) && w.contains("WATCH_DIRECTORY")),
        "{:?}",
        config.warnings
    );
    assert!(config.warnings.iter().any(|w| w.contains(&second) && w.contains("FOO")), "{:?}", config.warnings);
}

// ---- QEMU_CONVERT_OPTIONS ----

fn convert_options(text: &str) -> (ConvertOptions, Vec<String>) {
    let config = with_env("QEMU_CONVERT_OPTIONS", text).unwrap_or_else(|e| panic!("{text:?} refused: {e}"));
    (config.convert_options, config.warnings)
}

#[test]
fn convert_options_honoured_subset() {
    let (options, warnings) = convert_options("-O qcow2");
    assert_eq!(options, ConvertOptions { compress: false, compression_type: CompressionType::Zlib, progress: false });
    assert!(warnings.is_empty(), "{warnings:?}");

    let (options, warnings) = convert_options("-O qcow2 -c -p");
    assert_eq!(options, ConvertOptions { compress: true, compression_type: CompressionType::Zlib, progress: true });
    assert!(warnings.is_empty(), "{warnings:?}");

    let (options, warnings) = convert_options("-c -o compression_type=zstd");
    assert_eq!(options, ConvertOptions { compress: true, compression_type: CompressionType::Zstd, progress: false });
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn convert_options_that_would_break_the_contract_are_refused() {
    let err = with_env("QEMU_CONVERT_OPTIONS", "-O raw").unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { key: "QEMU_CONVERT_OPTIONS", .. }), "{err:?}");
    assert_mentions(&err, &["QEMU_CONVERT_OPTIONS", "-O raw", "-O qcow2", "the environment"]);

    let setup = Setup::new();
    let path = setup.file(None, "QEMU_CONVERT_OPTIONS=\"-c -o compression_type=lz4\"\n");
    let err = setup.err();
    assert!(matches!(err, ConfigError::Invalid { key: "QEMU_CONVERT_OPTIONS", .. }), "{err:?}");
    assert_mentions(&err, &["compression_type=lz4", "zlib", "zstd", &format!("{}:1", path.display())]);

    assert!(with_env("QEMU_CONVERT_OPTIONS", "-O").is_err());
    assert!(with_env("QEMU_CONVERT_OPTIONS", "-c -o").is_err());
}

#[test]
fn unhonoured_convert_options_are_warnings() {
    let (options, warnings) = convert_options("-W -m 16");
    assert_eq!(options, ConvertOptions { compress: false, compression_type: CompressionType::Zlib, progress: false });
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("-W"), "{warnings:?}");
    assert!(warnings[1].contains("-m 16"), "{warnings:?}");
    assert!(warnings.iter().all(|w| w.contains("QEMU_CONVERT_OPTIONS")), "{warnings:?}");

    let (options, warnings) = convert_options("-o compression_type=zstd,cluster_size=2M");
    assert_eq!(options.compression_type, CompressionType::Zstd);
    assert!(!options.compress);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("cluster_size=2M"), "{warnings:?}");
}

#[test]
fn parse_convert_options_directly() {
    let (options, ignored) = parse_convert_options("-p -t none -O qcow2 -c").unwrap();
    assert!(options.compress && options.progress);
    assert_eq!(ignored, vec!["-t none".to_string()]);
    let (_, ignored) = parse_convert_options("").unwrap();
    assert!(ignored.is_empty());
    // A trailing option that wants an argument is still just one warning.
    let (_, ignored) = parse_convert_options("-m").unwrap();
    assert_eq!(ignored, vec!["-m".to_string()]);
}

// ---- MAX_CONCURRENT, syntax errors, SOURCE_ROOTS ----

#[test]
fn zero_max_concurrent_means_number_of_cpus() {
    let config = with_env("MAX_CONCURRENT", "0").unwrap();
    assert!(config.max_concurrent >= 1);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    assert_eq!(config.max_concurrent, cpus);
    assert_eq!(with_env("MAX_CONCURRENT", "16").unwrap().max_concurrent, 16);
}

#[test]
fn syntax_error_names_the_file() {
    let setup = Setup::new();
    let path = setup.file(None, "LOG_LEVEL=info\nthis is not an assignment\n");
    let err = setup.err();
    assert!(matches!(&err, ConfigError::Syntax { path: p, source } if *p == path && source.line == 2), "{err:?}");
    assert_mentions(&err, &[&path.display().to_string(), "line 2"]);

    let mut setup = Setup::new();
    setup.flag("INSTANCE_NAME", "vsphere");
    let path = setup.file(Some("vsphere"), "POLL_INTERVAL=\"5\n");
    let err = setup.err();
    assert!(matches!(&err, ConfigError::Syntax { path: p, .. } if *p == path), "{err:?}");
    assert_mentions(&err, &[&path.display().to_string(), "quote"]);
}

#[test]
fn source_roots_are_colon_separated_absolute_directories() {
    let config = with_env("SOURCE_ROOTS", "/a:/b").unwrap();
    assert_eq!(config.source_roots, paths(&["/a", "/b"]));
    let config = with_env("SOURCE_ROOTS", "/nfs/exports:").unwrap();
    assert_eq!(config.source_roots, paths(&["/nfs/exports"]));

    for bad in ["/a:relative", "relative", ":"] {
        let err = with_env("SOURCE_ROOTS", bad).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { key: "SOURCE_ROOTS", .. }), "{bad:?}: {err:?}");
        assert_mentions(&err, &["SOURCE_ROOTS", bad, "absolute"]);
    }
}

#[test]
fn config_dir_falls_back_to_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hyper2kvm.conf"), "MAX_CONCURRENT=3\n").unwrap();
    let mut env = BTreeMap::new();
    env.insert("HYPER2KVM_CONFIG_DIR".to_string(), dir.path().display().to_string());
    let config = Config::load(&Overrides::default(), &env).unwrap();
    assert_eq!(config.max_concurrent, 3);
}

/// The example files shipped in conf.d/ (installed to /etc/hyper2kvm as conffiles).
fn shipped_conf(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf.d").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const SHIPPED: [&str; 3] = ["hyper2kvm.conf", "hyper2kvm-vsphere.conf", "hyper2kvm-aws.conf"];

#[test]
fn shipped_examples_show_every_key() {
    for name in SHIPPED {
        let text = shipped_conf(name);
        for key in KNOWN_KEYS {
            let shown = text.lines().any(|l| l.trim_start_matches('#').starts_with(&format!("{key}=")));
            assert!(shown, "conf.d/{name} does not show {key}");
        }
    }
}

#[test]
fn shipped_examples_load_as_they_are_and_with_every_line_uncommented() {
    for uncomment in [false, true] {
        let mut setup = Setup::new();
        for name in SHIPPED {
            let mut text = shipped_conf(name);
            if uncomment {
                // Every `#KEY=value` example must be a valid value, not a trap for whoever
                // uncomments it. INSTANCE_NAME stays the unit's business.
                text = text
                    .lines()
                    .map(|l| match l.strip_prefix('#') {
                        Some(rest) if rest.starts_with(|c: char| c.is_ascii_uppercase()) && rest.contains('=') => {
                            if rest.starts_with("INSTANCE_NAME=") {
                                l
                            } else {
                                rest
                            }
                        }
                        _ => l,
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
            }
            let instance = name.strip_prefix("hyper2kvm-").and_then(|n| n.strip_suffix(".conf"));
            setup.file(instance, &text);
        }
        for instance in ["vsphere", "aws"] {
            setup.flags.clear();
            setup.flag("INSTANCE_NAME", instance);
            let config = setup.load().unwrap_or_else(|e| panic!("{instance} (uncommented: {uncomment}): {e}"));
            assert!(config.warnings.is_empty(), "{instance}: {:?}", config.warnings);
            if !uncomment {
                assert_eq!(config.watch_dir, Path::new(DEFAULT_STATE_ROOT).join(instance).join("queue"));
                assert_eq!(config.output_dir, Path::new(DEFAULT_STATE_ROOT).join(instance).join("output"));
            }
        }
    }
}

#[test]
fn under_systemd_an_invalid_value_names_its_file_not_the_environment() {
    // EnvironmentFile= puts the file's values in the environment too; the error must still
    // point at the file and line, where the operator can fix it.
    let mut setup = Setup::new();
    let path = setup.file(Some("bad"), "# comment\nPOLL_INTERVAL=soon\n");
    setup.env("POLL_INTERVAL", "soon").flag("INSTANCE_NAME", "bad");
    match setup.load() {
        Err(ConfigError::Invalid { key: "POLL_INTERVAL", origin: Origin::File { path: p, line: 2 }, .. }) => {
            assert_eq!(p, path)
        }
        other => panic!("{other:?}"),
    }
    // A different value in the environment is the environment's.
    setup.env("POLL_INTERVAL", "later");
    match setup.load() {
        Err(ConfigError::Invalid { origin: Origin::Environment, .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// HyperSDK's units set HYPER2KVM_WATCH_DIR / HYPER2KVM_OUTPUT_DIR. Every key has that
/// prefixed name, ranked above the defaults and below the files, the plain variable and flags.
#[test]
fn prefixed_variables_rank_above_defaults_and_below_everything_else() {
    let mut setup = Setup::new();
    setup.env("HYPER2KVM_WATCH_DIR", "/srv/q").env("HYPER2KVM_OUTPUT_DIR", "/srv/out");
    setup.env("HYPER2KVM_POLL_INTERVAL", "7");
    let config = setup.ok();
    assert_eq!(config.watch_dir, PathBuf::from("/srv/q"));
    assert_eq!(config.output_dir, PathBuf::from("/srv/out"));
    assert_eq!(config.poll_interval, Duration::from_secs(7));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);

    // The plain variable wins, and the prefixed one that lost is said.
    setup.env("WATCH_DIR", "/plain/q");
    let config = setup.ok();
    assert_eq!(config.watch_dir, PathBuf::from("/plain/q"));
    assert_eq!(config.output_dir, PathBuf::from("/srv/out"));
    assert!(
        config.warnings.iter().any(|w| w.contains("HYPER2KVM_WATCH_DIR=\"/srv/q\"") && w.contains("the environment")),
        "{:?}",
        config.warnings
    );

    // A file wins over the prefixed variable, as it would when systemd exports it.
    setup.file(None, "OUTPUT_DIR=/file/out\n");
    assert_eq!(setup.ok().output_dir, PathBuf::from("/file/out"));
    // And a flag over everything.
    setup.flag("OUTPUT_DIR", "/flag/out");
    assert_eq!(setup.ok().output_dir, PathBuf::from("/flag/out"));

    // An invalid prefixed value names the variable it came from; an empty one is unset.
    let err = with_env("HYPER2KVM_POLL_INTERVAL", "soon").unwrap_err();
    assert!(err.to_string().contains("the environment variable HYPER2KVM_POLL_INTERVAL"), "{err}");
    assert_eq!(with_env("HYPER2KVM_WATCH_DIR", "").unwrap().watch_dir, PathBuf::from("/var/lib/hyper2kvm/queue"));
}

#[test]
fn virtio_win_must_be_an_existing_readable_iso_or_directory() {
    assert_eq!(with_env("VIRTIO_WIN", "").unwrap().virtio_win, None);
    assert_eq!(Setup::new().ok().virtio_win, None);
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("virtio-win.iso");
    std::fs::write(&iso, b"CD001").unwrap();
    for path in [iso.clone(), dir.path().to_path_buf()] {
        let config = with_env("VIRTIO_WIN", path.to_str().unwrap()).unwrap();
        assert_eq!(config.virtio_win, Some(path));
    }
    let missing = dir.path().join("virtio-win-0.1.240.iso");
    let err = with_env("VIRTIO_WIN", missing.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.starts_with("invalid VIRTIO_WIN="), "{err}");
    assert!(
        err.contains("expected the absolute path of a readable virtio-win ISO or directory (No such file"),
        "{err}"
    );
    let err = with_env("VIRTIO_WIN", "virtio-win.iso").unwrap_err().to_string();
    assert!(err.contains("(the path is relative)"), "{err}");
}
