//! A small builder for MLIR text in the dialects kernels use: `func`, `scf` loops, `arith`,
//! `math`, `vector`, and `llvm` pointers for memory. Values are SSA names; every helper
//! emits one operation and returns its result.
//!
//! Kernels take raw pointers and do their own address arithmetic (`llvm.getelementptr`),
//! which keeps the calling convention one C signature for every kernel:
//! `void kernel(void **buffers, const int64_t *dims, int64_t first, int64_t last)`, running
//! programs `first..last` of the kernel's grid.

use std::fmt::Write;

/// An SSA value name (`%v12`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Val(pub String);

impl std::fmt::Display for Val {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub const I64: &str = "i64";
pub const F32: &str = "f32";
pub const I1: &str = "i1";
pub const PTR: &str = "!llvm.ptr";

/// `vector<nxf32>`.
pub fn vf32(n: usize) -> String {
    format!("vector<{n}xf32>")
}

/// `vector<nxi64>`.
pub fn vi64(n: usize) -> String {
    format!("vector<{n}xi64>")
}

/// `vector<nxi1>`.
pub fn vi1(n: usize) -> String {
    format!("vector<{n}xi1>")
}

/// The exact text of an f32 constant.
pub fn f32_literal(value: f32) -> String {
    format!("0x{:08X}", value.to_bits())
}

/// A function body being built.
pub struct Builder {
    lines: Vec<String>,
    indent: usize,
    counter: usize,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder::new()
    }
}

impl Builder {
    pub fn new() -> Builder {
        Builder {
            lines: Vec::new(),
            indent: 2,
            counter: 0,
        }
    }

    fn fresh(&mut self) -> Val {
        self.counter += 1;
        Val(format!("%v{}", self.counter))
    }

    /// Emits a line as is.
    pub fn line(&mut self, text: impl AsRef<str>) {
        let pad = "  ".repeat(self.indent);
        self.lines.push(format!("{pad}{}", text.as_ref()));
    }

    /// Emits `%v = rhs` and returns `%v`.
    pub fn op(&mut self, rhs: impl AsRef<str>) -> Val {
        let v = self.fresh();
        self.line(format!("{v} = {}", rhs.as_ref()));
        v
    }

    pub fn i64(&mut self, value: i64) -> Val {
        self.op(format!("arith.constant {value} : i64"))
    }

    pub fn f32(&mut self, value: f32) -> Val {
        self.op(format!("arith.constant {} : f32", f32_literal(value)))
    }

    pub fn bool(&mut self, value: bool) -> Val {
        self.op(format!("arith.constant {value}"))
    }

    /// A vector of `n` copies of a scalar.
    pub fn splat(&mut self, scalar: &Val, scalar_ty: &str, n: usize) -> Val {
        self.op(format!(
            "vector.broadcast {scalar} : {scalar_ty} to vector<{n}x{scalar_ty}>"
        ))
    }

    pub fn splat_f32(&mut self, value: f32, n: usize) -> Val {
        let s = self.f32(value);
        self.splat(&s, F32, n)
    }

    pub fn splat_i64(&mut self, value: i64, n: usize) -> Val {
        let s = self.i64(value);
        self.splat(&s, I64, n)
    }

    /// `[0, 1, ..., n - 1]` as i64 lanes.
    pub fn iota(&mut self, n: usize) -> Val {
        let items: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        self.op(format!(
            "arith.constant dense<[{}]> : vector<{n}xi64>",
            items.join(", ")
        ))
    }

    /// A binary arith op: `arith.{name} a, b : ty`.
    pub fn bin(&mut self, name: &str, a: &Val, b: &Val, ty: &str) -> Val {
        self.op(format!("arith.{name} {a}, {b} : {ty}"))
    }

    pub fn addi(&mut self, a: &Val, b: &Val) -> Val {
        self.bin("addi", a, b, I64)
    }

    pub fn subi(&mut self, a: &Val, b: &Val) -> Val {
        self.bin("subi", a, b, I64)
    }

