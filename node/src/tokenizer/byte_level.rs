//! GPT-2's byte-level alphabet: each of the 256 byte values is written as one printable Unicode character, so that
//! BPE vocabularies can be stored as text. Bytes that are printable Latin-1 keep their own code point; the other 68
//! (controls, space, DEL, NBSP, soft hyphen) take U+0100.. in byte order. Encoding goes through the `tokenizers`
//! crate; this table only serves decoding, where the crate keeps its copy private.

use std::sync::OnceLock;

/// Last code point the alphabet uses (U+0100 + 67).
const MAX_CHAR: usize = 0x143;

fn keeps_own_code_point(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// Byte value of each alphabet character, indexed by code point; `None` for code points outside the alphabet.
fn decode_table() -> &'static [Option<u8>; MAX_CHAR + 1] {
    static TABLE: OnceLock<[Option<u8>; MAX_CHAR + 1]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [None; MAX_CHAR + 1];
        let mut next_shifted = 0x100;
        for b in 0..=255u8 {
            let c = if keeps_own_code_point(b) {
                usize::from(b)
            } else {
                next_shifted += 1;
                next_shifted - 1
            };
            table[c] = Some(b);
        }
        table
    })
}

/// The byte a byte-level character stands for.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    decode_table().get(c as usize).copied().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_is_a_bijection_on_bytes() {
        let mut seen = [false; 256];
        for cp in 0..=MAX_CHAR as u32 {
            if let Some(b) = char::from_u32(cp).and_then(char_to_byte) {
                assert!(!seen[usize::from(b)], "byte {b} mapped twice");
                seen[usize::from(b)] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn known_characters() {
        assert_eq!(char_to_byte('\u{120}'), Some(b' '));
        assert_eq!(char_to_byte('\u{10a}'), Some(b'\n'));
        assert_eq!(char_to_byte('\u{100}'), Some(0));
        assert_eq!(char_to_byte('a'), Some(b'a'));
        assert_eq!(char_to_byte('\u{e9}'), Some(0xE9));
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(char_to_byte('\u{144}'), None);
    }
}
