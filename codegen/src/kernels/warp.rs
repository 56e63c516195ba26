//! The warp-level operations of the tensor-core kernels (`mma.sync`, `ldmatrix`, `cp.async`,
//! shuffles, barriers, and sm_90's warpgroup `wgmma`), in one of two lowerings:
//!
//! - [`Lowering::Ptx`]: inline PTX (`llvm.inline_asm`), what runs on the GPU;
//! - [`Lowering::Emulated`]: calls to the warp emulator's functions ([`crate::emulate`]), so
//!   that the very same kernel, compiled for the CPU, runs with one OS thread per GPU thread
//!   and is tested without a GPU.
//!
//! The kernel generators call only these; nothing else in a tensor-core kernel differs
//! between the two lowerings. Shared-memory addresses are 32-bit: on the GPU, addresses in
//! the shared window; emulated, byte offsets into the block's shared memory.

use super::attention_mma::Half;
use crate::mlir::{Builder, F32, Val};

/// A `wgmma` shared-memory matrix descriptor (64 bits): its low word, run-time (the start
/// address and the leading byte offset), and its high word, known when the kernel is built
/// (the stride byte offset; no base offset, no swizzling). Kept apart so that stepping
/// along a tile is one 32-bit add, and the high word a constant in the instruction.
#[derive(Clone, Debug)]
pub struct Descriptor {
    pub lo: Val,
    pub hi: u32,
}

impl Descriptor {
    /// The descriptor of the operand `bytes` further on (a multiple of 16): the start
    /// address field plus `bytes / 16`, which cannot carry into the next field, as shared
    /// memory (228 KiB at most) ends before the field's 256 KiB.
    pub fn plus(&self, b: &mut Builder, bytes: usize) -> Descriptor {
        debug_assert_eq!(bytes % 16, 0);
        if bytes == 0 {
            return self.clone();
        }
        let step = const_i32(b, (bytes / 16) as i64);
        Descriptor {
            lo: b.bin("addi", &self.lo, &step, "i32"),
            hi: self.hi,
        }
    }

    /// The descriptor as one i64.
    fn value(&self, b: &mut Builder) -> Val {
        let lo = b.op(format!("arith.extui {} : i32 to i64", self.lo));
        let hi = b.i64(i64::from(self.hi) << 32);
        b.bin("ori", &lo, &hi, "i64")
    }
}

