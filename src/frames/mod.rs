//! WebSocket frames as a proxy handles them: a reader that hands frames out one at a time (or
//! streams large ones) without holding memory a peer did not send, a writer that coalesces,
//! and the masking and UTF-8 rules in between. No knowledge of sessions or replicas.

mod reader;
mod utf8;
mod writer;

pub(crate) use reader::{is_mask_violation, FrameReader, Head, StreamedHead, Wire, STREAM_BYTES};
pub use writer::FrameWriter;

/// A fresh, unpredictable mask key, as RFC 6455 5.3 asks of every client frame.
pub(crate) fn fresh_mask() -> [u8; 4] {
    rand::random()
}

/// XOR `payload` with `key`, starting `phase` bytes into the key (a payload handled in pieces
/// keeps its place in the key from one piece to the next).
pub(crate) fn apply_mask(payload: &mut [u8], key: [u8; 4], phase: usize) {
    let key = u32::from_le_bytes(key).rotate_right(8 * (phase % 4) as u32);
    fastwebsockets::unmask(payload, key.to_le_bytes());
}

/// Move a payload masked under `old` to `new` in one pass (XOR with `old ^ new`), never
/// exposing the plaintext and never touching the bytes twice.
pub(crate) fn rekey(payload: &mut [u8], old: [u8; 4], new: [u8; 4], phase: usize) {
    let both = u32::from_ne_bytes(old) ^ u32::from_ne_bytes(new);
    apply_mask(payload, both.to_ne_bytes(), phase);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_their_phase_across_pieces() {
        let plain: Vec<u8> = (0..=255u8).cycle().take(1001).collect();
        let key = [0x11, 0x22, 0x33, 0x44];
        let mut whole = plain.clone();
        apply_mask(&mut whole, key, 0);
        for cut in [0, 1, 2, 3, 5, 500, 1001] {
            let mut pieces = plain.clone();
            let (a, b) = pieces.split_at_mut(cut);
            apply_mask(a, key, 0);
            apply_mask(b, key, cut);
            assert_eq!(pieces, whole, "cut at {cut}");
        }
    }

    #[test]
    fn rekeying_equals_unmasking_and_masking_again() {
        let plain: Vec<u8> = (0..997u32).map(|i| (i * 7) as u8).collect();
        let (old, new) = ([1, 2, 3, 4], [0xa0, 0xb1, 0xc2, 0xd3]);
        let mut under_old = plain.clone();
        apply_mask(&mut under_old, old, 0);
        let mut under_new = plain.clone();
        apply_mask(&mut under_new, new, 0);
        for cut in [0, 3, 6, 997] {
            let mut moved = under_old.clone();
            let (a, b) = moved.split_at_mut(cut);
            rekey(a, old, new, 0);
            rekey(b, old, new, cut);
            assert_eq!(moved, under_new, "cut at {cut}");
        }
    }

    #[test]
    fn fresh_masks_differ() {
        let keys: std::collections::HashSet<[u8; 4]> = (0..1000).map(|_| fresh_mask()).collect();
        assert!(keys.len() > 990);
    }
}
