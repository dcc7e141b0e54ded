//! Turning generated token bytes into text for streaming: UTF-8 pieces are
//! only emitted on character boundaries, and text that might be the start of a
//! stop string is held back until it is known not to be one.

/// Incremental UTF-8 assembly plus stop-string matching for one sequence.
pub struct TextStream {
    decoder: encoding_rs::Decoder,
    stop: Vec<String>,
    /// Decoded text not yet emitted because it may begin a stop string.
    pending: String,
}

/// What one call to [`TextStream::push`] produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Text safe to send to the client now (possibly empty).
    pub text: String,
    /// A stop string was found; generation must end and `text` is the last piece.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stop: &[String]) -> Self {
        Self {
            decoder: encoding_rs::UTF_8.new_decoder_without_bom_handling(),
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Feeds the raw bytes of one token.
    pub fn push(&mut self, bytes: &[u8]) -> Pushed {
        let mut decoded =
            String::with_capacity(self.decoder.max_utf8_buffer_length(bytes.len()).unwrap_or(bytes.len() + 4));
        let (_, _, _) = self.decoder.decode_to_string(bytes, &mut decoded, false);
        self.pending.push_str(&decoded);
        self.drain(false)
    }

    /// Ends the stream: flushes incomplete bytes (as U+FFFD) and held-back text.
    pub fn finish(&mut self) -> Pushed {
        let mut tail = String::with_capacity(8);
        let (_, _, _) = self.decoder.decode_to_string(&[], &mut tail, true);
        self.pending.push_str(&tail);
        self.drain(true)
    }

    fn drain(&mut self, last: bool) -> Pushed {
        if let Some(at) = self.earliest_stop() {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Pushed { text, stopped: true };
        }
        let keep = if last { 0 } else { self.partial_stop_suffix() };
        let split = self.pending.len() - keep;
        let text = self.pending[..split].to_string();
        self.pending.drain(..split);
        Pushed { text, stopped: false }
    }

    fn earliest_stop(&self) -> Option<usize> {
        self.stop.iter().filter_map(|s| self.pending.find(s.as_str())).min()
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper
    /// prefix of some stop string (always on a char boundary).
    fn partial_stop_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stop {
            for (i, _) in stop.char_indices().skip(1) {
                let prefix = &stop[..i];
                if i > best && self.pending.ends_with(prefix) {
                    best = i;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&[u8]], stop: &[&str]) -> (Vec<String>, bool) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut ts = TextStream::new(&stop);
        let mut out = Vec::new();
        for p in pieces {
            let r = ts.push(p);
            if !r.text.is_empty() {
                out.push(r.text);
            }
            if r.stopped {
                return (out, true);
            }
        }
        let r = ts.finish();
        if !r.text.is_empty() {
            out.push(r.text);
        }
        (out, r.stopped)
    }

    #[test]
    fn emoji_split_across_tokens_is_emitted_whole() {
        let emoji = "🙂".as_bytes(); // 4 bytes
        let (out, _) = run(&[b"a", &emoji[..1], &emoji[1..3], &emoji[3..], b"b"], &[]);
        assert_eq!(out, vec!["a", "🙂", "b"]);
    }

    #[test]
    fn cjk_split_across_tokens_is_emitted_whole() {
        let s = "你好".as_bytes(); // 6 bytes
        let (out, _) = run(&[&s[..2], &s[2..4], &s[4..]], &[]);
        assert_eq!(out.concat(), "你好");
        assert!(out.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn stop_string_is_not_emitted_even_when_split() {
        let (out, stopped) = run(&[b"Hello ", b"EN", b"D more"], &["END"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Hello ");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_is_not_a_stop() {
        let (out, stopped) = run(&[b"a E", b"Nx"], &["END"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "a ENx");
    }

    #[test]
    fn truncated_utf8_at_end_becomes_replacement_char() {
        let (out, _) = run(&[b"ok", &"🙂".as_bytes()[..2]], &[]);
        assert_eq!(out.concat(), "ok\u{FFFD}");
    }
}
