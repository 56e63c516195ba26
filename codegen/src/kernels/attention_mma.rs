//! The fused attention on tensor cores, for NVIDIA GPUs from sm_80 on: the same attention
//! kernel description as the CPU's (mask and score modifier compiled in, the tile schedule
//! read at run time, GQA by head index), lowered the way a GPU wants it.
//!
//! One block of four warps per (query tile, batch row and head); each warp owns one or two
//! row blocks of 16 queries ([`MmaTiles`]: two for head dims up to 128, so that every K and V
//! fragment read from shared memory feeds two `mma`s). The Q tile is copied into shared memory
//! once; for each key tile the schedule lists, the K tile and then the V tile are copied with
//! `cp.async` (V's copy overlaps `S = Q K^T`, the next K tile's copy overlaps `O += P V`; with
//! two stages both are copied a tile ahead). `S` comes from `mma.sync.m16n8k16` with Q and K
//! fragments from `ldmatrix`; the mask is evaluated only on partial tiles (and the tile past
//! the end of the sequence); the online softmax runs in base 2 on the accumulator fragments,
//! the scale folded into the exponent's `fma`, row maxima (`max.f32`) and sums across the four
//! threads of a row by `shfl`; a row's running maximum moves only when a tile's is more than
//! [`LAZY_RESCALE`] above it, so that O is rescaled on few tiles (FlashAttention-4's lazy
//! rescaling); `P` is repacked in registers into A fragments for `O += P V`, with V
//! fragments from `ldmatrix.trans`. Inputs and the output are bf16 or f16; scores, softmax and
//! accumulation are f32. Block `x` takes query tile `tiles - 1 - x`.
//!
//! Each thread copies consecutive rows of a K or V tile, so its copies' sources are one
//! register plus constants; only the tile past the end checks rows, and a row past the end
//! is a copy of no bytes (zero-filled). Per warp and key tile of the benchmark's local
//! attention (head dim 128, 128 x 64 tiles; sm_90 SASS), that is 796 instructions on a full
//! tile without rescaling, 256 of them `mma`, and 1005 on a partial one.
//!
//! Shared memory is dynamic (the runtime opts in above 48 KiB); its rows are padded by 8
//! elements, so that the eight rows an `ldmatrix` reads fall in distinct banks.
//!
//! On sm_90 the products can run on warpgroup MMAs instead ([`Product::Wgmma`]): one or two
//! warpgroups of 64 rows per block, Q and K in unpadded K-major core matrices read through
//! matrix descriptors, V read N-major where it was copied, and a loop pipelined so that each
//! tile's softmax runs while the previous tile's `O += P V` is on the tensor cores
//! ([`Product::WgmmaTransposedV`]: V transposed first, a plain loop). The fragment layouts
//! of a warp's 16 rows are those of `mma.sync`, so the mask, softmax and epilogue are shared.
//!
//! Buffers: `q [B, H, T, D]`, `k [B, KV, T, D]`, `v [B, KV, T, D]`, `out [B, H, T, D]`, the
//! schedule's row offsets (in sections per batch row and head: `schedule_range`) and tiles,
//! then the side inputs `[B, T]` (i64, padded by 8).
//! Dims: `B`, `T`, and whether the schedule has one set of rows per batch row.

use zebra_ir::op::AttentionKernel;

use super::attention::{ScheduleRows, schedule_range};
use super::block::{ChunkedTile, block_function, load8, pack8, shared_address, trunc32};
use super::warp::{Descriptor, Lowering, WgmmaA};
use crate::mlir::{Builder, F32, I64, Val, f32_literal};
use crate::vexpr::{self, VecEnv};

/// The 16-bit input type of the tensor-core kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Half {
    Bf16,
    F16,
}

impl Half {
    pub fn from_name(name: &str) -> Option<Half> {
        match name {
            "bf16" => Some(Half::Bf16),
            "f16" => Some(Half::F16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Half::Bf16 => "bf16",
            Half::F16 => "f16",
        }
    }
}

/// Warps per block of the `mma.sync` kernels (a `wgmma` attention kernel has four per
/// warpgroup: [`MmaTiles::warps`]).
pub const WARPS: usize = 4;
/// Threads per block of the `mma.sync` kernels.
pub const THREADS: usize = WARPS * 32;
/// The largest head dimension the kernel takes.
pub const MAX_HEAD_DIM: usize = 256;

/// The tensor-core instruction a kernel's products run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Product {
    /// `mma.sync.m16n8k16`, per warp, operands from registers (sm_80 on).
    #[default]
    Sync,
    /// `wgmma.mma_async` m64nNk16, per warpgroup of four warps, B (and for `Q K^T` A too)
    /// read from shared memory through matrix descriptors (sm_90a); V read as it is copied
    /// (N-major: head dims contiguous).
    Wgmma,
    /// The same with V first transposed in shared memory, so that every operand is K-major.
    WgmmaTransposedV,
}

impl Product {
    pub fn from_name(name: &str) -> Option<Product> {
        match name {
            "sync" => Some(Product::Sync),
            "wgmma" => Some(Product::Wgmma),
            "wgmma-vt" => Some(Product::WgmmaTransposedV),
            _ => None,
        }
    }

    /// The name `--mma` takes.
    pub fn name(self) -> &'static str {
        match self {
            Product::Sync => "sync",
            Product::Wgmma => "wgmma",
            Product::WgmmaTransposedV => "wgmma-vt",
        }
    }

    pub fn is_wgmma(self) -> bool {
        self != Product::Sync
    }
}

/// How a model plan's kernels run on tensor cores: the 16-bit type of their operands, and
/// the settings of the forward attentions' kernels (their product instruction, `wgmma` on
/// sm_90 only, and tiles; the backward's stay on `mma.sync` at the head dim's tiles).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorCores {
    pub half: Half,
    pub attention: MmaChoice,
}

impl From<Half> for TensorCores {
    /// `half` operands, attentions on `mma.sync` at the head dim's tiles.
    fn from(half: Half) -> TensorCores {
        TensorCores {
            half,
            attention: MmaChoice::default(),
        }
    }
}

/// Settings of the tensor-core attention kernels that override the target's choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmaSettings {
    /// K/V stages in flight, 1 or 2 (`mma.sync` only).
    pub stages: Option<usize>,
    /// Keys per tile: 16, 32, 64 or 128.
    pub block_k: Option<usize>,
    /// Queries per tile, 64 or 128 (`mma.sync` only: one or two row blocks per warp).
    pub block_q: Option<usize>,
    /// The instruction of the products.
    pub product: Option<Product>,
}

/// The settings of each attention's tensor-core kernel: the command line's for all of them
/// where it set any, else those a tuning database recorded for what the attention computes,
/// else the target's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MmaChoice {
    pub all: MmaSettings,
    pub tuned: std::collections::BTreeMap<zebra_passes::AttentionKey, MmaSettings>,
}

impl MmaChoice {
    /// The settings for `kernel`, and whether they are the tuning database's.
    pub fn settings(&self, kernel: &AttentionKernel) -> (MmaSettings, bool) {
        if self.all != MmaSettings::default() {
            return (self.all, false);
        }
        match self.tuned.get(&zebra_passes::AttentionKey::of(kernel)) {
            Some(tuned) => (*tuned, true),
            None => (self.all, false),
        }
    }
}

impl MmaChoice {
    /// Whether any attention's kernel uses `wgmma` (sm_90's, in PTX for sm_90a).
    pub fn uses_wgmma(&self) -> bool {
        std::iter::once(&self.all)
            .chain(self.tuned.values())
            .any(|s| s.product.is_some_and(Product::is_wgmma))
    }
}

impl From<MmaSettings> for MmaChoice {
    fn from(all: MmaSettings) -> MmaChoice {
        MmaChoice {
            all,
            tuned: Default::default(),
        }
    }
}

/// The tiles of a tensor-core attention kernel for one head dimension and target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmaTiles {
    pub block_q: usize,
    pub block_k: usize,
    pub head_dim: usize,
    /// Row blocks of 16 query rows per warp: two where the accumulators fit the registers
    /// (each K and V fragment read from shared memory then feeds two `mma`s), else one.
    pub row_blocks: usize,
    /// K and V tiles in flight: 1 (the next K tile's copy overlaps `P V`, the V tile's
    /// `Q K^T`), or 2 (the next K and V tiles are copied while the whole of this one is
    /// computed; one barrier per tile).
    pub stages: usize,
    pub product: Product,
    /// Warps per block: 4, or with `wgmma` 8 (two warpgroups of 64 rows sharing the K and
    /// V tiles).
    pub warps: usize,
}

impl MmaTiles {
    /// The tiles for a head dimension, or `None` when the kernel cannot take it (not a
    /// multiple of 16, over 256, or a target before sm_80). Up to 128: 128 query rows (two
    /// row blocks per warp) by 64 keys; beyond, the output accumulators alone take 128
    /// registers a thread: 64 rows (one row block) by 32 keys. One K/V stage on both
    /// targets: on an H100, two stages measured 8.4 ms against one stage's 7.5 ms for the
    /// benchmark's global attention (bench/gpu_attention.zb, T = 16384).
    pub fn for_head_dim(head_dim: usize, sm: u32) -> Option<MmaTiles> {
        if head_dim == 0 || !head_dim.is_multiple_of(16) || head_dim > MAX_HEAD_DIM || sm < 80 {
            return None;
        }
        let (row_blocks, block_k) = if head_dim <= 128 { (2, 64) } else { (1, 32) };
        Some(MmaTiles {
            block_q: WARPS * 16 * row_blocks,
            block_k,
            head_dim,
            row_blocks,
            stages: 1,
            product: Product::Sync,
            warps: WARPS,
        })
    }

