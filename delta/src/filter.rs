//! The x86 branch filter of literal frames (format version 3): x86 and x86-64 code calls
//! and jumps by 32-bit offsets relative to the next instruction, so one function called
//! from many places appears as many different offsets. Rewriting each offset as the
//! absolute target (relative to the frame) makes those four bytes repeat, and a
//! compressor finds them: the idea of the BCJ filters of xz and 7-Zip, in a simpler,
//! reversible form.
//!
//! At each byte `0xE8` (CALL rel32) or `0xE9` (JMP rel32) with four bytes after it, the
//! four bytes are read as a little-endian `i32` `v`; if `-2^24 ≤ v < 2^24` (the top byte is
//! `0x00` or `0xFF`, as for near calls) it becomes `((v + 2^24 + p) mod 2^25) − 2^24`, `p`
//! the frame position after the field, and decoding subtracts `p` instead. Either way the
//! four bytes are then skipped. Both directions map that range onto itself and leave
//! other values alone, and the opcode bytes they test are never changed, so decoding
//! visits the same positions as encoding and restores every byte.

const HALF: i64 = 1 << 24;
const SPAN: i64 = 1 << 25;

/// Rewrites `buf` in place for compression.
pub(crate) fn x86_encode(buf: &mut [u8]) {
    transform(buf, 1);
}

/// Undoes `x86_encode` in place.
pub(crate) fn x86_decode(buf: &mut [u8]) {
    transform(buf, -1);
}

fn transform(buf: &mut [u8], sign: i64) {
    let n = buf.len();
    let mut i = 0;
    while i + 5 <= n {
        let op = buf[i];
        if op != 0xE8 && op != 0xE9 {
            i += 1;
            continue;
        }
        let top = buf[i + 4];
        if top == 0x00 || top == 0xFF {
            let field = [buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]];
            let v = i64::from(i32::from_le_bytes(field));
            let p = (i + 5) as i64 % SPAN;
            let w = (v + HALF + sign * p).rem_euclid(SPAN) - HALF;
            buf[i + 1..i + 5].copy_from_slice(&(w as i32).to_le_bytes());
        }
        i += 5;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn calls_to_one_target_become_equal() {
        // Three calls of one function at 0x1000 from different places.
        let mut code = vec![0x90u8; 0x2000];
        for &at in &[0x100usize, 0x400, 0x1800] {
            let rel = 0x1000i32 - (at as i32 + 5);
            code[at] = 0xE8;
            code[at + 1..at + 5].copy_from_slice(&rel.to_le_bytes());
        }
        let orig = code.clone();
        x86_encode(&mut code);
        let f = |at: usize| code[at + 1..at + 5].to_vec();
        assert_eq!(f(0x100), f(0x400));
        assert_eq!(f(0x100), f(0x1800));
        x86_decode(&mut code);
        assert_eq!(code, orig);
    }

    proptest! {
        #[test]
        fn decode_restores_any_bytes(mut data in proptest::collection::vec(
            prop_oneof![Just(0xE8u8), Just(0xE9), Just(0x00), Just(0xFF), any::<u8>()], 0..4096)) {
            let orig = data.clone();
            x86_encode(&mut data);
            x86_decode(&mut data);
            prop_assert_eq!(data, orig);
        }
    }
}
