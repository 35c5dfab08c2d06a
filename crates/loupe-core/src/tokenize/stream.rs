//! Streaming detokenization: text is released only once it is valid UTF-8 (a multi-byte character
//! split over tokens waits for its last byte) and only once it cannot be the start of a stop string.

use super::Tokenizer;
use crate::error::Result;

pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Text of all ids decoded so far (complete characters only).
    text: String,
    /// How much of `text` has been handed out.
    emitted: usize,
    stop_strings: Vec<String>,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stop_strings: Vec<String>) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            text: String::new(),
            emitted: 0,
            stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
            stopped: false,
        }
    }

    /// Adds a token; returns the text that is now safe to show. After a stop string is seen, the
    /// stream is `stopped()` and the stop string itself is never shown.
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        let full = self.tokenizer.decode(&self.ids)?;
        // An incomplete UTF-8 sequence decodes to U+FFFD at the end: wait for the next token.
        if full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        self.text = full;
        if let Some(cut) = self.first_stop() {
            self.text.truncate(cut);
            self.stopped = true;
            return Ok(self.take(self.text.len()));
        }
        let safe = self.text.len() - self.held_back();
        Ok(self.take(safe))
    }

    /// Whatever is left once generation ends: text held back as a possible stop prefix, and an
    /// incomplete character at the very end (decoded as U+FFFD, as the reference does).
    pub fn finish(&mut self) -> Result<String> {
        if !self.stopped {
            let full = self.tokenizer.decode(&self.ids)?;
            if full.starts_with(self.text.as_str()) {
                self.text = full;
            }
        }
        let end = self.text.len();
        Ok(self.take(end))
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, upto: usize) -> String {
        if upto <= self.emitted {
            return String::new();
        }
        let out = self.text[self.emitted..upto].to_owned();
        self.emitted = upto;
        out
    }

    fn first_stop(&self) -> Option<usize> {
        // Only text not yet shown can hold a new stop string (plus its overlap with what was shown).
        let longest = self.stop_strings.iter().map(String::len).max()?;
        let from = floor_char_boundary(&self.text, self.emitted.saturating_sub(longest));
        self.stop_strings
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let mut keep = 0;
        for stop in &self.stop_strings {
            for (i, _) in stop.char_indices().skip(1) {
                if i > keep && self.text.ends_with(&stop[..i]) {
                    keep = i;
                }
            }
        }
        keep.min(self.text.len() - self.emitted)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
