//! Python's `str` where the string nodes rely on it: slices by code point with negative and
//! out-of-range bounds, `strip`'s idea of white space, and `capitalize`/`title` with title-case
//! letters and the final-sigma rule. Upper and lower case are Rust's full Unicode mappings, as
//! Python's are. (Rust has no title-case mapping: the letters whose title case is not their upper
//! case — digraphs, ligatures, `ß` — are listed here, Greek with a subscript iota aside.)

/// `text[start:end]`.
pub fn slice(text: &str, start: i64, end: i64) -> String {
    let length = text.chars().count() as i64;
    let bound = |index: i64| {
        if index < 0 {
            (index + length).max(0)
        } else {
            index.min(length)
        }
    };
    let (start, end) = (bound(start), bound(end));
    if start >= end {
        return String::new();
    }
    text.chars().skip(start as usize).take((end - start) as usize).collect()
}

/// `str.isspace` of one character: Unicode white space and the separators U+001C–U+001F.
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.capitalize()`: the first character in title case, the others in lower case.
pub fn capitalize(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (index, &c) in chars.iter().enumerate() {
        if index == 0 {
            push_title(&mut out, c);
        } else {
            push_lower(&mut out, &chars, index);
        }
    }
    out
}

/// `str.title()`: a character after a cased one in lower case, any other in title case.
pub fn title(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut previous_is_cased = false;
    for (index, &c) in chars.iter().enumerate() {
        if previous_is_cased {
            push_lower(&mut out, &chars, index);
        } else {
            push_title(&mut out, c);
        }
        previous_is_cased = is_cased(c);
    }
    out
}

/// Whether `c` has case (Unicode's `Cased`: upper, lower or title case).
fn is_cased(c: char) -> bool {
    c.is_uppercase() || c.is_lowercase() || title_case(c).is_some_and(|title| title == c.to_string())
}

/// The lower case of `chars[index]`; a capital sigma is final (ς) after a cased letter and
/// before none.
fn push_lower(out: &mut String, chars: &[char], index: usize) {
    let c = chars[index];
    if c == 'Σ' {
        let after_cased = index > 0 && is_cased(chars[index - 1]);
        let before_cased = chars.get(index + 1).is_some_and(|&next| is_cased(next));
        out.push(if after_cased && !before_cased { 'ς' } else { 'σ' });
    } else {
        out.extend(c.to_lowercase());
    }
}

fn push_title(out: &mut String, c: char) {
    match title_case(c) {
        Some(title) => out.push_str(title),
        None => out.extend(c.to_uppercase()),
    }
}

/// The title case of the letters whose title case is not their upper case.
fn title_case(c: char) -> Option<&'static str> {
    Some(match c {
        'ß' => "Ss",
        'ŉ' => "ʼN",
        'Ǆ' | 'ǅ' | 'ǆ' => "ǅ",
        'Ǉ' | 'ǈ' | 'ǉ' => "ǈ",
        'Ǌ' | 'ǋ' | 'ǌ' => "ǋ",
        'Ǳ' | 'ǲ' | 'ǳ' => "ǲ",
        'և' => "Եւ",
        'ﬀ' => "Ff",
        'ﬁ' => "Fi",
        'ﬂ' => "Fl",
        'ﬃ' => "Ffi",
        'ﬄ' => "Ffl",
        'ﬅ' | 'ﬆ' => "St",
        'ﬓ' => "Մն",
        'ﬔ' => "Մե",
        'ﬕ' => "Մի",
        'ﬖ' => "Վն",
        'ﬗ' => "Մխ",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_string_methods() {
        assert_eq!(slice("hello", -3, 100), "llo");
        assert_eq!(slice("hello", 4, 1), "");
        assert_eq!(slice("ǆemal", 0, 2), "ǆe");
        assert_eq!(title("they're bill's 1st ǆemal ﬁnal"), "They'Re Bill'S 1St ǅemal Final");
        assert_eq!(capitalize("ΣΑΣ straße"), "Σας straße");
        assert_eq!(title("ΣΑΣ"), "Σας");
        assert!(is_space('\u{1f}') && is_space('\u{a0}') && !is_space('x'));
    }
}
