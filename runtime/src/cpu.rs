//! The CPU executor: loads the kernel library with dlopen, packs the weights, and runs the
//! plan's steps, each kernel's grid of programs spread over a thread pool. Memory for
//! intermediate values comes from slots sized for the current batch and length, reused
//! between runs; tile schedules and RoPE tables are built per sequence length and cached.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use crate::buffer::Buffer;
use zebra_ir::Weights;
use zebra_ir::expr::Expr;
use zebra_ir::rope::Rope;
use zebra_ir::schedule::{ScheduleInput, SideValues, Support, TileKind, build_heads};

use crate::artifact::{Artifact, ArtifactError};
use crate::kv::KvCache;
use crate::pack::{pack, pack_into};
use crate::plan::{ElemType, Extent, HYPER, Operand, OptimizerPlan, PackSpec, Plan, Step, volume};

/// The C signature of every kernel: buffers, dims, and the range of programs to run.
type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

/// Slack after every buffer, so that kernels may read a vector past a row's end.
const SLACK_WORDS: usize = 64;

/// The most threads a CPU model runs on; more would only cost memory and start-up time.
pub const MAX_THREADS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("cannot load the kernel library {path}: {message}")]
    Library { path: String, message: String },
    #[error("the kernel library has no kernel `{0}`; the artifact is corrupt, recompile it")]
    Symbol(String),
    #[error("weight `{name}` is missing (expected shape {expected:?})")]
    MissingWeight { name: String, expected: Vec<usize> },
    #[error("weight `{name}` has shape {found:?}, expected {expected:?}")]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("input `{0}` was not given")]
    MissingInput(String),
    #[error(
        "input `{name}` has shape {found:?}, expected{expected} (with B and T the same for every input)"
    )]
    InputShape {
        name: String,
        expected: String,
        found: Vec<usize>,
    },
    #[error(
        "the sequence length {found} is above the {max} this artifact was compiled for; recompile with a larger --max-seq-len"
    )]
    TooLong { found: usize, max: usize },
    #[error("the inputs are empty")]
    Empty,
    #[error("token id {id} at [{row}, {position}] is out of range for a vocabulary of {vocab}")]
    TokenOutOfRange {
        id: i64,
        row: usize,
        position: usize,
        vocab: usize,
    },
    #[error("the thread pool could not start: {0}")]
    Threads(String),
    #[error("the plan's mask `{0}` does not parse; the artifact is corrupt")]
    Mask(String),
    #[error("{0}")]
    Decode(String),
    #[error("{0}")]
    Training(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    /// Inputs or weights to be made that would not fit in memory, with their sizes.
    #[error("{0}")]
    TooLarge(String),
    #[error(
        "running {batch} x {seq} tokens needs {needed} more memory for the plan's buffers, \
         and {available} is available: give fewer tokens (a shorter sequence or a smaller batch)"
    )]
    Memory {
        batch: usize,
        seq: usize,
        needed: String,
        available: String,
    },
}

/// How a kernel's programs run: on the calling thread, or spread over the pool (one task per
/// program when their costs differ, else a few chunks per thread).
#[derive(Clone, Copy)]
enum Tasks {
    Inline,
    Pool { fine_grained: bool },
}

/// KV-cache slots from which a single token's attention is worth the thread pool.
const PARALLEL_SLOTS: usize = 4096;

/// The fewest KV-cache slots a program of a decode step's attention takes when the cache is
/// shared out (fewer would spend more on combining the shares than they save).
const SHARE_SLOTS: usize = 1024;

/// Bytes of packed weights from which a single token's projection is worth the thread pool:
/// it reads every byte once, and one core alone does not draw all the memory bandwidth.
const PARALLEL_WEIGHT_BYTES: usize = 1 << 20;

struct Raw(Vec<*mut u8>);
// SAFETY: the pointers address buffers that outlive the kernel call, and each program
// writes a disjoint part of its output, as the kernels' grids are designed.
unsafe impl Send for Raw {}
unsafe impl Sync for Raw {}

fn buffer(words: usize) -> Buffer {
    Buffer::zeroed(words + SLACK_WORDS)
}

pub(crate) fn words(bytes: usize) -> usize {
    bytes.div_ceil(8)
}

/// A host array given to or returned by a model.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
        }
    }

    pub fn elem(&self) -> ElemType {
        match self {
            Tensor::F32(_) => ElemType::F32,
            Tensor::I64(_) => ElemType::I64,
        }
    }
}

/// A schedule in the kernels' format: row offsets, then `(key tile << 1) | partial` entries;
/// and the same by columns (per key tile, `(query tile << 1) | partial`). The offsets come in
/// sections of `tiles + 1` (the start of each row, then the end of the last): one section in
/// all, or one per batch row when the mask reads side inputs, each of those one per head when
/// the mask reads `h` ([`zebra_ir::schedule::per_head`]). Heads with the same schedule point
/// at the same entries.
pub(crate) struct BuiltSchedule {
    pub(crate) rows: Buffer,
    pub(crate) tiles: Buffer,
    pub(crate) columns: Buffer,
    pub(crate) column_tiles: Buffer,
    pub(crate) per_batch: bool,
    /// The heads of a section each, when the schedule is per head; else 1.
    pub(crate) heads: usize,
}

impl BuiltSchedule {
    /// The section of row offsets of batch row `b` and head `h`, as the kernels compute it.
    pub(crate) fn section(&self, b: usize, h: usize) -> usize {
        let b = if self.per_batch { b } else { 0 };
        b * self.heads + h.min(self.heads - 1)
    }

    /// The entries of query tile `qt` (of `n_qt`) for batch row `b` and head `h`.
    pub(crate) fn row(&self, b: usize, h: usize, n_qt: usize, qt: usize) -> Range<usize> {
        let at = self.section(b, h) * (n_qt + 1) + qt;
        self.rows[at] as usize..self.rows[at + 1] as usize
    }
}

