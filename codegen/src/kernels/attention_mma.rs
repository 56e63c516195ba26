//! The fused attention on tensor cores, for NVIDIA GPUs from sm_80 on: the same attention
//! kernel description as the CPU's (mask and score modifier compiled in, the tile schedule
//! read at run time, GQA by head index), lowered the way a GPU wants it.
//!
//! One block of four warps per (query tile of 64 rows, batch row and head); each warp owns
//! 16 query rows. Q stays in registers as `mma` A fragments for the whole kernel. For each
//! key tile the schedule lists: the K tile and then the V tile are copied into shared memory
//! with `cp.async` (V's copy overlaps `S = Q K^T`, the next K tile's copy overlaps `O += P V`),
//! `S` comes from `mma.sync.m16n8k16` with K fragments from `ldmatrix`, the mask is evaluated
//! only on partial tiles (and the tile past the end of the sequence), the online softmax runs
//! in base 2 on the accumulator fragments (row maxima and sums across the four threads of a
//! row with `shfl`), and `P` is repacked in registers into A fragments for `O += P V`, with
//! V fragments from `ldmatrix.trans`. Inputs and the output are bf16 or f16; scores,
//! softmax and accumulation are f32.
//!
//! Shared-memory rows are padded by 8 elements, so that the eight rows an `ldmatrix` reads
//! fall in distinct banks.
//!
//! Buffers: `q [B, H, T, D]`, `k [B, KV, T, D]`, `v [B, KV, T, D]`, `out [B, H, T, D]`, the
//! schedule's row offsets and tiles, then the side inputs `[B, T]` (i64, padded by 8).
//! Dims: `B`, `T`, and whether the schedule has one set of rows per batch row.

use zebra_ir::op::AttentionKernel;

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

/// Warps per block; each owns 16 query rows.
pub const WARPS: usize = 4;
/// Threads per block.
pub const THREADS: usize = WARPS * 32;
/// Query rows per block.
pub const BLOCK_Q: usize = WARPS * 16;
/// The largest head dimension the kernel takes.
pub const MAX_HEAD_DIM: usize = 256;

/// The tiles of a tensor-core attention kernel for one head dimension and target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmaTiles {
    pub block_q: usize,
    pub block_k: usize,
    pub head_dim: usize,
}

impl MmaTiles {
    /// Keys per tile: 64 while a K and a V tile of 64 padded rows fit in 48 KiB of static
    /// shared memory (every sm_80 and sm_90 block may use that much without opting in), 32
    /// beyond (head dims over 128), or `None` when the head dimension cannot be taken (not a
    /// multiple of 16, or over 256).
    pub fn for_head_dim(head_dim: usize, sm: u32) -> Option<MmaTiles> {
        if head_dim == 0 || !head_dim.is_multiple_of(16) || head_dim > MAX_HEAD_DIM || sm < 80 {
            return None;
        }
        let block_k = if head_dim <= 128 { 64 } else { 32 };
        Some(MmaTiles {
            block_q: BLOCK_Q,
            block_k,
            head_dim,
        })
    }

    /// Elements per padded shared-memory row.
    pub fn row(&self) -> usize {
        self.head_dim + 8
    }

    /// Shared memory per block, in bytes: one K and one V tile.
    pub fn shared_bytes(&self) -> usize {
        2 * self.block_k * self.row() * 2
    }

    /// The 32-bit registers a thread holds live through the key loop (Q fragments, the
    /// output accumulators, one tile of scores, and softmax state), before the compiler's
    /// own temporaries: a lower bound that must stay well under 255.
    pub fn live_registers(&self) -> usize {
        let d = self.head_dim;
        d / 16 * 4 + d / 8 * 4 + self.block_k / 8 * 4 + 4
    }
}

