//! GPT-2 style pre-tokenization, written out by hand because the pattern's look-ahead
//! (`\s+(?!\S)`) is not supported by the `regex` crate.
//!
//! Pattern: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
//! With `split_digits` (SmolLM), every digit is its own piece first, as Hugging Face's
//! `Digits(individual_digits=true)` pre-tokenizer does.

fn is_letter(c: char) -> bool {
    c.is_alphabetic()
}

fn is_number(c: char) -> bool {
    c.is_numeric()
}

fn is_other(c: char) -> bool {
    !c.is_whitespace() && !is_letter(c) && !is_number(c)
}

/// Splits `text` into pieces, each of which is then BPE-encoded on its own.
pub fn pretokenize(text: &str, split_digits: bool) -> Vec<&str> {
    let mut out = Vec::new();
    if split_digits {
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if is_number(c) {
                if start < i {
                    gpt2_split(&text[start..i], &mut out);
                }
                out.push(&text[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        if start < text.len() {
            gpt2_split(&text[start..], &mut out);
        }
    } else {
        gpt2_split(text, &mut out);
    }
    out
}

fn gpt2_split<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let byte_at = |i: usize| if i < n { chars[i].0 } else { text.len() };
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // contractions
        if c == '\'' && i + 1 < n {
            let rest = &text[chars[i + 1].0..];
            let len = ["s", "t", "re", "ve", "m", "ll", "d"]
                .iter()
                .find(|s| rest.starts_with(**s))
                .map(|s| s.len());
            if let Some(l) = len {
                out.push(&text[chars[i].0..chars[i + 1].0 + l]);
                i += 1 + l; // contraction suffixes are ASCII
                continue;
            }
        }
        let next = chars.get(i + 1).map(|x| x.1);
        let lead_space = c == ' ' && next.is_some();
        let (class_start, class_char) = if lead_space {
            (i + 1, next.unwrap_or(' '))
        } else {
            (i, c)
        };
        let class: Option<fn(char) -> bool> = if is_letter(class_char) {
            Some(is_letter)
        } else if is_number(class_char) {
            Some(is_number)
        } else if is_other(class_char) {
            Some(is_other)
        } else {
            None
        };
        if let Some(f) = class {
            if lead_space || !c.is_whitespace() {
                let mut j = class_start;
                while j < n && f(chars[j].1) {
                    j += 1;
                }
                out.push(&text[byte_at(i)..byte_at(j)]);
                i = j;
                continue;
            }
        }
        // whitespace run
        let mut j = i;
        while j < n && chars[j].1.is_whitespace() {
            j += 1;
        }
        if j == i {
            // unreachable for valid classes, but never loop forever
            j = i + 1;
        } else if j < n && j - i > 1 {
            // leave the last whitespace to prefix the next word (`\s+(?!\S)`)
            j -= 1;
        }
        out.push(&text[byte_at(i)..byte_at(j)]);
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_gpt2() {
        assert_eq!(
            pretokenize("Hello world, it's  fine!\n\nOk", false),
            vec!["Hello", " world", ",", " it", "'s", " ", " fine", "!", "\n", "\n", "Ok"]
        );
    }

    #[test]
    fn trailing_whitespace_is_one_piece() {
        assert_eq!(pretokenize("a   ", false), vec!["a", "   "]);
    }

    #[test]
    fn digits_are_isolated() {
        assert_eq!(
            pretokenize("in 2024 we", true),
            vec!["in", " ", "2", "0", "2", "4", " we"]
        );
    }

    #[test]
    fn pieces_cover_the_input_exactly() {
        let s = "Ünïcødé  tëxt\t\t42 ’quotes’ 🎉🎉 end  ";
        for d in [false, true] {
            assert_eq!(pretokenize(s, d).concat(), s);
        }
    }
}