    /// The same tiles with some settings overridden (a tuning run's). With `wgmma`, a block
    /// is one warpgroup of 64 query rows (a row block per warp) and one K/V stage.
    pub fn with(self, settings: &MmaSettings) -> MmaTiles {
        let product = settings.product.unwrap_or(self.product);
        // wgmma: one warpgroup (64 rows) or two (128 rows, the default up to head dim 128:
        // each K and V tile copied serves twice the queries).
        let warps = match (product.is_wgmma(), settings.block_q) {
            (false, _) => WARPS,
            (true, Some(64)) => 4,
            (true, _) if self.head_dim <= 128 => 8,
            (true, _) => 4,
        };
        let row_blocks = match (product, settings.block_q) {
            (Product::Wgmma | Product::WgmmaTransposedV, _) => 1,
            (Product::Sync, Some(64)) => 1,
            (Product::Sync, Some(128)) if self.head_dim <= 128 => 2,
            (Product::Sync, _) => self.row_blocks,
        };
        let block_k = settings
            .block_k
            .filter(|k| k.is_multiple_of(16) && (16..=128).contains(k))
            .unwrap_or(self.block_k);
        // Beyond head dim 128 the output accumulators of `wgmma` take 128 registers a thread:
        // more than 32 keys' scores beside them spill (ptxas: 200 bytes at 64 keys).
        let block_k = match product {
            _ if product.is_wgmma() && self.head_dim > 128 => block_k.min(32),
            _ => block_k,
        };
        MmaTiles {
            stages: match product {
                Product::Sync => settings.stages.map_or(self.stages, |s| s.clamp(1, 2)),
                _ => 1,
            },
            block_k,
            row_blocks,
            block_q: warps * 16 * row_blocks,
            product,
            warps,
            ..self
        }
    }

    /// [`MmaTiles::with`], refusing a setting it would not take as asked (a user's flag):
    /// the reason, naming the setting and the limit.
    pub fn checked_with(self, settings: &MmaSettings) -> Result<MmaTiles, String> {
        let tiles = self.with(settings);
        let d = self.head_dim;
        let product = match tiles.product {
            Product::Sync => "mma.sync",
            Product::Wgmma => "wgmma",
            Product::WgmmaTransposedV => "wgmma-vt",
        };
        if let Some(stages) = settings.stages.filter(|&s| s != tiles.stages) {
            return Err(format!(
                "{product} kernels take one K/V stage, not {stages} (their next K and V tiles are \
                 copied a step ahead in buffers of their own)"
            ));
        }
        if let Some(block_q) = settings.block_q.filter(|&q| q != tiles.block_q) {
            return Err(format!(
                "at head dim {d}, {product} kernels take {} queries per tile, not {block_q}: \
                 beyond head dim 128 the output accumulators fill the registers",
                tiles.block_q
            ));
        }
        if let Some(block_k) = settings.block_k.filter(|&k| k != tiles.block_k) {
            return Err(format!(
                "at head dim {d}, {product} kernels take at most {} keys per tile, not \
                 {block_k}: beyond head dim 128 more scores beside the output accumulators spill",
                tiles.block_k
            ));
        }
        Ok(tiles)
    }

    /// Threads per block.
    pub fn threads(&self) -> usize {
        self.warps * 32
    }

    /// Elements per padded shared-memory row (the Q and K tiles of `wgmma` kernels are in
    /// core matrices instead, unpadded).
    pub fn row(&self) -> usize {
        self.head_dim + 8
    }

    /// Bytes of a Q or K tile of `rows` rows as the products read it.
    fn operand_bytes(&self, rows: usize) -> usize {
        match self.product {
            Product::Sync => rows * self.row() * 2,
            _ => rows * self.head_dim * 2,
        }
    }

    /// Byte offset of the transposed V tile of a `wgmma-vt` kernel (after the V tile as it
    /// is copied, in padded rows): head dims by keys, in core matrices.
    pub fn vt_offset(&self) -> usize {
        self.v_offset() + self.kv_tile_bytes()
    }

    /// Bytes of one K (or V) tile in shared memory.
    pub fn kv_tile_bytes(&self) -> usize {
        self.block_k * self.row() * 2
    }

    /// Byte offsets of stage 0's K and V tiles in shared memory (the Q tile is at 0; stage
    /// `s` is `s * 2 * kv_tile_bytes` further).
    pub fn k_offset(&self) -> usize {
        self.operand_bytes(self.block_q)
    }

    /// After the K tiles: two for `wgmma` with V in place (the next tile's copy lands while
    /// this one is read), else one per stage.
    pub fn v_offset(&self) -> usize {
        let k_tiles = if self.product == Product::Wgmma { 2 } else { 1 };
        self.k_offset() + k_tiles * self.operand_bytes(self.block_k)
    }

    /// Shared memory per block, in bytes: the Q tile, then K and V tiles per stage (for
    /// `wgmma`, two V tiles, or the V tile and its transpose).
    pub fn shared_bytes(&self) -> usize {
        match self.product {
            Product::Sync => self.k_offset() + self.stages * 2 * self.kv_tile_bytes(),
            Product::Wgmma => self.v_offset() + 2 * self.block_k * self.head_dim * 2,
            Product::WgmmaTransposedV => self.vt_offset() + self.block_k * self.head_dim * 2,
        }
    }

    /// The shared memory a block of `sm` may use (opting in above 48 KiB).
    pub fn shared_limit(sm: u32) -> usize {
        if sm >= 90 { 227 * 1024 } else { 163 * 1024 }
    }

    /// The 32-bit registers a thread holds live through the key loop (the output
    /// accumulators, one tile of scores, softmax state), before the compiler's own
    /// temporaries: a lower bound that must stay well under 255.
    pub fn live_registers(&self) -> usize {
        let (d, m) = (self.head_dim, self.row_blocks);
        m * (d / 8 * 4 + self.block_k / 8 * 4 + 4)
    }
}

/// The row and 16-byte column of chunk `chunk` (i64) of a tile of `per_row` chunks a row,
/// stored in core matrices: chunk `c` is row `c / (8 per_row) 8 + c % 8`, column
/// `(c / 8) % per_row`.
fn core_position(b: &mut Builder, chunk: &Val, per_row: usize) -> (Val, Val) {
    let c8 = b.i64(8);
    let group = b.i64(8 * per_row as i64);
    let r = b.divi(chunk, &group);
    let r = b.muli(&r, &c8);
    let within = b.remi(chunk, &c8);
    let r = b.addi(&r, &within);
    let per_row = b.i64(per_row as i64);
    let cc = b.divi(chunk, &c8);
    (r, b.remi(&cc, &per_row))
}

fn const_i32(b: &mut Builder, v: i64) -> Val {
    b.op(format!("arith.constant {v} : i32"))
}

/// How far (in base 2) a row's maximum may rise past the one its probabilities are taken
/// with before O is rescaled: a factor of 256, far from f32's and bf16's limits.
pub const LAZY_RESCALE: f32 = 8.0;

/// Multiplies the output accumulators of each row (`at(row, n, lane)`: the accumulator of
/// the thread's row `row`, head dims `8 n + 2 (lane % 2)..`) by its factor, skipped when every
/// factor of the thread is exactly 1 (no row's maximum moved).
fn rescale_rows(
    b: &mut Builder,
    o: &[Val],
    alphas: &[Val],
    at: impl Fn(usize, usize, usize) -> usize,
    d: usize,
) -> Vec<Val> {
    let one = b.f32(1.0);
    let mut any = b.op("arith.constant false");
    for alpha in alphas {
        let moved = b.cmpf("une", alpha, &one, F32);
        any = b.bin("ori", &any, &moved, "i1");
    }
    let types = vec![F32.to_string(); o.len()];
    b.if_else(
        &any,
        &types,
        |b| {
            let mut o = o.to_vec();
            for (row, alpha) in alphas.iter().enumerate() {
                for n in 0..d / 8 {
                    for lane in 0..2 {
                        let i = at(row, n, lane);
                        o[i] = b.bin("mulf", &o[i], alpha, F32);
                    }
                }
            }
            o
        },
        |_| o.to_vec(),
    )
}

/// What a tensor-core attention kernel reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionIo {
    /// 16-bit `q`, `k`, `v` and output, `[B, heads, T, D]` (attention artifacts).
    Half,
    /// As a model's plan has them: `q` in f32 (rounded while it is copied to shared
    /// memory), 16-bit `k` and `v` (converted by [`super::tensor_core::pack_half`]), and the output in
    /// f32, `[B, T, heads * D]` when the kernel merges heads, else `[B, heads, T, D]`; with
    /// `lse`, also each row's log-sum-exp of its scores (natural log, `-inf` for a row that
    /// sees no key), `[B, heads, T]`, the last buffer, for the training step's backward.
    Plan { lse: bool },
}