/// Emits inline PTX: `results` are the types of the outputs (none, one, or several, read
/// back from a struct).
fn asm(
    b: &mut Builder,
    text: &str,
    constraints: &str,
    args: &[(&Val, &str)],
    results: &[&str],
    side_effects: bool,
) -> Vec<Val> {
    let names: Vec<String> = args.iter().map(|(v, _)| v.0.clone()).collect();
    let types: Vec<&str> = args.iter().map(|(_, t)| *t).collect();
    let effects = if side_effects { "has_side_effects " } else { "" };
    let head = format!(
        "llvm.inline_asm {effects}asm_dialect = att \"{text}\", \"{constraints}\" {} : ({})",
        names.join(", "),
        types.join(", ")
    );
    match results {
        [] => {
            b.line(format!("{head} -> ()"));
            Vec::new()
        }
        [one] => vec![b.op(format!("{head} -> {one}"))],
        many => {
            let st = format!("!llvm.struct<({})>", many.join(", "));
            let s = b.op(format!("{head} -> {st}"));
            (0..many.len())
                .map(|i| b.op(format!("llvm.extractvalue {s}[{i}] : {st}")))
                .collect()
        }
    }
}

fn const_i32(b: &mut Builder, v: i64) -> Val {
    b.op(format!("arith.constant {v} : i32"))
}

fn trunc32(b: &mut Builder, v: &Val) -> Val {
    b.op(format!("arith.trunci {v} : i64 to i32"))
}

/// `d = a * b + c` on one m16n8k16 tile: A in four registers, B in two, C and D in four f32.
fn mma(b: &mut Builder, half: Half, a: &[Val], bf: [&Val; 2], c: &[Val]) -> Vec<Val> {
    let t = half.name();
    let text = format!(
        "mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{$0,$1,$2,$3}}, {{$4,$5,$6,$7}}, {{$8,$9}}, {{$10,$11,$12,$13}};"
    );
    let args: Vec<(&Val, &str)> = a
        .iter()
        .map(|v| (v, "i32"))
        .chain(bf.iter().map(|v| (*v, "i32")))
        .chain(c.iter().map(|v| (v, F32)))
        .collect();
    asm(
        b,
        &text,
        "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3",
        &args,
        &[F32, F32, F32, F32],
        false,
    )
}

/// Four 8x8 matrices of 16-bit values from shared memory (each thread gives one row's
/// address), transposed or not.
fn ldmatrix4(b: &mut Builder, address: &Val, trans: bool) -> Vec<Val> {
    let trans = if trans { ".trans" } else { "" };
    asm(
        b,
        &format!("ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 {{$0,$1,$2,$3}}, [$4];"),
        "=r,=r,=r,=r,r",
        &[(address, "i32")],
        &["i32", "i32", "i32", "i32"],
        true,
    )
}

/// Two 8x8 matrices (threads 0..16 give the rows).
fn ldmatrix2(b: &mut Builder, address: &Val) -> Vec<Val> {
    asm(
        b,
        "ldmatrix.sync.aligned.m8n8.x2.shared.b16 {$0,$1}, [$2];",
        "=r,=r,r",
        &[(address, "i32")],
        &["i32", "i32"],
        true,
    )
}

/// Two f32 values rounded to a pair of 16-bit values (`lo` in the low half).
fn pack(b: &mut Builder, half: Half, lo: &Val, hi: &Val) -> Val {
    let text = format!("cvt.rn.{}x2.f32 $0, $2, $1;", half.name());
    asm(b, &text, "=r,f,f", &[(lo, F32), (hi, F32)], &["i32"], false).remove(0)
}

fn exp2(b: &mut Builder, x: &Val) -> Val {
    asm(b, "ex2.approx.ftz.f32 $0, $1;", "=f,f", &[(x, F32)], &[F32], false).remove(0)
}

/// The value of `x` in the thread whose lane differs from this one's in bit `mask`.
fn shuffle_xor(b: &mut Builder, x: &Val, mask: u32) -> Val {
    let text = format!("shfl.sync.bfly.b32 $0, $1, {mask}, 31, 0xffffffff;");
    asm(b, &text, "=f,f", &[(x, F32)], &[F32], true).remove(0)
}

fn barrier(b: &mut Builder) {
    asm(b, "bar.sync 0;", "", &[], &[], true);
}

fn wait_copies(b: &mut Builder) {
    asm(b, "cp.async.wait_group 0;", "", &[], &[], true);
}