    pub fn muli(&mut self, a: &Val, b: &Val) -> Val {
        self.bin("muli", a, b, I64)
    }

    pub fn mini(&mut self, a: &Val, b: &Val) -> Val {
        self.bin("minsi", a, b, I64)
    }

    pub fn maxi(&mut self, a: &Val, b: &Val) -> Val {
        self.bin("maxsi", a, b, I64)
    }

    /// `a / b` rounded down (for non-negative operands, plain division).
    pub fn divi(&mut self, a: &Val, b: &Val) -> Val {
        self.bin("floordivsi", a, b, I64)
    }

    pub fn remi(&mut self, a: &Val, b: &Val) -> Val {
        self.bin("remsi", a, b, I64)
    }

    /// `ceil(a / b)` for positive `b`.
    pub fn ceil_div(&mut self, a: &Val, b: &Val) -> Val {
        self.bin("ceildivsi", a, b, I64)
    }

    pub fn cmpi(&mut self, pred: &str, a: &Val, b: &Val, ty: &str) -> Val {
        self.op(format!("arith.cmpi {pred}, {a}, {b} : {ty}"))
    }

    pub fn cmpf(&mut self, pred: &str, a: &Val, b: &Val, ty: &str) -> Val {
        self.op(format!("arith.cmpf {pred}, {a}, {b} : {ty}"))
    }

    pub fn select(&mut self, cond: &Val, a: &Val, b: &Val, ty: &str) -> Val {
        let cond_ty = if ty.starts_with("vector<") {
            let n: String = ty
                .trim_start_matches("vector<")
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            format!("vector<{n}xi1>, ")
        } else {
            String::new()
        };
        self.op(format!("arith.select {cond}, {a}, {b} : {cond_ty}{ty}"))
    }

    pub fn fma(&mut self, a: &Val, b: &Val, c: &Val, ty: &str) -> Val {
        if ty.starts_with("vector") {
            self.op(format!("vector.fma {a}, {b}, {c} : {ty}"))
        } else {
            self.op(format!("math.fma {a}, {b}, {c} : {ty}"))
        }
    }

    pub fn sitofp(&mut self, a: &Val, from: &str, to: &str) -> Val {
        self.op(format!("arith.sitofp {a} : {from} to {to}"))
    }

    pub fn fptosi(&mut self, a: &Val, from: &str, to: &str) -> Val {
        self.op(format!("arith.fptosi {a} : {from} to {to}"))
    }

    /// RMSNorm's `1 / sqrt(sum / n + eps)` of a sum of `n` squares (f32 scalars).
    pub fn inverse_rms(&mut self, sum_of_squares: &Val, n: &Val, eps: f64) -> Val {
        let mean = self.bin("divf", sum_of_squares, n, F32);
        let e = self.f32(eps as f32);
        let shifted = self.bin("addf", &mean, &e, F32);
        self.op(format!("math.rsqrt {shifted} : f32"))
    }

    /// A horizontal reduction of a vector: `kind` is `add`, `maxnumf`, ...
    pub fn reduce(&mut self, kind: &str, v: &Val, vec_ty: &str, elem: &str) -> Val {
        self.op(format!(
            "vector.reduction <{kind}>, {v} : {vec_ty} into {elem}"
        ))
    }

    /// The `i`-th pointer of a pointer array.
    pub fn ptr_at(&mut self, base: &Val, index: usize) -> Val {
        let slot = self.op(format!(
            "llvm.getelementptr {base}[{index}] : (!llvm.ptr) -> !llvm.ptr, !llvm.ptr"
        ));
        self.op(format!("llvm.load {slot} : !llvm.ptr -> !llvm.ptr"))
    }

    /// The `i`-th value of an i64 array.
    pub fn i64_at(&mut self, base: &Val, index: usize) -> Val {
        let slot = self.op(format!(
            "llvm.getelementptr {base}[{index}] : (!llvm.ptr) -> !llvm.ptr, i64"
        ));
        self.op(format!("llvm.load {slot} : !llvm.ptr -> i64"))
    }