/// Builds the tile schedule of `spec` for `batch` rows of `seq` tokens (the inputs hold the
/// side values of masks over data), in the kernels' format.
pub(crate) fn build_schedule(
    spec: &crate::plan::ScheduleSpec,
    mask: &Expr,
    support: &Support,
    batch: usize,
    seq: usize,
    inputs: &[Buffer],
) -> BuiltSchedule {
    let per_batch = spec.per_batch();
    let mut rows = Vec::new();
    let mut tiles = Vec::new();
    let mut columns = Vec::new();
    let mut column_tiles = Vec::new();
    let names: Vec<String> = spec.sides.iter().map(|(n, _)| n.clone()).collect();
    let n_kt = seq.div_ceil(spec.block_k);
    let mut heads = 1;
    for b in 0..if per_batch { batch } else { 1 } {
        let side_rows: Vec<&[i64]> = spec
            .sides
            .iter()
            .map(|(_, input)| {
                // SAFETY: input buffers hold `batch * seq` i64 values.
                let all = unsafe {
                    std::slice::from_raw_parts(inputs[*input].as_ptr().cast::<i64>(), batch * seq)
                };
                &all[b * seq..(b + 1) * seq]
            })
            .collect();
        let sides = SideValues {
            names: &names,
            values: side_rows,
        };
        let built = build_heads(&ScheduleInput {
            mask,
            support,
            heads: spec.heads,
            block_q: spec.block_q,
            block_k: spec.block_k,
            seq_len: seq,
            sides: per_batch.then_some(&sides),
            batch_row: b,
            // Static masks are classified exactly once per length; masks over data are
            // classified from value ranges alone, per run.
            refine: !per_batch,
        });
        heads = built.of_head.len();
        // Each distinct schedule's entries once, then every head's sections pointing at them.
        let mut sections = Vec::with_capacity(built.schedules.len());
        for schedule in &built.schedules {
            let mut row_ends = vec![tiles.len() as u64];
            let mut by_key: Vec<Vec<u64>> = vec![Vec::new(); n_kt];
            for (qt, row) in schedule.rows.iter().enumerate() {
                for &(kt, kind) in &row.tiles {
                    let partial = u64::from(kind == TileKind::Partial);
                    tiles.push((u64::from(kt) << 1) | partial);
                    by_key[kt as usize].push(((qt as u64) << 1) | partial);
                }
                row_ends.push(tiles.len() as u64);
            }
            let mut column_ends = vec![column_tiles.len() as u64];
            for entries in by_key {
                column_tiles.extend(entries);
                column_ends.push(column_tiles.len() as u64);
            }
            sections.push((row_ends, column_ends));
        }
        for &s in &built.of_head {
            rows.extend_from_slice(&sections[s].0);
            columns.extend_from_slice(&sections[s].1);
        }
    }
    BuiltSchedule {
        rows: words_of_i64(rows.into_iter().map(|x| x as i64)),
        tiles: words_of_i64(tiles.into_iter().map(|x| x as i64)),
        columns: words_of_i64(columns.into_iter().map(|x| x as i64)),
        column_tiles: words_of_i64(column_tiles.into_iter().map(|x| x as i64)),
        per_batch,
        heads,
    }
}

/// RoPE tables `[seq, dim / 2]` of cosines and sines for positions from `offset`.
pub(crate) fn rope_tables(rope: &Rope, dim: usize, seq: usize, offset: usize) -> (Buffer, Buffer) {
    let (cos, sin) = rope.tables(dim, offset, seq);
    let f32s = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
    (as_words(&f32s(cos)), as_words(&f32s(sin)))
}

/// Checks the inputs against the plan and binds `B` and `T` from their shapes.
pub(crate) fn check_inputs(
    plan: &Plan,
    inputs: &BTreeMap<String, Tensor>,
) -> Result<(usize, usize), RuntimeError> {
    let (mut batch, mut seq) = (None, None);
    for spec in &plan.inputs {
        let array = inputs
            .get(&spec.name)
            .ok_or_else(|| RuntimeError::MissingInput(spec.name.clone()))?;
        let found = array.shape().to_vec();
        let mismatch = || RuntimeError::InputShape {
            name: spec.name.clone(),
            expected: format!(
                "{} {:?}",
                if array.elem() == spec.elem {
                    ""
                } else {
                    "of another element type"
                },
                spec.shape
            ),
            found: found.clone(),
        };
        if array.elem() != spec.elem || found.len() != spec.shape.len() {
            return Err(mismatch());
        }
        for (extent, &size) in spec.shape.iter().zip(&found) {
            let bound = match extent {
                Extent::Batch => &mut batch,
                Extent::Seq => &mut seq,
                other => {
                    if other.resolve(batch.unwrap_or(1), seq.unwrap_or(1)) != size {
                        return Err(mismatch());
                    }
                    continue;
                }
            };
            match bound {
                Some(b) if *b != size => return Err(mismatch()),
                _ => *bound = Some(size),
            }
        }
    }
    let (batch, seq) = (batch.unwrap_or(1), seq.unwrap_or(1));
    if batch == 0 || seq == 0 {
        return Err(RuntimeError::Empty);
    }
    if seq > plan.max_seq_len {
        return Err(RuntimeError::TooLong {
            found: seq,
            max: plan.max_seq_len,
        });
    }
    for (name, allow_negative) in [("tokens", false), ("targets", true)] {
        let Some(Tensor::I64(tokens)) = inputs.get(name) else {
            continue;
        };
        if plan.vocab == 0 {
            continue;
        }
        for (index, &id) in tokens.indexed_iter() {
            if (id < 0 && !allow_negative) || (id >= 0 && id as usize >= plan.vocab) {
                let (row, position) = (index[0], index[1]);
                return Err(RuntimeError::TokenOutOfRange {
                    id,
                    row,
                    position,
                    vocab: plan.vocab,
                });
            }
        }
    }
    Ok((batch, seq))
}

