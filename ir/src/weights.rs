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
    #[error(
        "{0} holds no weights: a model folder holds model.safetensors, or \
         model.safetensors.index.json and the shards it names"
    )]
    NoWeights(PathBuf),
    #[error("{path} is not a valid safetensors index: {message}")]
    Index { path: PathBuf, message: String },
    #[error(
        "the weights in {path} take {needed} in f32 (Zebra computes in f32), and {available} of \
         memory is available"
    )]
    Memory {
        path: PathBuf,
        needed: String,
        available: String,
    },
    #[error("tensor `{name}` in {path} has element type {dtype:?}; expected F32, F64, F16 or BF16")]
    DType {
        path: PathBuf,
        name: String,
        dtype: Dtype,
    },
}

/// What the tensors of a safetensors file take in f32, from its header (0 where it does not
/// parse: the loader then says why).
fn f32_bytes(bytes: &[u8]) -> u64 {
    SafeTensors::read_metadata(bytes).map_or(0, |(_, metadata)| {
        metadata.tensors().values().fold(0u64, |n, info| {
            let size = crate::memory::product(info.shape.iter().copied().chain([4]));
            n.saturating_add(size)
        })
    })
}

/// Refuses weights of `bytes` in f32 (from `path`) that the memory left cannot hold.
fn fits(path: &Path, bytes: u64) -> Result<(), WeightsError> {
    match crate::memory::short_of(bytes) {
        Some(available) => Err(WeightsError::Memory {
            path: path.to_path_buf(),
            needed: crate::memory::human(bytes),
            available: crate::memory::human(available),
        }),
        None => Ok(()),
    }
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

    /// A warning naming the tensors model `model` does not read (`reads` says which it
    /// does), if there are any: a checkpoint with biases or QK-norm scales that the source
    /// leaves out would otherwise compute something else without a word. RoPE's
    /// `rotary_emb.inv_freq` buffers, which old checkpoints keep, are not counted.
    pub fn unread_warning(&self, model: &str, reads: impl Fn(&str) -> bool) -> Option<String> {
        const SHOWN: usize = 8;
        let unread: Vec<&str> = self
            .names()
            .filter(|name| !reads(name) && !name.ends_with("rotary_emb.inv_freq"))
            .collect();
        let (count, plural) = match unread.len() {
            0 => return None,
            1 => ("1".to_string(), "tensor of the weights is"),
            n => (n.to_string(), "tensors of the weights are"),
        };
        let more = match unread.len().saturating_sub(SHOWN) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        Some(format!(
            "warning: {count} {plural} not read by model `{model}`: {}{more} (does the \
             source leave out part of the model, such as `bias` or `qk_norm`?)",
            unread[..unread.len().min(SHOWN)].join(", "),
        ))
    }

    /// Reads every tensor of a safetensors file, converting F64, F16 and BF16 to f32; or of
    /// a checkpoint in shards, as Hugging Face writes large models: `path` is then the index
    /// (`model.safetensors.index.json`, whose `weight_map` names each tensor's shard) or a
    /// model folder holding it (or holding one `model.safetensors`).
    pub fn load(path: &Path) -> Result<Weights, WeightsError> {
        if path.is_dir() {
            let index = path.join(INDEX);
            if index.is_file() {
                return Weights::load_index(&index);
            }
            if !Weights::in_folder(path) {
                return Err(WeightsError::NoWeights(path.to_path_buf()));
            }
            return Weights::load_file(&path.join("model.safetensors"));
        }
        if path.to_string_lossy().ends_with(".index.json") {
            return Weights::load_index(path);
        }
        Weights::load_file(path)
    }

    /// Whether `dir` is a model folder [`Weights::load`] reads: it holds `model.safetensors`
    /// or a sharded checkpoint's index.
    pub fn in_folder(dir: &Path) -> bool {
        dir.join(INDEX).is_file() || dir.join("model.safetensors").is_file()
    }

    fn load_file(path: &Path) -> Result<Weights, WeightsError> {
        let file = std::fs::File::open(path).map_err(|cause| WeightsError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        // Mapped rather than read, the tensors are converted straight from the page cache,
        // without a second copy of the whole file in memory (for a model of several GB, the
        // difference between loading and running out of memory). What cannot be mapped (an
        // empty file, a pipe) is read.
        // SAFETY: the map is only read, and only while the tensors are converted to owned
        // arrays; a file another process rewrote in place meanwhile gives wrong values, as
        // reading it would. Zebra itself replaces files by renaming new ones into place, which
        // leaves the mapped one untouched.
        match unsafe { memmap2::Mmap::map(&file) } {
            Ok(map) if !map.is_empty() => {
                fits(path, f32_bytes(&map))?;
                Weights::from_bytes(&map, path)
            }
            _ => Weights::from_bytes(&read(path)?, path),
        }
    }

    /// The shards an index names, each read once; every tensor the index lists must be in
    /// the shard it names, and no tensor may be in two shards.
    fn load_index(index: &Path) -> Result<Weights, WeightsError> {
        let error = |message: String| WeightsError::Index {
            path: index.to_path_buf(),
            message,
        };
        let text = read(index)?;
        let json: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| error(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| error("it has no `weight_map` object".into()))?;
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                error(format!("the shard of `{name}` is not a file name: {shard}"))
            })?;
            if Path::new(shard).file_name() != Some(std::ffi::OsStr::new(shard)) {
                return Err(error(format!(
                    "the shard `{shard}` is not a file name in the index's folder"
                )));
            }
            shards.entry(shard).or_default().push(name);
        }
        if shards.is_empty() {
            return Err(error("its `weight_map` names no tensors".into()));
        }
        let folder = index.parent().unwrap_or(Path::new("."));
        // Every shard's tensors in f32 together, from their headers, before any is converted.
        let mut total = 0u64;
        for shard in shards.keys() {
            let file = std::fs::File::open(folder.join(shard));
            // SAFETY: as in `load_file`; only the header is read here.
            if let Ok(map) = file.and_then(|f| unsafe { memmap2::Mmap::map(&f) }) {
                total = total.saturating_add(f32_bytes(&map));
            }
        }
        fits(index, total)?;
        let mut weights = Weights::new();
        let mut home: BTreeMap<String, &str> = BTreeMap::new();
        for (shard, names) in shards {
            let file = folder.join(shard);
            let part = Weights::load_file(&file)?;
            if let Some(name) = names.iter().find(|n| part.get(n).is_none()) {
                return Err(error(format!(
                    "it puts tensor `{name}` in {shard}, which does not hold it"
                )));
            }
            for (name, tensor) in part.tensors {
                if let Some(first) = home.insert(name.clone(), shard) {
                    return Err(error(format!(
                        "tensor `{name}` is in two shards, {first} and {shard}"
                    )));
                }
                weights.tensors.insert(name, tensor);
            }
        }
        Ok(weights)
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

