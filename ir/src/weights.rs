//! Named model weights, read from and written to safetensors files with Hugging Face names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// Why a weights file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("tensor `{name}` in {path} has element type {dtype:?}; expected F32, F64, F16 or BF16")]
    DType {
        path: PathBuf,
        name: String,
        dtype: Dtype,
    },
}

/// A set of named f32 tensors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Weights {
    tensors: BTreeMap<String, ArrayD<f32>>,
}

impl Weights {
    pub fn new() -> Weights {
        Weights::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: ArrayD<f32>) {
        self.tensors.insert(name.into(), tensor);
    }

    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.tensors.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut ArrayD<f32>> {
        self.tensors.get_mut(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &ArrayD<f32>)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Reads every tensor of a safetensors file, converting F64, F16 and BF16 to f32.
    pub fn load(path: &Path) -> Result<Weights, WeightsError> {
        let bytes = std::fs::read(path).map_err(|cause| WeightsError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Weights::from_bytes(&bytes, path)
    }

    /// Parses safetensors bytes; `path` only names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Weights, WeightsError> {
        let file = SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut weights = Weights::new();
        for (name, view) in file.tensors() {
            let values = to_f32(&view).ok_or_else(|| WeightsError::DType {
                path: path.to_path_buf(),
                name: name.clone(),
                dtype: view.dtype(),
            })?;
            let tensor = ArrayD::from_shape_vec(IxDyn(view.shape()), values).map_err(|e| {
                WeightsError::Format {
                    path: path.to_path_buf(),
                    message: format!("tensor `{name}`: {e}"),
                }
            })?;
            weights.insert(name, tensor);
        }
        Ok(weights)
    }

    /// Writes all tensors as F32, atomically: a temporary file is renamed into place.
    pub fn save(&self, path: &Path) -> Result<(), WeightsError> {
        let bytes = self.to_bytes();
        write_atomically(path, &bytes).map_err(|cause| WeightsError::Write {
            path: path.to_path_buf(),
            cause,
        })
    }

    /// The safetensors encoding of all tensors, as F32.
    pub fn to_bytes(&self) -> Vec<u8> {
        let buffers: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let bytes = t.iter().flat_map(|x| x.to_le_bytes()).collect();
                (name.clone(), bytes, t.shape().to_vec())
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .map(|(name, bytes, shape)| {
                let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .expect("the byte count matches the shape");
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize(views, None).expect("serializing in-memory f32 tensors")
    }
}

fn to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(values)
}

/// Writes a file so that readers see the old contents or the new, never a partial file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    // Unique per process and call, so that concurrent writers never share a temporary.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = dir.join(format!(".{file_name}.tmp{}-{n}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_safetensors() {
        let mut weights = Weights::new();
        weights.insert(
            "model.norm.weight",
            ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0, 2.0, -0.5]).unwrap(),
        );
        weights.insert(
            "lm_head.weight",
            ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![0.25, 0.5, 0.75, 1.0]).unwrap(),
        );
        let bytes = weights.to_bytes();
        let back = Weights::from_bytes(&bytes, Path::new("test")).unwrap();
        assert_eq!(back, weights);
    }

    #[test]
    fn garbage_is_refused_with_the_path() {
        let err =
            Weights::from_bytes(b"not a safetensors file", Path::new("w.safetensors")).unwrap_err();
        assert!(
            err.to_string()
                .contains("w.safetensors is not a valid safetensors file")
        );
    }
}