/// The generator's view of one kernel being built.
struct Ctx<'a> {
    kernel: &'a AttentionKernel,
    half: Half,
    tiles: MmaTiles,
    tid: Val,
    lane: Val,
    t: Val,
    smem: Val,
}

impl Ctx<'_> {
    /// Copies key tile `kt` of `src` (`kv_base`: the head's first element) into the shared
    /// tile at byte offset `offset`, zero-filling rows past the end; one `cp.async` group.
    fn load_tile(&self, b: &mut Builder, src: &Val, kv_base: &Val, kt: &Val, offset: usize) {
        let (d, bk) = (self.tiles.head_dim, self.tiles.block_k);
        let chunks_per_row = d / 8;
        let chunks = bk * chunks_per_row;
        let cbk = b.i64(bk as i64);
        let first_key = b.muli(kt, &cbk);
        let c1 = b.i64(1);
        let last = b.subi(&self.t, &c1);
        for i in 0..chunks.div_ceil(THREADS) {
            let emit = |b: &mut Builder| {
                let off = b.i64((i * THREADS) as i64);
                let chunk = b.addi(&self.tid, &off);
                let per_row = b.i64(chunks_per_row as i64);
                let row = b.divi(&chunk, &per_row);
                let col = b.remi(&chunk, &per_row);
                let key = b.addi(&first_key, &row);
                let inside = b.cmpi("slt", &key, &self.t, I64);
                let key = b.mini(&key, &last);
                let cd = b.i64(d as i64);
                let at = b.muli(&key, &cd);
                let at = b.addi(kv_base, &at);
                let c8 = b.i64(8);
                let col_at = b.muli(&col, &c8);
                let at = b.addi(&at, &col_at);
                let from = b.gep(src, &at, "i16");
                let row_bytes = b.i64((self.tiles.row() * 2) as i64);
                let to = b.muli(&row, &row_bytes);
                let c16 = b.i64(16);
                let col_bytes = b.muli(&col, &c16);
                let to = b.addi(&to, &col_bytes);
                let base = b.i64(offset as i64);
                let to = b.addi(&to, &base);
                let to = trunc32(b, &to);
                let to = b.bin("addi", &to, &self.smem, "i32");
                let full = const_i32(b, 16);
                let none = const_i32(b, 0);
                let size = b.select(&inside, &full, &none, "i32");
                asm(
                    b,
                    "cp.async.cg.shared.global [$0], [$1], 16, $2;",
                    "r,l,r",
                    &[(&to, "i32"), (&from, "!llvm.ptr"), (&size, "i32")],
                    &[],
                    true,
                );
            };
            if (i + 1) * THREADS <= chunks {
                emit(b);
            } else {
                let off = b.i64((chunks - i * THREADS) as i64);
                let take = b.cmpi("slt", &self.tid, &off, I64);
                b.if_then(&take, emit);
            }
        }
        asm(b, "cp.async.commit_group;", "", &[], &[], true);
    }

    /// The shared-memory address (i32) of element (`row`, `col`) of the tile at `offset`.
    fn shared_at(&self, b: &mut Builder, row: &Val, col: &Val, offset: usize) -> Val {
        let row_bytes = b.i64((self.tiles.row() * 2) as i64);
        let at = b.muli(row, &row_bytes);
        let c2 = b.i64(2);
        let col_bytes = b.muli(col, &c2);
        let at = b.addi(&at, &col_bytes);
        let base = b.i64(offset as i64);
        let at = b.addi(&at, &base);
        let at = trunc32(b, &at);
        b.bin("addi", &at, &self.smem, "i32")
    }

    /// The lane's row and column within the 8x8 matrix group of an `ldmatrix`: lanes 8m..8m+8
    /// give the rows of matrix `m`.
    fn lane_split(&self, b: &mut Builder) -> (Val, Val) {
        let c8 = b.i64(8);
        (b.remi(&self.lane, &c8), b.divi(&self.lane, &c8))
    }
}

