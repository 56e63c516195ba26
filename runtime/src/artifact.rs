//! Compiled artifacts on disk: a directory with `plan.json` and the kernel library.

use std::path::{Path, PathBuf};

use crate::plan::{PLAN_FORMAT, Plan, Step};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{0} is not a compiled artifact: it has no plan.json")]
    Missing(PathBuf),
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "{path} has plan format {found}, this runtime reads format {expected}; recompile the model"
    )]
    Format {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
}

/// A loaded plan and where its files are.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub dir: PathBuf,
    pub plan: Plan,
}

impl Artifact {
    /// Reads and checks an artifact directory.
    pub fn load(dir: &Path) -> Result<Artifact, ArtifactError> {
        let plan_path = dir.join("plan.json");
        if !plan_path.exists() {
            return Err(ArtifactError::Missing(dir.to_path_buf()));
        }
        let plan: Plan = read_versioned(&plan_path, PLAN_FORMAT, "no plan format")?;
        check(&plan).map_err(|message| ArtifactError::Corrupt {
            path: plan_path.clone(),
            message,
        })?;
        let library = dir.join(&plan.library);
        if !library.exists() {
            return Err(ArtifactError::Corrupt {
                path: library,
                message: "the kernel library is missing".into(),
            });
        }
        Ok(Artifact {
            dir: dir.to_path_buf(),
            plan,
        })
    }
}

/// Reads a JSON file whose `format` field must be `expected`, as a `T`; `missing` is the
/// complaint when it has no format at all.
pub(crate) fn read_versioned<T: serde::de::DeserializeOwned>(
    path: &Path,
    expected: u32,
    missing: &str,
) -> Result<T, ArtifactError> {
    let text = std::fs::read_to_string(path).map_err(|e| ArtifactError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let corrupt = |message: String| ArtifactError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    let format = value
        .get("format")
        .and_then(|f| f.as_u64())
        .ok_or_else(|| corrupt(missing.into()))?;
    if format != u64::from(expected) {
        return Err(ArtifactError::Format {
            path: path.to_path_buf(),
            found: format as u32,
            expected,
        });
    }
    serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))
}

/// Checks that every index in the plan points at something.
fn check(plan: &Plan) -> Result<(), String> {
    for (i, step) in plan.steps.iter().enumerate() {
        if !step_ok(plan, step, false) {
            return Err(format!(
                "step {i} refers to something the plan does not have"
            ));
        }
    }
    if let Some(optimizer) = &plan.optimizer {
        if optimizer
            .params
            .iter()
            .any(|p| p.weight >= plan.weights.len() || p.grad >= plan.values.len())
        {
            return Err("the optimizer trains a weight the plan does not have".into());
        }
        for step in optimizer.norm.iter().chain(&optimizer.update) {
            if !step_ok(plan, step, true) {
                return Err("an optimizer step refers to something the plan does not have".into());
            }
        }
    }
    // The decode step writes the new key before it attends: a ring has a slot at least.
    if plan
        .caches
        .iter()
        .any(|c| c.block == 0 || c.kv_heads == 0 || c.ring == Some(0))
    {
        return Err("a KV cache of the plan has no room".into());
    }
    if plan
        .caches
        .iter()
        .any(|c| c.kv_heads_held.len() != c.kv_heads || c.prefill_outputs >= plan.caches.len())
    {
        return Err("a KV cache of the plan refers to KV heads or outputs it does not have".into());
    }
    for p in &plan.packed {
        if p.weight >= plan.weights.len()
            || p.norm.is_some_and(|n| n >= plan.weights.len())
            || p.group == 0
            || p.nr == 0
        {
            return Err("a packed weight refers to something the plan does not have".into());
        }
    }
    if plan.values.iter().any(|v| v.slot >= plan.slots)
        || plan.outputs.iter().any(|(_, v)| *v >= plan.values.len())
    {
        return Err("a value refers to a memory slot the plan does not have".into());
    }
    Ok(())
}

