//! Which kernels of a model's GPU plan run on tensor cores, and how they are built and
//! launched. With a 16-bit type chosen (`zebra compile --target sm_XX --dtype bf16|f16`):
//!
//! - the projections ([`ProjectionMma`]) and the products of activations of the training
//!   step's backward ([`matmul_mma`]);
//! - the fused attention ([`attention_mma`] reading the plan's f32 queries and writing its
//!   f32 output, and in a training step its log-sum-exp), where the tensor-core kernel takes
//!   the head dim, and its backward ([`attention_mma_grad`]: `dQ`, and `dK` with `dV`) where
//!   the tensor-core backward does (head dims up to 128);
//! - `pack_kv` before such attentions, replaced by [`pack_half`]: keys and values rounded
//!   to 16 bits, `[B, KV, T, D]`, in the workspaces the attentions read (the backward's
//!   second `pack_kv`, values then keys, gives the values and the keys again).
//!
//! - the decode step's attention ([`decode_gpu`]), in every GPU plan, f32 too
//!   ([`select_decode`]): not a tensor-core kernel (one query per head), but the same launch.
//!
//! The plan itself is unchanged: the same steps, buffers and schedules, so that every kernel
//! still has its portable f32 version, and a kernel runs on tensor cores only where every
//! step that reads what it writes does too.

use zebra_ir::op::AttentionKernel;
use zebra_ir::{Graph, Op};
use zebra_runtime::plan::{Operand, Step, TensorCoreGrid};

use super::KernelSpec;
use super::attention_mma::{
    AttentionIo, Half, MmaChoice, MmaSettings, MmaTiles, THREADS, attention_mma,
};
use super::attention_mma_grad::{GradKernel, GradTiles, attention_mma_grad};
use super::block::{block_function, load8, pack8};
use super::decode_gpu;
use super::matmul::MatMulShape;
use super::matmul_mma::matmul_mma;
use super::projection_mma::{ProjectionMma, projection_mma};
use super::warp::Lowering;
use crate::mlir::{Builder, I64, Val};
use crate::plan::Planned;

/// Rows of `[B T]` per block of `pack_half`.
const PACK_ROWS: usize = 16;

/// A kernel of a plan on tensor cores.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorCoreKernel {
    Projection(ProjectionMma),
    /// Keys and values rounded to 16 bits for a tensor-core attention.
    PackHalf {
        kv_heads: usize,
        head_dim: usize,
    },
    Attention {
        kernel: AttentionKernel,
        tiles: MmaTiles,
        /// Also writes the log-sum-exp (a training step's forward).
        lse: bool,
    },
    AttentionGrad {
        kernel: AttentionKernel,
        tiles: GradTiles,
        which: GradKernel,
    },
    MatMul(MatMulShape),
    /// The decode step's attention spread over a block's threads (f32, no tensor cores: one
    /// query per head), in every GPU plan.
    Decode {
        kernel: AttentionKernel,
        cache: zebra_ir::cache::HeadCache,
        /// Slots per block of the key cache.
        slots: usize,
        /// Threads per block ([`decode_gpu::threads_for`]).
        threads: usize,
        /// The most blocks a batch row and KV head's cache is split over
        /// ([`decode_gpu::SPLITS`]).
        splits: usize,
    },
}

impl TensorCoreKernel {
    /// The MLIR function `@name(buffers, dims, x, y, thread, shared memory)`.
    pub fn function(&self, name: &str, half: Half, isa: Lowering) -> String {
        match self {
            TensorCoreKernel::Projection(p) => projection_mma(name, p, half, isa),
            TensorCoreKernel::PackHalf { kv_heads, head_dim } => {
                pack_half(name, *kv_heads, *head_dim, half, isa)
            }
            TensorCoreKernel::Attention { kernel, tiles, lse } => attention_mma(
                name,
                kernel,
                half,
                *tiles,
                isa,
                AttentionIo::Plan { lse: *lse },
            ),
            TensorCoreKernel::AttentionGrad {
                kernel,
                tiles,
                which,
            } => attention_mma_grad(name, kernel, half, *tiles, *which, isa),
            TensorCoreKernel::MatMul(shape) => matmul_mma(name, shape, half, isa),
            TensorCoreKernel::Decode {
                kernel,
                cache,
                slots,
                threads,
                splits,
            } => {
                let shape = (*slots, *threads, *splits);
                decode_gpu::attention_decode_gpu(name, kernel, cache, shape, isa)
                    + &decode_gpu::attention_decode_combine(
                        &format!("{name}{COMBINE}"),
                        kernel,
                        cache,
                        shape,
                    )
            }
        }
    }