/// The MLIR function of a tensor-core attention kernel: `@name(buffers, dims, query tile,
/// batch row * heads + head, thread, shared memory)`; the PTX entry that calls it is
/// [`entry_ir`]'s.
pub fn attention_mma(name: &str, kernel: &AttentionKernel, half: Half, tiles: MmaTiles) -> String {
    let mut b = Builder::new();
    let b = &mut b;
    let d = tiles.head_dim;
    let (bq, bk) = (tiles.block_q, tiles.block_k);
    let heads = kernel.heads as i64;
    let group = (kernel.heads / kernel.kv_heads.max(1)).max(1) as i64;
    let bufs = Val("%bufs".into());
    let dims = Val("%dims".into());
    let qt = Val("%qt".into());
    let bh = Val("%bh".into());
    let tid = Val("%tid".into());
    let (c0, c1) = (b.i64(0), b.i64(1));
    let smem = b.op("llvm.ptrtoint %smem : !llvm.ptr<3> to i32");
    let q = b.ptr_at(&bufs, 0);
    let k = b.ptr_at(&bufs, 1);
    let v = b.ptr_at(&bufs, 2);
    let out = b.ptr_at(&bufs, 3);
    let sched_rows = b.ptr_at(&bufs, 4);
    let sched_tiles = b.ptr_at(&bufs, 5);
    let batches = b.i64_at(&dims, 0);
    let _ = batches;
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
    let c2 = b.i64(2);
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
    let c16 = b.i64(16);
    let row0 = b.muli(&warp, &c16);
    let row0 = b.addi(&q0, &row0);
    let row0 = b.addi(&row0, &g);
    let c8 = b.i64(8);
    let row1 = b.addi(&row0, &c8);
    let last_row = b.subi(&t, &c1);
    let ctx = Ctx {
        kernel,
        half,
        tiles,
        tid: tid.clone(),
        lane: lane.clone(),
        t: t.clone(),
        smem,
    };
    let v_offset = bk * tiles.row() * 2;

    // Q as A fragments, one per 16 columns: rows g and g + 8, columns 2c and 2c + 8.
    let q_frags: Vec<Vec<Val>> = (0..d / 16)
        .map(|kk| {
            [(&row0, 0), (&row1, 0), (&row0, 8), (&row1, 8)]
                .into_iter()
                .map(|(row, col)| {
                    let row = b.mini(row, &last_row);
                    let at = b.muli(&row, &cd);
                    let at = b.addi(&q_base, &at);
                    let off = b.i64((kk * 16 + col) as i64);
                    let at = b.addi(&at, &off);
                    let at = b.addi(&at, &two_c);
                    b.load(&q, &at, "i16", "i32")
                })
                .collect()
        })
        .collect();

    // This query tile's row of the schedule.
    let n_qt = b.ceil_div(&t, &cbq);
    let shared = b.muli(&batch, &per_batch);
    let shared = b.muli(&shared, &n_qt);
    let row = b.addi(&shared, &qt);
    let start = b.load(&sched_rows, &row, I64, I64);
    let next = b.addi(&row, &c1);
    let end = b.load(&sched_rows, &next, I64, I64);
    let any = b.cmpi("slt", &start, &end, I64);
    b.if_then(&any, |b| {
        let entry = b.load(&sched_tiles, &start, I64, I64);
        let kt = b.op(format!("arith.shrsi {entry}, {c1} : i64"));
        ctx.load_tile(b, &k, &kv_base, &kt, 0);
    });

    let zero = b.f32(0.0);
    let neg_inf = b.op(format!("arith.constant {} : f32", f32_literal(f32::NEG_INFINITY)));
    let n_o = d / 8 * 4;
    let mut carried: Vec<(Val, String)> = (0..n_o).map(|_| (zero.clone(), F32.to_string())).collect();
    carried.extend([
        (neg_inf.clone(), F32.to_string()),
        (neg_inf.clone(), F32.to_string()),
        (zero.clone(), F32.to_string()),
        (zero.clone(), F32.to_string()),
    ]);
    let log2e = std::f64::consts::LOG2_E;
    let narrow = vexpr::fits_in_32_bits(&kernel.mask, heads)
        && kernel
            .score
            .as_ref()
            .is_none_or(|s| vexpr::fits_in_32_bits(s, heads));
    let finals = b.for_range(&start, &end, &c1, &carried, |b, i, acc| {
        let (o_in, state) = acc.split_at(n_o);
        let entry = b.load(&sched_tiles, i, I64, I64);
        let kt = b.op(format!("arith.shrsi {entry}, {c1} : i64"));
        let partial = b.bin("andi", &entry, &c1, I64);
        let partial = b.cmpi("ne", &partial, &c0, I64);
        let cbk = b.i64(bk as i64);
        let k0 = b.muli(&kt, &cbk);
        let k_end = b.addi(&k0, &cbk);
        let tail = b.cmpi("sgt", &k_end, &t, I64);
        let needs_mask = b.bin("ori", &partial, &tail, "i1");
        wait_copies(b);
        barrier(b);
        ctx.load_tile(b, &v, &kv_base, &kt, v_offset);

        // S = Q K^T, eight keys per accumulator tile.
        let (lrow, lmat) = ctx.lane_split(b);
        let mut s: Vec<Vec<Val>> = Vec::new();
        for n in 0..bk / 8 {
            let mut acc = vec![zero.clone(); 4];
            let key = b.i64((n * 8) as i64);
            let key = b.addi(&key, &lrow);
            let mut kk = 0;
            while kk < d / 16 {
                if kk + 1 < d / 16 {
                    let col = b.muli(&lmat, &c8);
                    let off = b.i64((kk * 16) as i64);
                    let col = b.addi(&col, &off);
                    let at = ctx.shared_at(b, &key, &col, 0);
                    let r = ldmatrix4(b, &at, false);
                    acc = mma(b, half, &q_frags[kk], [&r[0], &r[1]], &acc);
                    acc = mma(b, half, &q_frags[kk + 1], [&r[2], &r[3]], &acc);
                    kk += 2;
                } else {
                    let c2 = b.i64(2);
                    let m = b.remi(&lmat, &c2);
                    let col = b.muli(&m, &c8);
                    let off = b.i64((kk * 16) as i64);
                    let col = b.addi(&col, &off);
                    let at = ctx.shared_at(b, &key, &col, 0);
                    let r = ldmatrix2(b, &at);
                    acc = mma(b, half, &q_frags[kk], [&r[0], &r[1]], &acc);
                    kk += 1;
                }
            }
            s.push(acc);
        }

        // Scale and modify (base 2 for the softmax), and mask where the tile needs it.
        let plain_scale = b.f32((kernel.scale * log2e) as f32);
        let scale = b.f32(kernel.scale as f32);
        let log2e_c = b.f32(log2e as f32);
        let mut flat: Vec<Val> = Vec::new();
        for (n, acc) in s.iter().enumerate() {
            for r in 0..2 {
                let qpos = if r == 0 { &row0 } else { &row1 };
                let (x0, x1) = (&acc[2 * r], &acc[2 * r + 1]);
                match &kernel.score {
                    None => {
                        flat.push(b.bin("mulf", x0, &plain_scale, F32));
                        flat.push(b.bin("mulf", x1, &plain_scale, F32));
                    }
                    Some(expr) => {
                        let y0 = b.bin("mulf", x0, &scale, F32);
                        let y1 = b.bin("mulf", x1, &scale, F32);
                        let pair = b.op(format!("vector.from_elements {y0}, {y1} : vector<2xf32>"));
                        let kpos = b.i64((n * 8) as i64);
                        let kpos = b.addi(&k0, &kpos);
                        let kpos = b.addi(&kpos, &two_c);
                        let env = VecEnv {
                            n: 2,
                            q: qpos.clone(),
                            k0: kpos,
                            h: h.clone(),
                            b: batch.clone(),
                            score: Some(pair),
                            sides: &side_rows,
                            narrow,
                            keys: None,
                        };
                        let m = vexpr::score(b, expr, &env);
                        for lane in 0..2 {
                            let x = b.op(format!("vector.extract {m}[{lane}] : f32 from vector<2xf32>"));
                            flat.push(b.bin("mulf", &x, &log2e_c, F32));
                        }
                    }
                }
            }
        }
        let types = vec![F32.to_string(); flat.len()];
        let masked = b.if_else(
            &needs_mask,
            &types,
            |b| {
                let mut outv = Vec::new();
                for n in 0..bk / 8 {
                    for r in 0..2 {
                        let qpos = if r == 0 { &row0 } else { &row1 };
                        let kpos = b.i64((n * 8) as i64);
                        let kpos = b.addi(&k0, &kpos);
                        let kpos = b.addi(&kpos, &two_c);
                        let env = VecEnv {
                            n: 2,
                            q: qpos.clone(),
                            k0: kpos,
                            h: h.clone(),
                            b: batch.clone(),
                            score: None,
                            sides: &side_rows,
                            narrow,
                            keys: None,
                        };
                        let seen = vexpr::mask(b, &kernel.mask, &env);
                        let below = env.keys_below(b, &t);
                        let seen = b.bin("andi", &seen, &below, "vector<2xi1>");
                        for lane in 0..2 {
                            let ok = b.op(format!("vector.extract {seen}[{lane}] : i1 from vector<2xi1>"));
                            let x = &flat[(n * 2 + r) * 2 + lane];
                            outv.push(b.select(&ok, x, &neg_inf, F32));
                        }
                    }
                }
                outv
            },
            |_| flat.clone(),
        );

        // Online softmax, per row (r = 0: row g, r = 1: row g + 8).
        let mut o: Vec<Val> = o_in.to_vec();
        let mut p = masked.clone();
        let mut next_state = Vec::new();
        let mut sums = Vec::new();
        for r in 0..2 {
            let (m_old, l_old) = (&state[r], &state[2 + r]);
            let mut mx = neg_inf.clone();
            for n in 0..bk / 8 {
                for lane in 0..2 {
                    mx = b.op(format!(
                        "arith.maximumf {mx}, {} : f32",
                        masked[(n * 2 + r) * 2 + lane]
                    ));
                }
            }
            for bit in [1, 2] {
                let other = shuffle_xor(b, &mx, bit);
                mx = b.op(format!("arith.maximumf {mx}, {other} : f32"));
            }
            let m_new = b.op(format!("arith.maximumf {m_old}, {mx} : f32"));
            let empty = b.cmpf("oeq", &m_new, &neg_inf, F32);
            let m_safe = b.select(&empty, &zero, &m_new, F32);
            let diff = b.bin("subf", m_old, &m_safe, F32);
            let alpha = exp2(b, &diff);
            let mut sum = b.bin("mulf", l_old, &alpha, F32);
            for n in 0..bk / 8 {
                for lane in 0..2 {
                    let at = (n * 2 + r) * 2 + lane;
                    let x = b.bin("subf", &masked[at], &m_safe, F32);
                    let e = exp2(b, &x);
                    sum = b.bin("addf", &sum, &e, F32);
                    p[at] = e;
                }
            }
            for n in 0..d / 8 {
                for lane in 0..2 {
                    let at = n * 4 + 2 * r + lane;
                    o[at] = b.bin("mulf", &o[at], &alpha, F32);
                }
            }
            next_state.push(m_new);
            sums.push(sum);
        }
        next_state.extend(sums);

        // P as A fragments: keys 16j.. of rows g and g + 8.
        let pf = |n: usize, r: usize, lane: usize| (n * 2 + r) * 2 + lane;
        let p_frags: Vec<Vec<Val>> = (0..bk / 16)
            .map(|j| {
                [(2 * j, 0), (2 * j, 1), (2 * j + 1, 0), (2 * j + 1, 1)]
                    .into_iter()
                    .map(|(n, r)| pack(b, half, &p[pf(n, r, 0)], &p[pf(n, r, 1)]))
                    .collect()
            })
            .collect();

        wait_copies(b);
        barrier(b);
        let following = b.addi(i, &c1);
        let more = b.cmpi("slt", &following, &end, I64);
        b.if_then(&more, |b| {
            let entry = b.load(&sched_tiles, &following, I64, I64);
            let kt = b.op(format!("arith.shrsi {entry}, {c1} : i64"));
            ctx.load_tile(b, &k, &kv_base, &kt, 0);
        });

        // O += P V: V fragments by ldmatrix.trans, two 8-column output tiles at a time.
        let c2 = b.i64(2);
        let half_row = b.remi(&lmat, &c2);
        let half_row = b.muli(&half_row, &c8);
        let key_in = b.addi(&lrow, &half_row);
        let col_pair = b.divi(&lmat, &c2);
        let col_pair = b.muli(&col_pair, &c8);
        for (j, a) in p_frags.iter().enumerate() {
            let key = b.i64((j * 16) as i64);
            let key = b.addi(&key, &key_in);
            for np in 0..d / 16 {
                let col = b.i64((np * 16) as i64);
                let col = b.addi(&col, &col_pair);
                let at = ctx.shared_at(b, &key, &col, v_offset);
                let r = ldmatrix4(b, &at, true);
                let (lo, hi) = (2 * np * 4, (2 * np + 1) * 4);
                let acc = mma(b, half, a, [&r[0], &r[1]], &o[lo..lo + 4]);
                o.splice(lo..lo + 4, acc);
                let acc = mma(b, half, a, [&r[2], &r[3]], &o[hi..hi + 4]);
                o.splice(hi..hi + 4, acc);
            }
        }
        o.extend(next_state);
        o
    });

    // The row sums across the four threads of a row, then O / l (zeros for a row that saw
    // no key), stored as 16-bit pairs.
    let (o, state) = finals.split_at(n_o);
    let one = b.f32(1.0);
    let mut inverse = Vec::new();
    for r in 0..2 {
        let mut l = state[2 + r].clone();
        for bit in [1, 2] {
            let other = shuffle_xor(b, &l, bit);
            l = b.bin("addf", &l, &other, F32);
        }
        let seen = b.cmpf("ogt", &l, &zero, F32);
        let inv = b.bin("divf", &one, &l, F32);
        inverse.push(b.select(&seen, &inv, &zero, F32));
    }
    for (r, row) in [&row0, &row1].into_iter().enumerate() {
        let inside = b.cmpi("slt", row, &t, I64);
        b.if_then(&inside, |b| {
            let at = b.muli(row, &cd);
            let at = b.addi(&q_base, &at);
            let at = b.addi(&at, &two_c);
            for n in 0..d / 8 {
                let x0 = b.bin("mulf", &o[n * 4 + 2 * r], &inverse[r], F32);
                let x1 = b.bin("mulf", &o[n * 4 + 2 * r + 1], &inverse[r], F32);
                let packed = pack(b, half, &x0, &x1);
                let off = b.i64((n * 8) as i64);
                let at = b.addi(&at, &off);
                b.store(&packed, &out, &at, "i16", "i32");
            }
        });
    }
    let _ = ctx.kernel;
    let _ = ctx.half;
    finish(b, name)
}

