//! UTF-8 checked piece by piece: a text message may arrive in fragments and reads that split a
//! code point anywhere, and is checked as it passes, holding at most the 3 bytes of a code
//! point cut at the end of a piece.

/// The state of one direction's text message: whether one is open, and the start of a code
/// point cut at the end of the last piece. Small enough to live in a frame reader's padding.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8Stream {
    carry: [u8; 3],
    carry_len: u8,
}

/// The length of the code point a leading byte starts (0: not a leading byte).
fn width(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

impl Utf8Stream {
    /// Forget any carried bytes (a new message starts).
    pub fn reset(&mut self) {
        self.carry_len = 0;
    }

    /// Check the next piece of the message; `last` marks the message's end, where no code
    /// point may be left open. `false` means the text is not UTF-8.
    pub fn feed(&mut self, mut bytes: &[u8], last: bool) -> bool {
        if self.carry_len > 0 {
            let held = usize::from(self.carry_len);
            let want = width(self.carry[0]);
            let take = (want - held).min(bytes.len());
            let mut point = [0u8; 4];
            point[..held].copy_from_slice(&self.carry[..held]);
            point[held..held + take].copy_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            let have = held + take;
            match std::str::from_utf8(&point[..have]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still cut short: the piece ended inside the same code point.
                    debug_assert!(bytes.is_empty());
                    self.carry[..have].copy_from_slice(&point[..have]);
                    self.carry_len = have as u8;
                    return !last;
                }
                Err(_) => return false,
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() && !last => {
                let tail = &bytes[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `text` cut at every split point (two pieces) and in single bytes.
    fn accepts_in_pieces(bytes: &[u8]) -> bool {
        let whole = std::str::from_utf8(bytes).is_ok();
        for cut in 0..=bytes.len() {
            let mut s = Utf8Stream::default();
            let ok = s.feed(&bytes[..cut], false) && s.feed(&bytes[cut..], true);
            assert_eq!(ok, whole, "{bytes:x?} cut at {cut}");
        }
        let mut s = Utf8Stream::default();
        let mut ok = true;
        for (i, b) in bytes.iter().enumerate() {
            ok &= s.feed(std::slice::from_ref(b), i + 1 == bytes.len());
        }
        if bytes.is_empty() {
            ok = s.feed(&[], true);
        }
        assert_eq!(ok, whole, "{bytes:x?} byte by byte");
        whole
    }

    #[test]
    fn pieces_agree_with_the_whole() {
        assert!(accepts_in_pieces("h€llo 𝄞 wörld".as_bytes()));
        assert!(accepts_in_pieces(b""));
        assert!(!accepts_in_pieces(&[0xf0, 0x9d, 0x84])); // cut 4-byte point at the end
        assert!(!accepts_in_pieces(&[0xe2, 0x82, 0x41])); // broken continuation
        assert!(!accepts_in_pieces(&[0xed, 0xa0, 0x80])); // surrogate
        assert!(!accepts_in_pieces(&[0xc0, 0xaf])); // overlong
        assert!(!accepts_in_pieces(&[0xf4, 0x90, 0x80, 0x80])); // beyond U+10FFFF
        assert!(!accepts_in_pieces(&[0x80]));
        assert!(!accepts_in_pieces(b"ok\xff"));
    }

    #[test]
    fn a_bad_byte_fails_at_once_not_at_the_end() {
        let mut s = Utf8Stream::default();
        assert!(s.feed(&[0xf0], false));
        assert!(
            !s.feed(b"A", false),
            "a lead byte followed by ASCII is already invalid"
        );
    }
}
