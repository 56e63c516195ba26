//! What the tensor-core kernels share: the block function's signature, shared-memory
//! addresses, and the copy of tiles into shared memory in 16-byte chunks, each thread taking
//! every `threads`-th chunk (the block's threads: `ChunkedTile`).

use super::attention_mma::Half;
use super::warp::Lowering;
use crate::mlir::{Builder, F32, I64, Val, vf32};

/// The text of a block function: `@name(buffers, dims, x, y, thread, shared memory)`, with
/// the block indices named `%{x}` and `%{y}` in the body, inlined into its entry.
pub(crate) fn block_function(builder: Builder, name: &str, x: &str, y: &str) -> String {
    builder.finish(name).replacen(
        &format!(
            "func.func @{name}(%bufs: !llvm.ptr, %dims: !llvm.ptr, %first: i64, %last: i64) {{"
        ),
        &format!(
            "func.func private @{name}(%bufs: !llvm.ptr, %dims: !llvm.ptr, %{x}: i64, %{y}: i64, %tid: i64, %smem: !llvm.ptr<3>) attributes {{passthrough = [\"alwaysinline\"]}} {{"
        ),
        1,
    )
}

/// The low 32 bits of an i64 (shared-memory addresses are 32-bit).
pub(crate) fn trunc32(b: &mut Builder, v: &Val) -> Val {
    b.op(format!("arith.trunci {v} : i64 to i32"))
}

/// The shared-memory address of byte `row * row_bytes + col_bytes + offset` from `smem`.
pub(crate) fn shared_address(
    b: &mut Builder,
    smem: &Val,
    row: &Val,
    col_bytes: &Val,
    row_bytes: usize,
    offset: &Val,
) -> Val {
    let crb = b.i64(row_bytes as i64);
    let at = b.muli(row, &crb);
    let at = b.addi(&at, col_bytes);
    let at = b.addi(&at, offset);
    let at = trunc32(b, &at);
    b.bin("addi", &at, smem, "i32")
}

/// A tile of `rows` rows of `per_row` 16-byte chunks, copied chunk by chunk by a block of
/// `threads` threads: thread `tid` takes chunks `tid + i threads` for `i` in
/// [`ChunkedTile::slots`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChunkedTile {
    pub rows: usize,
    pub per_row: usize,
    pub threads: usize,
}

impl ChunkedTile {
    fn chunks(&self) -> usize {
        self.rows * self.per_row
    }

    /// How many chunks each thread takes (the last only where `tid` is low enough).
    pub fn slots(&self) -> usize {
        self.chunks().div_ceil(self.threads)
    }

    /// The row and the chunk in the row of this thread's chunk of slot `i` (past the tile's
    /// end in the last slot, for threads [`ChunkedTile::for_slot`] leaves out).
    /// Where every slot covers whole rows, each thread's slots are consecutive rows (the
    /// threads of a row still read it whole, 16 bytes each): a thread's addresses differ
    /// from slot to slot by a row, a constant offset in one instruction.
    pub fn position(&self, b: &mut Builder, tid: &Val, i: usize) -> (Val, Val) {
        let per_row = b.i64(self.per_row as i64);
        if self.consecutive() {
            let row = b.divi(tid, &per_row);
            let slots = b.i64(self.slots() as i64);
            let row = b.muli(&row, &slots);
            let down = b.i64(i as i64);
            return (b.addi(&row, &down), b.remi(tid, &per_row));
        }
        let off = b.i64((i * self.threads) as i64);
        let chunk = b.addi(tid, &off);
        (b.divi(&chunk, &per_row), b.remi(&chunk, &per_row))
    }

    /// Whether each thread's slots are consecutive rows: slot `i` is slot 0's row plus `i`
    /// (where every slot covers whole rows; see [`ChunkedTile::position`]).
    pub fn consecutive(&self) -> bool {
        self.threads.is_multiple_of(self.per_row) && self.chunks().is_multiple_of(self.threads)
    }

    /// Runs `body(b, row, chunk in row)` for this thread's chunk of slot `i`, guarded when
    /// the tile has fewer chunks than threads in that slot.
    pub fn for_slot(
        &self,
        b: &mut Builder,
        tid: &Val,
        i: usize,
        body: impl FnOnce(&mut Builder, &Val, &Val),
    ) {
        let chunks = self.chunks();
        let emit = |b: &mut Builder| {
            let (row, col) = self.position(b, tid, i);
            body(b, &row, &col);
        };
        if (i + 1) * self.threads <= chunks {
            emit(b);
        } else {
            let off = b.i64((chunks - i * self.threads) as i64);
            let take = b.cmpi("slt", tid, &off, I64);
            b.if_then(&take, emit);
        }
    }
}

/// Stores this thread's chunk of slot `i` (four words) into the tile at byte `offset` of
/// shared memory, rows `row_bytes` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_chunk(
    b: &mut Builder,
    isa: Lowering,
    smem: &Val,
    tid: &Val,
    (tile, i): (ChunkedTile, usize),
    row_bytes: usize,
    offset: usize,
    words: &[Val],
) {
    tile.for_slot(b, tid, i, |b, row, col| {
        let c16 = b.i64(16);
        let col_bytes = b.muli(col, &c16);
        let offset = b.i64(offset as i64);
        let at = shared_address(b, smem, row, &col_bytes, row_bytes, &offset);
        isa.store_shared(b, &at, [&words[0], &words[1], &words[2], &words[3]]);
    });
}

