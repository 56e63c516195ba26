//! Training data: a byte-level tokenizer (vocabulary 256), text files or folders of them, and
//! a synthetic long-context task, associative recall: key-value pairs planted early in a long
//! run of filler must be recalled at the end. Every source is deterministic for a seed, and
//! its position can be saved and restored exactly.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Why data cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{0} holds no text (no file, or only empty files)")]
    Empty(PathBuf),
    #[error(
        "{path} has {tokens} tokens of text, too few for sequences of {seq} tokens (it needs \
         at least {needed}); use shorter sequences or more data"
    )]
    TooShort {
        path: PathBuf,
        tokens: usize,
        seq: usize,
        needed: usize,
    },
    #[error(
        "a batch of {batch} x {seq} tokens needs {bytes} of memory for its tokens alone, and \
         {available} is available: use a smaller batch or shorter sequences"
    )]
    TooLarge {
        batch: usize,
        seq: usize,
        bytes: String,
        available: String,
    },
    #[error(
        "the recall task plants 1 to 26 pairs (an uppercase letter each as its key), found \
         {0}: give --pairs from 1 to 26"
    )]
    RecallPairs(usize),
    #[error("cannot encode {path}: {message}")]
    Encode { path: PathBuf, message: String },
    #[error(
        "the recall task needs sequences of at least {needed} tokens for {pairs} pairs, found {seq}"
    )]
    RecallTooShort {
        seq: usize,
        pairs: usize,
        needed: usize,
    },
}

/// Byte-level tokens: one token per byte.
pub fn encode(text: &str) -> Vec<i64> {
    text.bytes().map(i64::from).collect()
}

/// Bytes back to text (invalid UTF-8 shown with replacement characters).
pub fn decode(tokens: &[i64]) -> String {
    let bytes: Vec<u8> = tokens.iter().map(|&t| t.clamp(0, 255) as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A batch: `[B, T]` tokens and next-token targets (`-1` where there is no loss), document ids
/// (for masks over documents), and for recall, where each query is.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub tokens: Vec<i64>,
    pub targets: Vec<i64>,
    pub documents: Vec<i64>,
    /// `(row, position, distance)` of each scored query (recall only).
    pub queries: Vec<(usize, usize, usize)>,
}

impl Batch {
    /// A batch of `batch` rows of `seq` tokens, with room for them and nothing in it yet; an
    /// error where its tokens alone would not fit in the memory left.
    pub fn with_capacity(batch: usize, seq: usize) -> Result<Batch, DataError> {
        let count = batch.saturating_mul(seq);
        // Tokens, targets and document ids, 8 bytes each.
        let bytes = crate::memory::product([count, 3 * 8]);
        let short = crate::memory::short_of(bytes);
        let too_large = || DataError::TooLarge {
            batch,
            seq,
            bytes: crate::memory::human(bytes),
            available: short.map_or("less".into(), crate::memory::human),
        };
        if short.is_some() {
            return Err(too_large());
        }
        let room = || {
            let mut v = Vec::new();
            v.try_reserve_exact(count).map_err(|_| too_large())?;
            Ok(v)
        };
        Ok(Batch {
            batch,
            seq,
            tokens: room()?,
            targets: room()?,
            documents: room()?,
            queries: Vec::new(),
        })
    }

    /// Tokens with a loss.
    pub fn scored(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}

/// Where a source is: its seed and how far its random stream has run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataState {
    pub seed: u64,
    /// The random stream's position, in 32-bit words (a decimal string: JSON numbers cannot
    /// hold 128 bits).
    pub position: String,
}

fn rng_state(rng: &ChaCha8Rng, seed: u64) -> DataState {
    DataState {
        seed,
        position: rng.get_word_pos().to_string(),
    }
}

fn rng_at(state: &DataState) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(state.seed);
    rng.set_word_pos(state.position.parse().unwrap_or(0));
    rng
}

/// A source of training batches.
pub trait Source: Send {
    fn next_batch(&mut self, batch: usize, seq: usize) -> Result<Batch, DataError>;
    fn state(&self) -> DataState;
    fn restore(&mut self, state: &DataState);
    /// What it is, for logs (`text: data/ (3 files, 1.2 MB)`, `recall: 4 pairs`).
    fn describe(&self) -> String;
}

/// Text from a file, or every file under a folder (each file one document), as tokens: its
/// bytes, or a tokenizer's.
pub struct Text {
    path: PathBuf,
    tokens: Vec<u32>,
    /// Where each document's tokens start, and its id (the file's index): increasing, the
    /// first at 0 (a list of boundaries, not an id per token, which took twice the tokens'
    /// memory).
    documents: Vec<(usize, i64)>,
    files: usize,
    seed: u64,
    rng: ChaCha8Rng,
}