/// The name Hugging Face gives the index of a checkpoint in shards.
const INDEX: &str = "model.safetensors.index.json";

fn read(path: &Path) -> Result<Vec<u8>, WeightsError> {
    std::fs::read(path).map_err(|cause| WeightsError::Read {
        path: path.to_path_buf(),
        cause,
    })
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
    fn tensors_a_model_does_not_read_are_named() {
        let mut weights = Weights::new();
        let scalar = || ArrayD::zeros(ndarray::IxDyn(&[1]));
        for name in [
            "a",
            "b.bias",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
        ] {
            weights.insert(name, scalar());
        }
        assert_eq!(weights.unread_warning("m", |n| n != "zzz"), None);
        let warning = weights.unread_warning("m", |n| n == "a").unwrap();
        assert!(
            warning
                .starts_with("warning: 1 tensor of the weights is not read by model `m`: b.bias ("),
            "{warning}"
        );
        for i in 0..12 {
            weights.insert(format!("extra.{i:02}"), scalar());
        }
        let warning = weights.unread_warning("m", |n| n == "a").unwrap();
        assert!(
            warning.contains("13 tensors of the weights are not read")
                && warning.contains("extra.06 and 5 more"),
            "{warning}"
        );
    }

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

    fn tensor(values: &[f32]) -> ArrayD<f32> {
        ArrayD::from_shape_vec(IxDyn(&[values.len()]), values.to_vec()).unwrap()
    }

    /// Shards: (file name, the tensors it holds).
    type Shards<'a> = &'a [(&'a str, &'a [&'a str])];
    /// An index's map: (tensor, file name).
    type Map<'a> = &'a [(&'a str, &'a str)];

    /// Writes `shards` and an index of `map`.
    fn sharded(dir: &Path, shards: Shards<'_>, map: Map<'_>) -> PathBuf {
        for (i, (file, names)) in shards.iter().enumerate() {
            let mut part = Weights::new();
            for (j, name) in names.iter().enumerate() {
                part.insert(*name, tensor(&[i as f32, j as f32]));
            }
            part.save(&dir.join(file)).unwrap();
        }
        let map: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .map(|(n, f)| (n.to_string(), serde_json::Value::from(*f)))
            .collect();
        let index = dir.join(INDEX);
        let json = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(&index, json.to_string()).unwrap();
        index
    }

    #[test]
    fn sharded_checkpoints_load_from_their_index_or_folder() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        );
        let index = sharded(
            dir.path(),
            &[(a, &["x", "y"]), (b, &["z"])],
            &[("x", a), ("y", a), ("z", b)],
        );
        for path in [index.as_path(), dir.path()] {
            let weights = Weights::load(path).unwrap();
            assert_eq!(weights.names().collect::<Vec<_>>(), ["x", "y", "z"]);
            assert_eq!(weights.get("y"), Some(&tensor(&[0.0, 1.0])));
            assert_eq!(weights.get("z"), Some(&tensor(&[1.0, 0.0])));
        }
        // A folder with one file.
        let single = tempfile::tempdir().unwrap();
        let mut one = Weights::new();
        one.insert("w", tensor(&[2.0]));
        one.save(&single.path().join("model.safetensors")).unwrap();
        assert_eq!(Weights::load(single.path()).unwrap(), one);
        let empty = tempfile::tempdir().unwrap();
        let err = Weights::load(empty.path()).unwrap_err().to_string();
        assert!(err.contains("holds no weights"), "{err}");
    }

    #[test]
    fn broken_indexes_are_refused_with_the_reason() {
        let (a, b) = ("a.safetensors", "b.safetensors");
        let cases: [(Shards<'_>, Map<'_>, &str); 5] = [
            (
                &[(a, &["x"])],
                &[("x", a), ("y", a)],
                "puts tensor `y` in a.safetensors",
            ),
            (
                &[(a, &["x"]), (b, &["x"])],
                &[("x", a), ("x2", b)],
                "puts tensor `x2` in b.safetensors",
            ),
            (
                &[(a, &["x", "y"]), (b, &["y"])],
                &[("x", a), ("y", b)],
                "tensor `y` is in two shards",
            ),
            (
                &[(a, &["x"])],
                &[("x", "../a.safetensors")],
                "is not a file name",
            ),
            (&[(a, &["x"])], &[], "names no tensors"),
        ];
        for (shards, map, says) in cases {
            let dir = tempfile::tempdir().unwrap();
            let index = sharded(dir.path(), shards, map);
            let err = Weights::load(&index).unwrap_err().to_string();
            assert!(err.contains(says), "{says}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let index = sharded(dir.path(), &[], &[("x", a)]);
        let err = Weights::load(&index).unwrap_err().to_string();
        assert!(
            err.contains("a.safetensors") && err.contains("os error"),
            "{err}"
        );
        std::fs::write(&index, "{\"weight_map\": 3}").unwrap();
        let err = Weights::load(&index).unwrap_err().to_string();
        assert!(err.contains("no `weight_map` object"), "{err}");
        std::fs::write(&index, "{").unwrap();
        let err = Weights::load(&index).unwrap_err().to_string();
        assert!(err.contains("is not a valid safetensors index"), "{err}");
    }

    #[test]
    fn files_are_mapped_or_read_and_refused_with_the_path_when_broken() {
        let dir = tempfile::tempdir().unwrap();
        let mut weights = Weights::new();
        weights.insert("w", tensor(&[1.0, -2.5, 3.0]));
        let good = dir.path().join("good.safetensors");
        weights.save(&good).unwrap();
        assert_eq!(Weights::load(&good).unwrap().get("w"), weights.get("w"));
        // An empty file cannot be mapped: it is read, and refused as what it is.
        let empty = dir.path().join("empty.safetensors");
        std::fs::write(&empty, b"").unwrap();
        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"not a safetensors file").unwrap();
        for path in [&empty, &garbage] {
            let message = Weights::load(path).unwrap_err().to_string();
            let expected = format!("{} is not a valid safetensors file", path.display());
            assert!(message.contains(&expected), "{message}");
        }
        let missing = dir.path().join("missing.safetensors");
        let message = Weights::load(&missing).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("cannot read {}", missing.display())),
            "{message}"
        );
    }

    /// A checkpoint whose tensors would not fit in memory in f32 is refused with its size
    /// before any is converted, alone or as a shard of an index (a sparse file of 4 TiB of
    /// bf16: no disk is used, and converting it would be killed by the system).
    #[test]
    fn weights_too_large_for_memory_are_refused_with_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let count: u64 = 1 << 41;
        let header = format!(
            r#"{{"w":{{"dtype":"BF16","shape":[{count}],"data_offsets":[0,{}]}}}}"#,
            count * 2
        );
        let mut header = header.into_bytes();
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let huge = dir.path().join("model.safetensors");
        let mut file = std::fs::File::create(&huge).unwrap();
        std::io::Write::write_all(&mut file, &(header.len() as u64).to_le_bytes()).unwrap();
        std::io::Write::write_all(&mut file, &header).unwrap();
        if file.set_len(8 + header.len() as u64 + count * 2).is_err() {
            eprintln!("skipped: this file system has no sparse files of 4 TiB");
            return;
        }
        drop(file);
        let message = Weights::load(&huge).unwrap_err().to_string();
        let expected = format!("the weights in {} take 8.00 TiB in f32", huge.display());
        assert!(message.starts_with(&expected), "{message}");
        let index = dir.path().join(INDEX);
        std::fs::write(&index, r#"{"weight_map": {"w": "model.safetensors"}}"#).unwrap();
        let message = Weights::load(dir.path()).unwrap_err().to_string();
        let expected = format!("the weights in {} take 8.00 TiB in f32", index.display());
        assert!(message.starts_with(&expected), "{message}");
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
