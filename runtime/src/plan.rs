//! The execution plan of a compiled model: its inputs, weights (and how to pack them for
//! the kernels), intermediate values with their memory slots, and the steps to run. It is
//! what the code generator writes next to the kernels and what the runtime reads; the
//! runtime needs neither MLIR nor LLVM.

use serde::{Deserialize, Serialize};
use zebra_ir::rope::Rope;

/// The version of the plan format; the runtime refuses plans of another.
pub const PLAN_FORMAT: u32 = 4;

/// One dimension: a constant, the batch `B`, the sequence length `T`, or `ceil(T / n)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Extent {
    Const(u64),
    Batch,
    Seq,
    SeqBlocks(u64),
}

impl Extent {
    pub fn resolve(self, batch: usize, seq: usize) -> usize {
        match self {
            Extent::Const(n) => n as usize,
            Extent::Batch => batch,
            Extent::Seq => seq,
            Extent::SeqBlocks(n) => seq.div_ceil(n.max(1) as usize),
        }
    }
}

/// The product of a list of extents (`usize::MAX` where it overflows: more than any memory
/// holds, refused before it is allocated).
pub fn volume(extents: &[Extent], batch: usize, seq: usize) -> usize {
    extents
        .iter()
        .fold(1usize, |n, e| n.saturating_mul(e.resolve(batch, seq)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ElemType {
    F32,
    I64,
    /// A bool, stored as one byte.
    U8,
}

impl ElemType {
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::I64 => 8,
            ElemType::U8 => 1,
        }
    }
}

/// A buffer a step reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operand {
    /// A graph input (tokens, side inputs), `i64 [B, T]`.
    Input(usize),
    /// A weight as loaded.
    Weight(usize),
    /// A weight packed for the projection kernels.
    Packed(usize),
    /// An intermediate value.
    Value(usize),
    /// A scalar constant.
    Constant(usize),
    /// Positions `[0, 1, ..., T - 1]`, i64.
    Positions,
    /// Scratch memory of a step.
    Workspace(usize),
    /// The row offsets and tiles of a tile schedule.
    ScheduleRows(usize),
    ScheduleTiles(usize),
    /// The same schedule by columns: per key tile, the query tiles that visit it, as
    /// `(query tile << 1) | partial` entries.
    ScheduleColumns(usize),
    ScheduleColumnTiles(usize),
    /// RoPE tables `[T, D/2]` of cosines and sines.
    RopeCos(usize),
    RopeSin(usize),
    /// A KV cache (see [`CacheSpec`]): keys in blocks of `block` slots `[S / block][B][KV]
    /// [D][block]`, values `[S][B][KV][D]`, and the position each slot holds (`i64 [S]`,
    /// `-1` when empty).
    CacheKeys(usize),
    CacheValues(usize),
    CachePositions(usize),
    /// AdamW's first and second moments of trained weight `i` of the optimizer plan.
    MomentM(usize),
    MomentV(usize),
    /// The optimizer's partial sums of squares, from this float on.
    Partials(usize),
    /// The optimizer step's scalars ([`Hyper`]).
    Hyper,
}

/// The scalars of an optimizer step, in the order of its hyperparameter buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hyper {
    Lr,
    Beta1,
    OneMinusBeta1,
    Beta2,
    OneMinusBeta2,
    /// `1 / (1 - beta1^t)` and `1 / (1 - beta2^t)` at step `t` (from 1).
    InvCorrection1,
    InvCorrection2,
    Eps,
    WeightDecay,
    /// What the gradients are multiplied by: one over the scored tokens, times the clipping.
    GradScale,
}

/// Floats of the hyperparameter buffer.
pub const HYPER: usize = 10;

/// A weight the training step trains: the value holding its gradient, and whether AdamW
/// decays it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainedWeight {
    pub weight: usize,
    pub grad: usize,
    pub decay: bool,
}

/// AdamW in a training plan, run by the executor after the step's kernels, where the
/// weights and gradients are: `norm` writes per-part sums of squares of the gradients
/// (`partials` floats, which the runtime adds for the global norm that clipping needs),
/// `update` applies AdamW to each trained weight (its moments `MomentM(i)`, `MomentV(i)`,
/// the scalars in `Hyper`) and packs again the packed weights made from them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerPlan {
    pub params: Vec<TrainedWeight>,
    pub norm: Vec<Step>,
    pub partials: usize,
    pub update: Vec<Step>,
}