/// KV caches filled from a prefill plan's outputs (`cache:{c}:k` and `cache:{c}:v`,
/// `[B, KV, T, D]`, `c` a layer's first cache: each of its caches takes the KV heads it
/// holds) for the prompt's `T`
/// tokens, with room for `capacity` tokens when given;
/// also `B` and `T`.
pub(crate) fn fill_caches(
    plan: &Plan,
    prefill: &BTreeMap<String, ArrayD<f32>>,
    capacity: Option<usize>,
) -> Result<(Vec<KvCache>, usize, usize), RuntimeError> {
    let mut caches = Vec::new();
    let mut shape = None;
    for (c, spec) in plan.caches.iter().enumerate() {
        let get = |part: &str| {
            let name = format!("cache:{}:{part}", spec.prefill_outputs);
            prefill.get(&name).ok_or_else(|| {
                RuntimeError::Decode(format!(
                    "the prefill outputs have no `{name}`: the prefill and decode plans are \
                     not of the same model"
                ))
            })
        };
        let (k, v) = (get("k")?, get("v")?);
        let [b, kv, t, d] = k.shape() else {
            return Err(RuntimeError::Decode(
                "prefill keys are not [B, KV, T, D]".into(),
            ));
        };
        let held = &spec.kv_heads_held;
        if *d != spec.head_dim
            || v.shape() != k.shape()
            || held.len() != spec.kv_heads
            || held.iter().any(|&g| g >= *kv)
        {
            return Err(RuntimeError::Decode(format!(
                "prefill keys of cache {c} have shape {:?}, expected [B, KV, T, {}] with KV \
                 heads {held:?}",
                k.shape(),
                spec.head_dim
            )));
        }
        if *shape.get_or_insert((*b, *t)) != (*b, *t) {
            return Err(RuntimeError::Decode(
                "prefill caches disagree on B and T".into(),
            ));
        }
        if *t < spec.min_prompt {
            return Err(RuntimeError::Decode(format!(
                "the mask of layer {} lets the first {} positions see later ones: the \
                 prompt must hold at least {} tokens, it has {t}",
                spec.layer.map_or("?".into(), |l| l.to_string()),
                spec.min_prompt,
                spec.min_prompt
            )));
        }
        if *t > plan.max_seq_len {
            return Err(RuntimeError::TooLong {
                found: *t,
                max: plan.max_seq_len,
            });
        }
        let positions = capacity.unwrap_or(*t).max(*t);
        if c == 0 {
            // Keys and values, f32, of every cache (all of B rows) for the slots reserved,
            // against the memory left, before the first is allocated.
            let bytes = plan.caches.iter().fold(0u64, |n, spec| {
                let slots = spec.slots_for(positions);
                let each = [slots, *b, spec.kv_heads, spec.head_dim, 8];
                n.saturating_add(crate::memory::product(each))
            });
            if let Some(available) = crate::memory::short_of(bytes) {
                return Err(RuntimeError::TooLarge(format!(
                    "KV caches for a batch of {b} over {positions} positions need {} of \
                     memory, and {} is available: generate with a shorter context",
                    crate::memory::human(bytes),
                    crate::memory::human(available)
                )));
            }
        }
        let mut cache = KvCache::new(spec.clone(), *b);
        cache.reserve(spec.slots_for(positions));
        // Only the positions the cache keeps: the sinks and the last ring's worth.
        let first_kept = match spec.ring {
            Some(r) => t.saturating_sub(r).max(spec.sinks.min(*t)),
            None => 0,
        };
        let kept = (0..spec.sinks.min(*t)).chain(first_kept..*t);
        for p in kept {
            let slot = spec.slot(p);
            cache.set_position(slot, p);
            for row in 0..*b {
                for (i, &g) in held.iter().enumerate() {
                    let key: Vec<f32> = (0..*d).map(|x| k[[row, g, p, x]]).collect();
                    let value: Vec<f32> = (0..*d).map(|x| v[[row, g, p, x]]).collect();
                    cache.write(slot, row, i, &key, &value);
                }
            }
        }
        caches.push(cache);
    }
    let (batch, tokens) = shape.unwrap_or((1, 0));
    Ok((caches, batch, tokens))
}

/// The position of the next decode step, once decoding has started (`started` caches of the
/// plan's) and the tokens are `[B, 1]` for the caches' `B`.
pub(crate) fn next_position(
    plan: &Plan,
    started: usize,
    batch: usize,
    cached: usize,
    tokens: &ArrayD<i64>,
) -> Result<usize, RuntimeError> {
    if started != plan.caches.len() {
        return Err(RuntimeError::Decode(
            "decoding has not started: prefill a prompt first".into(),
        ));
    }
    if tokens.shape() != [batch, 1] {
        return Err(RuntimeError::InputShape {
            name: "tokens".into(),
            expected: format!(" [{batch}, 1]"),
            found: tokens.shape().to_vec(),
        });
    }
    if cached + 1 > plan.max_seq_len {
        return Err(RuntimeError::TooLong {
            found: cached + 1,
            max: plan.max_seq_len,
        });
    }
    Ok(cached)
}

/// Bytes of keys and values `caches` hold after `tokens` tokens of `batch` rows, and what
/// caches of every position (full attention in every layer) would hold.
pub(crate) fn cache_bytes(caches: &[KvCache], tokens: usize, batch: usize) -> (usize, usize) {
    let held = caches.iter().map(|c| c.bytes(tokens)).sum();
    let full = caches
        .iter()
        .map(|c| tokens * batch * c.spec.kv_heads * c.spec.head_dim * 8)
        .sum();
    (held, full)
}

/// Runs a whole kernel step in place of the library's kernel: given the step's buffers and
/// dims (`B`, `T`, per-batch schedule, first position).
pub type KernelSubstitute = Box<dyn Fn(&[*mut u8], [i64; 4]) + Send + Sync>;

/// A model loaded for the CPU.
pub struct CpuModel {
    plan: Plan,
    _library: libloading::Library,
    kernels: Vec<KernelFn>,
    substitutes: HashMap<usize, KernelSubstitute>,
    /// Shared with the decode plan's model when generating ([`CpuModel::load_pair`]).
    weights: Vec<Arc<Buffer>>,
    packed: Vec<Arc<Buffer>>,
    constants: Vec<Buffer>,
    masks: Vec<(Expr, Support)>,
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    slots: Vec<Buffer>,
    workspaces: Vec<Buffer>,
    /// The inputs of the last run, kept so that their memory is reused.
    inputs: Vec<Buffer>,
    /// Per sequence length and first position: positions, RoPE tables; per length: static
    /// schedules.
    positions: HashMap<(usize, usize), Buffer>,
    schedules: HashMap<(usize, usize), BuiltSchedule>,
    ropes: HashMap<(usize, usize, usize), (Buffer, Buffer)>,
    /// The KV caches of a decode plan, and how many tokens they hold.
    caches: Vec<KvCache>,
    cached_tokens: usize,
    cache_batch: usize,
    /// A training plan's optimizer: the moments of each trained weight (allocated at the
    /// first update, zeros, unless set), the partial sums of squares and the scalars.
    moments: Vec<[Buffer; 2]>,
    partials: Buffer,
    hyper: Buffer,
}

/// The first `count` f32 values of a buffer.
pub(crate) fn floats(buffer: &Buffer, count: usize) -> Vec<f32> {
    assert!(
        count * 4 <= buffer.len() * 8,
        "{count} floats in a smaller buffer"
    );
    // SAFETY: the buffer holds at least `count` f32s (checked above), all initialized.
    unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<f32>(), count) }.to_vec()
}

/// The optimizer of a plan, or an error saying that it is not a training plan.
pub(crate) fn optimizer_of(plan: &Plan) -> Result<&OptimizerPlan, RuntimeError> {
    plan.optimizer.as_ref().ok_or_else(|| {
        RuntimeError::Training(format!(
            "`{}` is not a training plan with an optimizer; build one with `zebra compile FILE.zb --emit artifact --for train -o DIR`",
            plan.name
        ))
    })
}

/// The number of elements of each trained weight of a training plan.
pub(crate) fn trained_sizes(plan: &Plan) -> Result<Vec<usize>, RuntimeError> {
    Ok(optimizer_of(plan)?
        .params
        .iter()
        .map(|p| plan.weights[p.weight].len())
        .collect())
}

/// An error unless a training step has run (its memory slots, `slots` of them, hold the
/// gradients the optimizer reads).
pub(crate) fn stepped(slots: usize, plan: &Plan) -> Result<(), RuntimeError> {
    if slots < plan.slots {
        return Err(RuntimeError::Training(
            "the optimizer runs after a training step: run the step first".into(),
        ));
    }
    Ok(())
}