    /// `&base[index]` for elements of `elem`.
    pub fn gep(&mut self, base: &Val, index: &Val, elem: &str) -> Val {
        self.op(format!(
            "llvm.getelementptr {base}[{index}] : (!llvm.ptr, i64) -> !llvm.ptr, {elem}"
        ))
    }

    /// Loads a value of type `ty` (a scalar or a vector) from `base[index]`, where the
    /// array's elements are `elem`.
    pub fn load(&mut self, base: &Val, index: &Val, elem: &str, ty: &str) -> Val {
        let p = self.gep(base, index, elem);
        let align = if elem == "i8" {
            1
        } else if elem == I64 {
            8
        } else {
            4
        };
        self.op(format!(
            "llvm.load {p} {{alignment = {align} : i64}} : !llvm.ptr -> {ty}"
        ))
    }

    /// As [`Builder::load`], for an address the caller knows to be a multiple of `align`
    /// bytes (a vector load is then one instruction on a GPU, not one per element).
    pub fn load_aligned(
        &mut self,
        base: &Val,
        index: &Val,
        elem: &str,
        ty: &str,
        align: usize,
    ) -> Val {
        let p = self.gep(base, index, elem);
        self.op(format!(
            "llvm.load {p} {{alignment = {align} : i64}} : !llvm.ptr -> {ty}"
        ))
    }

    pub fn store(&mut self, value: &Val, base: &Val, index: &Val, elem: &str, ty: &str) {
        let p = self.gep(base, index, elem);
        let align = if elem == "i8" {
            1
        } else if elem == I64 {
            8
        } else {
            4
        };
        self.line(format!(
            "llvm.store {value}, {p} {{alignment = {align} : i64}} : {ty}, !llvm.ptr"
        ));
    }

    /// As [`Builder::store`], to an address the caller knows to be a multiple of `align`
    /// bytes.
    pub fn store_aligned(
        &mut self,
        value: &Val,
        base: &Val,
        index: &Val,
        (elem, ty): (&str, &str),
        align: usize,
    ) {
        let p = self.gep(base, index, elem);
        self.line(format!(
            "llvm.store {value}, {p} {{alignment = {align} : i64}} : {ty}, !llvm.ptr"
        ));
    }

    /// Asks the CPU to bring the cache line of `base[index]` towards the core (into the L2: the
    /// data is for a later tile, not the current one).
    pub fn prefetch(&mut self, base: &Val, index: &Val, elem: &str) {
        let p = self.gep(base, index, elem);
        self.line(format!(
            "\"llvm.intr.prefetch\"({p}) <{{cache = 1 : i32, hint = 2 : i32, rw = 0 : i32}}> : (!llvm.ptr) -> ()"
        ));
    }

    /// A stack array of `count` elements of `elem`, for per-program scratch.
    pub fn alloca(&mut self, count: usize, elem: &str) -> Val {
        let n = self.i64(count as i64);
        self.op(format!(
            "llvm.alloca {n} x {elem} {{alignment = 64 : i64}} : (i64) -> !llvm.ptr"
        ))
    }

