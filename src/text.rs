//! Text to token ids and back: bytes as tokens (Zebra's own models), or a Hugging Face
//! tokenizer (`tokenizer.json`) for imported checkpoints, with its end-of-sequence tokens
//! from the folder's `generation_config.json` or `config.json`.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};

/// How text becomes token ids.
pub enum Codec {
    /// Each byte is a token (vocabulary 256).
    Bytes,
    /// A Hugging Face tokenizer.
    Tokenizer {
        tokenizer: Box<tokenizers::Tokenizer>,
        path: PathBuf,
        /// Tokens that end a generation.
        eos: Vec<i64>,
    },
}

impl Codec {
    /// The codec for a model of `vocab` tokens: the tokenizer at `explicit`, else the
    /// `tokenizer.json` of the model folder `source` (weights from the Hub), else bytes.
    pub fn find(explicit: Option<&Path>, source: Option<&Path>, vocab: usize) -> Result<Codec> {
        let found = explicit.map(Path::to_path_buf).or_else(|| {
            let folder = source.filter(|s| s.is_dir())?;
            Some(folder.join("tokenizer.json")).filter(|t| t.is_file())
        });
        let Some(path) = found else {
            if vocab < 256 {
                bail!(
                    "the model has a vocabulary of {vocab}, too small for bytes as tokens (256): \
                     give its tokenizer with --tokenizer tokenizer.json"
                );
            }
            return Ok(Codec::Bytes);
        };
        let codec = Codec::load(&path)?;
        if let Codec::Tokenizer { tokenizer, .. } = &codec {
            let size = tokenizer.get_vocab_size(true);
            if size > vocab {
                bail!(
                    "the tokenizer {} has {size} tokens, more than the model's vocabulary of \
                     {vocab}: it is not this model's",
                    path.display()
                );
            }
        }
        Ok(codec)
    }

    /// A tokenizer file, with the end-of-sequence tokens of the configuration beside it.
    pub fn load(path: &Path) -> Result<Codec> {
        let tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            if path.exists() {
                anyhow!("{} is not a Hugging Face tokenizer: {e}", path.display())
            } else {
                anyhow!(
                    "cannot read the tokenizer {}: it does not exist",
                    path.display()
                )
            }
        })?;
        let folder = path.parent().unwrap_or(Path::new("."));
        let eos = ["generation_config.json", "config.json"]
            .iter()
            .find_map(|name| eos_tokens(&folder.join(name)))
            .unwrap_or_default();
        Ok(Codec::Tokenizer {
            tokenizer: Box::new(tokenizer),
            path: path.to_path_buf(),
            eos,
        })
    }

    /// The ids of `text` (with the tokenizer's special tokens, as a beginning-of-sequence).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let ids = self.encode_bytes(text.as_bytes()).map_err(|e| {
            let path = self.path().unwrap_or(Path::new("the tokenizer"));
            anyhow!("{} cannot encode the text: {e}", path.display())
        })?;
        Ok(ids.into_iter().map(i64::from).collect())
    }

    /// The ids of a file's bytes (invalid UTF-8 as replacement characters for a tokenizer),
    /// for [`zebra_runtime::data::Text::open_encoded`].
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<Vec<u32>, String> {
        match self {
            Codec::Bytes => Ok(bytes.iter().map(|&b| u32::from(b)).collect()),
            Codec::Tokenizer { tokenizer, .. } => {
                let text = String::from_utf8_lossy(bytes);
                let encoding = tokenizer
                    .encode(text.as_ref(), true)
                    .map_err(|e| e.to_string())?;
                Ok(encoding.get_ids().to_vec())
            }
        }
    }

    /// The tokenizer's file (none for bytes).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Codec::Bytes => None,
            Codec::Tokenizer { path, .. } => Some(path),
        }
    }

    /// Whether `token` ends a generation.
    pub fn ends(&self, token: i64) -> bool {
        match self {
            Codec::Bytes => false,
            Codec::Tokenizer { eos, .. } => eos.contains(&token),
        }
    }

    /// A decoder for the tokens generated after `prompt`: what they add to the prompt's
    /// text (a word's leading space included, which a tokenizer drops at the start of a text).
    pub fn stream(&self, prompt: &[i64]) -> Result<Stream<'_>> {
        let ids = prompt
            .iter()
            .map(|&t| u32::try_from(t).map_err(|_| anyhow!("token id {t} is not a tokenizer id")))
            .collect::<Result<Vec<u32>>>()?;
        // A few tokens of the prompt give the first new ones their context.
        let read = ids.len();
        Ok(Stream {
            codec: self,
            ids,
            prefix: read.saturating_sub(STREAM_CONTEXT),
            read,
        })
    }
}