impl Text {
    /// The text at `path`, bytes as tokens.
    pub fn open(path: &Path, seed: u64) -> Result<Text, DataError> {
        Text::open_encoded(path, seed, |bytes| {
            Ok(bytes.iter().map(|&b| u32::from(b)).collect())
        })
    }

    /// The text at `path`, each file encoded by `encode` (a tokenizer; its error is said
    /// with the file's name).
    pub fn open_encoded(
        path: &Path,
        seed: u64,
        encode: impl Fn(&[u8]) -> Result<Vec<u32>, String>,
    ) -> Result<Text, DataError> {
        let read_error = |p: &Path, e: std::io::Error| DataError::Read {
            path: p.to_path_buf(),
            message: e.to_string(),
        };
        let mut files = Vec::new();
        if path.is_dir() {
            fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
                let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
                    .map(|e| e.map(|e| e.path()))
                    .collect::<Result<_, _>>()?;
                entries.sort();
                for p in entries {
                    if p.is_dir() {
                        walk(&p, out)?;
                    } else {
                        out.push(p);
                    }
                }
                Ok(())
            }
            walk(path, &mut files).map_err(|e| read_error(path, e))?;
        } else {
            files.push(path.to_path_buf());
        }
        let mut tokens = Vec::new();
        let mut documents = Vec::new();
        let mut count = 0;
        for (i, file) in files.iter().enumerate() {
            // The file's bytes, and at most a token of 4 bytes per byte: refused with the
            // sizes where that cannot fit, before it is read.
            let size = std::fs::metadata(file)
                .map_err(|e| read_error(file, e))?
                .len();
            let needed = size.saturating_mul(5);
            if let Some(available) = crate::memory::short_of(needed) {
                return Err(DataError::Read {
                    path: file.clone(),
                    message: format!(
                        "its {} of text, read and encoded, need up to {}, and {} of memory is \
                         available",
                        crate::memory::human(size),
                        crate::memory::human(needed),
                        crate::memory::human(available)
                    ),
                });
            }
            let data = std::fs::read(file).map_err(|e| read_error(file, e))?;
            if data.is_empty() {
                continue;
            }
            let ids = encode(&data).map_err(|message| DataError::Encode {
                path: file.clone(),
                message,
            })?;
            if ids.is_empty() {
                continue;
            }
            count += 1;
            documents.push((tokens.len(), i as i64));
            tokens.extend(ids);
        }
        if tokens.is_empty() {
            return Err(DataError::Empty(path.to_path_buf()));
        }
        Ok(Text {
            path: path.to_path_buf(),
            tokens,
            documents,
            files: count,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// Tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    fn check(&self, seq: usize) -> Result<(), DataError> {
        if self.tokens.len() < seq + 1 {
            return Err(DataError::TooShort {
                path: self.path.clone(),
                tokens: self.tokens.len(),
                seq,
                needed: seq + 1,
            });
        }
        Ok(())
    }

    fn window(&self, start: usize, seq: usize, batch: &mut Batch) {
        // The document of the window's first token, then the next boundary after it.
        let mut doc = self.documents.partition_point(|&(first, _)| first <= start) - 1;
        for i in start..start + seq {
            batch.tokens.push(i64::from(self.tokens[i]));
            batch.targets.push(i64::from(self.tokens[i + 1]));
            while self
                .documents
                .get(doc + 1)
                .is_some_and(|&(first, _)| first <= i)
            {
                doc += 1;
            }
            batch.documents.push(self.documents[doc].1);
        }
    }

    /// The consecutive, non-overlapping windows of `seq` tokens, in order (for evaluation):
    /// at most `limit` of them, grouped in batches of `batch`.
    pub fn windows(&self, batch: usize, seq: usize, limit: usize) -> Result<Vec<Batch>, DataError> {
        self.check(seq)?;
        let count = ((self.tokens.len() - 1) / seq).min(limit);
        let mut out = Vec::new();
        for first in (0..count).step_by(batch) {
            let rows = batch.min(count - first);
            let mut b = Batch::with_capacity(rows, seq)?;
            for row in 0..rows {
                self.window((first + row) * seq, seq, &mut b);
            }
            out.push(b);
        }
        Ok(out)
    }
}

impl Source for Text {
    fn next_batch(&mut self, batch: usize, seq: usize) -> Result<Batch, DataError> {
        self.check(seq)?;
        let mut b = Batch::with_capacity(batch, seq)?;
        for _ in 0..batch {
            let start = self.rng.random_range(0..=self.tokens.len() - seq - 1);
            self.window(start, seq, &mut b);
        }
        Ok(b)
    }

