//! Python's `re` where the regex nodes rely on it, on fancy-regex (which has Python's
//! backreferences and lookaround): the `IGNORECASE`, `MULTILINE` and `DOTALL` flags; `$` (end, or
//! before a final newline), `\Z`, `(?P=name)` and a `[` inside a class written as Python reads
//! them; `search`, and `finditer`/`sub` with Python 3.7's empty matches (one may follow a
//! non-empty match, never another empty one at the same place); `sub`'s template (`\1`, `\g<n>`,
//! `\g<name>`, escapes, octal), checked before anything is replaced.
//!
//! Known differences: patterns only Python accepts (`a{` as a literal, the `(?a)`/`(?L)` flags,
//! conditionals `(?(1)…)`) are refused as bad patterns, and a lazy pattern that matched empty is
//! tried again one character on, where Python first looks for a longer match at the same place.

use fancy_regex::{Captures, Regex};

/// Python's `re.error`: a bad pattern or template, or a pattern that backtracks without end.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReError(String);

pub struct PythonRegex {
    regex: Regex,
}

impl PythonRegex {
    /// `re.compile(pattern, flags)`.
    pub fn new(pattern: &str, ignore_case: bool, multiline: bool, dot_all: bool) -> Result<Self, ReError> {
        let flags: String = [(ignore_case, 'i'), (multiline, 'm'), (dot_all, 's')]
            .iter()
            .filter_map(|&(on, flag)| on.then_some(flag))
            .collect();
        let flags = if flags.is_empty() {
            String::new()
        } else {
            format!("(?{flags})")
        };
        let regex = Regex::new(&format!("{flags}{}", translate(pattern, multiline)))
            .map_err(|error| ReError(error.to_string()))?;
        Ok(PythonRegex { regex })
    }

    /// The number of groups (Python's `len(match.groups())`).
    pub fn groups(&self) -> usize {
        self.regex.captures_len() - 1
    }

    /// `re.search`: the first match.
    pub fn search<'t>(&self, text: &'t str) -> Result<Option<Captures<'t>>, ReError> {
        self.regex.captures(text).map_err(|error| ReError(error.to_string()))
    }

    /// `re.finditer`: every match, as Python finds them; at most `limit` (0: all).
    pub fn find_all<'t>(&self, text: &'t str, limit: usize) -> Result<Vec<Captures<'t>>, ReError> {
        let mut found = Vec::new();
        let mut position = 0;
        let mut previous_empty_at = None;
        while position <= text.len() && (limit == 0 || found.len() < limit) {
            let captures = self
                .regex
                .captures_from_pos(text, position)
                .map_err(|error| ReError(error.to_string()))?;
            let Some(captures) = captures else {
                break;
            };
            let whole = captures.get(0).map_or(position..position, |m| m.range());
            if whole.is_empty() && previous_empty_at == Some(whole.start) {
                match next_boundary(text, whole.start) {
                    Some(next) => position = next,
                    None => break,
                }
                continue;
            }
            position = whole.end;
            previous_empty_at = whole.is_empty().then_some(whole.end);
            found.push(captures);
        }
        Ok(found)
    }

    /// `re.sub(pattern, template, text, count)`.
    pub fn sub(&self, text: &str, template: &str, count: usize) -> Result<String, ReError> {
        let template = Template::parse(template, self)?;
        let mut out = String::with_capacity(text.len());
        let mut copied_up_to = 0;
        for captures in self.find_all(text, count)? {
            let Some(whole) = captures.get(0) else {
                continue;
            };
            out.push_str(&text[copied_up_to..whole.start()]);
            template.expand(&captures, &mut out);
            copied_up_to = whole.end();
        }
        out.push_str(&text[copied_up_to..]);
        Ok(out)
    }
}

/// The byte offset of the character after the one at `at`, `None` at the end.
fn next_boundary(text: &str, at: usize) -> Option<usize> {
    text[at..].chars().next().map(|c| at + c.len_utf8())
}

/// The pattern in fancy-regex's syntax (see the module documentation).
fn translate(pattern: &str, multiline: bool) -> String {
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars().peekable();
    // Inside a class: how many characters of it have been read (a `]` first is literal).
    let mut class: Option<usize> = None;
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('Z') if class.is_none() => out.push_str(r"\z"),
                Some(escaped) => {
                    out.push('\\');
                    out.push(escaped);
                }
                None => out.push('\\'),
            }
            class = class.map(|read| read + 1);
            continue;
        }
        match class {
            Some(read) => {
                match c {
                    ']' if read > 0 => {
                        out.push(']');
                        class = None;
                        continue;
                    }
                    '^' if read == 0 => {
                        out.push('^');
                        continue;
                    }
                    // Literal in Python; set syntax in fancy-regex.
                    '[' | '&' | '~' => {
                        out.push('\\');
                        out.push(c);
                    }
                    _ => out.push(c),
                }
                class = Some(read + 1);
            }
            None => match c {
                '[' => {
                    out.push('[');
                    class = Some(0);
                }
                '$' if !multiline => out.push_str(r"(?=\n?\z)"),
                '(' if pattern_continues(&mut chars, "?P=") => {
                    let name: String = chars.by_ref().take_while(|&c| c != ')').collect();
                    out.push_str(&format!(r"\k<{name}>"));
                }
                _ => out.push(c),
            },
        }
    }
    out
}