/// Tokens before the unwritten ones that a stream decodes with them.
const STREAM_CONTEXT: usize = 5;

/// The `eos_token_id` (a number or a list) of a configuration file, if it has one.
fn eos_tokens(path: &Path) -> Option<Vec<i64>> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    match json.get("eos_token_id")? {
        serde_json::Value::Array(ids) => Some(ids.iter().filter_map(|v| v.as_i64()).collect()),
        v => v.as_i64().map(|id| vec![id]),
    }
}

/// Turns generated tokens into text as they come. A tokenizer's text for a token depends on
/// the tokens around it (a word's leading space, a character split over byte tokens), so each
/// step decodes the unwritten tokens with a few written ones before them, hands out what
/// they add to those, and holds back text that ends inside a character: every step costs
/// the same however long the generation.
pub struct Stream<'a> {
    codec: &'a Codec,
    ids: Vec<u32>,
    /// The first token decoded for context.
    prefix: usize,
    /// The first token whose text is not written yet.
    read: usize,
}

impl Stream<'_> {
    /// The new text after `token` (bytes for the byte codec).
    pub fn push(&mut self, token: i64) -> Result<Vec<u8>> {
        let Codec::Tokenizer {
            tokenizer, path, ..
        } = self.codec
        else {
            return Ok(vec![token as u8]);
        };
        let id =
            u32::try_from(token).map_err(|_| anyhow!("token id {token} is not a tokenizer id"))?;
        self.ids.push(id);
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, true)
                .map_err(|e| anyhow!("{} cannot decode: {e}", path.display()))
        };
        let before = decode(&self.ids[self.prefix..self.read])?;
        let after = decode(&self.ids[self.prefix..])?;
        if after.ends_with('\u{fffd}')
            || after.len() <= before.len()
            || !after.is_char_boundary(before.len())
        {
            // A character not yet complete, or nothing new yet.
            return Ok(Vec::new());
        }
        let new = after.as_bytes()[before.len()..].to_vec();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/tokenizer.json")
    }

    #[test]
    fn a_tokenizer_encodes_as_the_python_library_and_streams_back_the_text() {
        let codec = Codec::load(&fixture()).unwrap();
        let ids = codec.encode("a zebra is local").unwrap();
        // As the Python `tokenizers` encodes it (the fixture's README).
        assert_eq!(ids, [1, 25, 38, 22, 11, 18, 31]);
        let mut stream = codec.stream(&[]).unwrap();
        let mut text = Vec::new();
        for &id in &ids {
            text.extend(stream.push(id).unwrap());
        }
        assert_eq!(String::from_utf8(text).unwrap(), "a zebra is local");
        // After a prompt, a word keeps its leading space.
        let mut stream = codec.stream(&ids[..3]).unwrap();
        let rest: Vec<u8> = ids[3..]
            .iter()
            .flat_map(|&id| stream.push(id).unwrap())
            .collect();
        assert_eq!(String::from_utf8(rest).unwrap(), " is local");
        assert!(
            !codec.ends(2),
            "no configuration beside the fixture: no end token"
        );
    }

    #[test]
    fn end_tokens_come_from_the_configuration_and_bad_tokenizers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::copy(fixture(), &path).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"eos_token_id": [2, 7]}"#,
        )
        .unwrap();
        let codec = Codec::find(None, Some(dir.path()), 64).unwrap();
        assert!(codec.ends(2) && codec.ends(7) && !codec.ends(1));
        let err = Codec::find(None, Some(dir.path()), 32)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("more than the model's vocabulary of 32"),
            "{err}"
        );
        // No tokenizer: bytes, when the vocabulary holds them.
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Codec::find(None, Some(empty.path()), 256).unwrap(),
            Codec::Bytes
        ));
        let err = Codec::find(None, Some(empty.path()), 64)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--tokenizer"), "{err}");
        std::fs::write(&path, "{").unwrap();
        let err = Codec::load(&path).err().unwrap().to_string();
        assert!(err.contains("is not a Hugging Face tokenizer"), "{err}");
        let err = Codec::load(&dir.path().join("none.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