    pub fn grid(&self) -> TensorCoreGrid {
        match self {
            TensorCoreKernel::Projection(p) => TensorCoreGrid::Rows {
                rows: p.block_m(),
                columns: p.column_blocks(),
            },
            TensorCoreKernel::PackHalf { .. } => TensorCoreGrid::Rows {
                rows: PACK_ROWS,
                columns: 1,
            },
            TensorCoreKernel::Attention { kernel, tiles, .. } => TensorCoreGrid::Attention {
                block_q: tiles.block_q,
                heads: kernel.heads as usize,
            },
            TensorCoreKernel::AttentionGrad {
                kernel,
                tiles,
                which: GradKernel::Dq,
            } => TensorCoreGrid::Attention {
                block_q: tiles.block_q,
                heads: kernel.heads as usize,
            },
            // Key tiles, per batch row and KV head.
            TensorCoreKernel::AttentionGrad {
                kernel,
                tiles,
                which: GradKernel::Dkv,
            } => TensorCoreGrid::Attention {
                block_q: tiles.block_k,
                heads: kernel.kv_heads as usize,
            },
            TensorCoreKernel::MatMul(shape) => TensorCoreGrid::MatMul {
                batch: shape
                    .batch
                    .iter()
                    .map(|d| crate::plan::extent(*d))
                    .collect(),
                m: crate::plan::extent(shape.m),
                n: crate::plan::extent(shape.n),
                block_m: super::matmul_mma::BLOCK_M,
                block_n: super::matmul_mma::BLOCK_N,
            },
            // Shares of the cache of each batch row and KV head it holds.
            TensorCoreKernel::Decode {
                cache,
                slots,
                threads,
                splits,
                ..
            } => TensorCoreGrid::Splits {
                splits: *splits,
                heads: cache.kv_heads.len(),
                chunk: slots * threads,
                capacity: cache.policy.capacity().map(|c| c as usize),
            },
        }
    }

    pub fn threads(&self) -> usize {
        match self {
            TensorCoreKernel::Attention { tiles, .. } => tiles.threads(),
            TensorCoreKernel::AttentionGrad { tiles, which, .. } => tiles.threads(*which),
            TensorCoreKernel::Decode { threads, .. } => *threads,
            _ => THREADS,
        }
    }

    pub fn shared_bytes(&self) -> usize {
        match self {
            TensorCoreKernel::Projection(p) => p.shared_bytes(),
            TensorCoreKernel::PackHalf { .. } => 0,
            TensorCoreKernel::Attention { tiles, .. } => tiles.shared_bytes(),
            TensorCoreKernel::AttentionGrad { tiles, which, .. } => tiles.layout(*which).bytes,
            TensorCoreKernel::MatMul(shape) => super::matmul_mma::shared_bytes(shape),
            TensorCoreKernel::Decode {
                kernel,
                slots,
                threads,
                ..
            } => decode_gpu::shared_bytes(kernel, *slots, *threads),
        }
    }

    /// The kernel launched right after this one with the same buffers and dims, where there
    /// is one: its function is `{name}{suffix}` in [`TensorCoreKernel::function`]'s text.
    pub fn then(&self) -> Option<Then> {
        match self {
            // Combining the splits' shares: a block per batch row and KV head held (`T` is 1).
            TensorCoreKernel::Decode { cache, threads, .. } => Some(Then {
                suffix: COMBINE,
                grid: TensorCoreGrid::Attention {
                    block_q: 1,
                    heads: cache.kv_heads.len(),
                },
                threads: *threads,
                shared_bytes: 0,
            }),
            _ => None,
        }
    }

