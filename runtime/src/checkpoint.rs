//! Training checkpoints in a run directory:
//!
//! ```text
//! RUN_DIR/checkpoint.json                 which checkpoint is current, and its metadata
//! RUN_DIR/checkpoints/step-000100/model.safetensors       weights (Hugging Face names)
//! RUN_DIR/checkpoints/step-000100/optimizer.safetensors   AdamW moments (`m.NAME`, `v.NAME`)
//! ```
//!
//! A checkpoint is written in full under its own folder first; only then is `checkpoint.json`
//! replaced, atomically (a temporary file renamed into place), so a crash at any moment leaves
//! the previous checkpoint current and whole. The two newest checkpoints are kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};
use zebra_ir::Weights;

use crate::data::DataState;
use crate::optim::{AdamW, AdamWConfig, Moments};

/// Why a checkpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{0} has no checkpoint (no checkpoint.json)")]
    Missing(PathBuf),
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "the checkpoint in {path} was trained for another model (configuration {found}, this \
         model is {expected}); nothing was changed"
    )]
    WrongModel {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    /// A checkpoint's weights or optimizer state that is not a valid safetensors file (the
    /// error names the file).
    #[error(transparent)]
    Tensors(#[from] zebra_ir::weights::WeightsError),
}

/// How the run was set up: enough to continue it exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The model source file, and the model's name in it.
    pub model_path: String,
    pub model: String,
    /// A hash of the model's graph: a checkpoint only loads into the same model.
    pub config_hash: String,
    /// `recall` or `text:PATH`.
    pub data: String,
    pub seq_len: usize,
    pub batch: usize,
    pub steps: u64,
    pub seed: u64,
    pub optimizer: AdamWConfig,
    /// A checkpoint every this many steps.
    pub checkpoint_every: u64,
    /// Replaces every layer's attention kind (`--every-layer`), when set.
    #[serde(default)]
    pub every_layer: Option<String>,
    /// The Hugging Face tokenizer that encodes the text data (none: bytes as tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
}

/// The metadata of one checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: u32,
    pub step: u64,
    pub config: RunConfig,
    pub data: DataState,
    /// Tokens trained on so far, and training time (seconds).
    pub tokens: u64,
    pub elapsed: f64,
    /// The last loss per scored token.
    pub loss: f64,
    /// The folder of this checkpoint, relative to the run directory.
    pub folder: String,
}

pub const CHECKPOINT_FORMAT: u32 = 1;

/// A loaded checkpoint.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub weights: Weights,
    pub optimizer: AdamW,
}

fn read(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(|e| CheckpointError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Reads `checkpoint.json` only (cheap): the run's configuration and progress.
pub fn meta(run_dir: &Path) -> Result<CheckpointMeta, CheckpointError> {
    let path = run_dir.join("checkpoint.json");
    if !path.exists() {
        return Err(CheckpointError::Missing(run_dir.to_path_buf()));
    }
    let text = read(&path)?;
    let meta: CheckpointMeta =
        serde_json::from_slice(&text).map_err(|e| CheckpointError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
    if meta.format != CHECKPOINT_FORMAT {
        return Err(CheckpointError::Corrupt {
            path,
            message: format!(
                "checkpoint format {}, this version reads {CHECKPOINT_FORMAT}",
                meta.format
            ),
        });
    }
    Ok(meta)
}

/// The weights of the current checkpoint's folder.
pub fn weights_path(run_dir: &Path, meta: &CheckpointMeta) -> PathBuf {
    run_dir.join(&meta.folder).join("model.safetensors")
}

/// Loads the current checkpoint, checking that it belongs to the model with `config_hash`.
pub fn load(run_dir: &Path, config_hash: &str) -> Result<Checkpoint, CheckpointError> {
    let meta = meta(run_dir)?;
    if meta.config.config_hash != config_hash {
        return Err(CheckpointError::WrongModel {
            path: run_dir.to_path_buf(),
            found: meta.config.config_hash.clone(),
            expected: config_hash.to_string(),
        });
    }
    let folder = run_dir.join(&meta.folder);
    let weights_file = folder.join("model.safetensors");
    let weights = Weights::from_bytes(&read(&weights_file)?, &weights_file)?;
    let optimizer_file = folder.join("optimizer.safetensors");
    let state = Weights::from_bytes(&read(&optimizer_file)?, &optimizer_file)?;
    let mut optimizer = AdamW {
        step: meta.step,
        moments: BTreeMap::new(),
    };
    for (name, tensor) in weights.iter() {
        let corrupt = |message: String| CheckpointError::Corrupt {
            path: optimizer_file.clone(),
            message,
        };
        let get = |prefix: &str| -> Result<Vec<f32>, CheckpointError> {
            let key = format!("{prefix}.{name}");
            let t = state
                .get(&key)
                .ok_or_else(|| corrupt(format!("no `{key}`")))?;
            if t.len() != tensor.len() {
                return Err(corrupt(format!(
                    "`{key}` has {} values for a weight of {}",
                    t.len(),
                    tensor.len()
                )));
            }
            Ok(t.iter().copied().collect())
        };
        if state.get(&format!("m.{name}")).is_some() {
            optimizer.moments.insert(
                name.to_string(),
                Moments {
                    m: get("m")?,
                    v: get("v")?,
                },
            );
        }
    }
    Ok(Checkpoint {
        meta,
        weights,
        optimizer,
    })
}

/// Writes a checkpoint and makes it current (see the module's documentation).
pub fn save(
    run_dir: &Path,
    meta: &CheckpointMeta,
    weights: &Weights,
    optimizer: &AdamW,
) -> Result<(), CheckpointError> {
    let folder = run_dir.join(&meta.folder);
    std::fs::create_dir_all(&folder).map_err(|e| write_error(&folder, e))?;
    let model_file = folder.join("model.safetensors");
    weights
        .save(&model_file)
        .map_err(|e| write_error(&model_file, e))?;
    let mut state = Weights::new();
    for (name, moments) in &optimizer.moments {
        let shape = weights
            .get(name)
            .map_or_else(|| vec![moments.m.len()], |w| w.shape().to_vec());
        for (prefix, values) in [("m", &moments.m), ("v", &moments.v)] {
            state.insert(
                format!("{prefix}.{name}"),
                ArrayD::from_shape_vec(IxDyn(&shape), values.clone())
                    .expect("moments have the weight's size"),
            );
        }
    }
    let optimizer_file = folder.join("optimizer.safetensors");
    state
        .save(&optimizer_file)
        .map_err(|e| write_error(&optimizer_file, e))?;
    let pointer = run_dir.join("checkpoint.json");
    let json = serde_json::to_string_pretty(meta).map_err(|e| write_error(&pointer, e))?;
    zebra_ir::weights::write_atomically(&pointer, json.as_bytes())
        .map_err(|e| write_error(&pointer, e))?;
    // Keep the two newest checkpoints.
    let all = run_dir.join("checkpoints");
    if let Ok(entries) = std::fs::read_dir(&all) {
        let mut folders: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            })
            .collect();
        folders.sort();
        let current = folder.canonicalize().ok();
        let keep = folders.len().saturating_sub(2);
        for old in folders.into_iter().take(keep) {
            if old.canonicalize().ok() != current {
                let _ = std::fs::remove_dir_all(old);
            }
        }
    }
    Ok(())
}

/// The folder name of the checkpoint of `step`.
pub fn folder_of(step: u64) -> String {
    format!("checkpoints/step-{step:06}")
}
