//! Tensor types: element types and shapes whose batch and sequence dimensions stay symbolic.

use std::fmt;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    I64,
    Bool,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        match name {
            "f32" => Some(DType::F32),
            "i64" => Some(DType::I64),
            "bool" => Some(DType::Bool),
            _ => None,
        }
    }

    pub fn is_float(self) -> bool {
        self == DType::F32
    }
}

/// A symbolic dimension, bound when a graph runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sym {
    /// The batch size `B`.
    Batch,
    /// The sequence length `T`.
    Seq,
}

impl Sym {
    pub fn name(self) -> &'static str {
        match self {
            Sym::Batch => "B",
            Sym::Seq => "T",
        }
    }

    pub fn from_name(name: &str) -> Option<Sym> {
        match name {
            "B" => Some(Sym::Batch),
            "T" => Some(Sym::Seq),
            _ => None,
        }
    }
}

/// One dimension of a shape: a constant, a symbol, or the number of blocks of a given size
/// that cover a symbol (`T/64` is `ceil(T / 64)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Const(u64),
    Sym(Sym),
    Blocks(Sym, u32),
}

impl Dim {
    pub const ONE: Dim = Dim::Const(1);
    pub const B: Dim = Dim::Sym(Sym::Batch);
    pub const T: Dim = Dim::Sym(Sym::Seq);

    pub fn as_const(self) -> Option<u64> {
        match self {
            Dim::Const(n) => Some(n),
            Dim::Sym(_) | Dim::Blocks(..) => None,
        }
    }

    /// The concrete size of this dimension under `bindings`.
    pub fn resolve(self, bindings: &Bindings) -> usize {
        let sym = |s: Sym| match s {
            Sym::Batch => bindings.batch,
            Sym::Seq => bindings.seq,
        };
        match self {
            Dim::Const(n) => n as usize,
            Dim::Sym(s) => sym(s),
            Dim::Blocks(s, block) => sym(s).div_ceil(block.max(1) as usize),
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Const(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s.name()),
            Dim::Blocks(s, block) => write!(f, "{}/{block}", s.name()),
        }
    }
}

/// Values of the symbolic dimensions for one run of a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bindings {
    pub batch: usize,
    pub seq: usize,
}

/// A shape: a list of dimensions, outermost first.
pub type Shape = Vec<Dim>;

/// Writes a shape as `[B, T, 64]`.
pub fn fmt_shape(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

/// Resolves every dimension of `shape` under `bindings`.
pub fn resolve_shape(shape: &[Dim], bindings: &Bindings) -> Vec<usize> {
    shape.iter().map(|d| d.resolve(bindings)).collect()
}

/// Broadcasts two shapes numpy-style (right-aligned; a 1 stretches to the other size).
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = (i + a.len()).checked_sub(rank).map_or(Dim::ONE, |j| a[j]);
        let db = (i + b.len()).checked_sub(rank).map_or(Dim::ONE, |j| b[j]);
        let d = if da == db || db == Dim::ONE {
            da
        } else if da == Dim::ONE {
            db
        } else {
            return None;
        };
        out.push(d);
    }
    Some(out)
}

/// Whether two shapes hold the same number of elements for every value of the symbols.
pub fn same_volume(a: &[Dim], b: &[Dim]) -> bool {
    fn split(shape: &[Dim]) -> (Option<u64>, Vec<Dim>) {
        let mut product: Option<u64> = Some(1);
        let mut syms = Vec::new();
        for d in shape {
            match d {
                Dim::Const(n) => product = product.and_then(|p| p.checked_mul(*n)),
                symbolic => syms.push(*symbolic),
            }
        }
        syms.sort();
        (product, syms)
    }
    let (pa, sa) = split(a);
    let (pb, sb) = split(b);
    pa.is_some() && pa == pb && sa == sb
}

/// The type of a tensor value: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl Into<Shape>) -> TensorType {
        TensorType {
            dtype,
            shape: shape.into(),
        }
    }

    pub fn f32(shape: impl Into<Shape>) -> TensorType {
        TensorType::new(DType::F32, shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype.name(), fmt_shape(&self.shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_follows_numpy() {
        let c = Dim::Const;
        assert_eq!(
            broadcast_shapes(&[Dim::B, Dim::T, c(1)], &[c(64)]),
            Some(vec![Dim::B, Dim::T, c(64)])
        );
        assert_eq!(broadcast_shapes(&[Dim::T], &[c(3)]), None);
        assert_eq!(
            broadcast_shapes(
                &[c(1), c(1), Dim::T, Dim::T],
                &[Dim::B, c(4), Dim::T, Dim::T]
            ),
            Some(vec![Dim::B, c(4), Dim::T, Dim::T])
        );
    }

    #[test]
    fn volume_compares_constants_and_symbols() {
        let c = Dim::Const;
        assert!(same_volume(
            &[Dim::B, Dim::T, c(64)],
            &[Dim::B, Dim::T, c(4), c(16)]
        ));
        assert!(!same_volume(&[Dim::B, Dim::T, c(64)], &[Dim::B, c(64)]));
        assert!(!same_volume(&[c(6)], &[c(4)]));
    }
}