/// The KV cache of one attention layer, or of some of its KV heads, as its mask needs it
/// (see `zebra_ir::cache`): `sinks` slots for the first positions, then a ring of `ring`
/// slots, or one slot per position when `ring` is `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// The KV heads it holds (of the layer's keys and values `[B, KV, T, D]`)...
    pub kv_heads: usize,
    /// ...which they are, in order (`0..KV` for a cache of the whole layer).
    pub kv_heads_held: Vec<usize>,
    /// The cache whose prefill outputs (`cache:{c}:k`, `cache:{c}:v`) hold the layer's
    /// keys and values: the layer's first, output once for all its caches.
    pub prefill_outputs: usize,
    pub head_dim: usize,
    pub sinks: usize,
    pub ring: Option<usize>,
    /// The shortest prompt after which decoding is exact.
    pub min_prompt: usize,
    /// Slots per block of the key layout.
    pub block: usize,
    /// The model layer, when known.
    pub layer: Option<usize>,
}

impl CacheSpec {
    /// The slot of position `p`.
    pub fn slot(&self, p: usize) -> usize {
        match self.ring {
            None => p,
            Some(_) if p < self.sinks => p,
            Some(r) => self.sinks + (p - self.sinks) % r.max(1),
        }
    }

    /// Slots needed for `tokens` tokens.
    pub fn slots_for(&self, tokens: usize) -> usize {
        match self.ring {
            None => tokens,
            Some(r) => tokens.min(self.sinks + r),
        }
    }
}

/// A graph input: its name, element type and shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub name: String,
    pub elem: ElemType,
    pub shape: Vec<Extent>,
}

/// A weight of the model, as the checkpoint holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl WeightSpec {
    /// Its number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A weight `[N, K]` packed into panels of `nr` output columns, `[N' / nr][K][nr]`: each
/// group of `group` output columns (a head, or all of them) is padded to whole panels. With
/// `norm`, the norm weight `g [K]` is folded in: `w[n, k] * g[k]`. With `transposed`, the
/// matrix is the weight's transpose (the weight is stored `[K, N]`), as the backward's
/// `dx = dy @ w` needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackSpec {
    pub weight: usize,
    pub norm: Option<usize>,
    #[serde(default)]
    pub transposed: bool,
    pub n: usize,
    pub k: usize,
    pub group: usize,
    pub nr: usize,
    /// Packed as bf16 (rounded to nearest even): half the bytes of f32.
    #[serde(default)]
    pub bf16: bool,
}

impl PackSpec {
    pub fn packed_len(&self) -> usize {
        let groups = self.n / self.group;
        groups * self.group.div_ceil(self.nr) * self.nr * self.k
    }
}

/// An intermediate value (or output): its shape, element type and memory slot. Values in
/// one slot are never alive at once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValueSpec {
    pub shape: Vec<Extent>,
    pub elem: ElemType,
    pub slot: usize,
}

/// A tile schedule computed by the runtime for an attention step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// The mask, in the IR's expression syntax.
    pub mask: String,
    pub heads: usize,
    pub block_q: usize,
    pub block_k: usize,
    /// Side inputs the mask reads: name, and the graph input holding the values (`[B, T]`).
    /// With side inputs, each batch row gets its own schedule, from per-tile ranges of the
    /// values.
    pub sides: Vec<(String, usize)>,
}

impl ScheduleSpec {
    /// Whether each batch row has its own schedule (the mask reads side inputs); else one
    /// serves every row and every run of the same length.
    pub fn per_batch(&self) -> bool {
        !self.sides.is_empty()
    }
}

/// The programs of a kernel step: `ceil(product(rows) / row_chunk) * cols`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grid {
    pub rows: Vec<Extent>,
    pub row_chunk: u64,
    pub cols: u64,
}

impl Grid {
    pub fn programs(&self, batch: usize, seq: usize) -> usize {
        volume(&self.rows, batch, seq).div_ceil(self.row_chunk.max(1) as usize) * self.cols as usize
    }
}

