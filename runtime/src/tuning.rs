//! A GPU tuning run on disk: `zebra tune FILE --target sm_90 -o DIR` compiles each distinct
//! attention of a model with every candidate setting of its tensor-core kernel, one attention
//! artifact per candidate under `DIR`, and lists them in `DIR/tune.json`; `zebra-run tune
//! DIR` times and checks each on the GPU and writes `DIR/results.json`; `zebra tune --record
//! DIR` reads both and records the fastest checked candidate of each attention in the
//! tuning database. The two files are here so that `zebra-run`, which links no compiler,
//! reads and writes them.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::artifact::ArtifactError;

/// The format version of `tune.json` and `results.json`.
pub const TUNE_FORMAT: u32 = 1;

/// `tune.json`: what a tuning run compiled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneManifest {
    pub format: u32,
    /// The target compiled for (`sm_80`, `sm_90`).
    pub target: String,
    /// The 16-bit type of the kernels' inputs (`bf16`, `f16`).
    pub dtype: String,
    /// The model file the attentions come from.
    pub source: String,
    /// The sequence length and timed runs per candidate `zebra tune` was asked for: what
    /// `zebra-run tune` uses unless told otherwise.
    pub seq_len: usize,
    pub repeats: usize,
    pub attentions: Vec<TunedAttention>,
    pub candidates: Vec<TuneCandidate>,
}

/// One distinct attention: what its best settings depend on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunedAttention {
    /// Its name in the model (the first layer kind that has it).
    pub name: String,
    pub mask: String,
    pub score: Option<String>,
    pub sides: Vec<String>,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
}

/// One compiled candidate: an attention artifact of one kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneCandidate {
    /// Its directory, relative to the run's.
    pub dir: String,
    /// Which of [`TuneManifest::attentions`] it computes.
    pub attention: usize,
    /// The product instruction (`sync`, `wgmma`, `wgmma-vt`), queries and keys per tile.
    pub mma: String,
    pub block_q: usize,
    pub block_k: usize,
    /// Whether these are the target's default settings, against which the others compete.
    pub default: bool,
}

/// `results.json`: what the GPU measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneResults {
    pub format: u32,
    /// The GPU's name, as its driver gives it: the tuning database's entries apply to it.
    pub device: String,
    pub seq_len: usize,
    pub batch: usize,
    pub runs: Vec<TuneRun>,
}

/// One candidate's run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneRun {
    /// The candidate's directory, as in [`TuneCandidate::dir`].
    pub dir: String,
    /// Median time of one launch; `None` when it did not run.
    pub time_ms: Option<f64>,
    /// The worst error of the checked rows against the f64 reference, in units of the
    /// tolerance (at most 1 passes).
    pub worst_error: Option<f64>,
    /// Whether it ran and its check passed.
    pub ok: bool,
    /// Why it did not run or did not pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TuneManifest {
    /// Reads and checks `DIR/tune.json`.
    pub fn load(dir: &Path) -> Result<TuneManifest, ArtifactError> {
        let path = dir.join("tune.json");
        if !path.exists() {
            return Err(ArtifactError::Read {
                path,
                message: "there is none: not a tuning run (prepare one with `zebra tune \
                          FILE.zb --target sm_90 -o DIR`)"
                    .into(),
            });
        }
        let manifest: TuneManifest =
            crate::artifact::read_versioned(&path, TUNE_FORMAT, "no format")?;
        let corrupt = |message: String| ArtifactError::Corrupt {
            path: path.clone(),
            message,
        };
        if manifest.seq_len == 0 || manifest.repeats == 0 {
            return Err(corrupt(
                "its sequence length and repeats must be at least 1".into(),
            ));
        }
        for candidate in &manifest.candidates {
            if candidate.attention >= manifest.attentions.len() {
                return Err(corrupt(format!(
                    "candidate `{}` names attention {}, of {}",
                    candidate.dir,
                    candidate.attention,
                    manifest.attentions.len()
                )));
            }
            if !is_plain_name(&candidate.dir) {
                return Err(corrupt(format!(
                    "candidate directory `{}` is not a plain name inside the run",
                    candidate.dir
                )));
            }
        }
        for (i, attention) in manifest.attentions.iter().enumerate() {
            let defaults = manifest
                .candidates
                .iter()
                .filter(|c| c.attention == i && c.default)
                .count();
            if defaults != 1 {
                return Err(corrupt(format!(
                    "attention `{}` has {defaults} default candidates, not one",
                    attention.name
                )));
            }
        }
        Ok(manifest)
    }
}

