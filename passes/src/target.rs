//! Target descriptions: what the cost model and the tile sizes depend on.

use std::fmt;
use std::str::FromStr;

/// A machine to compile for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The host CPU (x86-64 with AVX-512 or AVX2, or AArch64).
    Cpu,
    /// NVIDIA Ampere (A100).
    Sm80,
    /// NVIDIA Hopper (H100).
    Sm90,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::Cpu, Target::Sm80, Target::Sm90];

    pub fn name(self) -> &'static str {
        match self {
            Target::Cpu => "cpu",
            Target::Sm80 => "sm_80",
            Target::Sm90 => "sm_90",
        }
    }

    /// Peak arithmetic rate, in FLOP/s, of the precision kernels run in (f32 on the CPU;
    /// bf16 with f32 accumulation on tensor cores).
    pub fn peak_flops(self) -> f64 {
        match self {
            // Two cores with AVX-512 FMA, as measured for an f32 matmul here (~190 GFLOP/s).
            Target::Cpu => 190e9,
            Target::Sm80 => 312e12,
            Target::Sm90 => 989e12,
        }
    }

    /// Memory bandwidth, in bytes per second.
    pub fn bandwidth(self) -> f64 {
        match self {
            Target::Cpu => 20e9,
            Target::Sm80 => 2.0e12,
            Target::Sm90 => 3.35e12,
        }
    }

    /// The default tile sizes `(block_q, block_k)` of the fused attention; on the CPU,
    /// narrow bands of keys get smaller ones (`tiles::default_blocks`). A tile table
    /// (`Options::tiles`, from the tuning database that `zebra tune` writes) overrides them
    /// per attention.
    pub fn attention_blocks(self) -> (u64, u64) {
        match self {
            Target::Cpu => (64, 64),
            Target::Sm80 => (128, 64),
            Target::Sm90 => (128, 128),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Target, String> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == text || t.name().replace('_', "") == text)
            .ok_or_else(|| format!("unknown target `{text}`; the targets are cpu, sm_80 and sm_90"))
    }
}
