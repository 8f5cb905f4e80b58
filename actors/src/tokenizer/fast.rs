//! A direct encoder for the GGUF "gpt2" (byte-level BPE) pipeline that [`super::build_tokenizer`]
//! assembles with `tokenizers`: added tokens split out first (leftmost-longest), then digits
//! isolated one by one, then the GPT-2 pre-tokenizer regex, then byte-level BPE. Hugging Face
//! `tokenizer.json` pipelines of the same shape, with or without the digit step, use it too.
//!
//! It exists for speed: `tokenizers` builds a `NormalizedString` with alignment tables per split
//! and an `Encoding` with a `String` per token, which made encoding a 35-token chat prompt cost
//! ~95 µs — more than the rest of the request path. This encoder works on byte slices and ids and
//! produces the same ids; the `tokenizers` pipeline stays as the reference the tests compare
//! against (and as the fallback for vocabularies this encoder does not cover).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};

/// GPT-2's pre-tokenizer pattern without its one look-around alternative (`\s+(?!\S)`), which
/// [`FastBpe::split_words`] applies by hand so that a finite automaton (no backtracking) can run
/// it. Every character is in one of its classes, so a match always starts where the previous one
/// ended: searches are anchored, which needs only the forward pass.
const WORD_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

/// Marks a byte with no single-byte token, and a symbol merged away.
const MISSING: u32 = u32::MAX;

/// Words up to this many bytes have their ids remembered ([`FastBpe::cache`]); longer ones are rare
/// and would mostly fill the cache with one-offs.
const CACHED_WORD_BYTES: usize = 32;

/// Most words remembered. Past it new words are encoded without being remembered (as in
/// `tokenizers`' own cache), which bounds the memory clients can make it hold (~10 MB).
const CACHED_WORDS: usize = 100_000;

/// Byte-level BPE encoder, shared by every thread that validates; only its word cache changes.
pub(super) struct FastBpe {
    /// Matches every added token (control and user-defined) in the raw text.
    added: Option<AhoCorasick>,
    /// Id of each pattern of `added`, by pattern index.
    added_ids: Vec<u32>,
    words: Regex,
    /// Id of the single-byte token for each byte value, [`MISSING`] where the vocabulary has none
    /// (SmolLM2 lacks some control bytes): such bytes are dropped, as `tokenizers` drops
    /// characters it has no id for when the model has no unknown token.
    byte_ids: [u32; 256],
    /// (left id, right id) → (rank, merged id); a later duplicate merge replaces an earlier one,
    /// as in `tokenizers`.
    merges: HashMap<u64, (u32, u32), BuildHasherDefault<PairHasher>>,
    /// Whether digits are isolated one by one before the GPT-2 pattern runs (a `Digits`
    /// pre-tokenizer ahead of `ByteLevel`).
    split_digits: bool,
    /// Ids of words already encoded. Prompts repeat their words (a chat template's fixed text
    /// above all), and a lookup costs a tenth of merging the word again. Sharded: every thread
    /// that validates reads it at once.
    cache: dashmap::DashMap<Box<[u8]>, Box<[u32]>>,
    /// Words in `cache` (about: two threads may insert the same word).
    cached: std::sync::atomic::AtomicUsize,
}