/// Checks AdamW moments given for a plan's trained weights: one pair per weight, each of
/// its size.
pub(crate) fn check_moments(
    plan: &Plan,
    moments: &[crate::optim::MomentPair],
) -> Result<(), RuntimeError> {
    let optimizer = optimizer_of(plan)?;
    if moments.len() != optimizer.params.len() {
        return Err(RuntimeError::Training(format!(
            "{} pairs of optimizer moments given for {} trained weights",
            moments.len(),
            optimizer.params.len()
        )));
    }
    for (p, (m, v)) in optimizer.params.iter().zip(moments) {
        let spec = &plan.weights[p.weight];
        let n = spec.len();
        if m.len() != n || v.len() != n {
            return Err(RuntimeError::Training(format!(
                "the optimizer moments of `{}` hold {} and {} values, expected {n}",
                spec.name,
                m.len(),
                v.len()
            )));
        }
    }
    Ok(())
}

pub(crate) fn as_words(values: &[f32]) -> Buffer {
    let mut out = buffer(words(values.len() * 4));
    // SAFETY: `out` has room for `values.len()` f32s; u64 is more aligned than f32.
    unsafe {
        std::ptr::copy_nonoverlapping(
            values.as_ptr(),
            out.as_mut_ptr().cast::<f32>(),
            values.len(),
        )
    };
    out
}

/// `w` packed as `spec` says, in a buffer: f32, or rounded to bf16 when the spec says so.
pub(crate) fn packed_words(w: &[f32], norm: Option<&[f32]>, spec: &PackSpec) -> Buffer {
    if spec.bf16 {
        return as_bf16_words(&pack(w, norm, spec));
    }
    let len = spec.packed_len();
    let mut out = buffer(words(len * 4));
    // SAFETY: `out` has room for `len` f32s; u64 is more aligned than f32.
    let values = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<f32>(), len) };
    pack_into(w, norm, spec, values);
    out
}

/// `values` rounded to bf16 (to nearest, ties to even), two bytes each, in a buffer.
pub(crate) fn as_bf16_words(values: &[f32]) -> Buffer {
    let mut out = buffer(words(values.len() * 2));
    // SAFETY: `out` has room for `values.len()` u16s; u64 is more aligned than u16.
    let halves =
        unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u16>(), values.len()) };
    for (h, &x) in halves.iter_mut().zip(values) {
        *h = crate::attention_check::bf16_bits(x);
    }
    out
}

/// Copies a tensor into `buffer` (grown when too small): one memcpy when the tensor is laid out
/// contiguously, as it almost always is.
pub(crate) fn fill(buffer_: &mut Buffer, tensor: &Tensor) {
    let count = match tensor {
        Tensor::I64(a) => a.len() * 2,
        Tensor::F32(a) => a.len(),
    };
    if buffer_.len() < words(count * 4) + SLACK_WORDS {
        *buffer_ = buffer(words(count * 4));
    }
    match tensor {
        Tensor::I64(a) => match a.as_slice() {
            Some(values) => buffer_[..values.len()]
                .iter_mut()
                .zip(values)
                .for_each(|(w, &v)| *w = v as u64),
            None => buffer_
                .iter_mut()
                .zip(a.iter())
                .for_each(|(w, &v)| *w = v as u64),
        },
        Tensor::F32(a) => {
            // SAFETY: the buffer holds at least `a.len()` f32s; u64 is more aligned than f32.
            let out = unsafe {
                std::slice::from_raw_parts_mut(buffer_.as_mut_ptr().cast::<f32>(), a.len())
            };
            match a.as_slice() {
                Some(values) => parallel_copy(out, values),
                None => out.iter_mut().zip(a.iter()).for_each(|(o, &v)| *o = v),
            }
        }
    }
}

/// Copies in chunks on the current thread pool: one core does not saturate memory bandwidth.
fn parallel_copy(out: &mut [f32], values: &[f32]) {
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(values.par_chunks(CHUNK))
        .for_each(|(o, v)| o.copy_from_slice(v));
}

/// Each weight of `plan` from `weights` in the plan's order, checked against its shape: borrowed (no copy) where
/// the tensor is contiguous, as weights read from a file are.
pub(crate) fn raw_weights<'w>(
    plan: &Plan,
    weights: &'w Weights,
) -> Result<Vec<std::borrow::Cow<'w, [f32]>>, RuntimeError> {
    plan.weights
        .iter()
        .map(|spec| {
            let tensor = weights
                .get(&spec.name)
                .ok_or_else(|| RuntimeError::MissingWeight {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                })?;
            if tensor.shape() != spec.shape.as_slice() {
                return Err(RuntimeError::WeightShape {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    found: tensor.shape().to_vec(),
                });
            }
            Ok(match tensor.as_slice() {
                Some(values) => std::borrow::Cow::Borrowed(values),
                None => std::borrow::Cow::Owned(tensor.iter().copied().collect()),
            })
        })
        .collect()
}

/// For each weight and packed weight of `plan`, the buffer that another model of the same
/// model and weights (`beside`: its plan, weights and packed weights) holds of it, if any.
pub(crate) fn held_beside<B: Clone>(
    plan: &Plan,
    beside: Option<(&Plan, &[B], &[B])>,
) -> (Vec<Option<B>>, Vec<Option<B>>) {
    let Some((other, weights, packed)) = beside else {
        return (Vec::new(), Vec::new());
    };
    let (raw_in, packed_in) = plan.weights_in(other);
    let take = |found: Vec<Option<usize>>, buffers: &[B]| {
        found
            .into_iter()
            .map(|j| j.map(|j| buffers[j].clone()))
            .collect()
    };
    (take(raw_in, weights), take(packed_in, packed))
}

pub(crate) fn words_of_i64(values: impl ExactSizeIterator<Item = i64>) -> Buffer {
    let mut out = buffer(values.len());
    for (slot, v) in out.iter_mut().zip(values) {
        *slot = v as u64;
    }
    out
}

impl CpuModel {
    /// Loads an artifact and its weights; `threads` of 0 means one per core.
    pub fn load(dir: &Path, weights: &Weights, threads: usize) -> Result<CpuModel, RuntimeError> {
        CpuModel::load_with(dir, weights, threads, None)
    }

    /// Loads two plans of one model (its prefill and decode plans) with its weights: the
    /// weights both read are held once, and the thread pool is shared.
    pub fn load_pair(
        first: &Path,
        second: &Path,
        weights: &Weights,
        threads: usize,
    ) -> Result<(CpuModel, CpuModel), RuntimeError> {
        let one = CpuModel::load(first, weights, threads)?;
        let two = CpuModel::load_with(second, weights, one.threads, Some(&one))?;
        Ok((one, two))
    }