/// One step of the plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Step {
    /// Run a kernel over a grid of programs.
    Kernel {
        kernel: usize,
        operands: Vec<Operand>,
        grid: Grid,
        /// Set for attention steps: their schedule (whose rows are per batch row when the
        /// mask reads side inputs).
        schedule: Option<usize>,
    },
    /// Build a tile schedule.
    Schedule { id: usize },
}

/// A compiled kernel of the library.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub symbol: String,
    pub description: String,
    /// On a GPU, a tensor-core (or otherwise GPU-shaped) version of the kernel, launched
    /// instead of the grid of programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_cores: Option<TensorCoreLaunch>,
    /// For a decode step's attention: how many programs, at most, the kernel can share each
    /// (batch row, KV head)'s cache out over (dim 2 says how many; see
    /// `CpuModel`'s launches), 0 where it cannot.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_splits: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// How to launch a tensor-core kernel: entry `(buffers, dims)` on `grid`'s blocks of
/// `threads` threads, with `shared_bytes` of dynamic shared memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorCoreLaunch {
    pub entry: String,
    /// The 16-bit type the kernel rounds its operands to (`bf16` or `f16`), or `f32` for a
    /// GPU-shaped kernel without tensor cores (the decode step's attention).
    pub dtype: String,
    pub grid: TensorCoreGrid,
    pub threads: usize,
    pub shared_bytes: usize,
    /// A second launch right after this one, with the same buffers and dims (the decode
    /// attention's combining of the shares of the cache its blocks took).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then: Option<Box<TensorCoreLaunch>>,
}

/// The blocks of a tensor-core launch, for `B` rows of `T` tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorCoreGrid {
    /// `(ceil(B T / rows), columns)`: tiles of rows of the `[B T, N]` activations.
    Rows { rows: usize, columns: usize },
    /// `(ceil(T / block_q), B heads)`: query tiles, per batch row and head.
    Attention { block_q: usize, heads: usize },
    /// `(splits, B heads)`: shares of a decode step's KV cache, per batch row and KV head:
    /// one per `chunk` slots in use (the token's position plus one, at most `capacity`), at
    /// most `splits`.
    Splits {
        splits: usize,
        heads: usize,
        chunk: usize,
        capacity: Option<usize>,
    },
    /// `(ceil(M / block_m) ceil(N / block_n), batch)`: output tiles of each batch entry.
    MatMul {
        batch: Vec<Extent>,
        m: Extent,
        n: Extent,
        block_m: usize,
        block_n: usize,
    },
}

impl TensorCoreGrid {
    /// The grid's `(x, y)` blocks for `B` rows of `T` tokens, the first at `position`.
    pub fn blocks(&self, batch: usize, seq: usize, position: usize) -> (usize, usize) {
        match self {
            TensorCoreGrid::Rows { rows, columns } => ((batch * seq).div_ceil(*rows), *columns),
            TensorCoreGrid::Attention { block_q, heads } => (seq.div_ceil(*block_q), batch * heads),
            TensorCoreGrid::Splits {
                splits,
                heads,
                chunk,
                capacity,
            } => {
                let used = (position + 1).min(capacity.unwrap_or(usize::MAX));
                (used.div_ceil((*chunk).max(1)).min(*splits), batch * heads)
            }
            TensorCoreGrid::MatMul {
                batch: entries,
                m,
                n,
                block_m,
                block_n,
            } => (
                m.resolve(batch, seq).div_ceil(*block_m) * n.resolve(batch, seq).div_ceil(*block_n),
                volume(entries, batch, seq),
            ),
        }
    }
}

