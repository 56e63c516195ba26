//! Reading and writing numpy `.npy` files with errors that name the file and the problem.

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use ndarray_npy::{ReadNpyError, ReadNpyExt, WritableElement, WriteNpyExt};

/// Why an `.npy` file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("cannot open {path}: {cause}")]
    Open {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, NpyError> {
    std::fs::read(path).map_err(|cause| NpyError::Open {
        path: path.to_path_buf(),
        cause,
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

/// Refuses a file whose header claims more than the file holds (a longer header, or more
/// data than follows it) before a reader allocates what the header claims: a corrupt or
/// hostile header could claim gigabytes. Headers it cannot make out are left to the reader,
/// which reports them.
fn check_size(path: &Path, bytes: &[u8]) -> Result<(), NpyError> {
    let error = |message: String| NpyError::Format {
        path: path.to_path_buf(),
        message,
    };
    let Some((header_len, rest)) = header_length(bytes) else {
        return Ok(());
    };
    if header_len > rest.len() {
        return Err(error(format!(
            "its header's length is {header_len} bytes, the file holds {} after it",
            rest.len()
        )));
    }
    let (header, data) = rest.split_at(header_len);
    // numpy's headers are a dict holding a tuple (a list of tuples for structured types);
    // the reader's parser takes exponential time on deeply nested brackets.
    let depth = header
        .iter()
        .scan(0i64, |depth, c| {
            match c {
                b'(' | b'[' | b'{' => *depth += 1,
                b')' | b']' | b'}' => *depth -= 1,
                _ => {}
            }
            Some(*depth)
        })
        .max()
        .unwrap_or(0);
    if depth > MAX_HEADER_DEPTH {
        return Err(error(format!(
            "its header nests brackets {depth} deep; a numpy header nests at most {MAX_HEADER_DEPTH}"
        )));
    }
    let Some((shape, needed)) = std::str::from_utf8(header).ok().and_then(header_claim) else {
        return Ok(());
    };
    let data = data.len();
    if needed > data as u128 {
        let needed = match needed {
            u128::MAX => "more than 2^128".to_string(),
            n => n.to_string(),
        };
        return Err(error(format!(
            "its header's shape {shape} needs {needed} bytes of data, the file holds {data}"
        )));
    }
    Ok(())
}

/// The deepest nesting of brackets in the header of an `.npy` file written by numpy: a dict
/// holding a list of tuples holding a tuple (a structured type's field with a shape).
const MAX_HEADER_DEPTH: i64 = 4;

/// The header length an `.npy` file declares (after the magic string and the version: two
/// bytes in version 1, four after) and the bytes that follow it.
fn header_length(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let rest = bytes.strip_prefix(b"\x93NUMPY")?;
    let (&major, rest) = rest.split_first()?;
    let rest = rest.get(1..)?;
    match major {
        1 => Some((
            u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize,
            rest.get(2..)?,
        )),
        _ => Some((
            u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize,
            rest.get(4..)?,
        )),
    }
}

/// The largest shape an `.npy` header states (as written) and the bytes of data it needs,
/// from the digits of `'descr'` (at least one byte an element: a descriptor that is not a
/// plain string counts one). Every statement of the key counts, in either quotes, so that a
/// header the reader takes differently cannot slip past.
fn header_claim(header: &str) -> Option<(String, u128)> {
    let values = |key: &str| -> Vec<&str> {
        let quoted = [format!("'{key}'"), format!("\"{key}\"")];
        quoted
            .iter()
            .flat_map(|q| header.match_indices(q.as_str()))
            .filter_map(|(at, q)| {
                header[at + q.len()..]
                    .trim_start()
                    .strip_prefix(':')
                    .map(str::trim_start)
            })
            .collect()
    };
    let item = values("descr")
        .iter()
        .filter_map(|d| {
            let d = d.strip_prefix(['\'', '"'])?;
            let d = &d[..d.find(['\'', '"'])?];
            d.trim_start_matches(|c: char| !c.is_ascii_digit())
                .parse::<u128>()
                .ok()
        })
        .max()
        .unwrap_or(1)
        .max(1);
    values("shape")
        .into_iter()
        .filter_map(|v| {
            let tuple = &v[..=v.find(')')?];
            let dims = tuple.strip_prefix('(')?.strip_suffix(')')?;
            let elements = dims
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .try_fold(1u128, |n, d| {
                    let d: u128 = d.trim_end_matches('L').parse().ok()?;
                    Some(n.saturating_mul(d))
                })?;
            Some((tuple.to_string(), elements.saturating_mul(item)))
        })
        .max_by_key(|(_, n)| *n)
}

/// Reads an integer array stored as int64 or int32 (numpy's usual token dtypes).
pub fn read_ints(path: &Path) -> Result<ArrayD<i64>, NpyError> {
    ints_from_bytes(&read_bytes(path)?, path)
}

/// [`read_ints`] on the bytes of a file; `path` names it in errors.
pub fn ints_from_bytes(bytes: &[u8], path: &Path) -> Result<ArrayD<i64>, NpyError> {
    check_size(path, bytes)?;
    match ArrayD::<i64>::read_npy(bytes) {
        Ok(array) => Ok(array),
        Err(ReadNpyError::WrongDescriptor(_)) => ArrayD::<i32>::read_npy(bytes)
            .map(|a| a.mapv(i64::from))
            .map_err(|e| format_error(path, e, "int64 or int32")),
        Err(e) => Err(format_error(path, e, "int64 or int32")),
    }
}

/// Reads a float array stored as float32 or float64.
pub fn read_floats(path: &Path) -> Result<ArrayD<f64>, NpyError> {
    floats_from_bytes(&read_bytes(path)?, path)
}

/// [`read_floats`] on the bytes of a file; `path` names it in errors.
pub fn floats_from_bytes(bytes: &[u8], path: &Path) -> Result<ArrayD<f64>, NpyError> {
    check_size(path, bytes)?;
    match ArrayD::<f32>::read_npy(bytes) {
        Ok(array) => Ok(array.mapv(f64::from)),
        Err(ReadNpyError::WrongDescriptor(_)) => {
            ArrayD::<f64>::read_npy(bytes).map_err(|e| format_error(path, e, "float32 or float64"))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        header.push_str(&" ".repeat(63 - (10 + header.len()) % 64));
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        bytes
    }

    #[test]
    fn reads_int64_int32_and_floats() {
        let data: Vec<u8> = [3i64, -4].iter().flat_map(|x| x.to_le_bytes()).collect();
        let ints = ints_from_bytes(&npy("<i8", "(1, 2)", &data), Path::new("t.npy")).unwrap();
        assert_eq!(ints.shape(), &[1, 2]);
        assert_eq!(ints.iter().copied().collect::<Vec<_>>(), vec![3, -4]);
        let data: Vec<u8> = [7i32].iter().flat_map(|x| x.to_le_bytes()).collect();
        let ints = ints_from_bytes(&npy("<i4", "(1,)", &data), Path::new("t.npy")).unwrap();
        assert_eq!(ints.iter().copied().collect::<Vec<_>>(), vec![7]);
        let data: Vec<u8> = [0.5f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let floats = floats_from_bytes(&npy("<f4", "(2,)", &data), Path::new("t.npy")).unwrap();
        assert_eq!(floats.iter().copied().collect::<Vec<_>>(), vec![0.5, 2.0]);
    }

    #[test]
    fn a_header_claiming_more_than_the_file_holds_is_refused_before_allocating() {
        let err = ints_from_bytes(&npy("<i8", "(1000000000000000,)", &[]), Path::new("t.npy"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.npy"), "{err}");
        assert!(
            err.contains("needs 8000000000000000 bytes of data, the file holds 0"),
            "{err}"
        );
        let err = floats_from_bytes(&npy("<f4", "(1, 3)", &[0; 8]), Path::new("t.npy"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs 12 bytes of data, the file holds 8"),
            "{err}"
        );
        // A shape stated twice, and a descriptor that is not a plain string.
        let twice = npy("<i8", "(1,), 'shape': (1000000,)", &[0; 8]);
        let err = ints_from_bytes(&twice, Path::new("t.npy"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shape (1000000,) needs 8000000 bytes"),
            "{err}"
        );
        let mut header =
            "{'descr': [('a', '<i8')], 'fortran_order': False, 'shape': (1000000,), }".to_string();
        header.push_str(&" ".repeat(63 - (10 + header.len()) % 64));
        header.push('\n');
        let mut structured = b"\x93NUMPY\x01\x00".to_vec();
        structured.extend((header.len() as u16).to_le_bytes());
        structured.extend(header.as_bytes());
        let err = ints_from_bytes(&structured, Path::new("t.npy"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs 1000000 bytes of data, the file holds 0"),
            "{err}"
        );
        let nested = npy(
            "<i8",
            &format!("(1,), 'x': {}{}", "[".repeat(30), "]".repeat(30)),
            &[0; 8],
        );
        let err = ints_from_bytes(&nested, Path::new("t.npy"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("header nests brackets 31 deep"), "{err}");
        // Version 2: a four-byte header length, here claiming 4 GiB.
        let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
        v2.extend(u32::MAX.to_le_bytes());
        v2.extend(b"{'descr'");
        let err = ints_from_bytes(&v2, Path::new("t.npy"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("header's length is 4294967295 bytes, the file holds 8"),
            "{err}"
        );
    }

    #[test]
    fn wrong_types_and_garbage_are_named() {
        let err = ints_from_bytes(&npy("<f4", "(1,)", &[0; 4]), Path::new("t.npy"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected int64 or int32, found element type"),
            "{err}"
        );
        let err = ints_from_bytes(b"not numpy", Path::new("t.npy"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.npy: not a readable .npy file"), "{err}");
    }
}