    /// The PTX entry `{name}_mma(buffers, dims)`, in LLVM IR.
    pub fn entry_ir(&self, name: &str) -> String {
        match self {
            TensorCoreKernel::Attention { tiles, .. } => {
                super::attention_mma::entry_ir(name, tiles)
            }
            TensorCoreKernel::AttentionGrad { tiles, which, .. } => {
                super::attention_mma_grad::entry_ir(name, tiles, *which)
            }
            TensorCoreKernel::Decode { threads, .. } => {
                super::block::entry_ir(name, false, *threads)
            }
            _ => super::projection_mma::entry_ir(name),
        }
    }
}

/// A kernel's second launch ([`TensorCoreKernel::then`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Then {
    pub suffix: &'static str,
    pub grid: TensorCoreGrid,
    pub threads: usize,
    pub shared_bytes: usize,
}

impl Then {
    /// Its PTX entry `{name}{suffix}_mma(buffers, dims)`, in LLVM IR.
    pub fn entry_ir(&self, name: &str) -> String {
        super::block::entry_ir(&format!("{name}{}", self.suffix), false, self.threads)
    }
}

/// The suffix of the decode attention's combining function.
const COMBINE: &str = "_combine";

/// The graph with each attention's tiles those of its tensor-core kernel on `sm`, where
/// there is one (the schedule is built for the kernel's tiles): the forward's as `choice`
/// sets them for it (the head dim's by default), the backward's the head dim's.
pub fn retile(graph: &Graph, sm: u32, choice: &MmaChoice) -> Graph {
    let mut graph = graph.clone();
    for id in graph.node_ids() {
        let node = graph.node_mut(id);
        let (kernel, settings) = match &mut node.op {
            Op::Attention(kernel) | Op::AttentionLse(kernel) => {
                let (settings, _) = choice.settings(kernel);
                (kernel, settings)
            }
            Op::AttentionGrad { kernel, .. } => (kernel, MmaSettings::default()),
            _ => continue,
        };
        if let Some(tiles) = MmaTiles::for_head_dim(kernel.head_dim as usize, sm)
            .and_then(|tiles| tiles.checked_with(&settings).ok())
        {
            kernel.block_q = tiles.block_q as u64;
            kernel.block_k = tiles.block_k as u64;
        }
    }
    graph
}

