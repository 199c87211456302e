//! The per-page pattern: a deterministic function of (page index, generation).
//!
//! Layout of one 4096-byte page, as 512 little-endian `u64` words:
//! - word 0: [`MAGIC`]
//! - word 1: `(index << 32) | generation`
//! - words 2..512: an xorshift64 stream seeded from (index, generation); xorshift never
//!   yields 0 from a non-zero state, so every word is non-zero.
//!
//! No page is ever all zeroes (zero-page compression cannot cheat), no two (index,
//! generation) pairs give the same page, and a verifier comparing whole pages catches any
//! flipped byte. The header lets a host-side tool that reads guest RAM from outside find
//! which page and generation a 4 KiB frame holds without the agent's generation table.

/// Bytes per page.
pub const PAGE_SIZE: usize = 4096;
/// 64-bit words per page.
pub const WORDS: usize = PAGE_SIZE / 8;
/// Word 0 of every agent page: "VMBEAMP1" in ASCII, read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VMBEAMP1");

/// One page viewed as words.
pub type Page = [u64; WORDS];

/// splitmix64's finaliser: a good 64-bit mixer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The non-zero xorshift seed for (index, generation).
fn seed(index: u64, generation: u32) -> u64 {
    let s = mix(index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ mix(u64::from(generation) ^ 0x5eed));
    if s == 0 {
        0x2545_f491_4f6c_dd1d
    } else {
        s
    }
}

/// Word 1 of the page (index, generation).
pub fn header_word(index: u64, generation: u32) -> u64 {
    (index << 32) | u64::from(generation)
}

/// The next xorshift64 state.
#[inline(always)]
fn step(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Writes the pattern for (index, generation) into `page`.
pub fn fill_page(page: &mut Page, index: u64, generation: u32) {
    page[0] = MAGIC;
    page[1] = header_word(index, generation);
    let mut x = seed(index, generation);
    for w in page[2..].iter_mut() {
        x = step(x);
        *w = x;
    }
}

/// True if `page` holds exactly the pattern for (index, generation).
pub fn verify_page(page: &Page, index: u64, generation: u32) -> bool {
    // Accumulate differences without branching: this is the verifier's hot loop.
    let mut diff = (page[0] ^ MAGIC) | (page[1] ^ header_word(index, generation));
    let mut x = seed(index, generation);
    for &w in page[2..].iter() {
        x = step(x);
        diff |= w ^ x;
    }
    diff == 0
}

/// The first byte offset in `page` that differs from the pattern, with the expected and
/// actual byte, for diagnostics.
pub fn first_mismatch(page: &Page, index: u64, generation: u32) -> Option<(usize, u8, u8)> {
    let mut expected = [0u64; WORDS];
    fill_page(&mut expected, index, generation);
    for (i, (&want, &got)) in expected.iter().zip(page.iter()).enumerate() {
        if want != got {
            let (wb, gb) = (want.to_le_bytes(), got.to_le_bytes());
            let j = (0..8).find(|&j| wb[j] != gb[j]).unwrap_or(0);
            return Some((i * 8 + j, wb[j], gb[j]));
        }
    }
    None
}

/// Decodes the header of a page: `Some((index, generation))` if word 0 is [`MAGIC`].
pub fn decode_header(page: &Page) -> Option<(u64, u32)> {
    (page[0] == MAGIC).then(|| (page[1] >> 32, page[1] as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(index: u64, generation: u32) -> Box<Page> {
        let mut p = Box::new([0u64; WORDS]);
        fill_page(&mut p, index, generation);
        p
    }

    #[test]
    fn filled_page_verifies() {
        for (i, g) in [
            (0, 0),
            (1, 0),
            (0, 1),
            (12345, 678),
            (u32::MAX as u64, u32::MAX),
        ] {
            let p = page(i, g);
            assert!(verify_page(&p, i, g));
            assert_eq!(first_mismatch(&p, i, g), None);
            assert_eq!(decode_header(&p), Some((i, g)));
        }
    }

    #[test]
    fn every_word_is_non_zero() {
        for i in 0..64 {
            let p = page(i, 3);
            assert!(p.iter().all(|&w| w != 0), "page {i} has a zero word");
        }
    }

    #[test]
    fn any_single_flipped_byte_is_detected() {
        let p = page(42, 7);
        let bytes_of = |p: &Page| p.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
        let orig = bytes_of(&p);
        for off in 0..PAGE_SIZE {
            for bit in [0x01u8, 0x80] {
                let mut q = p.clone();
                let w = off / 8;
                let mut b = q[w].to_le_bytes();
                b[off % 8] ^= bit;
                q[w] = u64::from_le_bytes(b);
                assert!(!verify_page(&q, 42, 7), "flip at byte {off} not detected");
                let (at, want, got) = first_mismatch(&q, 42, 7).unwrap();
                assert_eq!(at, off);
                assert_eq!(want, orig[off]);
                assert_eq!(got, orig[off] ^ bit);
            }
        }
    }

    #[test]
    fn wrong_generation_or_index_is_detected() {
        let p = page(9, 1);
        assert!(!verify_page(&p, 9, 0));
        assert!(!verify_page(&p, 9, 2));
        assert!(!verify_page(&p, 8, 1));
        assert!(!verify_page(&p, 10, 1));
    }

    #[test]
    fn pages_differ_between_indices_and_generations() {
        let a = page(1, 1);
        let b = page(2, 1);
        let c = page(1, 2);
        assert_ne!(a[2..], b[2..]);
        assert_ne!(a[2..], c[2..]);
    }
}