/// Whether a step's indices point at what the plan has; the optimizer's buffers only in
/// its own steps (`optimizer`), and their partial sums within its buffer.
fn step_ok(plan: &Plan, step: &Step, optimizer: bool) -> bool {
    use crate::plan::Operand::*;
    let trained = match (&plan.optimizer, optimizer) {
        (Some(o), true) => Some(o),
        _ => None,
    };
    // The optimizer runs after a step, with no inputs of its own.
    let outside = |o: &crate::plan::Operand| {
        !matches!(
            o,
            Weight(_)
                | Packed(_)
                | Value(_)
                | Constant(_)
                | MomentM(_)
                | MomentV(_)
                | Partials(_)
                | Hyper
        )
    };
    match step {
        Step::Kernel {
            kernel,
            operands,
            schedule,
            grid,
        } => {
            !(optimizer && operands.iter().any(outside))
                && *kernel < plan.kernels.len()
                && schedule.is_none_or(|s| s < plan.schedules.len() && !optimizer)
                && operands.iter().all(|o| match *o {
                    Input(x) => x < plan.inputs.len(),
                    Weight(x) => x < plan.weights.len(),
                    Packed(x) => x < plan.packed.len(),
                    Value(x) => x < plan.values.len(),
                    Constant(x) => x < plan.constants.len(),
                    Positions => true,
                    Workspace(x) => x < plan.workspaces.len(),
                    ScheduleRows(x)
                    | ScheduleTiles(x)
                    | ScheduleColumns(x)
                    | ScheduleColumnTiles(x) => x < plan.schedules.len(),
                    RopeCos(x) | RopeSin(x) => x < plan.rope_tables.len(),
                    CacheKeys(x) | CacheValues(x) | CachePositions(x) => x < plan.caches.len(),
                    MomentM(x) | MomentV(x) => trained.is_some_and(|o| x < o.params.len()),
                    Partials(x) => trained.is_some_and(|o| {
                        constant_programs(grid)
                            .and_then(|n| x.checked_add(n))
                            .is_some_and(|end| end <= o.partials)
                    }),
                    Hyper => trained.is_some(),
                })
        }
        Step::Schedule { id } => *id < plan.schedules.len() && !optimizer,
    }
}

/// The programs of a grid of constant rows (an optimizer step's), unless they overflow.
fn constant_programs(grid: &crate::plan::Grid) -> Option<usize> {
    let mut rows: u64 = 1;
    for extent in &grid.rows {
        let crate::plan::Extent::Const(n) = *extent else {
            return None;
        };
        rows = rows.checked_mul(n)?;
    }
    let programs = rows
        .div_ceil(grid.row_chunk.max(1))
        .checked_mul(grid.cols)?;
    usize::try_from(programs).ok()
}

/// The format version of `attention.json`.
pub const ATTENTION_FORMAT: u32 = 1;

/// A GPU artifact of tensor-core attention kernels (`zebra compile --for attention`): each
/// distinct attention of a model as one PTX entry, with what a launch needs. The kernels
/// take 16-bit `q [B, H, T, D]`, `k` and `v [B, KV, T, D]` and write `out [B, H, T, D]`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AttentionArtifact {
    pub format: u32,
    /// `sm_80` or `sm_90`.
    pub target: String,
    /// `bf16` or `f16`.
    pub dtype: String,
    pub library: String,
    pub library_hash: String,
    pub kernels: Vec<AttentionEntry>,
}

/// One tensor-core attention kernel: a grid of (`ceil(T / block_q)`, `B * heads`) blocks
/// of `threads` threads, taking `(buffers, dims)` as the plan's kernels do (buffers: q, k,
/// v, out, schedule rows, schedule tiles, side inputs; dims: B, T, per-batch schedule).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AttentionEntry {
    /// The attention kind's label.
    pub name: String,
    pub entry: String,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_q: usize,
    pub block_k: usize,
    pub threads: usize,
    pub shared_bytes: usize,
    pub scale: f64,
    /// The mask and score modifier, in the IR's expression syntax.
    pub mask: String,
    pub score: Option<String>,
    pub sides: Vec<String>,
}