fn finish(b: &mut Builder, name: &str) -> String {
    let body = std::mem::take(b).finish(name);
    body.replacen(
        &format!(
            "func.func @{name}(%bufs: !llvm.ptr, %dims: !llvm.ptr, %first: i64, %last: i64) {{"
        ),
        &format!(
            "func.func private @{name}(%bufs: !llvm.ptr, %dims: !llvm.ptr, %qt: i64, %bh: i64, %tid: i64, %smem: !llvm.ptr<3>) attributes {{passthrough = [\"alwaysinline\"]}} {{"
        ),
        1,
    )
}

/// The PTX entry of a tensor-core attention kernel, in LLVM IR: `{name}_mma(buffers, dims)`,
/// launched on a grid of (query tiles, batch rows * heads) blocks of [`THREADS`] threads,
/// with its shared memory.
pub fn entry_ir(name: &str, tiles: MmaTiles) -> String {
    format!(
        "
@{name}_smem = internal addrspace(3) global [{bytes} x i8] undef, align 16

define ptx_kernel void @{name}_mma(ptr %bufs, ptr %dims) \"nvvm.maxntid\"=\"{threads}\" {{
  %tid = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %qt = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
  %bh = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.y()
  %tid64 = zext i32 %tid to i64
  %qt64 = zext i32 %qt to i64
  %bh64 = zext i32 %bh to i64
  call void @{name}(ptr %bufs, ptr %dims, i64 %qt64, i64 %bh64, i64 %tid64, ptr addrspace(3) @{name}_smem)
  ret void
}}
",
        bytes = tiles.shared_bytes(),
        threads = THREADS
    )
}
