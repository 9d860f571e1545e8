//! Untrusted names and lists put into messages, bounded: an `.error` line or a log line must
//! stay readable whatever an archive or a manifest holds (an OVA with 2000 `.ovf` members once
//! made an 8 MB `.error` line).
//!
//! It only bounds and formats; any message that carries an untrusted name or list goes through
//! it.

use std::borrow::Cow;
use std::fmt::Display;

/// Items a message lists before "and N more".
pub(crate) const MAX_LISTED: usize = 5;

/// Characters of one name shown in a message; longer ones are cut with `…`.
pub(crate) const MAX_NAME_CHARS: usize = 120;

/// `a, b, c, d, e and 1995 more`: the first `max` items (each cut by [`shorten`]), then how
/// many were left out; `none` for no items.
pub(crate) fn capped_list<I>(items: I, max: usize) -> String
where
    I: IntoIterator,
    I::Item: Display,
{
    let mut shown = Vec::new();
    let mut more = 0usize;
    for item in items {
        if shown.len() < max {
            shown.push(shorten(&item.to_string()).into_owned());
        } else {
            more += 1;
        }
    }
    match (shown.is_empty(), more) {
        (true, 0) => "none".to_owned(),
        (true, n) => format!("{n} not shown"),
        (false, 0) => shown.join(", "),
        (false, n) => format!("{} and {n} more", shown.join(", ")),
    }
}

/// `name` cut to [`MAX_NAME_CHARS`] characters, with `…` where it was cut.
pub(crate) fn shorten(name: &str) -> Cow<'_, str> {
    match name.char_indices().nth(MAX_NAME_CHARS) {
        None => Cow::Borrowed(name),
        Some((at, _)) => Cow::Owned(format!("{}…", &name[..at])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_cut_and_counted() {
        assert_eq!(capped_list(Vec::<String>::new(), 5), "none");
        assert_eq!(capped_list(["a", "b"], 5), "a, b");
        let many: Vec<String> = (0..2000).map(|n| format!("vm{n}.ovf")).collect();
        assert_eq!(capped_list(&many, 3), "vm0.ovf, vm1.ovf, vm2.ovf and 1997 more");
        assert_eq!(capped_list(["a", "b"], 0), "2 not shown");
    }

    #[test]
    fn long_names_are_cut_on_a_character_boundary() {
        let long = "é".repeat(5000);
        let cut = shorten(&long);
        assert_eq!(cut.chars().count(), MAX_NAME_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(shorten("short"), "short");
        assert!(capped_list([long.as_str()], 5).len() < 400);
    }
}
