//! Zebra's graph IR: a tensor dataflow graph on petgraph with symbolic batch and sequence
//! dimensions, a stable text form, a verifier, Graphviz output and the reference interpreter.

pub mod attention;
pub mod cache;
pub mod dot;
pub mod expr;
pub mod graph;
pub mod interp;
pub mod interval;
pub mod memory;
pub mod npy;
pub mod op;
pub mod parse;
pub mod print;
pub mod rope;
pub mod schedule;
pub mod types;
pub mod verify;
pub mod weights;

pub use expr::{Expr, Var};
pub use graph::{Graph, LayerInfo, Loc, Node, NodeId};
pub use interp::{InterpError, Value, interpret};
pub use op::{BinaryOp, Op, ReduceOp, UnaryOp};
pub use parse::{ParseError, parse_graph};
pub use print::print_graph;
pub use types::{Bindings, DType, Dim, Shape, Sym, TensorType};
pub use verify::{VerifyError, VerifyErrors, verify};
pub use weights::Weights;