/// The whole plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: u32,
    pub name: String,
    /// What the kernels were compiled for (`x86_64-pc-linux-gnu znver3`).
    pub target: String,
    /// The kernel library next to the plan (`kernels.so`).
    pub library: String,
    /// The FNV-1a hash of the library's bytes (16 hex digits): a library that does not match
    /// (truncated, or from another build) is refused before it is loaded.
    pub library_hash: String,
    pub kernels: Vec<KernelInfo>,
    /// The longest sequence the plan runs (the runtime refuses longer ones).
    pub max_seq_len: usize,
    /// The vocabulary size, for checking token ids (0 when the graph has no embedding).
    pub vocab: usize,
    pub inputs: Vec<InputSpec>,
    pub weights: Vec<WeightSpec>,
    pub packed: Vec<PackSpec>,
    /// Scalar constants (infinities and NaN written as the strings `inf`, `-inf`, `nan`, which
    /// JSON numbers cannot hold).
    #[serde(with = "floats")]
    pub constants: Vec<f32>,
    pub values: Vec<ValueSpec>,
    pub slots: usize,
    /// Scratch buffers: shape and element type.
    pub workspaces: Vec<(Vec<Extent>, ElemType)>,
    pub schedules: Vec<ScheduleSpec>,
    /// RoPE tables: the RoPE (base and scaling) and head dim.
    pub rope_tables: Vec<(Rope, usize)>,
    pub steps: Vec<Step>,
    pub outputs: Vec<(String, usize)>,
    /// The KV caches of a decode or prefill plan, one per attention.
    #[serde(default)]
    pub caches: Vec<CacheSpec>,
    /// A training plan's optimizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerPlan>,
}

impl Plan {
    /// For each weight, whether a step reads it as it is (not only packed): every weight of
    /// a training plan (its optimizer updates them and packs them again), else those a
    /// step names as `Operand::Weight`. An executor holds the others packed only.
    pub fn raw_weights_read(&self) -> Vec<bool> {
        let mut read = vec![self.optimizer.is_some(); self.weights.len()];
        for step in &self.steps {
            if let Step::Kernel { operands, .. } = step {
                for operand in operands {
                    if let Operand::Weight(i) = operand
                        && let Some(r) = read.get_mut(*i)
                    {
                        *r = true;
                    }
                }
            }
        }
        read
    }

    /// Where this plan's weights and packed weights are in `other`'s, for plans of one
    /// model that share them (a prefill and a decode plan): a weight of the same name and
    /// shape; a packed weight packed alike from the same weights.
    pub fn weights_in(&self, other: &Plan) -> (Vec<Option<usize>>, Vec<Option<usize>>) {
        let raw = self
            .weights
            .iter()
            .map(|w| other.weights.iter().position(|o| o == w))
            .collect();
        let key = |plan: &Plan, p: &PackSpec| {
            let name = |w: usize| plan.weights[w].clone();
            let PackSpec {
                weight,
                norm,
                transposed,
                n,
                k,
                group,
                nr,
                bf16,
            } = *p;
            (
                name(weight),
                norm.map(name),
                transposed,
                n,
                k,
                group,
                nr,
                bf16,
            )
        };
        let packed = self
            .packed
            .iter()
            .map(|p| {
                let mine = key(self, p);
                other.packed.iter().position(|o| key(other, o) == mine)
            })
            .collect();
        (raw, packed)
    }

    /// Whether this is a decode plan: its attention runs against KV caches.
    pub fn is_decode(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(s, Step::Kernel { operands, .. }
                if operands.iter().any(|o| matches!(o, Operand::CacheKeys(_))))
        })
    }
}

/// Serde for f32 lists with non-finite values: numbers, else `"inf"`, `"-inf"`, `"nan"`.
mod floats {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Float {
        Number(f32),
        Text(String),
    }

    pub fn serialize<S: Serializer>(values: &[f32], serializer: S) -> Result<S::Ok, S::Error> {
        let items: Vec<Float> = values
            .iter()
            .map(|&v| match v {
                v if v.is_finite() => Float::Number(v),
                v if v.is_nan() => Float::Text("nan".into()),
                v if v > 0.0 => Float::Text("inf".into()),
                _ => Float::Text("-inf".into()),
            })
            .collect();
        items.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
        Vec::<Float>::deserialize(deserializer)?
            .into_iter()
            .map(|item| match item {
                Float::Number(v) => Ok(v),
                Float::Text(t) => match t.as_str() {
                    "inf" => Ok(f32::INFINITY),
                    "-inf" => Ok(f32::NEG_INFINITY),
                    "nan" => Ok(f32::NAN),
                    other => Err(D::Error::custom(format!("`{other}` is not a number"))),
                },
            })
            .collect()
    }
}
