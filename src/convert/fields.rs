//! The human form of `inspect` (of an image, and of a guest): a JSON description printed as
//! indented `key: value` lines, or as pretty JSON with `--json`. It formats and prints to
//! stdout; it reads nothing and knows nothing of what it describes.

use std::fmt::Write;

/// Appends one line; writing to a `String` cannot fail.
macro_rules! put {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Keys shown first, in this order, by the human form of `inspect`; the others follow
/// alphabetically.
const FIRST_KEYS: &[&str] = &[
    "format",
    "subformat",
    "virtual_size",
    "allocated_bytes",
    "disk",
    "type",
    "access",
    "file",
    "sectors",
    "bytes",
    "virtual_offset",
    "file_offset",
    "ovf",
    "hardware",
    "disks",
    "disk_id",
    "href",
    "capacity_bytes",
    "extents",
    "chain",
    "referenced_files",
];

/// Prints what `inspect` found: pretty JSON with `--json`, else [`render`]'s lines.
pub fn print(value: &impl serde::Serialize, json: bool) -> Result<(), serde_json::Error> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", render(&serde_json::to_value(value)?));
    }
    Ok(())
}

/// A JSON description as indented `key: value` lines: the main facts first, sizes also in
/// binary units, empty lists as `none`.
pub fn render(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_fields(&mut out, value, "");
    out
}

fn write_fields(out: &mut String, value: &serde_json::Value, indent: &str) {
    match value {
        serde_json::Value::Object(map) => {
            let rank = |key: &str| FIRST_KEYS.iter().position(|k| *k == key).unwrap_or(FIRST_KEYS.len());
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by_key(|k| (rank(k), k.as_str()));
            for key in keys {
                let v = &map[key];
                match v {
                    serde_json::Value::Null => {}
                    serde_json::Value::Array(a) if a.is_empty() => put!(out, "{indent}{key}: none"),
                    serde_json::Value::Object(o) if o.is_empty() => put!(out, "{indent}{key}: none"),
                    serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
                        put!(out, "{indent}{key}:");
                        write_fields(out, v, &format!("{indent}  "));
                    }
                    serde_json::Value::Number(n) if is_size(key) && n.as_u64().is_some_and(|n| n >= 1024) => {
                        put!(out, "{indent}{key}: {n} ({})", binary_size(n.as_u64().unwrap_or_default()));
                    }
                    _ => put!(out, "{indent}{key}: {}", scalar(v)),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if item.is_object() || item.is_array() {
                    put!(out, "{indent}- [{i}]");
                    write_fields(out, item, &format!("{indent}  "));
                } else {
                    put!(out, "{indent}- {}", scalar(item));
                }
            }
        }
        other => put!(out, "{indent}{}", scalar(other)),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn is_size(key: &str) -> bool {
    key == "virtual_size" || key == "bytes" || key.ends_with("_bytes")
}

/// `1.5 GiB`: two decimals at most, trailing zeros dropped.
fn binary_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_facts_come_first_sizes_in_binary_units_and_empty_lists_as_none() {
        let value = serde_json::json!({
            "chain": [],
            "ddb": {"ddb.adapterType": "lsilogic"},
            "virtual_size": 1610612736u64,
            "format": "vmdk",
        });
        assert_eq!(
            render(&value),
            "format: vmdk\nvirtual_size: 1610612736 (1.5 GiB)\nchain: none\nddb:\n  ddb.adapterType: lsilogic\n"
        );
    }
}