impl AttentionIo {
    fn is_plan(self) -> bool {
        matches!(self, AttentionIo::Plan { .. })
    }
}

/// What the softmax of one key tile gives: per row block and 16 keys the P fragment (four
/// words), per row the factor that rescales what came before, the new maxima and sums.
struct SoftmaxStep {
    /// The probabilities in f32, in the order of the scores (`sf`); `pack_probs` makes
    /// them A fragments.
    probs: Vec<Val>,
    alphas: Vec<Val>,
    maxima: Vec<Val>,
    sums: Vec<Val>,
}

/// The generator's view of one kernel being built.
pub(super) struct Ctx {
    pub(super) isa: Lowering,
    pub(super) tiles: MmaTiles,
    pub(super) tid: Val,
    pub(super) lane: Val,
    pub(super) t: Val,
    pub(super) smem: Val,
}

impl Ctx {
    /// Copies tile `index` of `rows` rows of `src` (`base`: the head's first element) into
    /// shared memory at byte offset `offset`, zero-filling rows past the end: 16-bit values
    /// by `cp.async` (not committed), or with `from_f32`, f32 values rounded to that type on
    /// the way (synchronous: a barrier makes them visible). In padded rows, or with `core`,
    /// in the core matrices `wgmma` reads (8 rows by 16 bytes, 128 contiguous bytes each,
    /// row-major over the tile): a thread's chunk `c` goes to byte `16 c`, from row
    /// `8 (c / (8 per_row)) + c % 8` and chunk `(c / 8) % per_row` of it, so that each eight
    /// threads fill one core matrix and each row is read 64 contiguous bytes at a time.
    #[allow(clippy::too_many_arguments)]
    fn load_rows(
        &self,
        b: &mut Builder,
        src: &Val,
        base: &Val,
        (index, rows): (&Val, usize),
        offset: &Val,
        from_f32: Option<Half>,
        core: bool,
    ) {
        let d = self.tiles.head_dim;
        let tile = ChunkedTile {
            rows,
            per_row: d / 8,
            threads: self.tiles.threads(),
        };
        let crows = b.i64(rows as i64);
        let first_key = b.muli(index, &crows);
        let c1 = b.i64(1);
        let last = b.subi(&self.t, &c1);
        // Every row but those of the tile past the end is inside: there the copy needs no
        // bounds check, and its source is the tile's first row plus an offset each thread
        // computes once (the loop-invariant part, hoisted by LLVM).
        let left = b.subi(&self.t, &first_key);
        // In core matrices (`core_position`), where the threads cover whole groups of 8 rows, the thread's chunks `tid + i threads` are its first moved `i
        // threads / per_row` rows down: in global and in shared memory alike `16 i threads`
        // bytes further, constant offsets of one address each.
        let strided = core
            && from_f32.is_none()
            && tile.threads.is_multiple_of(8 * tile.per_row)
            && (rows * tile.per_row).is_multiple_of(tile.threads);
        let copy_strided = |b: &mut Builder, checked: bool| {
            let tid = &self.tid;
            let (r, cc) = core_position(b, tid, tile.per_row);
            let c8 = b.i64(8);
            let cd = b.i64(d as i64);
            let tile_at = b.muli(&first_key, &cd);
            let tile_at = b.addi(base, &tile_at);
            let at = b.muli(&r, &cd);
            let col_at = b.muli(&cc, &c8);
            let at = b.addi(&at, &col_at);
            let at0 = b.addi(&tile_at, &at);
            let c16 = b.i64(16);
            let bytes = b.muli(tid, &c16);
            let c0 = b.i64(0);
            let to0 = shared_address(b, &self.smem, &c0, &bytes, 0, offset);
            for i in 0..tile.slots() {
                let step = i * tile.threads;
                let down = b.i64((step * 8) as i64);
                let at = b.addi(&at0, &down);
                let from = b.gep(src, &at, "i16");
                let further = const_i32(b, (step * 16) as i64);
                let to = b.bin("addi", &to0, &further, "i32");
                let full = const_i32(b, 16);
                let size = if checked {
                    let rows_down = b.i64((step / tile.per_row) as i64);
                    let row = b.addi(&r, &rows_down);
                    let inside = b.cmpi("slt", &row, &left, I64);
                    let none = const_i32(b, 0);
                    b.select(&inside, &full, &none, "i32")
                } else {
                    full
                };
                self.isa.cp_async(b, &to, &from, &size);
            }
        };
        let copy = |b: &mut Builder, checked: bool| {
            if strided {
                return copy_strided(b, checked);
            }
            for i in 0..tile.slots() {
                tile.for_slot(b, &self.tid, i, |b, row, col| {
                    let (row, col, chunk) = if core {
                        let per_row = b.i64(tile.per_row as i64);
                        let chunk = b.muli(row, &per_row);
                        let chunk = b.addi(&chunk, col);
                        let (r, cc) = core_position(b, &chunk, tile.per_row);
                        (r, cc, Some(chunk))
                    } else {
                        (row.clone(), col.clone(), None)
                    };
                    let (row, col) = (&row, &col);
                    let cd = b.i64(d as i64);
                    let c8 = b.i64(8);
                    let col_at = b.muli(col, &c8);
                    let (at, inside) = match (checked, from_f32) {
                        // Reads f32 values itself: only rows inside.
                        (true, Some(_)) => {
                            let key = b.addi(&first_key, row);
                            let inside = b.cmpi("slt", &key, &self.t, I64);
                            let key = b.mini(&key, &last);
                            let at = b.muli(&key, &cd);
                            let at = b.addi(base, &at);
                            (b.addi(&at, &col_at), Some(inside))
                        }
                        _ => {
                            // A `cp.async` of no bytes reads nothing: rows past the end keep
                            // their address, so that each thread's copies stay a constant
                            // apart.
                            let tile_at = b.muli(&first_key, &cd);
                            let tile_at = b.addi(base, &tile_at);
                            match (core, tile.consecutive()) {
                                // Slot i's row is slot 0's plus i: the thread's offset in
                                // the tile, then i rows.
                                (false, true) => {
                                    let (row0, col0) = tile.position(b, &self.tid, 0);
                                    let at = b.muli(&row0, &cd);
                                    let col0 = b.muli(&col0, &c8);
                                    let at = b.addi(&at, &col0);
                                    let at = b.addi(&tile_at, &at);
                                    let down = b.i64((i * d) as i64);
                                    let inside = checked.then(|| {
                                        let ahead = b.i64(i as i64);
                                        let left = b.subi(&left, &ahead);
                                        b.cmpi("slt", &row0, &left, I64)
                                    });
                                    (b.addi(&at, &down), inside)
                                }
                                _ => {
                                    let at = b.muli(row, &cd);
                                    let at = b.addi(&at, &col_at);
                                    let inside = checked.then(|| b.cmpi("slt", row, &left, I64));
                                    (b.addi(&tile_at, &at), inside)
                                }
                            }
                        }
                    };
                    // Computed after the source, as the PTX snapshots have it.
                    let to = |b: &mut Builder| {
                        let c16 = b.i64(16);
                        match &chunk {
                            Some(chunk) => {
                                let bytes = b.muli(chunk, &c16);
                                let c0 = b.i64(0);
                                shared_address(b, &self.smem, &c0, &bytes, 0, offset)
                            }
                            None => {
                                let col_bytes = b.muli(col, &c16);
                                let row_bytes = self.tiles.row() * 2;
                                shared_address(b, &self.smem, row, &col_bytes, row_bytes, offset)
                            }
                        }
                    };
                    match from_f32 {
                        None => {
                            let from = b.gep(src, &at, "i16");
                            let to = to(b);
                            let full = const_i32(b, 16);
                            let size = match &inside {
                                Some(inside) => {
                                    let none = const_i32(b, 0);
                                    b.select(inside, &full, &none, "i32")
                                }
                                None => full,
                            };
                            self.isa.cp_async(b, &to, &from, &size);
                        }
                        Some(half) => {
                            let zero = b.f32(0.0);
                            let values: Vec<Val> = load8(b, src, &at, true)
                                .iter()
                                .map(|x| match &inside {
                                    Some(inside) => b.select(inside, x, &zero, F32),
                                    None => x.clone(),
                                })
                                .collect();
                            let words = pack8(b, self.isa, half, &values);
                            let to = to(b);
                            self.isa.store_shared(
                                b,
                                &to,
                                [&words[0], &words[1], &words[2], &words[3]],
                            );
                        }
                    }
                });
            }
        };
        let end = b.addi(&first_key, &crows);
        let whole = b.cmpi("sle", &end, &self.t, I64);
        b.if_else(
            &whole,
            &[],
            |b| {
                copy(b, false);
                Vec::new()
            },
            |b| {
                copy(b, true);
                Vec::new()
            },
        );
    }

    /// Copies key tile `kt` into shared memory at `offset` (in core matrices with `core`).
    pub(super) fn load_tile(
        &self,
        b: &mut Builder,
        src: &Val,
        kv_base: &Val,
        kt: &Val,
        offset: &Val,
        core: bool,
    ) {
        self.load_rows(
            b,
            src,
            kv_base,
            (kt, self.tiles.block_k),
            offset,
            None,
            core,
        );
    }

