//! systemd `EnvironmentFile=` syntax, so one file serves both systemd and the binary run by hand.
//!
//! Supported: `KEY=value`, blank lines, `#` and `;` comments, optional double or single quotes
//! around the value (with `\"`, `\\` and `\n` escapes inside double quotes), white space around
//! the key and the value, and a trailing `\` that continues a line.
//!
//! It only parses text: it reads no file and no environment, and knows no key; layering and
//! validation are [`super`]'s.

use thiserror::Error;

/// One assignment and the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The name left of `=`, white space trimmed.
    pub key: String,
    /// The value right of `=`, unquoted and unescaped; may be empty.
    pub value: String,
    /// 1-based line number where the assignment starts.
    pub line: usize,
}

/// A line that is not an assignment.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("line {line}: {problem}")]
pub struct SyntaxError {
    /// 1-based line number where the bad assignment starts.
    pub line: usize,
    /// What is wrong, for the message (`expected KEY=value`, `unterminated quote`, …).
    pub problem: String,
}

/// Parses the text of an environment file.
pub fn parse(text: &str) -> Result<Vec<Assignment>, SyntaxError> {
    let mut out = Vec::new();
    let mut pending = String::new();
    let mut pending_start = 0;
    for (index, raw_line) in text.lines().enumerate() {
        let line_no = index + 1;
        if pending.is_empty() {
            pending_start = line_no;
        }
        if let Some(stripped) = raw_line.strip_suffix('\\') {
            pending.push_str(stripped);
            continue;
        }
        pending.push_str(raw_line);
        let logical = std::mem::take(&mut pending);
        if let Some(assignment) = parse_line(&logical, pending_start)? {
            out.push(assignment);
        }
    }
    if !pending.is_empty() {
        if let Some(assignment) = parse_line(&pending, pending_start)? {
            out.push(assignment);
        }
    }
    Ok(out)
}

fn parse_line(line: &str, line_no: usize) -> Result<Option<Assignment>, SyntaxError> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
        return Ok(None);
    }
    let error = |problem: &str| SyntaxError { line: line_no, problem: problem.to_owned() };
    let (key, value) = trimmed.split_once('=').ok_or_else(|| error("expected KEY=value"))?;
    let key = key.trim();
    let valid_key = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid_key {
        return Err(error("the key must be letters, digits and '_'"));
    }
    let value = unquote(value.trim()).ok_or_else(|| error("unterminated quote"))?;
    Ok(Some(Assignment { key: key.to_owned(), value, line: line_no }))
}

fn unquote(value: &str) -> Option<String> {
    let quote = match value.chars().next() {
        Some(q @ ('"' | '\'')) => q,
        _ => return Some(value.to_owned()),
    };
    if value.len() < 2 || !value.ends_with(quote) {
        return None;
    }
    let inner = &value[1..value.len() - 1];
    if quote == '\'' {
        return Some(inner.to_owned());
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap().into_iter().map(|a| (a.key, a.value)).collect()
    }

    #[test]
    fn reads_plain_quoted_and_commented_lines() {
        let text = "# comment\n; also\n\nWATCH_DIR=/q\n  LOG_LEVEL = debug \nQEMU_CONVERT_OPTIONS=\"-O qcow2 -c\"\nX='a \"b\"'\nEMPTY=\n";
        assert_eq!(
            kv(text),
            vec![
                ("WATCH_DIR".into(), "/q".into()),
                ("LOG_LEVEL".into(), "debug".into()),
                ("QEMU_CONVERT_OPTIONS".into(), "-O qcow2 -c".into()),
                ("X".into(), "a \"b\"".into()),
                ("EMPTY".into(), "".into()),
            ]
        );
    }

    #[test]
    fn handles_escapes_and_continuations() {
        assert_eq!(kv("A=\"x\\\"y\\\\z\"\n"), vec![("A".into(), "x\"y\\z".into())]);
        assert_eq!(kv("A=one \\\ntwo\n"), vec![("A".into(), "one two".into())]);
    }

    #[test]
    fn reports_line_numbers_of_bad_lines() {
        assert_eq!(parse("A=1\nnot an assignment\n").unwrap_err().line, 2);
        assert_eq!(parse("A=\"open\n").unwrap_err().line, 1);
        assert_eq!(parse("1A=x\n").unwrap_err().line, 1);
    }
}