    fn state(&self) -> DataState {
        rng_state(&self.rng, self.seed)
    }

    fn restore(&mut self, state: &DataState) {
        self.seed = state.seed;
        self.rng = rng_at(state);
    }

    fn describe(&self) -> String {
        format!(
            "text: {} ({} file{}, {} tokens)",
            self.path.display(),
            self.files,
            if self.files == 1 { "" } else { "s" },
            self.tokens.len()
        )
    }
}

/// Associative recall: `pairs` key-value pairs (an uppercase key, a digit) planted among
/// lowercase filler in the first part of the sequence; at its end, each key again, whose next
/// token (its value) is the only thing scored. Recalling a value needs attention reaching back
/// as far as its pair: a sliding window of W keys cannot once the distance exceeds W.
pub struct Recall {
    pub pairs: usize,
    seed: u64,
    rng: ChaCha8Rng,
}

impl Recall {
    pub const DEFAULT_PAIRS: usize = 4;
    /// One pair per uppercase letter, the keys.
    pub const MAX_PAIRS: usize = 26;

    /// The task with `pairs` pairs (1 to [`Recall::MAX_PAIRS`]).
    pub fn new(pairs: usize, seed: u64) -> Result<Recall, DataError> {
        if !(1..=Recall::MAX_PAIRS).contains(&pairs) {
            return Err(DataError::RecallPairs(pairs));
        }
        Ok(Recall {
            pairs,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// The shortest sequence the task fits in.
    pub fn min_seq(pairs: usize) -> usize {
        4 * pairs + 8
    }

    fn row(&mut self, seq: usize, row: usize, b: &mut Batch) {
        let pairs = self.pairs;
        let mut tokens: Vec<i64> = (0..seq)
            .map(|_| {
                // Lowercase letters with some spaces.
                if self.rng.random_bool(0.15) {
                    i64::from(b' ')
                } else {
                    i64::from(b'a') + self.rng.random_range(0..26)
                }
            })
            .collect();
        // Distinct keys.
        let mut keys: Vec<i64> = (0..26).map(|k| i64::from(b'A') + k).collect();
        for i in 0..pairs {
            let j = self.rng.random_range(i..26);
            keys.swap(i, j);
        }
        let values: Vec<i64> = (0..pairs)
            .map(|_| i64::from(b'0') + self.rng.random_range(0..10))
            .collect();
        // Pair positions: distinct, non-adjacent slots before the queries.
        let query_start = seq - 2 * pairs;
        let slots = (query_start - 2) / 2;
        let mut chosen: Vec<usize> = Vec::new();
        while chosen.len() < pairs {
            let s = self.rng.random_range(0..slots);
            if !chosen.contains(&s) {
                chosen.push(s);
            }
        }
        let mut targets = vec![-1i64; seq];
        for i in 0..pairs {
            let at = 2 * chosen[i];
            tokens[at] = keys[i];
            tokens[at + 1] = values[i];
        }
        // Queries in a random order.
        let mut order: Vec<usize> = (0..pairs).collect();
        for i in 0..pairs {
            let j = self.rng.random_range(i..pairs);
            order.swap(i, j);
        }
        for (q, &i) in order.iter().enumerate() {
            let at = query_start + 2 * q;
            tokens[at] = keys[i];
            tokens[at + 1] = values[i];
            targets[at] = values[i];
            b.queries.push((row, at, at - 2 * chosen[i]));
        }
        b.tokens.extend(tokens);
        b.targets.extend(targets);
        b.documents.extend(std::iter::repeat_n(0, seq));
    }
}

impl Source for Recall {
    fn next_batch(&mut self, batch: usize, seq: usize) -> Result<Batch, DataError> {
        let needed = Recall::min_seq(self.pairs);
        if seq < needed {
            return Err(DataError::RecallTooShort {
                seq,
                pairs: self.pairs,
                needed,
            });
        }
        let mut b = Batch::with_capacity(batch, seq)?;
        for row in 0..batch {
            self.row(seq, row, &mut b);
        }
        Ok(b)
    }

    fn state(&self) -> DataState {
        rng_state(&self.rng, self.seed)
    }

    fn restore(&mut self, state: &DataState) {
        self.seed = state.seed;
        self.rng = rng_at(state);
    }

    fn describe(&self) -> String {
        format!("recall: {} key-value pairs per sequence", self.pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_rows_plant_pairs_and_score_only_the_values() {
        let mut task = Recall::new(4, 1).unwrap();
        let b = task.next_batch(3, 64).unwrap();
        assert_eq!(b.tokens.len(), 3 * 64);
        assert_eq!(b.scored(), 12);
        assert_eq!(b.queries.len(), 12);
        for &(row, at, distance) in &b.queries {
            let key = b.tokens[row * 64 + at];
            let value = b.targets[row * 64 + at];
            assert!((i64::from(b'A')..=i64::from(b'Z')).contains(&key));
            assert_eq!(b.tokens[row * 64 + at + 1], value);
            // The pair is `distance` tokens back, with the same key and value.
            assert_eq!(b.tokens[row * 64 + at - distance], key);
            assert_eq!(b.tokens[row * 64 + at - distance + 1], value);
        }
    }

    #[test]
    fn sources_resume_exactly_from_their_state() {
        let mut a = Recall::new(2, 7).unwrap();
        a.next_batch(2, 32).unwrap();
        let state = a.state();
        let next = a.next_batch(2, 32).unwrap();
        let mut b = Recall::new(2, 0).unwrap();
        b.restore(&state);
        assert_eq!(b.next_batch(2, 32).unwrap(), next);
    }

    #[test]
    fn text_is_encoded_file_by_file() {
        let dir = std::env::temp_dir().join(format!("zebra-encoded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.txt"), "one two").unwrap();
        std::fs::write(dir.join("b.txt"), "three").unwrap();
        // Words as tokens, each file starting with token 0.
        let words = |bytes: &[u8]| -> Result<Vec<u32>, String> {
            let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
            Ok(std::iter::once(0)
                .chain(text.split(' ').map(|w| w.len() as u32))
                .collect())
        };
        let mut text = Text::open_encoded(&dir, 1, words).unwrap();
        assert_eq!(text.len(), 5);
        let b = text.next_batch(1, 4).unwrap();
        assert_eq!(b.tokens, [0, 3, 3, 0]);
        assert_eq!(b.targets, [3, 3, 0, 5]);
        assert_eq!(b.documents, [0, 0, 0, 1]);
        assert!(text.describe().contains("2 files, 5 tokens"));
        let refuse = |_: &[u8]| -> Result<Vec<u32>, String> { Err("no such word".into()) };
        let err = Text::open_encoded(&dir, 1, refuse)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("cannot encode") && err.contains("a.txt: no such word"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Each token's document id, from the documents' boundaries, in every window of every
    /// start: a window starting in any document, crossing one or several boundaries.
    #[test]
    fn windows_give_each_token_its_documents_id() {
        let dir = std::env::temp_dir().join(format!("zebra-docs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut expected = Vec::new();
        for (i, len) in [3, 1, 0, 2, 1, 4].into_iter().enumerate() {
            std::fs::write(dir.join(format!("{i}.txt")), "x".repeat(len)).unwrap();
            expected.extend(std::iter::repeat_n(i as i64, len));
        }
        let text = Text::open(&dir, 0).unwrap();
        assert_eq!(text.len(), expected.len());
        assert!(text.describe().contains("5 files, 11 tokens"));
        for seq in 1..expected.len() {
            for start in 0..expected.len() - seq {
                let mut b = Batch::with_capacity(1, seq).unwrap();
                text.window(start, seq, &mut b);
                assert_eq!(b.documents, expected[start..start + seq], "{start} + {seq}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn text_windows_predict_the_next_byte() {
        let dir = std::env::temp_dir().join(format!("zebra-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.txt"), "hello world").unwrap();
        std::fs::write(dir.join("b.txt"), "").unwrap();
        std::fs::write(dir.join("c.txt"), "zebra").unwrap();
        let mut text = Text::open(&dir, 3).unwrap();
        assert_eq!(text.len(), 16);
        let b = text.next_batch(4, 5).unwrap();
        for row in 0..4 {
            for i in 0..4 {
                assert_eq!(b.targets[row * 5 + i], b.tokens[row * 5 + i + 1]);
            }
        }
        let err = text.next_batch(1, 20).unwrap_err().to_string();
        assert!(
            err.contains("has 16 tokens") && err.contains("sequences of 20 tokens"),
            "{err}"
        );
        let windows = text.windows(2, 5, 100).unwrap();
        assert_eq!(windows.iter().map(|w| w.batch).sum::<usize>(), 3);
        // The second file is empty; the third is document 2.
        assert_eq!(windows[1].documents[4], 2);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(Text::open(&dir, 0), Err(DataError::Read { .. })));
    }
}
