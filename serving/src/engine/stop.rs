//! Assembling output text: incremental UTF-8 decoding and stop strings.
//!
//! Text that could be the start of a stop string is held back until it is clear either way, so
//! a streamed client never sees part of a stop string and the streamed text equals the final one.

use crate::tokenizer::Utf8Stream;

#[derive(Debug, Default)]
pub struct OutputText {
    stops: Vec<String>,
    utf8: Utf8Stream,
    text: String,
    sent: usize,
}

impl OutputText {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Adds a token's bytes. Returns text that is safe to send, and whether a stop string
    /// ended the output.
    pub fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        let s = self.utf8.push(bytes);
        self.text.push_str(&s);
        self.release(false)
    }

    /// Ends the output: flushes held-back text.
    pub fn finish(&mut self) -> (String, bool) {
        let s = self.utf8.finish();
        self.text.push_str(&s);
        self.release(true)
    }

    fn release(&mut self, all: bool) -> (String, bool) {
        let unsent = &self.text[self.sent..];
        let hit = self
            .stops
            .iter()
            .filter_map(|s| unsent.find(s.as_str()))
            .min();
        if let Some(pos) = hit {
            let end = self.sent + pos;
            let delta = self.text[self.sent..end].to_string();
            self.text.truncate(end);
            self.sent = end;
            return (delta, true);
        }
        let hold = if all {
            0
        } else {
            self.stops
                .iter()
                .map(|s| longest_partial(&self.text[self.sent..], s))
                .max()
                .unwrap_or(0)
        };
        let upto = self.text.len() - hold;
        let delta = self.text[self.sent..upto].to_string();
        self.sent = upto;
        (delta, false)
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_partial(text: &str, stop: &str) -> usize {
    let mut best = 0;
    for (i, _) in stop.char_indices().skip(1) {
        if text.ends_with(&stop[..i]) {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut o = OutputText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let (d, stop) = o.push(p.as_bytes());
            out.push(d);
            if stop {
                return (out, true);
            }
        }
        out.push(o.finish().0);
        (out, false)
    }

    #[test]
    fn stop_string_split_across_tokens_is_never_sent() {
        let (out, stopped) = feed(&["END"], &["hello E", "N", "D more"]);
        assert!(stopped);
        assert_eq!(out.concat(), "hello ");
        assert_eq!(out[0], "hello ");
    }

    #[test]
    fn false_alarm_is_released() {
        let (out, stopped) = feed(&["END"], &["a E", "x"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a ", "Ex", ""]);
    }

    #[test]
    fn no_stops_passes_through() {
        let (out, _) = feed(&[], &["a", "b"]);
        assert_eq!(out.concat(), "ab");
    }
}