    fn load_with(
        dir: &Path,
        weights: &Weights,
        threads: usize,
        beside: Option<&CpuModel>,
    ) -> Result<CpuModel, RuntimeError> {
        let artifact = Artifact::load(dir)?;
        let plan = artifact.plan;
        if plan.library.ends_with(".ptx") {
            return Err(RuntimeError::Cuda(format!(
                "{} was compiled for {}: run it on the GPU (--device cuda), or compile it for \
                 the CPU (--target cpu)",
                dir.display(),
                plan.target
            )));
        }
        let library_path = dir.join(&plan.library);
        let library_error = |message: String| RuntimeError::Library {
            path: library_path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(&library_path).map_err(|e| library_error(e.to_string()))?;
        if format!("{:016x}", crate::fnv1a(&bytes)) != plan.library_hash {
            return Err(library_error(
                "it is not the library this plan was built with (truncated, changed or from \
                 another build); recompile the model"
                    .into(),
            ));
        }
        // SAFETY: the library is the kernel library written with this plan; loading it runs
        // no initializers beyond the C runtime's.
        let library = unsafe { libloading::Library::new(&library_path) }
            .map_err(|e| library_error(e.to_string()))?;
        let mut kernels = Vec::new();
        for info in &plan.kernels {
            // SAFETY: every kernel of the library has the signature `KernelFn`.
            let f: libloading::Symbol<KernelFn> = unsafe { library.get(info.symbol.as_bytes()) }
                .map_err(|_| RuntimeError::Symbol(info.symbol.clone()))?;
            kernels.push(*f);
        }
        let masks = plan
            .schedules
            .iter()
            .map(|s| {
                let expr = zebra_ir::expr::parse_expr(&s.mask)
                    .map_err(|_| RuntimeError::Mask(s.mask.clone()))?;
                let support = Support::of(&expr);
                Ok((expr, support))
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        if threads > MAX_THREADS {
            return Err(RuntimeError::Threads(format!(
                "{threads} threads asked for; at most {MAX_THREADS}"
            )));
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = match beside {
            Some(other) => other.pool.clone(),
            None => Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .stack_size(16 << 20)
                    .build()
                    .map_err(|e| RuntimeError::Threads(e.to_string()))?,
            ),
        };
        let constants = plan.constants.iter().map(|c| as_words(&[*c])).collect();
        let mut model = CpuModel {
            plan,
            _library: library,
            kernels,
            substitutes: HashMap::new(),
            weights: Vec::new(),
            packed: Vec::new(),
            constants,
            masks,
            pool,
            threads,
            slots: Vec::new(),
            inputs: Vec::new(),
            workspaces: Vec::new(),
            positions: HashMap::new(),
            schedules: HashMap::new(),
            ropes: HashMap::new(),
            caches: Vec::new(),
            cached_tokens: 0,
            cache_batch: 0,
            moments: Vec::new(),
            partials: Buffer::default(),
            hyper: Buffer::default(),
        };
        model.set_weights_beside(weights, beside)?;
        Ok(model)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Replaces the weights (and repacks them).
    pub fn set_weights(&mut self, weights: &Weights) -> Result<(), RuntimeError> {
        self.set_weights_beside(weights, None)
    }

    /// Sets the weights, taking those `beside` holds from it (when it was given the same).
    fn set_weights_beside(
        &mut self,
        weights: &Weights,
        beside: Option<&CpuModel>,
    ) -> Result<(), RuntimeError> {
        let raw = raw_weights(&self.plan, weights)?;
        let (mut shared, mut shared_packed) = held_beside(
            &self.plan,
            beside.map(|other| (&other.plan, &other.weights[..], &other.packed[..])),
        );
        let read_raw = self.plan.raw_weights_read();
        self.weights = raw
            .iter()
            .enumerate()
            .map(|(i, values)| {
                if !read_raw[i] {
                    // Read only packed: the packed copy is all the plan needs.
                    return Arc::new(Buffer::default());
                }
                let held = shared.get_mut(i).and_then(Option::take);
                held.filter(|b| !b.is_empty())
                    .unwrap_or_else(|| Arc::new(as_words(values)))
            })
            .collect();
        self.packed = self
            .plan
            .packed
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let held = shared_packed.get_mut(i).and_then(Option::take);
                held.unwrap_or_else(|| {
                    let norm = p.norm.map(|n| &*raw[n]);
                    Arc::new(packed_words(&raw[p.weight], norm, p))
                })
            })
            .collect();
        Ok(())
    }

    fn schedule(
        &mut self,
        id: usize,
        batch: usize,
        seq: usize,
        inputs: &[Buffer],
    ) -> (usize, usize) {
        let spec = &self.plan.schedules[id];
        let (mask, support) = &self.masks[id];
        let per_batch = spec.per_batch();
        let key = (id, seq);
        if !per_batch && self.schedules.contains_key(&key) {
            return key;
        }
        let built = build_schedule(spec, mask, support, batch, seq, inputs);
        self.schedules.insert(key, built);
        key
    }

    fn rope(&mut self, id: usize, seq: usize, offset: usize) {
        if self.ropes.contains_key(&(id, seq, offset)) {
            return;
        }
        let (rope, dim) = self.plan.rope_tables[id];
        self.ropes
            .insert((id, seq, offset), rope_tables(&rope, dim, seq, offset));
    }

    /// Runs the model on `[B, T]` inputs; returns the outputs.
    pub fn run(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, ArrayD<f32>>, RuntimeError> {
        self.run_keeping(inputs, &|_| true)
    }

    /// As [`CpuModel::run`], returning only the outputs `keep` accepts by name (a training
    /// step's loss, without its gradients).
    pub fn run_keeping(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<BTreeMap<String, ArrayD<f32>>, RuntimeError> {
        if !self.plan.caches.is_empty() && self.is_decode() {
            return Err(RuntimeError::Decode(
                "this is a decode plan: run it with `decode`".into(),
            ));
        }
        self.run_at(inputs, 0, keep)
    }

    /// A training plan's optimizer, first part: after a step, the partial sums of squares
    /// of its gradients (the global norm is the square root of their sum).
    pub fn grad_partials(&mut self) -> Result<Vec<f32>, RuntimeError> {
        let optimizer = optimizer_of(&self.plan)?;
        stepped(self.slots.len(), &self.plan)?;
        let (steps, count) = (optimizer.norm.clone(), optimizer.partials);
        if self.partials.len() < words(count * 4) {
            self.partials = buffer(words(count * 4));
        }
        self.run_optimizer(&steps);
        Ok(floats(&self.partials, count))
    }

    /// A training plan's optimizer, second part: AdamW on every trained weight with these
    /// scalars (in the order of [`crate::plan::Hyper`]), then the packed weights packed again.
    pub fn apply_update(&mut self, hyper: &[f32; HYPER]) -> Result<(), RuntimeError> {
        let steps = optimizer_of(&self.plan)?.update.clone();
        stepped(self.slots.len(), &self.plan)?;
        if self.moments.is_empty() {
            self.moments = trained_sizes(&self.plan)?
                .into_iter()
                .map(|n| [buffer(words(n * 4)), buffer(words(n * 4))])
                .collect();
        }
        self.hyper = as_words(hyper);
        self.run_optimizer(&steps);
        Ok(())
    }

    /// The weights as they are now (after updates), in the order of `plan().weights`.
    pub fn read_weights(&mut self) -> Result<Vec<Vec<f32>>, RuntimeError> {
        optimizer_of(&self.plan)?;
        Ok(self
            .plan
            .weights
            .iter()
            .zip(&self.weights)
            .map(|(spec, buffer)| floats(buffer, spec.len()))
            .collect())
    }

    /// AdamW's moments `(m, v)` of each trained weight (zeros before the first update).
    pub fn moments(&mut self) -> Result<Vec<crate::optim::MomentPair>, RuntimeError> {
        Ok(trained_sizes(&self.plan)?
            .into_iter()
            .enumerate()
            .map(|(i, n)| match self.moments.get(i) {
                Some([m, v]) => (floats(m, n), floats(v, n)),
                None => (vec![0.0; n], vec![0.0; n]),
            })
            .collect())
    }

    /// Sets AdamW's moments (a resumed run's), one pair per trained weight.
    pub fn set_moments(
        &mut self,
        moments: &[crate::optim::MomentPair],
    ) -> Result<(), RuntimeError> {
        check_moments(&self.plan, moments)?;
        self.moments = moments
            .iter()
            .map(|(m, v)| [as_words(m), as_words(v)])
            .collect();
        Ok(())
    }

    /// Runs optimizer steps: constant grids, no inputs.
    fn run_optimizer(&mut self, steps: &[Step]) {
        let pool = self.pool.clone();
        pool.install(|| {
            for step in steps {
                let Step::Kernel {
                    kernel,
                    operands,
                    grid,
                    ..
                } = step
                else {
                    continue;
                };
                let built = HashMap::new();
                let pointers: Vec<*mut u8> = operands
                    .iter()
                    .map(|o| self.pointer(*o, 0, 0, &[], &built))
                    .collect();
                let programs = grid.programs(1, 1);
                let tasks = Tasks::Pool {
                    fine_grained: false,
                };
                self.launch(*kernel, Raw(pointers), [1, 1, 0, 0], programs, tasks);
            }
        });
    }

    /// Runs the plan on inputs whose first token is at position `offset`.
    fn run_at(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        offset: usize,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<BTreeMap<String, ArrayD<f32>>, RuntimeError> {
        let (batch, seq) = check_inputs(&self.plan, inputs)?;
        // Memory: each slot sized for its largest value, each workspace for itself.
        let mut slot_words = vec![0usize; self.plan.slots];
        for v in &self.plan.values {
            let bytes = volume(&v.shape, batch, seq).saturating_mul(v.elem.size());
            slot_words[v.slot] = slot_words[v.slot].max(words(bytes));
        }
        let workspace_words: Vec<usize> = self
            .plan
            .workspaces
            .iter()
            .map(|(shape, elem)| words(volume(shape, batch, seq).saturating_mul(elem.size())))
            .collect();
        self.check_memory(batch, seq, &slot_words, &workspace_words, keep)?;
        let mut input_buffers = std::mem::take(&mut self.inputs);
        input_buffers.resize_with(self.plan.inputs.len(), Buffer::default);
        self.pool.install(|| {
            for (buffer, spec) in input_buffers.iter_mut().zip(&self.plan.inputs) {
                fill(buffer, &inputs[&spec.name]);
            }
        });
        self.slots.resize_with(self.plan.slots, Buffer::default);
        self.workspaces
            .resize_with(workspace_words.len(), Buffer::default);
        for (buffers, wanted) in [
            (&mut self.slots, &slot_words),
            (&mut self.workspaces, &workspace_words),
        ] {
            for (b, &w) in buffers.iter_mut().zip(wanted) {
                let w = w.saturating_add(SLACK_WORDS);
                if b.len() < w {
                    *b = Buffer::default();
                    *b = Buffer::try_zeroed(w).map_err(|_| RuntimeError::Memory {
                        batch,
                        seq,
                        needed: crate::memory::human((w as u64).saturating_mul(8)),
                        available: "less".into(),
                    })?;
                }
            }
        }
        if offset != 0 {
            // Decode steps move on by one position each: keep only this one's tables.
            self.positions.retain(|k, _| k.1 == 0);
            self.ropes.retain(|k, _| k.2 == 0);
        }
        self.positions.entry((seq, offset)).or_insert_with(|| {
            words_of_i64(
                (offset as i64..(offset + seq) as i64)
                    .collect::<Vec<_>>()
                    .into_iter(),
            )
        });
        for id in 0..self.plan.rope_tables.len() {
            self.rope(id, seq, offset);
        }
        // The steps run on a worker of the pool: kernels run inline there, or are shared
        // with the other workers, without the calling thread competing for a core.
        let pool = self.pool.clone();
        pool.install(|| self.run_steps(batch, seq, offset, &input_buffers));
        self.inputs = input_buffers;
        let mut outputs = BTreeMap::new();
        for (name, v) in &self.plan.outputs {
            if !keep(name) {
                continue;
            }
            let spec = &self.plan.values[*v];
            let shape: Vec<usize> = spec.shape.iter().map(|e| e.resolve(batch, seq)).collect();
            let count: usize = shape.iter().product();
            debug_assert_eq!(spec.elem, ElemType::F32);
            // SAFETY: the slot holds at least `count` f32 values written by the kernels.
            let values = unsafe {
                std::slice::from_raw_parts(self.slots[spec.slot].as_ptr().cast::<f32>(), count)
            };
            let mut copy = vec![0.0f32; count];
            self.pool.install(|| parallel_copy(&mut copy, values));
            outputs.insert(
                name.clone(),
                ArrayD::from_shape_vec(IxDyn(&shape), copy).expect("the count matches the shape"),
            );
        }
        Ok(outputs)
    }

    /// Refuses a run whose buffers would not fit in the memory left: the slots and
    /// workspaces that must grow to `slot_words` and `workspace_words` (less what the buffers
    /// they replace free) and the outputs' copies, against [`memory::available_bytes`].
    fn check_memory(
        &self,
        batch: usize,
        seq: usize,
        slot_words: &[usize],
        workspace_words: &[usize],
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<(), RuntimeError> {
        let held = |buffers: &[Buffer], i: usize| buffers.get(i).map_or(0, |b| b.len());
        let mut grow = 0usize;
        let mut freed = 0usize;
        for (buffers, wanted) in [
            (&self.slots, slot_words),
            (&self.workspaces, workspace_words),
        ] {
            for (i, &w) in wanted.iter().enumerate() {
                let have = held(buffers, i);
                if have < w.saturating_add(SLACK_WORDS) {
                    grow = grow.saturating_add(w.saturating_add(SLACK_WORDS));
                    freed += have;
                }
            }
        }
        let mut copies = 0u64;
        for (name, v) in &self.plan.outputs {
            if keep(name) {
                let spec = &self.plan.values[*v];
                let copy = volume(&spec.shape, batch, seq).saturating_mul(spec.elem.size());
                copies = copies.saturating_add(copy as u64);
            }
        }
        // Runs that allocate little (decode steps: no buffer grows, one token's outputs) go
        // on without asking the system, which costs more than a small step.
        if grow == 0 && copies < 1 << 26 {
            return Ok(());
        }
        // What the buffers replaced free comes back before the new ones are allocated.
        let bytes = (grow as u64).saturating_mul(8).saturating_add(copies);
        let freed = freed as u64 * 8;
        match crate::memory::short_of(bytes.saturating_sub(freed)) {
            Some(available) => Err(RuntimeError::Memory {
                batch,
                seq,
                needed: crate::memory::human(bytes),
                available: crate::memory::human(available.saturating_add(freed)),
            }),
            None => Ok(()),
        }
    }

    fn run_steps(&mut self, batch: usize, seq: usize, offset: usize, input_buffers: &[Buffer]) {
        let mut built: HashMap<usize, (usize, usize)> = HashMap::new();
        for s in 0..self.plan.steps.len() {
            match self.plan.steps[s].clone() {
                Step::Schedule { id } => {
                    let key = self.schedule(id, batch, seq, input_buffers);
                    built.insert(id, key);
                }
                Step::Kernel {
                    kernel,
                    operands,
                    grid,
                    schedule,
                } => {
                    let per_batch = schedule
                        .and_then(|id| built.get(&id))
                        .and_then(|key| self.schedules.get(key))
                        .is_some_and(|s| s.per_batch);
                    let pointers: Vec<*mut u8> = operands
                        .iter()
                        .map(|o| self.pointer(*o, seq, offset, input_buffers, &built))
                        .collect();
                    let dims = [
                        batch as i64,
                        seq as i64,
                        i64::from(per_batch),
                        offset as i64,
                    ];
                    if let Some(substitute) = self.substitutes.get(&kernel) {
                        substitute(&pointers, dims);
                        continue;
                    }
                    let programs = grid.programs(batch, seq);
                    if seq == 1
                        && let Some(parts) = self.cache_shares(kernel, &operands, offset, programs)
                    {
                        // Each (batch row, KV head)'s cache shared out over `parts`
                        // programs, then one program per pair combines their shares.
                        let mut split = dims;
                        split[2] = parts as i64;
                        let tasks = Tasks::Pool { fine_grained: true };
                        self.launch(
                            kernel,
                            Raw(pointers.clone()),
                            split,
                            programs * parts,
                            tasks,
                        );
                        split[2] = -(parts as i64);
                        self.launch(kernel, Raw(pointers), split, programs, Tasks::Inline);
                        continue;
                    }
                    // A single token's kernels are too small to share out (waking the pool
                    // costs more than they do), except attention over a long KV cache and
                    // projections through large weights.
                    let tasks = if batch * seq > 1 {
                        Tasks::Pool {
                            fine_grained: schedule.is_some(),
                        }
                    } else if operands.iter().any(|o| match o {
                        Operand::CacheKeys(c) => {
                            self.caches[*c].spec.slots_for(offset + 1) >= PARALLEL_SLOTS
                        }
                        Operand::Packed(p) => self.packed[*p].len() * 8 >= PARALLEL_WEIGHT_BYTES,
                        _ => false,
                    }) {
                        Tasks::Pool { fine_grained: true }
                    } else {
                        Tasks::Inline
                    };
                    self.launch(kernel, Raw(pointers), dims, programs, tasks);
                }
            }
        }
    }

    /// How many programs to share each (batch row, KV head)'s KV cache out over in a decode
    /// step's attention (kernel `kernel`, `programs` pairs, the token at `offset`): enough
    /// that every thread gets a few, each at least [`SHARE_SLOTS`] slots; `None` for one
    /// program per pair (a short cache, or a kernel that cannot share it out).
    fn cache_shares(
        &self,
        kernel: usize,
        operands: &[Operand],
        offset: usize,
        programs: usize,
    ) -> Option<usize> {
        let most = self.plan.kernels[kernel].cache_splits;
        let slots = operands.iter().find_map(|o| match o {
            Operand::CacheKeys(c) => Some(self.caches[*c].spec.slots_for(offset + 1)),
            _ => None,
        })?;
        if most < 2 || self.threads < 2 || slots < PARALLEL_SLOTS || programs == 0 {
            return None;
        }
        let wanted = (4 * self.threads).div_ceil(programs);
        let parts = wanted.min(slots / SHARE_SLOTS).min(most);
        (parts >= 2).then_some(parts)
    }

    /// The most programs the next decode step shares a (batch row, KV head)'s KV cache out
    /// over in one of its attentions, for a batch of `batch` rows (1: none is shared out).
    pub fn cache_shares_next(&self, batch: usize) -> usize {
        let offset = self.cached_tokens;
        self.plan
            .steps
            .iter()
            .filter_map(|step| match step {
                Step::Kernel {
                    kernel,
                    operands,
                    grid,
                    ..
                } => self.cache_shares(*kernel, operands, offset, grid.programs(batch, 1)),
                Step::Schedule { .. } => None,
            })
            .max()
            .unwrap_or(1)
    }

    /// Whether this is a decode plan (its attention runs against KV caches).
    pub fn is_decode(&self) -> bool {
        self.plan.is_decode()
    }

    /// Runs kernel `kernel` of the plan (an index into `plan().kernels`) by `substitute`
    /// from now on: the warp emulator's tensor-core kernels stand in this way for the
    /// library's, so that a whole model runs with them on a machine without a GPU.
    pub fn substitute(&mut self, kernel: usize, substitute: KernelSubstitute) {
        self.substitutes.insert(kernel, substitute);
    }

    /// Starts decoding after a prompt: fills the KV caches from a prefill plan's outputs
    /// (`cache:{c}:k` and `cache:{c}:v`, `[B, KV, T, D]`) for the prompt's `T` tokens.
    pub fn start_decode(
        &mut self,
        prefill: &BTreeMap<String, ArrayD<f32>>,
    ) -> Result<(), RuntimeError> {
        if !self.is_decode() {
            return Err(RuntimeError::Decode(
                "this plan has no decode step; compile the model for generation".into(),
            ));
        }
        let (caches, batch, tokens) = fill_caches(&self.plan, prefill, None)?;
        self.caches = caches;
        self.cache_batch = batch;
        self.cached_tokens = tokens;
        Ok(())
    }

    /// One decode step: the next token of each batch row (`tokens [B, 1]`), at the position
    /// after those the caches hold; returns the plan's outputs for it.
    pub fn decode(
        &mut self,
        tokens: &ArrayD<i64>,
    ) -> Result<BTreeMap<String, ArrayD<f32>>, RuntimeError> {
        let position = next_position(
            &self.plan,
            self.caches.len(),
            self.cache_batch,
            self.cached_tokens,
            tokens,
        )?;
        for cache in &mut self.caches {
            let slot = cache.spec.slot(position);
            cache.reserve(slot + 1);
            cache.set_position(slot, position);
        }
        let inputs = BTreeMap::from([("tokens".to_string(), Tensor::I64(tokens.clone()))]);
        let outputs = self.run_at(&inputs, position, &|_| true)?;
        self.cached_tokens += 1;
        Ok(outputs)
    }

    /// Tokens the KV caches have seen.
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// Bytes of keys and values the caches hold now, and what caches of every position
    /// (full attention in every layer) would hold.
    pub fn cache_bytes(&self) -> (usize, usize) {
        cache_bytes(&self.caches, self.cached_tokens, self.cache_batch)
    }

    fn pointer(
        &mut self,
        operand: Operand,
        seq: usize,
        offset: usize,
        inputs: &[Buffer],
        built: &HashMap<usize, (usize, usize)>,
    ) -> *mut u8 {
        let p = |v: &Buffer| v.as_ptr() as *mut u8;
        match operand {
            Operand::Input(i) => p(&inputs[i]),
            Operand::Weight(i) => p(&self.weights[i]),
            Operand::Packed(i) => p(&self.packed[i]),
            Operand::Value(i) => p(&self.slots[self.plan.values[i].slot]),
            Operand::Constant(i) => p(&self.constants[i]),
            Operand::Positions => p(&self.positions[&(seq, offset)]),
            Operand::Workspace(i) => p(&self.workspaces[i]),
            Operand::ScheduleRows(i) => p(&self.schedules[&built[&i]].rows),
            Operand::ScheduleTiles(i) => p(&self.schedules[&built[&i]].tiles),
            Operand::ScheduleColumns(i) => p(&self.schedules[&built[&i]].columns),
            Operand::ScheduleColumnTiles(i) => p(&self.schedules[&built[&i]].column_tiles),
            Operand::RopeCos(i) => p(&self.ropes[&(i, seq, offset)].0),
            Operand::RopeSin(i) => p(&self.ropes[&(i, seq, offset)].1),
            Operand::CacheKeys(i) => p(&self.caches[i].keys),
            Operand::CacheValues(i) => p(&self.caches[i].values),
            Operand::CachePositions(i) => p(&self.caches[i].positions),
            Operand::MomentM(i) => p(&self.moments[i][0]),
            Operand::MomentV(i) => p(&self.moments[i][1]),
            Operand::Partials(at) => p(&self.partials).wrapping_add(4 * at),
            Operand::Hyper => p(&self.hyper),
        }
    }

    /// Runs `programs` programs of a kernel: one task per program for attention (whose
    /// programs differ in cost), else a few contiguous chunks per thread.
    fn launch(&self, kernel: usize, pointers: Raw, dims: [i64; 4], programs: usize, tasks: Tasks) {
        if programs == 0 {
            return;
        }
        let f = self.kernels[kernel];
        let tasks = match tasks {
            Tasks::Inline => 1,
            Tasks::Pool { fine_grained: true } => programs,
            Tasks::Pool {
                fine_grained: false,
            } => programs.min(self.threads * 4),
        };
        let per_task = programs.div_ceil(tasks);
        if tasks == 1 {
            // SAFETY: as below.
            unsafe { f(pointers.0.as_ptr(), dims.as_ptr(), 0, programs as i64) };
            return;
        }
        let pointers = &pointers;
        self.pool.install(|| {
            (0..tasks).into_par_iter().for_each(|task| {
                let first = task * per_task;
                let last = ((task + 1) * per_task).min(programs);
                if first < last {
                    // SAFETY: the kernel reads and writes the buffers the plan gave it, sized
                    // for these dims, and programs write disjoint parts of the output.
                    unsafe {
                        f(
                            pointers.0.as_ptr(),
                            dims.as_ptr(),
                            first as i64,
                            last as i64,
                        )
                    };
                }
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::CacheSpec;

    /// A plan with nothing but KV caches (one global, one ring of 4), for `fill_caches`.
    fn plan_with_caches() -> Plan {
        let mut plan: Plan = serde_json::from_value(serde_json::json!({
            "format": 1, "name": "caches", "target": "cpu", "library": "", "library_hash": "",
            "kernels": [], "max_seq_len": 64, "vocab": 0, "inputs": [], "weights": [],
            "packed": [], "constants": [], "values": [], "slots": 0, "workspaces": [],
            "schedules": [], "rope_tables": [], "steps": [], "outputs": [],
        }))
        .unwrap();
        for (c, ring) in [None, Some(4)].into_iter().enumerate() {
            plan.caches.push(CacheSpec {
                kv_heads: 1,
                kv_heads_held: vec![0],
                prefill_outputs: c,
                head_dim: 4,
                sinks: 0,
                ring,
                min_prompt: 0,
                block: 8,
                layer: Some(c),
            });
        }
        plan
    }

    /// Caches hold the prompt's keys in their slots, with room for the capacity asked for;
    /// caches that would not fit in memory at that capacity are refused with their size
    /// before any is allocated.
    #[test]
    fn caches_are_filled_from_the_prefill_and_refused_past_memory() {
        let plan = plan_with_caches();
        let mut prefill = BTreeMap::new();
        for c in 0..2 {
            let keys = ArrayD::from_shape_fn(IxDyn(&[1, 1, 6, 4]), |i| (i[2] * 10 + i[3]) as f32);
            prefill.insert(format!("cache:{c}:k"), keys.clone());
            prefill.insert(format!("cache:{c}:v"), keys.mapv(|x| -x));
        }
        let (caches, batch, tokens) = fill_caches(&plan, &prefill, Some(64)).unwrap();
        assert_eq!((caches.len(), batch, tokens), (2, 1, 6));
        // The global cache: position p in slot p; the ring of 4: positions 2 to 5.
        let positions = |c: &KvCache| (0..8).map(|s| c.positions[s] as i64).collect::<Vec<_>>();
        assert_eq!(positions(&caches[0]), [0, 1, 2, 3, 4, 5, -1, -1]);
        assert_eq!(positions(&caches[1]), [4, 5, 2, 3, -1, -1, -1, -1]);
        let values = floats(&caches[1].values, 16);
        assert_eq!(values[..4], [-40.0, -41.0, -42.0, -43.0]);

        let err = fill_caches(&plan, &prefill, Some(1 << 42)).err().unwrap();
        let message = err.to_string();
        assert!(
            message.starts_with(
                "KV caches for a batch of 1 over 4398046511104 positions need 128.0 TiB of memory"
            ),
            "{message}"
        );
    }
}
