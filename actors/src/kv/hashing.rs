//! Block hashing (runtime spec §3.1): what the router and the engines agree a KV block is.
//!
//! A prompt is cut into consecutive blocks of exactly `block_size` tokens (a trailing partial block is
//! ignored). A block's *local* hash is XXH3-64, seed 1337, over its tokens as u32 little-endian; its
//! *sequence* hash chains the previous block's sequence hash with its local hash, so equal sequence
//! hashes mean equal prefixes.

use xxhash_rust::const_xxh3::const_custom_default_secret;
use xxhash_rust::xxh3::{xxh3_64_with_secret_input, xxh3_64_with_seed, SecretInput};

/// The seed of every block hash (`XXH3_SEED`).
pub const XXH3_SEED: u64 = 1337;

/// XXH3 hashes an input of more than this many bytes with a secret derived from the seed ...
const XXH3_MIDSIZE_MAX: usize = 240;

/// ... which is this one, derived once here: `xxh3_64_with_seed` derives it again on every call, a
/// third of the time it takes to hash a 64-token block (router overhead, issue 21).
const SEEDED_SECRET: SecretInput<[u8; 192]> =
    SecretInput::new(const_custom_default_secret(XXH3_SEED));

/// Hash of one block's tokens (`LocalBlockHash`, `tokens_hash` on the wire).
pub type LocalBlockHash = u64;
/// Hash of a block and everything before it (`SequenceHash`).
pub type SequenceHash = u64;

/// Local hash of one block of tokens.
pub fn local_block_hash(tokens: &[u32]) -> LocalBlockHash {
    let mut bytes = vec![0u8; tokens.len() * 4];
    hash_block(tokens, &mut bytes)
}

/// Local hashes of every full block of `tokens`.
pub fn local_block_hashes(tokens: &[u32], block_size: usize) -> Vec<LocalBlockHash> {
    assert!(block_size > 0, "block size must be positive");
    // One buffer for every block: a 32k-token prompt is 2048 blocks of 16, and an allocation per block
    // cost as much as the hashing (router overhead, issue 21).
    let mut bytes = vec![0u8; block_size * 4];
    tokens
        .chunks_exact(block_size)
        .map(|block| hash_block(block, &mut bytes))
        .collect()
}

/// Writes `tokens` into `bytes` (exactly four bytes per token) as u32 little-endian and hashes them.
#[inline]
fn hash_block(tokens: &[u32], bytes: &mut [u8]) -> LocalBlockHash {
    // A plain copy on little-endian targets, which the compiler vectorizes.
    for (out, token) in bytes.chunks_exact_mut(4).zip(tokens) {
        out.copy_from_slice(&token.to_le_bytes());
    }
    if bytes.len() > XXH3_MIDSIZE_MAX {
        // The same hash as `xxh3_64_with_seed`, which takes this path with this secret.
        xxh3_64_with_secret_input(bytes, &SEEDED_SECRET)
    } else {
        xxh3_64_with_seed(bytes, XXH3_SEED)
    }
}

/// The sequence hash of a block whose predecessor has sequence hash `parent` (none for the first block).
pub fn chain(parent: Option<SequenceHash>, local: LocalBlockHash) -> SequenceHash {
    match parent {
        None => local,
        Some(parent) => {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&parent.to_le_bytes());
            bytes[8..].copy_from_slice(&local.to_le_bytes());
            xxh3_64_with_seed(&bytes, XXH3_SEED)
        }
    }
}

/// Sequence hashes for a run of local hashes starting at the root.
pub fn sequence_hashes(locals: &[LocalBlockHash]) -> Vec<SequenceHash> {
    let mut parent = None;
    locals
        .iter()
        .map(|&local| {
            let hash = chain(parent, local);
            parent = Some(hash);
            hash
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hash_is_xxh3_seed_1337_over_u32_le() {
        // Independent of the helper: the bytes written out by hand.
        let bytes = [1u8, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0];
        assert_eq!(
            local_block_hash(&[1, 2, 3, 4]),
            xxh3_64_with_seed(&bytes, 1337)
        );
        assert_ne!(
            local_block_hash(&[1, 2, 3, 4]),
            xxh3_64_with_seed(&bytes, 0)
        );
    }

    #[test]
    fn every_block_length_hashes_as_xxh3_with_the_seed() {
        // Both sides of the 240-byte switch to the precomputed secret, and blocks far past it.
        for length in (1..=130).chain([256, 1024]) {
            let tokens: Vec<u32> = (0..3 * length as u32)
                .map(|t| t.wrapping_mul(2_654_435_761))
                .collect();
            let bytes: Vec<u8> = tokens[..length]
                .iter()
                .flat_map(|t| t.to_le_bytes())
                .collect();
            let expected = xxh3_64_with_seed(&bytes, XXH3_SEED);
            assert_eq!(local_block_hash(&tokens[..length]), expected, "{length}");
            let blocks = local_block_hashes(&tokens, length);
            assert_eq!(blocks.len(), 3, "{length}");
            assert_eq!(blocks[0], expected, "{length}");
            assert_eq!(
                blocks[2],
                local_block_hash(&tokens[2 * length..]),
                "{length}"
            );
        }
    }

    #[test]
    fn known_values() {
        // Computed with the xxhash C library (Python `xxhash.xxh3_64_intdigest(..., seed=1337)`)
        // over struct.pack('<I', ...) tokens and struct.pack('<QQ', parent, local).
        let first = local_block_hash(&[1, 2, 3, 4]);
        let second = local_block_hash(&[5, 6, 7, 8]);
        assert_eq!(first, 14_643_705_804_678_351_452);
        assert_eq!(second, 16_777_012_769_546_811_212);
        assert_eq!(chain(Some(first), second), 4_945_711_292_740_353_085);
        let tokens: Vec<u32> = (0..64).collect();
        assert_eq!(local_block_hash(&tokens), 3_480_597_578_098_033_343);
        assert_eq!(
            sequence_hashes(&local_block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4)),
            vec![first, 4_945_711_292_740_353_085]
        );
    }

    #[test]
    fn partial_blocks_are_ignored_and_chains_depend_on_the_prefix() {
        let tokens: Vec<u32> = (0..10).collect();
        let locals = local_block_hashes(&tokens, 4);
        assert_eq!(locals.len(), 2);
        assert_eq!(locals[1], local_block_hash(&[4, 5, 6, 7]));
        let seq = sequence_hashes(&locals);
        assert_eq!(seq[0], locals[0]);
        assert_eq!(seq[1], chain(Some(seq[0]), locals[1]));
        // The same second block after a different first block chains differently.
        let other = sequence_hashes(&local_block_hashes(&[9, 9, 9, 9, 4, 5, 6, 7], 4));
        assert_ne!(other[1], seq[1]);
        assert_eq!(
            local_block_hashes(&[9, 9, 9, 9, 4, 5, 6, 7], 4)[1],
            locals[1]
        );
    }
}