/// The shared-memory address of element (`row`, `col`) of 16 bits of a tile at byte
/// `offset`, rows `row_bytes` apart.
pub(crate) fn element_address(
    b: &mut Builder,
    smem: &Val,
    (row, col): (&Val, &Val),
    row_bytes: usize,
    offset: usize,
) -> Val {
    let c2 = b.i64(2);
    let col_bytes = b.muli(col, &c2);
    let offset = b.i64(offset as i64);
    shared_address(b, smem, row, &col_bytes, row_bytes, &offset)
}

/// Eight f32 values from `base[at..at + 8]`: two 16-byte loads where `aligned`, else eight.
pub(crate) fn load8(b: &mut Builder, base: &Val, at: &Val, aligned: bool) -> Vec<Val> {
    if !aligned {
        return (0..8)
            .map(|e| {
                let ce = b.i64(e);
                let i = b.addi(at, &ce);
                b.load(base, &i, F32, F32)
            })
            .collect();
    }
    let v4 = vf32(4);
    let mut out = Vec::new();
    for part in 0..2 {
        let off = b.i64(4 * part);
        let i = b.addi(at, &off);
        let ptr = b.gep(base, &i, F32);
        let v = b.op(format!(
            "llvm.load {ptr} {{alignment = 16 : i64}} : !llvm.ptr -> {v4}"
        ));
        for lane in 0..4 {
            out.push(b.op(format!("vector.extract {v}[{lane}] : f32 from {v4}")));
        }
    }
    out
}

/// Eight f32 values rounded to 16 bits, as four words (each pair low half first).
pub(crate) fn pack8(b: &mut Builder, isa: Lowering, half: Half, values: &[Val]) -> Vec<Val> {
    values
        .chunks(2)
        .map(|pair| isa.pack(b, half, &pair[0], &pair[1]))
        .collect()
}

/// The PTX entry of a block function, in LLVM IR: `{name}_mma(buffers, dims)` on a grid of
/// blocks of `threads` threads, passing `(blockIdx.x, blockIdx.y)`, or with `reverse_x`
/// `(gridDim.x - 1 - blockIdx.x, blockIdx.y)` (the longest causal query tiles first).
pub(crate) fn entry_ir(name: &str, reverse_x: bool, threads: usize) -> String {
    let x = if reverse_x {
        "  %block = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
  %blocks = call i32 @llvm.nvvm.read.ptx.sreg.nctaid.x()
  %last = sub i32 %blocks, 1
  %x = sub i32 %last, %block"
    } else {
        "  %x = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()"
    };
    format!(
        "
@{name}_smem = external addrspace(3) global [0 x i8], align 16

define ptx_kernel void @{name}_mma(ptr %bufs, ptr %dims) \"nvvm.maxntid\"=\"{threads}\" {{
  %tid = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
{x}
  %y = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.y()
  %tid64 = zext i32 %tid to i64
  %x64 = zext i32 %x to i64
  %y64 = zext i32 %y to i64
  call void @{name}(ptr %bufs, ptr %dims, i64 %x64, i64 %y64, i64 %tid64, ptr addrspace(3) @{name}_smem)
  ret void
}}
"
    )
}

/// The loop over the slices of `K` that the tensor-core products share: `accumulators` f32
/// values (zero at first) and the words of the slice read ahead are carried. Each iteration
/// stores its slice into shared memory between two barriers (every warp is done with the
/// previous one before it is overwritten), reads the next slice into registers (slice 0 again
/// after the last, harmlessly) so that the reads overlap the products, and runs `multiply`
/// on the accumulators. Returns the final accumulators.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sliced_product(
    b: &mut Builder,
    isa: Lowering,
    slices: &Val,
    accumulators: usize,
    read: impl Fn(&mut Builder, &Val) -> Vec<Val>,
    store: impl Fn(&mut Builder, &[Val]),
    multiply: impl FnOnce(&mut Builder, Vec<Val>) -> Vec<Val>,
) -> Vec<Val> {
    let (c0, c1) = (b.i64(0), b.i64(1));
    let zero = b.f32(0.0);
    let first = read(b, &c0);
    let mut carried: Vec<(Val, String)> = (0..accumulators)
        .map(|_| (zero.clone(), F32.to_string()))
        .collect();
    carried.extend(first.iter().map(|v| (v.clone(), "i32".to_string())));
    let finals = b.for_range(&c0, slices, &c1, &carried, |b, kt, state| {
        let (acc, words) = state.split_at(accumulators);
        isa.barrier(b);
        store(b, words);
        isa.barrier(b);
        let next = b.addi(kt, &c1);
        let more = b.cmpi("slt", &next, slices, I64);
        let next = b.select(&more, &next, &c0, I64);
        let next_words = read(b, &next);
        let mut out = multiply(b, acc.to_vec());
        out.extend(next_words);
        out
    });
    finals[..accumulators].to_vec()
}
