//! Reading and writing numpy `.npy` files with errors that name the file and the problem.

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use ndarray_npy::{ReadNpyError, ReadNpyExt, WritableElement, WriteNpyExt};

/// Why an `.npy` file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
}

fn open(path: &Path) -> Result<std::fs::File, NpyError> {
    std::fs::File::open(path).map_err(|source| NpyError::Open {
        path: path.to_path_buf(),
        source,
    })
}

fn format_error(path: &Path, err: ReadNpyError, want: &str) -> NpyError {
    let message = match err {
        ReadNpyError::WrongDescriptor(found) => {
            format!("expected {want}, found element type {found}")
        }
        other => format!("not a readable .npy file ({other})"),
    };
    NpyError::Format {
        path: path.to_path_buf(),
        message,
    }
}

/// Reads an integer array stored as int64 or int32 (numpy's usual token dtypes).
pub fn read_ints(path: &Path) -> Result<ArrayD<i64>, NpyError> {
    match ArrayD::<i64>::read_npy(open(path)?) {
        Ok(array) => Ok(array),
        Err(ReadNpyError::WrongDescriptor(_)) => ArrayD::<i32>::read_npy(open(path)?)
            .map(|a| a.mapv(i64::from))
            .map_err(|e| format_error(path, e, "int64 or int32")),
        Err(e) => Err(format_error(path, e, "int64 or int32")),
    }
}

/// Reads a float array stored as float32 or float64.
pub fn read_floats(path: &Path) -> Result<ArrayD<f64>, NpyError> {
    match ArrayD::<f32>::read_npy(open(path)?) {
        Ok(array) => Ok(array.mapv(f64::from)),
        Err(ReadNpyError::WrongDescriptor(_)) => ArrayD::<f64>::read_npy(open(path)?)
            .map_err(|e| format_error(path, e, "float32 or float64")),
        Err(e) => Err(format_error(path, e, "float32 or float64")),
    }
}

/// Writes an array (`f32` logits, `i64` tokens, ...), atomically.
pub fn write<A: WritableElement>(path: &Path, array: &ArrayD<A>) -> Result<(), NpyError> {
    let error = |message: String| NpyError::Write {
        path: path.to_path_buf(),
        message,
    };
    let mut bytes = Vec::new();
    array
        .write_npy(&mut bytes)
        .map_err(|e| error(e.to_string()))?;
    crate::weights::write_atomically(path, &bytes).map_err(|e| error(e.to_string()))
}