    /// The matrix descriptor of a `wgmma` operand at byte `offset` of shared memory, in core
    /// matrices `lbo` bytes apart along K and `sbo` apart along M or N, without swizzling.
    fn descriptor(&self, b: &mut Builder, offset: usize, lbo: usize, sbo: usize) -> Descriptor {
        let at = b.i64(offset as i64);
        self.descriptor_at(b, &at, lbo, sbo)
    }

    /// The same at a byte offset known at run time (i64).
    fn descriptor_at(&self, b: &mut Builder, offset: &Val, lbo: usize, sbo: usize) -> Descriptor {
        let at = trunc32(b, offset);
        let at = b.bin("addi", &at, &self.smem, "i32");
        let c4 = const_i32(b, 4);
        let at = b.op(format!("arith.shrui {at}, {c4} : i32"));
        let mask = const_i32(b, 0x3fff);
        let at = b.bin("andi", &at, &mask, "i32");
        let lbo = const_i32(b, ((lbo >> 4) << 16) as i64);
        Descriptor {
            lo: b.bin("ori", &at, &lbo, "i32"),
            hi: u32::try_from(sbo >> 4).expect("a stride byte offset of 14 bits"),
        }
    }

    /// The shared-memory address (i32) of element (`row`, `col`) of the tile at `offset`.
    pub(super) fn shared_at(&self, b: &mut Builder, row: &Val, col: &Val, offset: &Val) -> Val {
        let c2 = b.i64(2);
        let col_bytes = b.muli(col, &c2);
        shared_address(b, &self.smem, row, &col_bytes, self.tiles.row() * 2, offset)
    }

    /// The lane's row and column within the 8x8 matrix group of an `ldmatrix`: lanes 8m..8m+8
    /// give the rows of matrix `m`.
    pub(super) fn lane_split(&self, b: &mut Builder) -> (Val, Val) {
        let c8 = b.i64(8);
        (b.remi(&self.lane, &c8), b.divi(&self.lane, &c8))
    }
}