impl AttentionArtifact {
    /// Reads and checks `attention.json` and its PTX in `dir`.
    pub fn load(dir: &Path) -> Result<(AttentionArtifact, String), ArtifactError> {
        let path = dir.join("attention.json");
        if !path.exists() {
            return Err(ArtifactError::Corrupt {
                path: dir.to_path_buf(),
                message: "no attention.json: not an attention artifact (compile with \
                          --for attention --target sm_90 --emit artifact)"
                    .into(),
            });
        }
        let artifact: AttentionArtifact = read_versioned(&path, ATTENTION_FORMAT, "no format")?;
        let corrupt = |message: String| ArtifactError::Corrupt {
            path: path.clone(),
            message,
        };
        for k in &artifact.kernels {
            if k.heads == 0
                || k.kv_heads == 0
                || !k.heads.is_multiple_of(k.kv_heads)
                || k.head_dim == 0
                || k.block_q == 0
                || k.block_k == 0
                || k.threads == 0
            {
                return Err(corrupt(format!(
                    "kernel `{}` has impossible shapes",
                    k.name
                )));
            }
        }
        let library = dir.join(&artifact.library);
        let ptx = std::fs::read_to_string(&library).map_err(|e| ArtifactError::Corrupt {
            path: library.clone(),
            message: format!("the kernel library cannot be read: {e}"),
        })?;
        if format!("{:016x}", crate::fnv1a(ptx.as_bytes())) != artifact.library_hash {
            return Err(ArtifactError::Corrupt {
                path: library,
                message: "the kernel library does not match attention.json (its hash differs)"
                    .into(),
            });
        }
        for k in &artifact.kernels {
            if !ptx.contains(&format!(".entry {}(", k.entry)) {
                return Err(corrupt(format!("the PTX has no entry `{}`", k.entry)));
            }
        }
        Ok((artifact, ptx))
    }
}

/// Deterministic random weights of the shapes a plan reads, for benchmarks of models whose
/// weights are too large to carry: norm gains 1, every other weight uniform with standard
/// deviation 0.02. An error, before anything is drawn, where they and the executor's copy of
/// them would not fit in the memory left.
pub fn random_weights(
    plan: &crate::plan::Plan,
    seed: u64,
) -> Result<zebra_ir::Weights, crate::RuntimeError> {
    use rand::{Rng, SeedableRng};
    let count = plan.weights.iter().fold(0u64, |n, spec| {
        n.saturating_add(crate::memory::product(spec.shape.iter().copied()))
    });
    // The f32 tensors, and the executor's (packed) copy.
    let bytes = count.saturating_mul(8);
    if let Some(available) = crate::memory::short_of(bytes) {
        return Err(crate::RuntimeError::TooLarge(format!(
            "random weights for the plan's {count} parameters need {} of memory, and {} is \
             available",
            crate::memory::human(bytes),
            crate::memory::human(available)
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let half_width = 0.02 * 3f32.sqrt();
    let mut weights = zebra_ir::Weights::new();
    for spec in &plan.weights {
        let count: usize = spec.shape.iter().product();
        let values: Vec<f32> = if spec.name.ends_with("norm.weight") {
            vec![1.0; count]
        } else {
            (0..count)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * half_width)
                .collect()
        };
        let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&spec.shape), values)
            .expect("the count is the shape's");
        weights.insert(spec.name.clone(), array);
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Extent, Grid};

    #[test]
    fn programs_of_constant_grids_never_overflow() {
        let grid = |rows: Vec<Extent>, row_chunk: u64, cols: u64| Grid {
            rows,
            row_chunk,
            cols,
        };
        let c = Extent::Const;
        assert_eq!(constant_programs(&grid(vec![c(10)], 3, 2)), Some(8));
        assert_eq!(constant_programs(&grid(vec![c(10)], 0, 1)), Some(10));
        assert_eq!(
            constant_programs(&grid(vec![c(u64::MAX), c(2)], 1, 1)),
            None
        );
        assert_eq!(constant_programs(&grid(vec![c(u64::MAX)], 1, 2)), None);
        assert_eq!(constant_programs(&grid(vec![Extent::Seq], 1, 1)), None);
    }
}
