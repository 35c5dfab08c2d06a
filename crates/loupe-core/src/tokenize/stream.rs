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
        // A run of byte-fallback tokens (`<0xE2>`) decodes as a whole: as UTF-8 where the run is
        // valid, else every byte as U+FFFD. So `<0x49><0x6B>` reads "Ik" until a `<0xFA>` turns
        // the run into three U+FFFD: wait for the run to end.
        if self.is_byte_token(id) {
            return self.check_inside_run();
        }
        let full = self.tokenizer.decode(&self.ids)?;
        // An incomplete UTF-8 sequence decodes to U+FFFD at the end: wait for the next token.
        if full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        self.update(full);
        if self.cut_at_stop() {
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
            self.update(full);
            self.cut_at_stop();
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

    /// Inside a byte-fallback run: nothing is shown until the run ends, but a stop string its text
    /// completes (a newline is the byte token `<0x0A>` in such vocabularies) stops the stream now,
    /// showing what came before it.
    fn check_inside_run(&mut self) -> Result<String> {
        let full = self.tokenizer.decode(&self.ids)?;
        if self.stop_strings.is_empty() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let kept = (self.text.clone(), self.emitted);
        self.update(full);
        if self.cut_at_stop() {
            return Ok(self.take(self.text.len()));
        }
        (self.text, self.emitted) = kept;
        Ok(String::new())
    }

    /// Takes `full`, the decode of every id so far, as the text. Text already shown cannot be taken
    /// back: where the new decode changed it (a tokenizer whose decode of earlier ids depends on
    /// later ones), the stream goes on after as much of it as the new text has.
    fn update(&mut self, full: String) {
        let shown = &self.text[..self.emitted];
        if !full.starts_with(shown) {
            let mut at = self.emitted.min(full.len());
            while !full.is_char_boundary(at) {
                at += 1;
            }
            self.emitted = at;
        }
        self.text = full;
    }

    /// Whether `id` is a byte-fallback token (`<0x00>` .. `<0xFF>`).
    fn is_byte_token(&self, id: u32) -> bool {
        self.tokenizer.id_to_token(id).is_some_and(|t| {
            t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && t[3..5].bytes().all(|b| b.is_ascii_hexdigit())
        })
    }

    fn take(&mut self, upto: usize) -> String {
        if upto <= self.emitted {
            return String::new();
        }
        let out = self.text[self.emitted..upto].to_owned();
        self.emitted = upto;
        out
    }

    /// Ends the text before the first stop string in it, if there is one: then the stream is
    /// stopped.
    fn cut_at_stop(&mut self) -> bool {
        let Some(cut) = self.first_stop() else {
            return false;
        };
        self.text.truncate(cut);
        self.stopped = true;
        true
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