/// The kernels of a planned graph that run on tensor cores on `sm`, by kernel index; the
/// forward attentions' with the settings `choice` gives them (`wgmma` on sm_90 only, which
/// the caller checks; the backward's stay on `mma.sync`).
pub fn select(planned: &Planned, sm: u32, choice: &MmaChoice) -> Vec<(usize, TensorCoreKernel)> {
    let steps: Vec<(usize, &Vec<Operand>)> = planned
        .plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Kernel {
                kernel, operands, ..
            } => Some((*kernel, operands)),
            Step::Schedule { .. } => None,
        })
        .collect();
    // Attentions (forward and backward) whose kernels the tensor cores can run.
    let mut attention: Vec<(usize, TensorCoreKernel)> = planned
        .kernels
        .iter()
        .enumerate()
        .filter_map(|(i, spec)| {
            let kernel = match spec {
                KernelSpec::Attention { kernel, lse } => {
                    let tiles = MmaTiles::for_head_dim(kernel.head_dim as usize, sm)?
                        .with(&choice.settings(kernel).0);
                    let fits = tiles.block_q as u64 == kernel.block_q
                        && kernel.block_k.is_multiple_of(16)
                        && (16..=128).contains(&kernel.block_k);
                    let tiles = MmaTiles {
                        block_k: kernel.block_k as usize,
                        ..tiles
                    };
                    fits.then(|| TensorCoreKernel::Attention {
                        kernel: kernel.clone(),
                        tiles,
                        lse: *lse,
                    })?
                }
                KernelSpec::AttentionDq { kernel } | KernelSpec::AttentionDkv { kernel } => {
                    let which = match spec {
                        KernelSpec::AttentionDq { .. } => GradKernel::Dq,
                        _ => GradKernel::Dkv,
                    };
                    TensorCoreKernel::AttentionGrad {
                        kernel: kernel.clone(),
                        tiles: GradTiles::of(kernel, sm)?,
                        which,
                    }
                }
                _ => return None,
            };
            Some((i, kernel))
        })
        .collect();
    // Where an attention kernel reads keys and values (the backward's `dQ` reads the keys
    // twice), and its KV heads.
    let reads_kv = |kernel: &TensorCoreKernel| -> (&'static [usize], usize) {
        match kernel {
            TensorCoreKernel::Attention { kernel, .. } => (&[1, 2], kernel.kv_heads as usize),
            TensorCoreKernel::AttentionGrad {
                kernel,
                which: GradKernel::Dq,
                ..
            } => (&[1, 2, 3], kernel.kv_heads as usize),
            TensorCoreKernel::AttentionGrad { kernel, .. } => (&[1, 2], kernel.kv_heads as usize),
            _ => (&[], 0),
        }
    };
    // pack_kv kernels whose every output is read by those attentions alone (as their keys
    // and values), and the attentions whose keys and values all come from such kernels: to
    // a fixed point, as dropping one may drop the other.
    let mut packs: Vec<(usize, usize, usize)>;
    loop {
        packs = Vec::new();
        for (i, spec) in planned.kernels.iter().enumerate() {
            let KernelSpec::PackKv { head_dim, .. } = spec else {
                continue;
            };
            let mut kv_heads = None;
            let mut ok = true;
            for (_, ops) in steps.iter().filter(|(k, _)| *k == i) {
                for written in [ops[2], ops[3]] {
                    for (reader, rops) in &steps {
                        for (at, _) in rops.iter().enumerate().filter(|(_, o)| **o == written) {
                            let read = attention
                                .iter()
                                .find(|(a, _)| a == reader)
                                .map(|(_, kernel)| reads_kv(kernel));
                            match read {
                                Some((positions, kv)) if positions.contains(&at) => {
                                    ok &= kv_heads.replace(kv).is_none_or(|k| k == kv);
                                }
                                _ if *reader == i => {}
                                _ => ok = false,
                            }
                        }
                    }
                }
            }
            if let (true, Some(kv)) = (ok, kv_heads) {
                packs.push((i, kv, *head_dim));
            }
        }
        let before = attention.len();
        attention.retain(|(a, _)| {
            steps.iter().filter(|(k, _)| k == a).all(|(_, ops)| {
                [ops[1], ops[2]].iter().all(|read| {
                    steps.iter().any(|(writer, wops)| {
                        packs.iter().any(|(p, _, _)| p == writer)
                            && (wops[2] == *read || wops[3] == *read)
                    })
                })
            })
        });
        if attention.len() == before {
            break;
        }
    }
    let mut out: Vec<(usize, TensorCoreKernel)> = Vec::new();
    for (i, spec) in planned.kernels.iter().enumerate() {
        if let Some(decode) = decode_kernel(planned, i) {
            out.push((i, decode));
        } else if let Some(p) = ProjectionMma::of(spec) {
            out.push((i, TensorCoreKernel::Projection(p)));
        } else if let KernelSpec::MatMul(shape) = spec {
            out.push((i, TensorCoreKernel::MatMul(shape.clone())));
        } else if let Some((_, kernel)) = attention.iter().find(|(a, _)| *a == i) {
            out.push((i, kernel.clone()));
        } else if let Some((_, kv_heads, head_dim)) = packs.iter().find(|(p, _, _)| *p == i) {
            out.push((
                i,
                TensorCoreKernel::PackHalf {
                    kv_heads: *kv_heads,
                    head_dim: *head_dim,
                },
            ));
        }
    }
    out
}

/// The decode attentions of a plan, by kernel index, on their GPU kernel: what every GPU
/// plan runs in their place, with tensor cores or without.
pub fn select_decode(planned: &Planned) -> Vec<(usize, TensorCoreKernel)> {
    (0..planned.kernels.len())
        .filter_map(|i| Some((i, decode_kernel(planned, i)?)))
        .collect()
}