/// Where a `wgmma` reads its A operand.
pub enum WgmmaA<'a> {
    /// A shared-memory matrix descriptor.
    Shared(&'a Descriptor),
    /// Four 32-bit registers per thread.
    Registers(&'a [Val]),
}

/// How the warp-level operations are lowered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lowering {
    Ptx,
    Emulated,
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
    let effects = if side_effects {
        "has_side_effects "
    } else {
        ""
    };
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

/// Calls an emulator function.
fn call(b: &mut Builder, name: &str, args: &[(&Val, &str)], result: Option<&str>) -> Option<Val> {
    let names: Vec<String> = args.iter().map(|(v, _)| v.0.clone()).collect();
    let types: Vec<&str> = args.iter().map(|(_, t)| *t).collect();
    let text = format!(
        "func.call @{name}({}) : ({}) -> {}",
        names.join(", "),
        types.join(", "),
        result.unwrap_or("()")
    );
    match result {
        Some(_) => Some(b.op(text)),
        None => {
            b.line(text);
            None
        }
    }
}

/// The emulator's results of the last multi-result operation, as `ty` (i32 or f32).
fn results(b: &mut Builder, n: usize, ty: &str) -> Vec<Val> {
    (0..n)
        .map(|i| {
            let index = b.op(format!("arith.constant {i} : i32"));
            let word = call(b, "zebra_emu_result", &[(&index, "i32")], Some("i32")).unwrap();
            if ty == "i32" {
                word
            } else {
                b.op(format!("arith.bitcast {word} : i32 to {ty}"))
            }
        })
        .collect()
}

fn const_i32(b: &mut Builder, v: i64) -> Val {
    b.op(format!("arith.constant {v} : i32"))
}

impl Lowering {
    /// `d = a * b + c` on one m16n8k16 tile: A in four registers, B in two, C and D in four
    /// f32.
    pub fn mma(self, b: &mut Builder, half: Half, a: &[Val], bf: [&Val; 2], c: &[Val]) -> Vec<Val> {
        let t = half.name();
        let args: Vec<(&Val, &str)> = a
            .iter()
            .map(|v| (v, "i32"))
            .chain(bf.iter().map(|v| (*v, "i32")))
            .chain(c.iter().map(|v| (v, F32)))
            .collect();
        match self {
            Lowering::Ptx => {
                let text = format!(
                    "mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{$0,$1,$2,$3}}, {{$4,$5,$6,$7}}, {{$8,$9}}, {{$10,$11,$12,$13}};"
                );
                asm(
                    b,
                    &text,
                    "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3",
                    &args,
                    &[F32, F32, F32, F32],
                    false,
                )
            }
            Lowering::Emulated => {
                call(b, &format!("zebra_emu_mma_{t}"), &args, None);
                results(b, 4, F32)
            }
        }
    }

    /// `count` (2 or 4) 8x8 matrices of 16-bit values from shared memory, transposed or not:
    /// lanes `8m..8m+8` give the addresses of matrix `m`'s rows.
    pub fn ldmatrix(self, b: &mut Builder, address: &Val, count: usize, trans: bool) -> Vec<Val> {
        match self {
            Lowering::Ptx => {
                let trans = if trans { ".trans" } else { "" };
                let regs: Vec<String> = (0..count).map(|i| format!("${i}")).collect();
                let constraints: Vec<&str> = (0..count).map(|_| "=r").collect();
                asm(
                    b,
                    &format!(
                        "ldmatrix.sync.aligned.m8n8.x{count}{trans}.shared.b16 {{{}}}, [${count}];",
                        regs.join(",")
                    ),
                    &format!("{},r", constraints.join(",")),
                    &[(address, "i32")],
                    &vec!["i32"; count],
                    true,
                )
            }
            Lowering::Emulated => {
                let n = const_i32(b, count as i64);
                let t = const_i32(b, i64::from(trans));
                call(
                    b,
                    "zebra_emu_ldmatrix",
                    &[(address, "i32"), (&n, "i32"), (&t, "i32")],
                    None,
                );
                results(b, count, "i32")
            }
        }
    }

    /// Two f32 values rounded to a pair of 16-bit values (`lo` in the low half).
    pub fn pack(self, b: &mut Builder, half: Half, lo: &Val, hi: &Val) -> Val {
        match self {
            Lowering::Ptx => {
                let text = format!("cvt.rn.{}x2.f32 $0, $2, $1;", half.name());
                asm(b, &text, "=r,f,f", &[(lo, F32), (hi, F32)], &["i32"], false).remove(0)
            }
            Lowering::Emulated => call(
                b,
                &format!("zebra_emu_pack_{}", half.name()),
                &[(lo, F32), (hi, F32)],
                Some("i32"),
            )
            .unwrap(),
        }
    }

    /// `2^x`, approximate, subnormal results flushed to zero.
    pub fn exp2(self, b: &mut Builder, x: &Val) -> Val {
        match self {
            Lowering::Ptx => asm(
                b,
                "ex2.approx.ftz.f32 $0, $1;",
                "=f,f",
                &[(x, F32)],
                &[F32],
                false,
            )
            .remove(0),
            Lowering::Emulated => call(b, "zebra_emu_exp2", &[(x, F32)], Some(F32)).unwrap(),
        }
    }

    /// `log2(x)`, approximate (`-inf` for 0).
    pub fn log2(self, b: &mut Builder, x: &Val) -> Val {
        match self {
            Lowering::Ptx => asm(
                b,
                "lg2.approx.ftz.f32 $0, $1;",
                "=f,f",
                &[(x, F32)],
                &[F32],
                false,
            )
            .remove(0),
            Lowering::Emulated => call(b, "zebra_emu_log2", &[(x, F32)], Some(F32)).unwrap(),
        }
    }

    /// The value of `x` in the thread whose lane differs from this one's in bit `mask`.
    pub fn shuffle_xor(self, b: &mut Builder, x: &Val, mask: u32) -> Val {
        match self {
            Lowering::Ptx => {
                let text = format!("shfl.sync.bfly.b32 $0, $1, {mask}, 31, 0xffffffff;");
                asm(b, &text, "=f,f", &[(x, F32)], &[F32], true).remove(0)
            }
            Lowering::Emulated => {
                let m = const_i32(b, i64::from(mask));
                call(b, "zebra_emu_shfl_xor", &[(x, F32), (&m, "i32")], Some(F32)).unwrap()
            }
        }
    }

    /// Waits for every thread of the block.
    pub fn barrier(self, b: &mut Builder) {
        match self {
            Lowering::Ptx => {
                asm(b, "bar.sync 0;", "", &[], &[], true);
            }
            Lowering::Emulated => {
                call(b, "zebra_emu_barrier", &[], None);
            }
        }
    }

    /// Starts copying 16 bytes from global memory `from` to shared memory `to` (`size` bytes
    /// read, 0 or 16, the rest zero-filled), in the thread's open copy group.
    pub fn cp_async(self, b: &mut Builder, to: &Val, from: &Val, size: &Val) {
        let args = [(to, "i32"), (from, "!llvm.ptr"), (size, "i32")];
        match self {
            Lowering::Ptx => {
                asm(
                    b,
                    "cp.async.cg.shared.global [$0], [$1], 16, $2;",
                    "r,l,r",
                    &args,
                    &[],
                    true,
                );
            }
            Lowering::Emulated => {
                call(b, "zebra_emu_cp_async", &args, None);
            }
        }
    }

    /// Stores four 32-bit words (16 bytes, aligned to 16) at shared address `address`.
    pub fn store_shared(self, b: &mut Builder, address: &Val, words: [&Val; 4]) {
        let args = [
            (address, "i32"),
            (words[0], "i32"),
            (words[1], "i32"),
            (words[2], "i32"),
            (words[3], "i32"),
        ];
        match self {
            Lowering::Ptx => {
                asm(
                    b,
                    "st.shared.v4.b32 [$0], {$1,$2,$3,$4};",
                    "r,r,r,r,r",
                    &args,
                    &[],
                    true,
                );
            }
            Lowering::Emulated => {
                call(b, "zebra_emu_st_shared", &args, None);
            }
        }
    }

    /// Stores one 32-bit word at shared address `address` (aligned to 4).
    pub fn store_shared32(self, b: &mut Builder, address: &Val, word: &Val) {
        let args = [(address, "i32"), (word, "i32")];
        match self {
            Lowering::Ptx => {
                asm(b, "st.shared.b32 [$0], $1;", "r,r", &args, &[], true);
            }
            Lowering::Emulated => {
                call(b, "zebra_emu_st_shared32", &args, None);
            }
        }
    }

    /// Loads one 32-bit word from shared address `address` (aligned to 4).
    pub fn load_shared32(self, b: &mut Builder, address: &Val) -> Val {
        match self {
            Lowering::Ptx => asm(
                b,
                "ld.shared.b32 $0, [$1];",
                "=r,r",
                &[(address, "i32")],
                &["i32"],
                true,
            )
            .remove(0),
            Lowering::Emulated => {
                call(b, "zebra_emu_ld_shared32", &[(address, "i32")], Some("i32")).unwrap()
            }
        }
    }

    /// Makes this thread's writes to shared memory (stores, landed `cp.async` copies)
    /// visible to the asynchronous proxy that `wgmma` reads shared memory through; a barrier
    /// after it makes them visible to every thread's `wgmma`.
    pub fn fence_proxy_async(self, b: &mut Builder) {
        match self {
            Lowering::Ptx => {
                asm(b, "fence.proxy.async.shared::cta;", "", &[], &[], true);
            }
            Lowering::Emulated => {
                call(b, "zebra_emu_fence_proxy_async", &[], None);
            }
        }
    }

    /// Orders the warpgroup's register accesses before the `wgmma`s that follow (needed
    /// before the first of a batch, whose accumulators or A registers other instructions
    /// wrote).
    pub fn wgmma_fence(self, b: &mut Builder) {
        match self {
            Lowering::Ptx => {
                asm(b, "wgmma.fence.sync.aligned;", "", &[], &[], true);
            }
            Lowering::Emulated => {
                call(b, "zebra_emu_wgmma_fence", &[], None);
            }
        }
    }

    /// Starts `d += a * b` on one m64nNk16 tile for the warpgroup (`n` = 8..256, a multiple
    /// of 8): A (64 x 16) from shared memory through a K-major descriptor or from four
    /// registers per thread (the layout of an `mma.m16n8k16` A fragment, warp `w` holding
    /// rows 16w..), B (16 x n) through a descriptor, K-major where `k_major_b`, else
    /// N-major; `acc` are the thread's `n / 2` f32 accumulators (per 8 columns `j`: rows g
    /// and g + 8 of the warp's 16, columns 8j + 2t and 8j + 2t + 1). The results are not to
    /// be read before [`Lowering::wgmma_wait`].
    pub fn wgmma(
        self,
        b: &mut Builder,
        half: Half,
        a: WgmmaA,
        b_desc: &Descriptor,
        k_major_b: bool,
        acc: &[Val],
    ) -> Vec<Val> {
        let n = acc.len() * 2;
        assert!(n.is_multiple_of(8) && (8..=256).contains(&n));
        let t = half.name();
        let one = const_i32(b, 1);
        match self {
            Lowering::Ptx => {
                // Descriptors as their low words (`r`), made whole in the instruction's
                // block with their high words as constants.
                let mut args: Vec<(&Val, &str)> = Vec::new();
                match &a {
                    WgmmaA::Shared(desc) => args.push((&desc.lo, "i32")),
                    WgmmaA::Registers(regs) => args.extend(regs.iter().map(|r| (r, "i32"))),
                }
                args.push((&b_desc.lo, "i32"));
                let m = acc.len();
                args.push((&one, "i32"));
                args.extend(acc.iter().map(|v| (v, F32)));
                let outs: Vec<String> = (0..m).map(|i| format!("${i}")).collect();
                let whole = |name: &str, at: usize, hi: u32| {
                    format!(
                        "cvt.u64.u32 {name}, ${at}; or.b64 {name}, {name}, {:#x};",
                        u64::from(hi) << 32
                    )
                };
                let (a_text, a_setup, a_constraints, next) = match &a {
                    WgmmaA::Shared(desc) => (
                        "da".to_string(),
                        whole("da", m, desc.hi),
                        "r".to_string(),
                        m + 1,
                    ),
                    WgmmaA::Registers(_) => (
                        format!("{{${},${},${},${}}}", m, m + 1, m + 2, m + 3),
                        String::new(),
                        "r,r,r,r".to_string(),
                        m + 4,
                    ),
                };
                let b_setup = whole("db", next, b_desc.hi);
                let trans_b = u8::from(!k_major_b);
                let trans = match &a {
                    WgmmaA::Shared(_) => format!("1, 1, 0, {trans_b}"),
                    WgmmaA::Registers(_) => format!("1, 1, {trans_b}"),
                };
                let text = format!(
                    "{{ .reg .pred p; .reg .b64 da, db; {a_setup} {b_setup} setp.ne.b32 p, ${}, 0; wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{t}.{t} {{{}}}, {a_text}, db, p, {trans}; }}",
                    next + 1,
                    outs.join(",")
                );
                let mut constraints: Vec<String> = vec!["=f".to_string(); m];
                constraints.push(a_constraints);
                constraints.push("r".into());
                constraints.push("r".into());
                constraints.extend((0..m).map(|i| i.to_string()));
                asm(b, &text, &constraints.join(","), &args, &vec![F32; m], true)
            }
            Lowering::Emulated => {
                for (i, v) in acc.iter().enumerate() {
                    let index = const_i32(b, i as i64);
                    call(b, "zebra_emu_wgmma_acc", &[(&index, "i32"), (v, F32)], None);
                }
                let zero = b.op("arith.constant 0 : i64");
                let none = const_i32(b, 0);
                let (desc, regs): (Val, [&Val; 4]) = match &a {
                    WgmmaA::Shared(desc) => (desc.value(b), [&none, &none, &none, &none]),
                    WgmmaA::Registers(r) => (zero, [&r[0], &r[1], &r[2], &r[3]]),
                };
                let b_desc = b_desc.value(b);
                let from_registers = const_i32(b, i64::from(matches!(a, WgmmaA::Registers(_))));
                let cn = const_i32(b, n as i64);
                let kind = const_i32(
                    b,
                    i64::from(half == Half::F16) | (i64::from(!k_major_b) << 1),
                );
                call(
                    b,
                    "zebra_emu_wgmma",
                    &[
                        (&kind, "i32"),
                        (&cn, "i32"),
                        (&from_registers, "i32"),
                        (&desc, "i64"),
                        (regs[0], "i32"),
                        (regs[1], "i32"),
                        (regs[2], "i32"),
                        (regs[3], "i32"),
                        (&b_desc, "i64"),
                    ],
                    None,
                );
                results(b, acc.len(), F32)
            }
        }
    }

    /// Closes the warpgroup's open batch of `wgmma`s.
    pub fn wgmma_commit(self, b: &mut Builder) {
        match self {
            Lowering::Ptx => {
                asm(b, "wgmma.commit_group.sync.aligned;", "", &[], &[], true);
            }
            Lowering::Emulated => {
                call(b, "zebra_emu_wgmma_commit", &[], None);
            }
        }
    }

    /// Waits until at most `pending` committed batches of `wgmma`s are in flight, and gives
    /// back `acc` (accumulators of finished batches) as readable values: they pass through
    /// the wait, so that no read of them is moved before it.
    pub fn wgmma_wait(self, b: &mut Builder, pending: u32, acc: &[Val]) -> Vec<Val> {
        self.wgmma_wait_keeping(b, pending, acc, &[]).0
    }

    /// The same, also passing `words` (i32: A registers of the finished products) through
    /// the wait, so that nothing overwrites them before it.
    pub fn wgmma_wait_keeping(
        self,
        b: &mut Builder,
        pending: u32,
        acc: &[Val],
        words: &[Val],
    ) -> (Vec<Val>, Vec<Val>) {
        self.wgmma_wait_at(b, pending, acc, words, None)
    }

    /// `wgmma_wait_keeping` where the wait must stay after the work before it: ptxas's
    /// scheduler otherwise moves a wait to the top of its basic block (the earliest point
    /// is always correct), which for a softmax written between a product's start and its
    /// wait puts the wait before the softmax and nothing runs beside the product. Here the
    /// wait sits in both arms of a branch on `index` (an i64 the same in every thread, e.g.
    /// a loop's index, compared with -1), which ptxas can neither resolve nor treat as
    /// divergent: the block boundary holds the wait in place.
    pub fn wgmma_wait_pinned(
        self,
        b: &mut Builder,
        pending: u32,
        acc: &[Val],
        words: &[Val],
        index: &Val,
    ) -> (Vec<Val>, Vec<Val>) {
        self.wgmma_wait_at(b, pending, acc, words, Some(index))
    }

    fn wgmma_wait_at(
        self,
        b: &mut Builder,
        pending: u32,
        acc: &[Val],
        words: &[Val],
        pin: Option<&Val>,
    ) -> (Vec<Val>, Vec<Val>) {
        match self {
            Lowering::Ptx => {
                let wait = format!("wgmma.wait_group.sync.aligned {pending};");
                let (m, w) = (acc.len(), words.len());
                let text = match pin {
                    None => wait,
                    Some(_) => format!(
                        "{{ .reg .pred p; setp.ne.s64 p, ${index}, -1; \
                         @p bra.uni $$Lzw${{:uid}}_a; {wait} bra.uni $$Lzw${{:uid}}_b; \
                         $$Lzw${{:uid}}_a: {wait} $$Lzw${{:uid}}_b: }}",
                        index = 2 * (m + w)
                    ),
                };
                let mut constraints: Vec<String> = vec!["=f".to_string(); m];
                constraints.extend(vec!["=r".to_string(); w]);
                constraints.extend((0..m + w).map(|i| i.to_string()));
                let mut args: Vec<(&Val, &str)> = acc.iter().map(|v| (v, F32)).collect();
                args.extend(words.iter().map(|v| (v, "i32")));
                if let Some(index) = pin {
                    constraints.push("l".to_string());
                    args.push((index, "i64"));
                }
                let mut types = vec![F32; m];
                types.extend(vec!["i32"; w]);
                let mut out = asm(b, &text, &constraints.join(","), &args, &types, true);
                let kept = out.split_off(m);
                (out, kept)
            }
            Lowering::Emulated => {
                let n = const_i32(b, i64::from(pending));
                call(b, "zebra_emu_wgmma_wait", &[(&n, "i32")], None);
                (acc.to_vec(), words.to_vec())
            }
        }
    }

    /// Closes the thread's open copy group.
    pub fn commit(self, b: &mut Builder) {
        match self {
            Lowering::Ptx => {
                asm(b, "cp.async.commit_group;", "", &[], &[], true);
            }
            Lowering::Emulated => {
                call(b, "zebra_emu_commit", &[], None);
            }
        }
    }

    /// Waits for every committed copy group of the thread.
    pub fn wait_copies(self, b: &mut Builder) {
        self.wait_copies_but(b, 0);
    }

    /// Waits for the thread's committed copy groups but the `pending` newest.
    pub fn wait_copies_but(self, b: &mut Builder, pending: u32) {
        match self {
            Lowering::Ptx => {
                let text = format!("cp.async.wait_group {pending};");
                asm(b, &text, "", &[], &[], true);
            }
            Lowering::Emulated => {
                let n = const_i32(b, i64::from(pending));
                call(b, "zebra_emu_wait", &[(&n, "i32")], None);
            }
        }
    }
}