/// Key of the merge table: the two ids packed.
fn pair(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

/// Multiplicative hashing for the packed id pairs: SipHash was a tenth of encoding time, and the
/// keys come from the model file, not from clients.
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = (key ^ (key >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Buffers reused across the words of one encode.
#[derive(Default)]
struct Scratch {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Reverse<(u32, usize, u32)>>,
}

impl FastBpe {
    /// Builds the encoder, or `None` when a merge names a token outside the vocabulary (which
    /// `tokenizers` refuses too).
    ///
    /// `vocab` looks a token's text up; `byte_chars[b]` is the character byte-level BPE writes for byte `b`; `merges` are
    /// `(left, right)` token strings in rank order; `added` are the added tokens' (text, id);
    /// `split_digits` isolates digits before the GPT-2 pattern.
    pub(super) fn new(
        vocab: impl Fn(&str) -> Option<u32>,
        byte_chars: &[char; 256],
        merges: &[(String, String)],
        added: &[(String, u32)],
        split_digits: bool,
    ) -> Option<Self> {
        let mut byte_ids = [MISSING; 256];
        for (byte, c) in byte_chars.iter().enumerate() {
            byte_ids[byte] = vocab(c.encode_utf8(&mut [0; 4])).unwrap_or(MISSING);
        }
        let mut merge_map =
            HashMap::with_capacity_and_hasher(merges.len(), BuildHasherDefault::default());
        for (rank, (left, right)) in merges.iter().enumerate() {
            let (Some(l), Some(r), Some(merged)) =
                (vocab(left), vocab(right), vocab(&format!("{left}{right}")))
            else {
                // `tokenizers` refuses such a merge when it builds the BPE model, so the
                // reference pipeline would not exist either.
                return None;
            };
            merge_map.insert(pair(l, r), (rank as u32, merged));
        }
        let added_ac = if added.is_empty() {
            None
        } else {
            Some(
                AhoCorasickBuilder::new()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(added.iter().map(|(text, _)| text.as_str()))
                    .ok()?,
            )
        };
        Some(Self {
            added: added_ac,
            added_ids: added.iter().map(|(_, id)| *id).collect(),
            words: Regex::new(WORD_PATTERN).ok()?,
            byte_ids,
            merges: merge_map,
            split_digits,
            cache: dashmap::DashMap::new(),
            cached: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Token ids for `text`.
    pub(super) fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut scratch = Scratch::default();
        let mut start = 0;
        if let Some(added) = &self.added {
            for found in added.find_iter(text) {
                self.encode_plain(&text[start..found.start()], &mut ids, &mut scratch);
                ids.push(self.added_ids[found.pattern().as_usize()]);
                start = found.end();
            }
        }
        self.encode_plain(&text[start..], &mut ids, &mut scratch);
        ids
    }

    /// Text without added tokens: digits isolated one by one (when configured), each remaining
    /// run split by the GPT-2 pattern.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>, scratch: &mut Scratch) {
        if !self.split_digits {
            self.split_words(text, ids, scratch);
            return;
        }
        let mut run_start = 0;
        for (at, c) in text.char_indices() {
            if c.is_numeric() {
                self.split_words(&text[run_start..at], ids, scratch);
                self.bpe(&text.as_bytes()[at..at + c.len_utf8()], ids, scratch);
                run_start = at + c.len_utf8();
            }
        }
        self.split_words(&text[run_start..], ids, scratch);
    }

    /// Applies the GPT-2 pattern to `piece`. A whitespace run of two or more characters followed
    /// by a non-space gives up its last character (what `\s+(?!\S)` does), so that the next word
    /// carries its leading space.
    fn split_words(&self, piece: &str, ids: &mut Vec<u32>, scratch: &mut Scratch) {
        let mut at = 0;
        while at < piece.len() {
            let input = Input::new(piece)
                .range(at..)
                .anchored(Anchored::Yes)
                .earliest(false);
            let Some(found) = self.words.search(&input) else {
                // Unreachable: `\s+` and `[^\s\p{L}\p{N}]+` with `\p{L}+`/`\p{N}+` cover every
                // character. Encode the rest as one word rather than lose it.
                self.bpe(&piece.as_bytes()[at..], ids, scratch);
                return;
            };
            let word = &piece[at..found.end()];
            let mut end = found.end();
            if end < piece.len() && word.chars().all(char::is_whitespace) {
                let mut chars = word.char_indices();
                if let (Some((last, _)), Some(_)) = (chars.next_back(), chars.next()) {
                    end = at + last;
                }
            }
            self.bpe(&piece.as_bytes()[at..end], ids, scratch);
            at = end;
        }
    }

    /// Byte-level BPE of one word: starts from single-byte tokens and repeatedly applies the
    /// lowest-ranked merge among adjacent pairs (leftmost first), as `tokenizers` does.
    fn bpe(&self, word: &[u8], ids: &mut Vec<u32>, scratch: &mut Scratch) {
        if let [byte] = word {
            let id = self.byte_ids[*byte as usize];
            if id != MISSING {
                ids.push(id);
            }
            return;
        }
        if word.len() > CACHED_WORD_BYTES {
            self.merge(word, ids, scratch);
            return;
        }
        if let Some(known) = self.cache.get(word) {
            ids.extend_from_slice(&known);
            return;
        }
        let start = ids.len();
        self.merge(word, ids, scratch);
        use std::sync::atomic::Ordering;
        if self.cached.load(Ordering::Relaxed) < CACHED_WORDS {
            self.cached.fetch_add(1, Ordering::Relaxed);
            self.cache.insert(word.into(), ids[start..].into());
        }
    }

    /// [`Self::bpe`] without the cache.
    fn merge(&self, word: &[u8], ids: &mut Vec<u32>, scratch: &mut Scratch) {
        // A doubly linked list over the word's symbols; a merged-away symbol has `id == MISSING`.
        let Scratch { symbols, queue } = scratch;
        symbols.clear();
        queue.clear();
        symbols.extend(
            word.iter()
                .map(|&b| self.byte_ids[b as usize])
                .filter(|&id| id != MISSING)
                .enumerate()
                .map(|(i, id)| Symbol {
                    id,
                    prev: i.wrapping_sub(1),
                    next: i + 1,
                }),
        );
        let n = symbols.len();
        if n == 0 {
            return;
        }
        for i in 0..n - 1 {
            if let Some(&(rank, merged)) = self.merges.get(&pair(symbols[i].id, symbols[i + 1].id))
            {
                queue.push(Reverse((rank, i, merged)));
            }
        }
        while let Some(Reverse((rank, left, merged))) = queue.pop() {
            let right = symbols[left].next;
            if symbols[left].id == MISSING || right >= n {
                continue;
            }
            // Stale entry: one side has since been merged into something else.
            if self.merges.get(&pair(symbols[left].id, symbols[right].id)) != Some(&(rank, merged))
            {
                continue;
            }
            symbols[left].id = merged;
            let after = symbols[right].next;
            symbols[left].next = after;
            symbols[right].id = MISSING;
            if after < n {
                symbols[after].prev = left;
                if let Some(&(r, m)) = self.merges.get(&pair(merged, symbols[after].id)) {
                    queue.push(Reverse((r, left, m)));
                }
            }
            let before = symbols[left].prev;
            if before < n {
                if let Some(&(r, m)) = self.merges.get(&pair(symbols[before].id, merged)) {
                    queue.push(Reverse((r, before, m)));
                }
            }
        }
        let mut i = 0;
        while i < n {
            ids.push(symbols[i].id);
            i = symbols[i].next;
        }
    }
}

struct Symbol {
    id: u32,
    /// Index of the previous live symbol (`usize::MAX` for the first).
    prev: usize,
    /// Index of the next live symbol (`len` for the last).
    next: usize,
}