/// Kernel `i` of the plan on the GPU decode kernel, where it is a decode attention that
/// kernel takes (its slots per key-cache block read from the cache it runs against).
fn decode_kernel(planned: &Planned, i: usize) -> Option<TensorCoreKernel> {
    let KernelSpec::AttentionDecode {
        kernel,
        cache: held,
    } = &planned.kernels[i]
    else {
        return None;
    };
    let cache = planned.plan.steps.iter().find_map(|step| match step {
        Step::Kernel {
            kernel, operands, ..
        } if *kernel == i => operands.iter().find_map(|o| match o {
            Operand::CacheKeys(c) => Some(*c),
            _ => None,
        }),
        _ => None,
    })?;
    let slots = planned.plan.caches.get(cache)?.block;
    Some(TensorCoreKernel::Decode {
        kernel: kernel.clone(),
        cache: held.clone(),
        slots,
        threads: decode_gpu::threads_for(kernel, slots)?,
        splits: decode_gpu::SPLITS,
    })
}

/// `pack_kv`'s stand-in before a tensor-core attention: `k` and `v` (f32, `[B, KV, T, D]`)
/// rounded to 16 bits into `kp` and `vp` (same layout). Buffers: k, v, kp, vp. A block
/// converts `PACK_ROWS` (16) rows of `B T`, 8 elements per thread at a time.
pub fn pack_half(
    name: &str,
    kv_heads: usize,
    head_dim: usize,
    half: Half,
    isa: Lowering,
) -> String {
    let mut builder = Builder::new();
    let b = &mut builder;
    let bufs = Val("%bufs".into());
    let dims = Val("%dims".into());
    let bx = Val("%bx".into());
    let tid = Val("%tid".into());
    let k = b.ptr_at(&bufs, 0);
    let v = b.ptr_at(&bufs, 1);
    let kp = b.ptr_at(&bufs, 2);
    let vp = b.ptr_at(&bufs, 3);
    let batch = b.i64_at(&dims, 0);
    let t = b.i64_at(&dims, 1);
    let rows = b.muli(&batch, &t);
    let per_row = kv_heads * head_dim / 8;
    let chunks = b.i64((PACK_ROWS * per_row) as i64);
    let step = b.i64(THREADS as i64);
    let cpr = b.i64(per_row as i64);
    let per_head = b.i64((head_dim / 8) as i64);
    let crows = b.i64(PACK_ROWS as i64);
    let ckv = b.i64(kv_heads as i64);
    let cd = b.i64(head_dim as i64);
    let c8 = b.i64(8);
    let first = b.muli(&bx, &crows);
    b.for_range(&tid, &chunks, &step, &[], |b, c, _| {
        let r = b.divi(c, &cpr);
        let rem = b.remi(c, &cpr);
        let kvh = b.divi(&rem, &per_head);
        let col = b.remi(&rem, &per_head);
        let row = b.addi(&first, &r);
        let inside = b.cmpi("slt", &row, &rows, I64);
        b.if_then(&inside, |b| {
            let bi = b.divi(&row, &t);
            let ti = b.remi(&row, &t);
            let at = b.muli(&bi, &ckv);
            let at = b.addi(&at, &kvh);
            let at = b.muli(&at, &t);
            let at = b.addi(&at, &ti);
            let at = b.muli(&at, &cd);
            let col = b.muli(&col, &c8);
            let at = b.addi(&at, &col);
            for (src, dst) in [(&k, &kp), (&v, &vp)] {
                let values = load8(b, src, &at, true);
                // Element `at` of 16 bits is word `at / 2` of 32.
                let c2 = b.i64(2);
                let word = b.divi(&at, &c2);
                for (j, packed) in pack8(b, isa, half, &values).iter().enumerate() {
                    let cj = b.i64(j as i64);
                    let w = b.addi(&word, &cj);
                    b.store(packed, dst, &w, "i32", "i32");
                }
            }
        });
        vec![]
    });
    block_function(builder, name, "bx", "by")
}
