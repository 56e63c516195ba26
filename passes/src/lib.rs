//! Zebra's optimizer: equality saturation over the graph IR with egg. It recognizes attention
//! written the plain way and fuses it into one block-sparse attention op, fuses the norms,
//! residuals and activations around the projections, shares the work of identical layers,
//! and extracts the cheapest graph under a target's cost model.

pub mod autodiff;
pub mod cost;
pub mod diagnose;
pub mod lang;
pub mod pipeline;
pub mod rules;
pub mod saturate;
pub mod share;
pub mod target;
pub mod tiles;

pub use pipeline::{Optimized, Options, optimize};
pub use target::Target;
pub use tiles::{AttentionKey, Blocks, TileTable};