/// The MLIR function of a tensor-core attention kernel: `@name(buffers, dims, query tile,
/// batch row * heads + head, thread, shared memory)`; the PTX entry that calls it is
/// [`entry_ir`]'s.
pub fn attention_mma(
    name: &str,
    kernel: &AttentionKernel,
    half: Half,
    tiles: MmaTiles,
    isa: Lowering,
    io: AttentionIo,
) -> String {
    let mut b = Builder::new();
    let b = &mut b;
    let d = tiles.head_dim;
    let (bq, bk, mb) = (tiles.block_q, tiles.block_k, tiles.row_blocks);
    let wg = tiles.product.is_wgmma();
    // V in core matrices as copied (read N-major), or in padded rows (to transpose, or for
    // ldmatrix).
    let v_core = tiles.product == Product::Wgmma;
    let heads = kernel.heads as i64;
    let group = (kernel.heads / kernel.kv_heads.max(1)).max(1) as i64;
    let bufs = Val("%bufs".into());
    let dims = Val("%dims".into());
    let qt = Val("%qt".into());
    let bh = Val("%bh".into());
    let tid = Val("%tid".into());
    let (c0, c1, c2) = (b.i64(0), b.i64(1), b.i64(2));
    let c8 = b.i64(8);
    let smem = b.op("llvm.ptrtoint %smem : !llvm.ptr<3> to i32");
    let q = b.ptr_at(&bufs, 0);
    let k = b.ptr_at(&bufs, 1);
    let v = b.ptr_at(&bufs, 2);
    let out = b.ptr_at(&bufs, 3);
    let sched_rows = b.ptr_at(&bufs, 4);
    let sched_tiles = b.ptr_at(&bufs, 5);
    let t = b.i64_at(&dims, 1);
    let per_batch = b.i64_at(&dims, 2);
    let ch = b.i64(heads);
    let batch = b.divi(&bh, &ch);
    let h = b.remi(&bh, &ch);
    let cg = b.i64(group);
    let kvh = b.divi(&h, &cg);
    let ckv = b.i64(kernel.kv_heads as i64);
    let c32 = b.i64(32);
    let warp = b.divi(&tid, &c32);
    let lane = b.remi(&tid, &c32);
    let c4 = b.i64(4);
    let g = b.divi(&lane, &c4);
    let c = b.remi(&lane, &c4);
    let two_c = b.muli(&c, &c2);
    let side_rows: Vec<(String, Val)> = kernel
        .sides
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let p = b.ptr_at(&bufs, 6 + i);
            let at = b.muli(&batch, &t);
            (name.clone(), b.gep(&p, &at, I64))
        })
        .collect();
    let cd = b.i64(d as i64);
    let td = b.muli(&t, &cd);
    let q_head = b.muli(&batch, &ch);
    let q_head = b.addi(&q_head, &h);
    let q_base = b.muli(&q_head, &td);
    let kv_head = b.muli(&batch, &ckv);
    let kv_head = b.addi(&kv_head, &kvh);
    let kv_base = b.muli(&kv_head, &td);
    let cbq = b.i64(bq as i64);
    let q0 = b.muli(&qt, &cbq);
    // Warp w owns rows [w * 16 * mb, (w + 1) * 16 * mb) of the tile: row block `m` is rows
    // 16m.. of those; a thread holds rows g and g + 8 of each row block.
    let warp_rows = b.i64((16 * mb) as i64);
    let warp_first = b.muli(&warp, &warp_rows);
    let rows: Vec<[Val; 2]> = (0..mb)
        .map(|m| {
            let off = b.i64((16 * m) as i64);
            let r0 = b.addi(&warp_first, &off);
            let r0 = b.addi(&r0, &g);
            let r0 = b.addi(&q0, &r0);
            let r1 = b.addi(&r0, &c8);
            [r0, r1]
        })
        .collect();
    let ctx = Ctx {
        isa,
        tiles,
        tid: tid.clone(),
        lane: lane.clone(),
        t: t.clone(),
        smem,
    };
    let (k_offset, v_offset) = (tiles.k_offset(), tiles.v_offset());
    let (lrow, lmat) = ctx.lane_split(b);
    // The ldmatrix rows of an A fragment (and of a transposed V fragment): lanes 8m..8m+8
    // give rows (m % 2) * 8.. and columns (m / 2) * 8..
    let half_row = b.remi(&lmat, &c2);
    let half_row = b.muli(&half_row, &c8);
    let frag_row = b.addi(&lrow, &half_row);
    let frag_col = b.divi(&lmat, &c2);
    let frag_col = b.muli(&frag_col, &c8);

    // This query tile's row of the schedule.
    let n_qt = b.ceil_div(&t, &cbq);
    let row_offsets = ScheduleRows {
        kernel,
        rows: &sched_rows,
        batch: &batch,
        per_batch: &per_batch,
        tiles: &n_qt,
        head: (&h, &ch),
    };
    let (start, end) = schedule_range(b, &row_offsets, &qt, &c1);
    let any = b.cmpi("slt", &start, &end, I64);
    // The Q tile and the first K tile (and V tile, with two stages), one copy group.
    let stages = tiles.stages;
    let stage0_k = b.i64(k_offset as i64);
    let stage0_v = b.i64(v_offset as i64);
    let zero = b.f32(0.0);
    // The K tile at byte `k_at` times this warpgroup's 64 rows of the Q tile, started on the
    // warpgroup and committed (not waited for).
    let issue_scores = |b: &mut Builder, k_at: &Val| -> Vec<Val> {
        isa.wgmma_fence(b);
        let mut acc = vec![zero.clone(); bk / 2];
        let sbo = d / 8 * 128;
        let c4 = b.i64(4);
        let group = b.divi(&warp, &c4);
        let rows_bytes = b.i64((64 * d * 2) as i64);
        let q_at = b.muli(&group, &rows_bytes);
        let (q0, k0) = (
            ctx.descriptor_at(b, &q_at, 128, sbo),
            ctx.descriptor_at(b, k_at, 128, sbo),
        );
        for step in 0..d / 16 {
            let qd = q0.plus(b, step * 256);
            let kd = k0.plus(b, step * 256);
            acc = isa.wgmma(b, half, WgmmaA::Shared(&qd), &kd, true, &acc);
        }
        isa.wgmma_commit(b);
        acc
    };
    let tile_at = |b: &mut Builder, index: &Val| -> Val {
        let entry = b.load(&sched_tiles, index, I64, I64);
        b.op(format!("arith.shrsi {entry}, {c1} : i64"))
    };
    // Entry `index` of the schedule: its key tile, the tile's first key, and whether the
    // tile needs its mask (a partial tile, or past the end of the sequence).
    let tile_info = |b: &mut Builder, index: &Val| -> (Val, Val, Val) {
        let entry = b.load(&sched_tiles, index, I64, I64);
        let kt = b.op(format!("arith.shrsi {entry}, {c1} : i64"));
        let partial = b.bin("andi", &entry, &c1, I64);
        let partial = b.cmpi("ne", &partial, &c0, I64);
        let cbk = b.i64(bk as i64);
        let k0 = b.muli(&kt, &cbk);
        let k_end = b.addi(&k0, &cbk);
        let tail = b.cmpi("sgt", &k_end, &t, I64);
        let needs_mask = b.bin("ori", &partial, &tail, "i1");
        (kt, k0, needs_mask)
    };
    // Buffer `n` (an i64 value) of the tiles at byte `base`.
    let buffer_at = |b: &mut Builder, base: &Val, n: &Val| -> Val {
        let size = b.i64((bk * d * 2) as i64);
        let shift = b.muli(n, &size);
        b.addi(base, &shift)
    };
    // The Q tile and the first K tile (and V tile, with two stages), one copy group (the
    // pipelined `wgmma` loop makes its own).
    if !v_core {
        b.if_then(&any, |b| {
            let from_f32 = io.is_plan().then_some(half);
            ctx.load_rows(b, &q, &q_base, (&qt, bq), &c0, from_f32, wg);
            let kt = tile_at(b, &start);
            ctx.load_tile(b, &k, &kv_base, &kt, &stage0_k, wg);
            if stages == 2 {
                ctx.load_tile(b, &v, &kv_base, &kt, &stage0_v, false);
            }
            isa.commit(b);
        });
    }

    let neg_inf = b.op(format!(
        "arith.constant {} : f32",
        f32_literal(f32::NEG_INFINITY)
    ));
    // Carried: per row block the output accumulators (d / 8 tiles of 4), then per row
    // (2 per row block) the running maximum, then per row the running sum.
    let n_o = d / 8 * 4;
    let n_rows = 2 * mb;
    let mut carried: Vec<(Val, String)> = (0..mb * n_o)
        .map(|_| (zero.clone(), F32.to_string()))
        .collect();
    carried.extend((0..n_rows).map(|_| (neg_inf.clone(), F32.to_string())));
    carried.extend((0..n_rows).map(|_| (zero.clone(), F32.to_string())));
    let log2e = std::f64::consts::LOG2_E;
    let narrow = vexpr::fits_in_32_bits(&kernel.mask, heads)
        && kernel
            .score
            .as_ref()
            .is_none_or(|s| vexpr::fits_in_32_bits(s, heads));
    // Index of element `lane` of row `r` (0: row g, 1: row g + 8) of score tile `n` of row
    // block `m` in the flat list of a thread's scores.
    let sf = |m: usize, n: usize, r: usize, lane: usize| ((m * (bk / 8) + n) * 2 + r) * 2 + lane;
    // The softmax of one key tile (its first key `k0`, masked where `needs_mask`): from
    // its scores `s[m][n]` and the running maxima and sums (`state`), the P fragments, the
    // factors that rescale what came before (per row), and the new maxima and sums.
    let softmax_step = |b: &mut Builder,
                        k0: &Val,
                        needs_mask: &Val,
                        s: &[Vec<Vec<Val>>],
                        state: &[Val]|
     -> SoftmaxStep {
        // Scale and modify (base 2 for the softmax), and mask where the tile needs it.
        let plain_scale = b.f32((kernel.scale * log2e) as f32);
        // Without a score modifier the scale is applied where the exponent is formed, `x *
        // scale - max` in one fma (the maximum of the raw scores, scaled, is the maximum of
        // the scaled ones for a positive scale).
        let deferred_scale = kernel.score.is_none() && kernel.scale > 0.0;
        let scale = b.f32(kernel.scale as f32);
        let log2e_c = b.f32(log2e as f32);
        // The mask's and score's view of the two columns a thread holds of score tile `n`,
        // in row `qpos`.
        let env_at = |b: &mut Builder, qpos: &Val, n: usize, score: Option<Val>| {
            let kpos = b.i64((n * 8) as i64);
            let kpos = b.addi(k0, &kpos);
            let kpos = b.addi(&kpos, &two_c);
            VecEnv {
                n: 2,
                q: qpos.clone(),
                k0: kpos,
                h: h.clone(),
                b: batch.clone(),
                score,
                sides: &side_rows,
                narrow,
                keys: None,
            }
        };
        let mut flat: Vec<Val> = Vec::new();
        for (m, tiles_m) in s.iter().enumerate() {
            for (n, acc) in tiles_m.iter().enumerate() {
                for (r, qpos) in rows[m].iter().enumerate() {
                    let (x0, x1) = (&acc[2 * r], &acc[2 * r + 1]);
                    match &kernel.score {
                        None => {
                            if deferred_scale {
                                flat.push(x0.clone());
                                flat.push(x1.clone());
                            } else {
                                flat.push(b.bin("mulf", x0, &plain_scale, F32));
                                flat.push(b.bin("mulf", x1, &plain_scale, F32));
                            }
                        }
                        Some(expr) => {
                            let y0 = b.bin("mulf", x0, &scale, F32);
                            let y1 = b.bin("mulf", x1, &scale, F32);
                            let pair =
                                b.op(format!("vector.from_elements {y0}, {y1} : vector<2xf32>"));
                            let env = env_at(b, qpos, n, Some(pair));
                            let modified = vexpr::score(b, expr, &env);
                            for lane in 0..2 {
                                let x = b.op(format!(
                                    "vector.extract {modified}[{lane}] : f32 from vector<2xf32>"
                                ));
                                flat.push(b.bin("mulf", &x, &log2e_c, F32));
                            }
                        }
                    }
                }
            }
        }
        let types = vec![F32.to_string(); flat.len()];
        // Rows past the end are never stored; in the others a mask that sees no later key
        // sees no key past the end either.
        let causal = kernel.mask.sees_no_later_key();
        let masked = b.if_else(
            needs_mask,
            &types,
            |b| {
                let mut outv = Vec::new();
                for rows_m in &rows {
                    for n in 0..bk / 8 {
                        for qpos in rows_m {
                            let env = env_at(b, qpos, n, None);
                            let mut seen = vexpr::mask(b, &kernel.mask, &env);
                            if !causal {
                                let below = env.keys_below(b, &t);
                                seen = b.bin("andi", &seen, &below, "vector<2xi1>");
                            }
                            for lane in 0..2 {
                                let ok = b.op(format!(
                                    "vector.extract {seen}[{lane}] : i1 from vector<2xi1>"
                                ));
                                outv.push(b.select(&ok, &flat[outv.len()], &neg_inf, F32));
                            }
                        }
                    }
                }
                outv
            },
            |_| flat.clone(),
        );

        // Online softmax, per row: the row's maximum over this tile (across the four
        // threads that hold it), the rescaling of what came before, the probabilities.
        let mut p = masked.clone();
        let mut maxima = Vec::new();
        let mut sums = Vec::new();
        let mut alphas = Vec::new();
        for m in 0..mb {
            for r in 0..2 {
                let row_index = 2 * m + r;
                let (m_old, l_old) = (&state[row_index], &state[n_rows + row_index]);
                let mut mx = neg_inf.clone();
                for n in 0..bk / 8 {
                    for lane in 0..2 {
                        let x = &masked[sf(m, n, r, lane)];
                        mx = b.op(format!("llvm.intr.maxnum({mx}, {x}) : (f32, f32) -> f32"));
                    }
                }
                for bit in [1, 2] {
                    let other = isa.shuffle_xor(b, &mx, bit);
                    mx = b.op(format!(
                        "llvm.intr.maxnum({mx}, {other}) : (f32, f32) -> f32"
                    ));
                }
                if deferred_scale {
                    mx = b.bin("mulf", &mx, &plain_scale, F32);
                }
                // The running maximum moves only when this tile's is more than
                // `LAZY_RESCALE` above it (from -inf, always), so that O is rarely rescaled:
                // probabilities then stay below 2^LAZY_RESCALE, and the row's sum and O
                // agree on the maximum they were taken with.
                let grown = b.op(format!(
                    "llvm.intr.maxnum({m_old}, {mx}) : (f32, f32) -> f32"
                ));
                let gap = b.bin("subf", &grown, m_old, F32);
                let lazy = b.f32(LAZY_RESCALE);
                let far = b.cmpf("ogt", &gap, &lazy, F32);
                let m_new = b.select(&far, &grown, m_old, F32);
                let empty = b.cmpf("oeq", &m_new, &neg_inf, F32);
                let m_safe = b.select(&empty, &zero, &m_new, F32);
                let neg_m = b.op(format!("arith.negf {m_safe} : f32"));
                let diff = b.bin("subf", m_old, &m_safe, F32);
                let alpha = isa.exp2(b, &diff);
                // Exactly 1 where the maximum stayed: `rescale` skips those rows.
                let one = b.f32(1.0);
                let alpha = b.select(&far, &alpha, &one, F32);
                let mut sum = b.bin("mulf", l_old, &alpha, F32);
                for n in 0..bk / 8 {
                    for lane in 0..2 {
                        let at = sf(m, n, r, lane);
                        let x = if deferred_scale {
                            b.fma(&masked[at], &plain_scale, &neg_m, F32)
                        } else {
                            b.bin("subf", &masked[at], &m_safe, F32)
                        };
                        let e = isa.exp2(b, &x);
                        sum = b.bin("addf", &sum, &e, F32);
                        p[at] = e;
                    }
                }
                alphas.push(alpha);
                maxima.push(m_new);
                sums.push(sum);
            }
        }

        SoftmaxStep {
            probs: p,
            alphas,
            maxima,
            sums,
        }
    };
    // P as A fragments: per row block, keys 16j.. of rows g and g + 8.
    let pack_probs = |b: &mut Builder, p: &[Val]| -> Vec<Vec<Vec<Val>>> {
        (0..mb)
            .map(|m| {
                (0..bk / 16)
                    .map(|j| {
                        [(2 * j, 0), (2 * j, 1), (2 * j + 1, 0), (2 * j + 1, 1)]
                            .into_iter()
                            .map(|(n, r)| isa.pack(b, half, &p[sf(m, n, r, 0)], &p[sf(m, n, r, 1)]))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    };
    let finals = if v_core {
        // The pipelined `wgmma` loop (V read in place). K and V tiles alternate between two
        // buffers each (tile `j` of the row, counted from its first, in buffers `j % 2`).
        // The step for tile `i` waits for the copies of K tile `i + 1` and V tile `i`,
        // starts the scores of tile `i + 1`, rescales O and starts `O += P V` of tile `i`,
        // copies K tile `i + 2` and V tile `i + 1` into the buffers their predecessors left
        // (whose readers every thread waited for before the barrier) while they run, waits
        // for the scores and runs their softmax while the product runs, then waits for the
        // product.
        // Nothing is in flight from one step to the next (ptxas would serialize every
        // product if an accumulator in flight were copied). The first tile's scores and
        // softmax come before the loop, the last tile's product after it.
        let publish = |b: &mut Builder| {
            isa.fence_proxy_async(b);
            isa.barrier(b);
        };
        let issue_pv = |b: &mut Builder, p: &[Val], v_at: &Val, o: &[Val]| -> Vec<Val> {
            // V read N-major: core matrices of 8 keys by 8 head dims, 128 bytes apart along
            // the head dims and `D / 8` core matrices apart along the keys.
            isa.wgmma_fence(b);
            let along_keys = d / 8 * 128;
            let mut o = o.to_vec();
            let v0 = ctx.descriptor_at(b, v_at, along_keys, 128);
            for (j, a) in p.chunks(4).enumerate() {
                let vd = v0.plus(b, 2 * j * along_keys);
                o = isa.wgmma(b, half, WgmmaA::Registers(a), &vd, false, &o);
            }
            isa.wgmma_commit(b);
            o
        };
        let rescale = |b: &mut Builder, o: &[Val], alphas: &[Val]| -> Vec<Val> {
            rescale_rows(b, o, alphas, |r, n, lane| n * 4 + 2 * r + lane, d)
        };
        let scores = |acc: &[Val]| -> Vec<Vec<Vec<Val>>> {
            vec![acc.chunks(4).map(<[Val]>::to_vec).collect()]
        };
        // A step's loop-carried values: P's words (its probabilities packed), then per row
        // the factor that rescales O, the maximum, the sum.
        let step_values = |b: &mut Builder, step: SoftmaxStep| -> Vec<Val> {
            let mut out: Vec<Val> = pack_probs(b, &step.probs)[0]
                .iter()
                .flatten()
                .cloned()
                .collect();
            out.extend(step.alphas);
            out.extend(step.maxima);
            out.extend(step.sums);
            out
        };
        let words = bk / 4;
        // P's words, then per row the factor that rescales O before P V, the maximum, the
        // sum.
        let mut types: Vec<String> = vec!["i32".into(); words];
        types.extend(vec![F32.to_string(); 3 * n_rows]);
        let first = b.if_else(
            &any,
            &types,
            |b| {
                // Q and the first K tile; then the second K tile and the first V tile.
                let from_f32 = io.is_plan().then_some(half);
                ctx.load_rows(b, &q, &q_base, (&qt, bq), &c0, from_f32, true);
                let kt = tile_at(b, &start);
                ctx.load_tile(b, &k, &kv_base, &kt, &stage0_k, true);
                isa.commit(b);
                let second = b.addi(&start, &c1);
                let two = b.cmpi("slt", &second, &end, I64);
                b.if_then(&two, |b| {
                    let kt = tile_at(b, &second);
                    let at = buffer_at(b, &stage0_k, &c1);
                    ctx.load_tile(b, &k, &kv_base, &kt, &at, true);
                });
                ctx.load_tile(b, &v, &kv_base, &kt, &stage0_v, true);
                isa.commit(b);
                isa.wait_copies_but(b, 1);
                publish(b);
                let acc = issue_scores(b, &stage0_k);
                let acc = isa.wgmma_wait(b, 0, &acc);
                let (_, k0, needs_mask) = tile_info(b, &start);
                let mut state = vec![neg_inf.clone(); n_rows];
                state.extend(vec![zero.clone(); n_rows]);
                let step = softmax_step(b, &k0, &needs_mask, &scores(&acc), &state);
                step_values(b, step)
            },
            |b| {
                let none = b.op("arith.constant 0 : i32");
                let mut out = vec![none; words];
                out.extend(vec![zero.clone(); n_rows]);
                out.extend(vec![neg_inf.clone(); n_rows]);
                out.extend(vec![zero.clone(); n_rows]);
                out
            },
        );
        let mut carried: Vec<(Val, String)> =
            (0..n_o).map(|_| (zero.clone(), F32.to_string())).collect();
        carried.extend(first.iter().cloned().zip(types.iter().cloned()));
        let last = b.subi(&end, &c1);
        let looped = b.for_range(&start, &last, &c1, &carried, |b, i, acc| {
            let (o, rest) = acc.split_at(n_o);
            let (p, rest) = rest.split_at(words);
            let (alphas, state) = rest.split_at(n_rows);
            // The schedule's entries for the next two tiles, read first, so that their
            // loads are done by the time the copies and the mask need them.
            let next = b.addi(i, &c1);
            let (kt, k0, needs_mask) = tile_info(b, &next);
            let after = b.addi(i, &c2);
            let later = b.cmpi("slt", &after, &end, I64);
            let after_or_next = b.select(&later, &after, &next, I64);
            let kt_after = tile_at(b, &after_or_next);
            isa.wait_copies(b);
            publish(b);
            let index = b.subi(i, &start);
            let this = b.remi(&index, &c2);
            let other = b.subi(&c1, &this);
            let k_at = buffer_at(b, &stage0_k, &other);
            let acc = issue_scores(b, &k_at);
            let o = rescale(b, o, alphas);
            let v_at = buffer_at(b, &stage0_v, &this);
            let o = issue_pv(b, p, &v_at, &o);
            // The copies, into buffers no product in flight reads, issued while the
            // products run.
            b.if_then(&later, |b| {
                let at = buffer_at(b, &stage0_k, &this);
                ctx.load_tile(b, &k, &kv_base, &kt_after, &at, true);
            });
            let at = buffer_at(b, &stage0_v, &other);
            ctx.load_tile(b, &v, &kv_base, &kt, &at, true);
            isa.commit(b);
            let acc = isa.wgmma_wait(b, 1, &acc);
            let mut step = softmax_step(b, &k0, &needs_mask, &scores(&acc), state);
            // The product's accumulators and its A registers kept until it is done, and the
            // probabilities packed into P's words only after it (packed before, they would
            // take the registers the product reads, and ptxas would wait for the product
            // before the softmax); the wait pinned after the softmax, which so runs beside
            // the product.
            let mut kept = o.to_vec();
            kept.extend(step.probs.iter().cloned());
            let (mut out, _) = isa.wgmma_wait_pinned(b, 0, &kept, p, i);
            step.probs = out.split_off(n_o);
            out.extend(step_values(b, step));
            out
        });
        let (o, rest) = looped.split_at(n_o);
        let (p, rest) = rest.split_at(words);
        let (alphas, state) = rest.split_at(n_rows);
        let mut out = b.if_else(
            &any,
            &vec![F32.to_string(); n_o],
            |b| {
                isa.wait_copies(b);
                publish(b);
                let index = b.subi(&last, &start);
                let this = b.remi(&index, &c2);
                let o = rescale(b, o, alphas);
                let v_at = buffer_at(b, &stage0_v, &this);
                let o = issue_pv(b, p, &v_at, &o);
                isa.wgmma_wait_keeping(b, 0, &o, p).0
            },
            |_| o.to_vec(),
        );
        out.extend(state.iter().cloned());
        out
    } else {
        b.for_range(&start, &end, &c1, &carried, |b, i, acc| {
            let (o_in, state) = acc.split_at(mb * n_o);
            let (kt, k0, needs_mask) = tile_info(b, i);
            isa.wait_copies(b);
            if wg {
                isa.fence_proxy_async(b);
            }
            isa.barrier(b);
            let following = b.addi(i, &c1);
            let more = b.cmpi("slt", &following, &end, I64);
            // This tile's stage, and the copies of the next.
            let (k_at, v_at) = if stages == 2 {
                let index = b.subi(i, &start);
                let stage = b.remi(&index, &c2);
                let stride = b.i64((2 * tiles.kv_tile_bytes()) as i64);
                let shift = b.muli(&stage, &stride);
                let k_at = b.addi(&stage0_k, &shift);
                let v_at = b.addi(&stage0_v, &shift);
                let other = b.subi(&stride, &shift);
                b.if_then(&more, |b| {
                    let kt = tile_at(b, &following);
                    let next_k = b.addi(&stage0_k, &other);
                    let next_v = b.addi(&stage0_v, &other);
                    ctx.load_tile(b, &k, &kv_base, &kt, &next_k, false);
                    ctx.load_tile(b, &v, &kv_base, &kt, &next_v, false);
                    isa.commit(b);
                });
                (k_at, v_at)
            } else {
                ctx.load_tile(b, &v, &kv_base, &kt, &stage0_v, false);
                isa.commit(b);
                (stage0_k.clone(), stage0_v.clone())
            };

            let mut o: Vec<Val> = o_in.to_vec();
            let s = if wg {
                // S = Q K^T on the warpgroup, 16 columns of Q at a time; its wait also finishes
                // the previous tile's `O += P V`, so that O may be rescaled.
                let mut acc = issue_scores(b, &k_at);
                acc.extend(o.iter().cloned());
                let done = isa.wgmma_wait(b, 0, &acc);
                o = done[bk / 2..].to_vec();
                vec![done[..bk / 2].chunks(4).map(<[Val]>::to_vec).collect()]
            } else {
                sync_scores(
                    b,
                    &ctx,
                    half,
                    (&warp_first, &frag_row, &frag_col),
                    (&lrow, &lmat),
                    &c0,
                    (&k_at, bk),
                )
            };

            let step = softmax_step(b, &k0, &needs_mask, &s, state);
            let o_at = |row_index: usize, n: usize, lane: usize| {
                let (m, r) = (row_index / 2, row_index % 2);
                m * n_o + n * 4 + 2 * r + lane
            };
            let mut o = rescale_rows(b, &o, &step.alphas, o_at, d);
            let p_frags = pack_probs(b, &step.probs);
            let (maxima, sums) = (step.maxima, step.sums);

            if stages == 1 {
                isa.wait_copies(b);
                isa.barrier(b);
                b.if_then(&more, |b| {
                    let kt = tile_at(b, &following);
                    ctx.load_tile(b, &k, &kv_base, &kt, &stage0_k, wg);
                    isa.commit(b);
                });
            }

            if wg {
                // V transposed into core matrices of 8 head dims by 8 keys (K-major), then O +=
                // P V on the warpgroup, P from registers; waited for with the next tile's scores
                // (or after the loop).
                transpose_v(b, &ctx, (&warp, &lrow, &lmat, &g, &two_c), &v_at);
                isa.fence_proxy_async(b);
                isa.barrier(b);
                isa.wgmma_fence(b);
                let v0 = ctx.descriptor(b, tiles.vt_offset(), 128, bk / 8 * 128);
                for (j, a) in p_frags[0].iter().enumerate() {
                    let vd = v0.plus(b, j * 256);
                    o = isa.wgmma(b, half, WgmmaA::Registers(a), &vd, true, &o);
                }
                isa.wgmma_commit(b);
                o.extend(maxima);
                o.extend(sums);
                return o;
            }

            // O += P V: V fragments by ldmatrix.trans, two 8-column output tiles at a time,
            // each for every row block.
            for j in 0..bk / 16 {
                let key = b.i64((j * 16) as i64);
                let key = b.addi(&key, &frag_row);
                for np in 0..d / 16 {
                    let col = b.i64((np * 16) as i64);
                    let col = b.addi(&col, &frag_col);
                    let at = ctx.shared_at(b, &key, &col, &v_at);
                    let r = isa.ldmatrix(b, &at, 4, true);
                    for (m, a) in p_frags.iter().enumerate() {
                        for (half_tile, bf) in
                            [[&r[0], &r[1]], [&r[2], &r[3]]].into_iter().enumerate()
                        {
                            let at = m * n_o + (2 * np + half_tile) * 4;
                            let acc = isa.mma(b, half, &a[j], bf, &o[at..at + 4]);
                            o.splice(at..at + 4, acc);
                        }
                    }
                }
            }
            o.extend(maxima);
            o.extend(sums);
            o
        })
    };

    // The row sums across the four threads of a row, then O / l (zeros for a row that saw
    // no key), stored as 16-bit pairs.
    let (o, state) = finals.split_at(mb * n_o);
    let waited;
    // (The pipelined loop waited for its last product already.)
    let o = if wg && !v_core {
        waited = isa.wgmma_wait(b, 0, o);
        &waited[..]
    } else {
        o
    };
    let one = b.f32(1.0);
    for (m, rows_m) in rows.iter().enumerate() {
        for (r, row) in rows_m.iter().enumerate() {
            let mut l = state[n_rows + 2 * m + r].clone();
            for bit in [1, 2] {
                let other = isa.shuffle_xor(b, &l, bit);
                l = b.bin("addf", &l, &other, F32);
            }
            let seen = b.cmpf("ogt", &l, &zero, F32);
            let inv = b.bin("divf", &one, &l, F32);
            let inverse = b.select(&seen, &inv, &zero, F32);
            let inside = b.cmpi("slt", row, &t, I64);
            if io == (AttentionIo::Plan { lse: true }) {
                // The row's log-sum-exp: the maximum and the sum are in base 2.
                let m_row = &state[2 * m + r];
                let log_l = isa.log2(b, &l);
                let lse2 = b.bin("addf", m_row, &log_l, F32);
                let ln2 = b.f32(std::f32::consts::LN_2);
                let lse = b.bin("mulf", &lse2, &ln2, F32);
                let lse = b.select(&seen, &lse, &neg_inf, F32);
                let first = b.cmpi("eq", &c, &c0, I64);
                let writes = b.bin("andi", &inside, &first, "i1");
                b.if_then(&writes, |b| {
                    let p = b.ptr_at(&bufs, 6 + kernel.sides.len());
                    let at = b.muli(&q_head, &t);
                    let at = b.addi(&at, row);
                    b.store(&lse, &p, &at, F32, F32);
                });
            }
            b.if_then(&inside, |b| {
                let at = if io.is_plan() && kernel.merge_heads {
                    // [B, T, heads * D]
                    let at = b.muli(&batch, &t);
                    let at = b.addi(&at, row);
                    let at = b.muli(&at, &ch);
                    let at = b.addi(&at, &h);
                    b.muli(&at, &cd)
                } else {
                    let at = b.muli(row, &cd);
                    b.addi(&q_base, &at)
                };
                let at = b.addi(&at, &two_c);
                for n in 0..d / 8 {
                    let x0 = b.bin("mulf", &o[m * n_o + n * 4 + 2 * r], &inverse, F32);
                    let x1 = b.bin("mulf", &o[m * n_o + n * 4 + 2 * r + 1], &inverse, F32);
                    let off = b.i64((n * 8) as i64);
                    let at = b.addi(&at, &off);
                    match io {
                        AttentionIo::Half => {
                            let packed = isa.pack(b, half, &x0, &x1);
                            b.store(&packed, &out, &at, "i16", "i32");
                        }
                        AttentionIo::Plan { .. } => {
                            b.store(&x0, &out, &at, F32, F32);
                            let c1 = b.i64(1);
                            let next = b.addi(&at, &c1);
                            b.store(&x1, &out, &next, F32, F32);
                        }
                    }
                }
            });
        }
    }
    finish(b, name)
}

/// `S = Q K^T` of one key tile on `mma.sync`, 16 columns of Q at a time (two at once where
/// the head dim allows): the A fragments of every row block, then per 8 keys one K fragment
/// for all of them. Q is the tile at byte `q_at` (this warp's rows from `warp_first`), K the
/// `keys` rows at byte `k_at`, both in padded rows. Returns the scores of key tile `n` of row
/// block `m` as `s[m][n]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn sync_scores(
    b: &mut Builder,
    ctx: &Ctx,
    half: Half,
    (warp_first, frag_row, frag_col): (&Val, &Val, &Val),
    (lrow, lmat): (&Val, &Val),
    q_at: &Val,
    (k_at, keys): (&Val, usize),
) -> Vec<Vec<Vec<Val>>> {
    let (d, bk, mb) = (ctx.tiles.head_dim, keys, ctx.tiles.row_blocks);
    let isa = ctx.isa;
    let zero = b.f32(0.0);
    let (c2, c8) = (b.i64(2), b.i64(8));
    let mut s: Vec<Vec<Vec<Val>>> = vec![vec![vec![zero.clone(); 4]; bk / 8]; mb];
    let mut kk = 0;
    while kk < d / 16 {
        let pair = kk + 1 < d / 16;
        let steps = if pair { 2 } else { 1 };
        let a: Vec<Vec<Vec<Val>>> = (0..mb)
            .map(|m| {
                (kk..kk + steps)
                    .map(|step| {
                        let r = b.i64((m * 16) as i64);
                        let r = b.addi(warp_first, &r);
                        let r = b.addi(&r, frag_row);
                        let col = b.i64((step * 16) as i64);
                        let col = b.addi(&col, frag_col);
                        let at = ctx.shared_at(b, &r, &col, q_at);
                        isa.ldmatrix(b, &at, 4, false)
                    })
                    .collect()
            })
            .collect();
        // The scores of key tile `n` of every row block: `s[m][n]`.
        #[allow(clippy::needless_range_loop)]
        for n in 0..bk / 8 {
            let key = b.i64((n * 8) as i64);
            let key = b.addi(&key, lrow);
            let kf: Vec<Val> = if pair {
                let col = b.muli(lmat, &c8);
                let off = b.i64((kk * 16) as i64);
                let col = b.addi(&col, &off);
                let at = ctx.shared_at(b, &key, &col, k_at);
                isa.ldmatrix(b, &at, 4, false)
            } else {
                let m2 = b.remi(lmat, &c2);
                let col = b.muli(&m2, &c8);
                let off = b.i64((kk * 16) as i64);
                let col = b.addi(&col, &off);
                let at = ctx.shared_at(b, &key, &col, k_at);
                isa.ldmatrix(b, &at, 2, false)
            };
            for m in 0..mb {
                for step in 0..steps {
                    let bf = [&kf[2 * step], &kf[2 * step + 1]];
                    s[m][n] = isa.mma(b, half, &a[m][step], bf, &s[m][n]);
                }
            }
        }
        kk += steps;
    }
    s
}

/// Copies the V tile at byte `v_at` (padded rows of keys) transposed into the core
/// matrices of the `wgmma` kernel's V tile (rows of head dims, keys along K): 8 x 8 blocks
/// four at a time by `ldmatrix.trans`, the warps taking every fourth group of four; each
/// lane then holds two keys of one head dim per block and stores them as one word.
fn transpose_v(
    b: &mut Builder,
    ctx: &Ctx,
    (warp, lrow, lmat, g, two_c): (&Val, &Val, &Val, &Val, &Val),
    v_at: &Val,
) {
    let (d, bk) = (ctx.tiles.head_dim, ctx.tiles.block_k);
    let isa = ctx.isa;
    let quads = bk / 8 * (d / 8) / 4;
    let (c4, c8) = (b.i64(4), b.i64(8));
    let per_dim = b.i64((d / 8) as i64);
    let warps = ctx.tiles.warps;
    for i in 0..quads.div_ceil(warps) {
        let emit = |b: &mut Builder| {
            let off = b.i64((i * warps) as i64);
            let quad = b.addi(warp, &off);
            let first = b.muli(&quad, &c4);
            let block = b.addi(&first, lmat);
            let kb = b.divi(&block, &per_dim);
            let db = b.remi(&block, &per_dim);
            let key = b.muli(&kb, &c8);
            let key = b.addi(&key, lrow);
            let col = b.muli(&db, &c8);
            let at = ctx.shared_at(b, &key, &col, v_at);
            let words = isa.ldmatrix(b, &at, 4, true);
            for (m, word) in words.iter().enumerate() {
                let cm = b.i64(m as i64);
                let block = b.addi(&first, &cm);
                let kb = b.divi(&block, &per_dim);
                let db = b.remi(&block, &per_dim);
                let cpr = b.i64((bk / 8) as i64);
                let core = b.muli(&db, &cpr);
                let core = b.addi(&core, &kb);
                let c128 = b.i64(128);
                let at = b.muli(&core, &c128);
                let c16 = b.i64(16);
                let row = b.muli(g, &c16);
                let at = b.addi(&at, &row);
                let c2 = b.i64(2);
                let col = b.muli(two_c, &c2);
                let at = b.addi(&at, &col);
                let base = b.i64(ctx.tiles.vt_offset() as i64);
                let c0 = b.i64(0);
                let to = shared_address(b, &ctx.smem, &c0, &at, 0, &base);
                isa.store_shared32(b, &to, word);
            }
        };
        if (i + 1) * warps <= quads {
            emit(b);
        } else {
            let limit = b.i64((quads - i * warps) as i64);
            let take = b.cmpi("slt", warp, &limit, I64);
            b.if_then(&take, emit);
        }
    }
}

fn finish(b: &mut Builder, name: &str) -> String {
    block_function(std::mem::take(b), name, "qt", "bh")
}

/// The PTX entry of a tensor-core attention kernel, in LLVM IR: `{name}_mma(buffers, dims)`,
/// launched on a grid of (query tiles, batch rows * heads) blocks of
/// [`MmaTiles::threads`] threads with [`MmaTiles::shared_bytes`] of dynamic shared memory.
/// Block `x` takes query tile `tiles - 1 - x`: under a causal mask the longest rows start
/// first and the short ones fill the end of the launch.
pub fn entry_ir(name: &str, tiles: &MmaTiles) -> String {
    super::block::entry_ir(name, true, tiles.threads())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_every_head_dim_and_target() {
        for sm in [80, 90] {
            for d in (16..=MAX_HEAD_DIM).step_by(16) {
                let tiles = MmaTiles::for_head_dim(d, sm).unwrap();
                assert!(
                    tiles.shared_bytes() <= MmaTiles::shared_limit(sm),
                    "{tiles:?}"
                );
                assert!(tiles.live_registers() < 255, "{tiles:?}");
                assert_eq!(tiles.block_q, tiles.warps * 16 * tiles.row_blocks);
                // Every thread copies whole 16-byte chunks.
                assert!((tiles.block_k * d / 8).is_multiple_of(8), "{tiles:?}");
            }
            assert_eq!(MmaTiles::for_head_dim(128, sm).unwrap().block_q, 128);
            assert_eq!(MmaTiles::for_head_dim(256, sm).unwrap().block_q, 64);
        }
        for bad in [0, 8, 24, 72 + 1, 272] {
            assert_eq!(MmaTiles::for_head_dim(bad, 90), None, "{bad}");
        }
        assert_eq!(MmaTiles::for_head_dim(64, 75), None);
    }

    #[test]
    fn settings_override_only_what_they_name() {
        let tiles = MmaTiles::for_head_dim(128, 90).unwrap();
        let same = tiles.with(&MmaSettings::default());
        assert_eq!(same, tiles);
        let other = tiles.with(&MmaSettings {
            stages: Some(2),
            block_k: Some(32),
            ..MmaSettings::default()
        });
        assert_eq!((other.stages, other.block_k, other.block_q), (2, 32, 128));
        assert!(other.shared_bytes() > tiles.shared_bytes() - tiles.kv_tile_bytes());
        // Out-of-range settings leave the target's choice.
        let kept = tiles.with(&MmaSettings {
            stages: None,
            block_k: Some(24),
            block_q: Some(96),
            product: None,
        });
        assert_eq!((kept.block_k, kept.block_q), (64, 128));
        let narrow = tiles.with(&MmaSettings {
            block_q: Some(64),
            ..MmaSettings::default()
        });
        assert_eq!((narrow.block_q, narrow.row_blocks), (64, 1));
        // wgmma: two warpgroups of 64 rows (or one with 64 queries a tile), one stage,
        // whatever else is asked.
        let wgmma = tiles.with(&MmaSettings {
            stages: Some(2),
            block_q: None,
            block_k: Some(128),
            product: Some(Product::Wgmma),
        });
        assert_eq!(
            (wgmma.block_q, wgmma.row_blocks, wgmma.stages, wgmma.block_k),
            (128, 1, 1, 128)
        );
        assert_eq!(wgmma.threads(), 256);
        let one_group = tiles.with(&MmaSettings {
            block_q: Some(64),
            product: Some(Product::WgmmaTransposedV),
            ..MmaSettings::default()
        });
        assert_eq!((one_group.block_q, one_group.threads()), (64, 128));
        let wide = MmaTiles::for_head_dim(256, 90).unwrap().with(&MmaSettings {
            block_k: Some(128),
            product: Some(Product::Wgmma),
            ..MmaSettings::default()
        });
        assert_eq!(wide.block_k, 32);
        // What a user asks for and a kernel cannot take is refused, naming the limit.
        let asked = |settings: MmaSettings, d: usize| {
            MmaTiles::for_head_dim(d, 90)
                .unwrap()
                .checked_with(&settings)
                .map_err(|e| e.to_string())
        };
        let wgmma_2 = MmaSettings {
            stages: Some(2),
            product: Some(Product::Wgmma),
            ..MmaSettings::default()
        };
        assert!(
            asked(wgmma_2, 64)
                .unwrap_err()
                .contains("wgmma kernels take one K/V stage")
        );
        let q128 = MmaSettings {
            block_q: Some(128),
            ..MmaSettings::default()
        };
        assert!(asked(q128, 128).is_ok());
        let err = asked(q128, 256).unwrap_err();
        assert!(
            err.contains("at head dim 256, mma.sync kernels take 64 queries per tile, not 128"),
            "{err}"
        );
        let k128 = MmaSettings {
            block_k: Some(128),
            product: Some(Product::Wgmma),
            ..MmaSettings::default()
        };
        assert_eq!(asked(k128, 128).unwrap().block_k, 128);
        let err = asked(k128, 256).unwrap_err();
        assert!(
            err.contains("wgmma kernels take at most 32 keys per tile, not 128"),
            "{err}"
        );
        // Q (128 x 128), two K (128 x 128) and two V tiles, unpadded.
        assert_eq!(wgmma.shared_bytes(), 5 * 128 * 128 * 2);
        assert!(wgmma.shared_bytes() <= MmaTiles::shared_limit(90));
        // Q (64 x 128), K (64 x 128), V padded and V transposed.
        assert_eq!(
            one_group.shared_bytes(),
            64 * 128 * 2 + 64 * 128 * 2 + 64 * 136 * 2 + 64 * 128 * 2
        );
    }
}
