//! The warp-level operations of the tensor-core kernels (`mma.sync`, `ldmatrix`, `cp.async`,
//! shuffles, barriers), in one of two lowerings:
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
        match self {
            Lowering::Ptx => {
                asm(b, "cp.async.wait_group 0;", "", &[], &[], true);
            }
            Lowering::Emulated => {
                let none = const_i32(b, 0);
                call(b, "zebra_emu_wait", &[(&none, "i32")], None);
            }
        }
    }
}