impl TuneResults {
    /// Reads and checks `DIR/results.json` against the run's manifest.
    pub fn load(dir: &Path, manifest: &TuneManifest) -> Result<TuneResults, ArtifactError> {
        let path = dir.join("results.json");
        if !path.exists() {
            return Err(ArtifactError::Read {
                path,
                message: "there is none yet: run `zebra-run tune DIR` on the GPU first".into(),
            });
        }
        let results: TuneResults =
            crate::artifact::read_versioned(&path, TUNE_FORMAT, "no format")?;
        if let Some(run) = results
            .runs
            .iter()
            .find(|r| !manifest.candidates.iter().any(|c| c.dir == r.dir))
        {
            return Err(ArtifactError::Corrupt {
                path,
                message: format!(
                    "a result for `{}`, which tune.json does not list: results of another run?",
                    run.dir
                ),
            });
        }
        Ok(results)
    }

    /// Writes `DIR/results.json` atomically (a temporary file, then a rename).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)? + "\n";
        zebra_ir::weights::write_atomically(&dir.join("results.json"), text.as_bytes())
    }
}

/// A directory name with no separators, no `..` and nothing hidden.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> TuneManifest {
        TuneManifest {
            format: TUNE_FORMAT,
            target: "sm_90".into(),
            dtype: "bf16".into(),
            source: "model.zb".into(),
            seq_len: 4096,
            repeats: 20,
            attentions: vec![TunedAttention {
                name: "local".into(),
                mask: "k <= q && q - k < 32".into(),
                score: None,
                sides: vec![],
                heads: 4,
                kv_heads: 2,
                head_dim: 64,
            }],
            candidates: vec![
                TuneCandidate {
                    dir: "a0-sync-128x64".into(),
                    attention: 0,
                    mma: "sync".into(),
                    block_q: 128,
                    block_k: 64,
                    default: true,
                },
                TuneCandidate {
                    dir: "a0-sync-64x32".into(),
                    attention: 0,
                    mma: "sync".into(),
                    block_q: 64,
                    block_k: 32,
                    default: false,
                },
            ],
        }
    }

    fn write(dir: &Path, name: &str, value: &impl Serialize) {
        std::fs::write(dir.join(name), serde_json::to_string(value).unwrap()).unwrap();
    }

    #[test]
    fn a_tuning_run_round_trips_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = TuneManifest::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("tune.json: there is none"), "{error}");
        write(dir.path(), "tune.json", &manifest());
        let loaded = TuneManifest::load(dir.path()).unwrap();
        assert_eq!(loaded, manifest());
        let error = TuneResults::load(dir.path(), &loaded)
            .unwrap_err()
            .to_string();
        assert!(error.contains("zebra-run tune"), "{error}");
        let results = TuneResults {
            format: TUNE_FORMAT,
            device: "NVIDIA H100 80GB HBM3".into(),
            seq_len: 4096,
            batch: 1,
            runs: vec![TuneRun {
                dir: "a0-sync-64x32".into(),
                time_ms: Some(0.5),
                worst_error: Some(0.1),
                ok: true,
                error: None,
            }],
        };
        results.save(dir.path()).unwrap();
        assert_eq!(TuneResults::load(dir.path(), &loaded).unwrap(), results);

        let mut stray = results.clone();
        stray.runs[0].dir = "a9-sync-64x64".into();
        stray.save(dir.path()).unwrap();
        let error = TuneResults::load(dir.path(), &loaded)
            .unwrap_err()
            .to_string();
        assert!(error.contains("a9-sync-64x64"), "{error}");

        let mut escaping = manifest();
        escaping.candidates[1].dir = "../elsewhere".into();
        write(dir.path(), "tune.json", &escaping);
        let error = TuneManifest::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("not a plain name"), "{error}");

        let mut no_default = manifest();
        no_default.candidates[0].default = false;
        write(dir.path(), "tune.json", &no_default);
        let error = TuneManifest::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("0 default candidates"), "{error}");

        let mut dangling = manifest();
        dangling.candidates[1].attention = 3;
        write(dir.path(), "tune.json", &dangling);
        let error = TuneManifest::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("names attention 3"), "{error}");

        let mut future = serde_json::to_value(manifest()).unwrap();
        future["format"] = 99.into();
        write(dir.path(), "tune.json", &future);
        let error = TuneManifest::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("format 99"), "{error}");
    }
}