    /// `for (i = lo; i < hi; i += step)` carrying `carried` values; `body` gets the induction
    /// variable and the carried values and returns the next carried values. Returns the
    /// final carried values.
    pub fn for_range(
        &mut self,
        lo: &Val,
        hi: &Val,
        step: &Val,
        carried: &[(Val, String)],
        body: impl FnOnce(&mut Builder, &Val, &[Val]) -> Vec<Val>,
    ) -> Vec<Val> {
        let iv = self.fresh();
        let args: Vec<Val> = carried.iter().map(|_| self.fresh()).collect();
        let results: Vec<Val> = carried.iter().map(|_| self.fresh()).collect();
        let mut head = String::new();
        if !results.is_empty() {
            let names: Vec<String> = results.iter().map(|r| r.0.clone()).collect();
            let _ = write!(head, "{} = ", names.join(", "));
        }
        let _ = write!(head, "scf.for {iv} = {lo} to {hi} step {step}");
        if !carried.is_empty() {
            let inits: Vec<String> = args
                .iter()
                .zip(carried)
                .map(|(a, (init, _))| format!("{a} = {init}"))
                .collect();
            let types: Vec<&str> = carried.iter().map(|(_, t)| t.as_str()).collect();
            let _ = write!(
                head,
                " iter_args({}) -> ({})",
                inits.join(", "),
                types.join(", ")
            );
        }
        let _ = write!(head, " : i64 {{");
        self.line(head);
        self.indent += 1;
        let next = body(self, &iv, &args);
        if !carried.is_empty() {
            let names: Vec<String> = next.iter().map(|v| v.0.clone()).collect();
            let types: Vec<&str> = carried.iter().map(|(_, t)| t.as_str()).collect();
            self.line(format!(
                "scf.yield {} : {}",
                names.join(", "),
                types.join(", ")
            ));
        }
        self.indent -= 1;
        self.line("}");
        results
    }

    /// `if cond { then }`.
    pub fn if_then(&mut self, cond: &Val, then: impl FnOnce(&mut Builder)) {
        self.line(format!("scf.if {cond} {{"));
        self.indent += 1;
        then(self);
        self.indent -= 1;
        self.line("}");
    }

    /// `if cond { then } else { otherwise }` producing values of `types`.
    pub fn if_else(
        &mut self,
        cond: &Val,
        types: &[String],
        then: impl FnOnce(&mut Builder) -> Vec<Val>,
        otherwise: impl FnOnce(&mut Builder) -> Vec<Val>,
    ) -> Vec<Val> {
        let results: Vec<Val> = types.iter().map(|_| self.fresh()).collect();
        let names: Vec<String> = results.iter().map(|r| r.0.clone()).collect();
        let prefix = if results.is_empty() {
            String::new()
        } else {
            format!("{} = ", names.join(", "))
        };
        let suffix = if types.is_empty() {
            String::new()
        } else {
            format!(" -> ({})", types.join(", "))
        };
        self.line(format!("{prefix}scf.if {cond}{suffix} {{"));
        self.indent += 1;
        let a = then(self);
        if !types.is_empty() {
            let names: Vec<String> = a.iter().map(|v| v.0.clone()).collect();
            self.line(format!(
                "scf.yield {} : {}",
                names.join(", "),
                types.join(", ")
            ));
        }
        self.indent -= 1;
        self.line("} else {");
        self.indent += 1;
        let b = otherwise(self);
        if !types.is_empty() {
            let names: Vec<String> = b.iter().map(|v| v.0.clone()).collect();
            self.line(format!(
                "scf.yield {} : {}",
                names.join(", "),
                types.join(", ")
            ));
        }
        self.indent -= 1;
        self.line("}");
        results
    }

    /// The function's text.
    pub fn finish(self, name: &str) -> String {
        let mut out = format!(
            "  func.func @{name}(%bufs: !llvm.ptr, %dims: !llvm.ptr, %first: i64, %last: i64) {{\n"
        );
        for line in &self.lines {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("    return\n  }\n");
        out
    }
}

/// The pointer to the kernel's buffer array, dims array and program range, as values.
#[derive(Clone, Debug)]
pub struct Entry {
    pub bufs: Val,
    pub dims: Val,
    pub first: Val,
    pub last: Val,
}

pub fn entry() -> Entry {
    Entry {
        bufs: Val("%bufs".into()),
        dims: Val("%dims".into()),
        first: Val("%first".into()),
        last: Val("%last".into()),
    }
}

/// Wraps kernel functions into a module.
pub fn module(functions: &[String]) -> String {
    let mut out = String::from("module {\n");
    for f in functions {
        out.push_str(f);
    }
    out.push_str("}\n");
    out
}