/// Whether `chars` continue with `text`; if they do, they are consumed.
fn pattern_continues(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, text: &str) -> bool {
    let ahead: String = chars.clone().take(text.chars().count()).collect();
    if ahead != text {
        return false;
    }
    for _ in text.chars() {
        chars.next();
    }
    true
}

/// A parsed `sub` template.
struct Template {
    parts: Vec<TemplatePart>,
}

enum TemplatePart {
    Text(String),
    Group(usize),
}

impl Template {
    /// Python's `_parser.parse_template`: escapes resolved, group references checked.
    fn parse(template: &str, regex: &PythonRegex) -> Result<Template, ReError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let chars: Vec<char> = template.chars().collect();
        let mut index = 0;
        let group = |text: &mut String, parts: &mut Vec<TemplatePart>, number: usize| {
            if !text.is_empty() {
                parts.push(TemplatePart::Text(std::mem::take(text)));
            }
            parts.push(TemplatePart::Group(number));
        };
        while index < chars.len() {
            let c = chars[index];
            index += 1;
            if c != '\\' {
                text.push(c);
                continue;
            }
            let Some(&escaped) = chars.get(index) else {
                return Err(ReError("bad escape (end of pattern)".into()));
            };
            index += 1;
            let octal = |c: Option<&char>| c.is_some_and(|c| ('0'..='7').contains(c));
            match escaped {
                'g' => {
                    if chars.get(index) != Some(&'<') {
                        return Err(ReError("missing <".into()));
                    }
                    let end = chars[index..]
                        .iter()
                        .position(|&c| c == '>')
                        .ok_or_else(|| ReError("missing >, unterminated name".into()))?;
                    let name: String = chars[index + 1..index + end].iter().collect();
                    index += end + 1;
                    let number = match name.parse::<usize>() {
                        Ok(number) => number,
                        Err(_) => regex
                            .regex
                            .capture_names()
                            .position(|group| group == Some(name.as_str()))
                            .ok_or_else(|| ReError(format!("unknown group name '{name}'")))?,
                    };
                    if number > regex.groups() {
                        return Err(ReError(format!("invalid group reference {number}")));
                    }
                    group(&mut text, &mut parts, number);
                }
                '0' => {
                    // Up to two more octal digits.
                    let mut value = 0u32;
                    for _ in 0..2 {
                        if !octal(chars.get(index)) {
                            break;
                        }
                        value = value * 8 + chars[index].to_digit(8).unwrap_or(0);
                        index += 1;
                    }
                    text.push(char::from_u32(value).unwrap_or('\0'));
                }
                '1'..='9' => {
                    let first = escaped.to_digit(10).unwrap_or(0) as usize;
                    let next = chars.get(index).and_then(|c| c.to_digit(10));
                    if octal(Some(&escaped)) && octal(chars.get(index)) && octal(chars.get(index + 1)) {
                        let digits: String = chars[index - 1..index + 2].iter().collect();
                        let value = u32::from_str_radix(&digits, 8).unwrap_or(0);
                        if value > 0o377 {
                            return Err(ReError(format!(
                                r"octal escape value \{digits} outside of range 0-0o377"
                            )));
                        }
                        index += 2;
                        text.push(char::from_u32(value).unwrap_or('\0'));
                        continue;
                    }
                    let number = match next {
                        Some(second) => {
                            index += 1;
                            first * 10 + second as usize
                        }
                        None => first,
                    };
                    if number > regex.groups() {
                        return Err(ReError(format!("invalid group reference {number}")));
                    }
                    group(&mut text, &mut parts, number);
                }
                'a' => text.push('\u{7}'),
                'b' => text.push('\u{8}'),
                'f' => text.push('\u{c}'),
                'n' => text.push('\n'),
                'r' => text.push('\r'),
                't' => text.push('\t'),
                'v' => text.push('\u{b}'),
                '\\' => text.push('\\'),
                letter if letter.is_ascii_alphabetic() => {
                    return Err(ReError(format!(r"bad escape \{letter}")));
                }
                other => {
                    text.push('\\');
                    text.push(other);
                }
            }
        }
        if !text.is_empty() {
            parts.push(TemplatePart::Text(text));
        }
        Ok(Template { parts })
    }

    /// The replacement for one match; a group that took no part gives nothing.
    fn expand(&self, captures: &Captures, out: &mut String) {
        for part in &self.parts {
            match part {
                TemplatePart::Text(text) => out.push_str(text),
                TemplatePart::Group(number) => {
                    if let Some(group) = captures.get(*number) {
                        out.push_str(group.as_str());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_semantics() {
        let any_x = PythonRegex::new("x*", false, false, false).unwrap();
        assert_eq!(any_x.sub("abxd", "-", 0).unwrap(), "-a-b--d-");
        let line_end = PythonRegex::new("line$", false, false, false).unwrap();
        assert!(line_end.search("last line\n").unwrap().is_some());
        let repeated = PythonRegex::new(r"(?P<word>\w+) (?P=word)", false, false, false).unwrap();
        assert_eq!(repeated.sub("aaa aaa bbb", r"<\g<word>\1>", 0).unwrap(), "<aaaaaa> bbb");
        let class = PythonRegex::new("[[&]+", false, false, false).unwrap();
        assert_eq!(class.sub("a[&b", "-", 0).unwrap(), "a-b");
        assert!(any_x.sub("abc", r"\q", 0).is_err());
        assert!(any_x.sub("abc", r"\1", 0).is_err());
        assert_eq!(any_x.sub("", r"\101\&", 0).unwrap(), r"A\&");
    }
}
