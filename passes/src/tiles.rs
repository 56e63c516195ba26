//! Tile sizes of fused attentions: the target's defaults, overridden per attention by a table
//! that the caller supplies (the tuning database's entries for this machine, which `zebra
//! tune` measures).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use zebra_ir::Expr;
use zebra_ir::op::AttentionKernel;
use zebra_ir::schedule::keys_per_query;

use crate::target::Target;

/// Tile sizes of the fused attention: queries and keys per tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Blocks {
    pub block_q: u64,
    pub block_k: u64,
}

impl fmt::Display for Blocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.block_q, self.block_k)
    }
}

/// The tile sizes an attention with `mask` gets by default. On GPUs, the target's. On the CPU
/// the target's 64 x 64 too, unless the mask shows each query a band of keys that does not
/// grow with the sequence (a window, a chunk, sinks) and those tiles would visit many keys
/// it hides: then the largest tiles, of 32 or 64 each way, that visit at most an eighth more
/// keys per query than the fewest any of them visits (on average, far from the start). A
/// window of 32 gets 32 x 32 tiles (64 keys visited per query, where 64 x 64 tiles visit
/// 128; measured 1.2 to 1.5 times as fast at T = 8192); a window of 512 keeps 64 x 64 (576
/// keys against 32 x 32's 544, and as fast). A mask that reads `h` counts the keys of each of
/// its `heads`' own schedules, on average.
pub fn default_blocks(target: Target, mask: &Expr, heads: usize) -> Blocks {
    let (block_q, block_k) = target.attention_blocks();
    let defaults = Blocks { block_q, block_k };
    if target != Target::Cpu {
        return defaults;
    }
    let candidates = [(64, 64), (64, 32), (32, 64), (32, 32)];
    let visited: Vec<(Blocks, f64)> = candidates
        .into_iter()
        .filter_map(|(block_q, block_k)| {
            let keys = keys_per_query(mask, heads, block_q, block_k)?;
            Some((
                Blocks {
                    block_q: block_q as u64,
                    block_k: block_k as u64,
                },
                keys,
            ))
        })
        .collect();
    let Some(fewest) = visited.iter().map(|&(_, keys)| keys).reduce(f64::min) else {
        return defaults;
    };
    // The first (largest) candidate within an eighth of the fewest.
    visited
        .into_iter()
        .find(|&(_, keys)| keys <= fewest * 1.125)
        .map_or(defaults, |(blocks, _)| blocks)
}

/// What an attention's best tile sizes depend on: what it computes and its shape, not its
/// name, its scale, its tile sizes or where it was written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttentionKey {
    /// The mask in the IR's text form (parameters substituted).
    pub mask: String,
    /// The score modifier in the IR's text form.
    pub score: Option<String>,
    /// The side inputs the mask and score read.
    pub sides: Vec<String>,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
}

impl AttentionKey {
    pub fn of(kernel: &AttentionKernel) -> AttentionKey {
        AttentionKey {
            mask: kernel.mask.to_string(),
            score: kernel.score.as_ref().map(ToString::to_string),
            sides: kernel.sides.clone(),
            heads: kernel.heads,
            kv_heads: kernel.kv_heads,
            head_dim: kernel.head_dim,
        }
    }
}

impl fmt::Display for AttentionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mask `{}`", self.mask)?;
        if let Some(score) = &self.score {
            write!(f, ", score `{score}`")?;
        }
        write!(
            f,
            ", {} heads ({} KV), head dim {}",
            self.heads, self.kv_heads, self.head_dim
        )
    }
}

/// Tile sizes chosen per attention, over the target's defaults. Cheap to clone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TileTable(Arc<BTreeMap<AttentionKey, Blocks>>);

impl TileTable {
    pub fn new(entries: impl IntoIterator<Item = (AttentionKey, Blocks)>) -> TileTable {
        TileTable(Arc::new(entries.into_iter().collect()))
    }

    /// The tile sizes chosen for the attention `kernel` computes, if any.
    pub fn get(&self, kernel: &AttentionKernel) -> Option<Blocks> {
        self.0.get(&AttentionKey::of(kernel)).copied()
    }

    /// The tile sizes of `kernel`: the chosen ones, else `defaults`.
    pub fn blocks(&self, kernel: &AttentionKernel, defaults: Blocks) -> Blocks {
        self.get(kernel).unwrap_or(defaults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zebra_ir::expr::parse_expr;

    fn kernel(mask: &str, head_dim: u64) -> AttentionKernel {
        AttentionKernel {
            name: "local".into(),
            mask: parse_expr(mask).unwrap(),
            score: None,
            sides: vec![],
            scale: 0.125,
            heads: 8,
            kv_heads: 2,
            head_dim,
            block_q: 64,
            block_k: 64,
            merge_heads: false,
            loc: None,
        }
    }

    #[test]
    fn narrow_bands_of_keys_get_smaller_tiles_on_the_cpu() {
        let blocks = |mask: &str, target| {
            let b = default_blocks(target, &parse_expr(mask).unwrap(), 8);
            (b.block_q, b.block_k)
        };
        for (mask, tiles) in [
            // Keys growing with T: the target's tiles.
            ("k <= q", (64, 64)),
            ("true", (64, 64)),
            ("k <= q || k < 100", (64, 64)),
            ("k <= q && doc[q] == doc[k]", (64, 64)),
            // Wide bands: 64 x 64 visits little more than any other.
            ("k <= q && q - k < 512", (64, 64)),
            ("k <= q && q - k < 4096", (64, 64)),
            ("k <= q && q / 8192 == k / 8192", (64, 64)),
            ("k <= q && q - k < 256", (64, 64)),
            // Narrow ones: fewer keys visited per query.
            ("k <= q && q - k < 128", (32, 32)),
            ("k <= q && q - k < 32", (32, 32)),
            ("k <= q && (q - k < 16 || k < 4)", (32, 32)),
            ("abs(q - k) <= 64", (32, 32)),
            ("k <= q && q / 16 == k / 16", (32, 32)),
            // Per-head windows: their heads' own keys, on average.
            ("k <= q && q - k < [256, 128, 64, 32][h % 4]", (32, 32)),
            ("k <= q && q - k < [4096, 512][h % 2]", (64, 64)),
            ("k <= q && (q - k < [256, 32][h % 2] || h > 3)", (64, 64)),
        ] {
            assert_eq!(blocks(mask, Target::Cpu), tiles, "{mask}");
        }
        assert_eq!(blocks("k <= q && q - k < 32", Target::Sm80), (128, 64));
        assert_eq!(blocks("k <= q && q - k < 32", Target::Sm90), (128, 128));
    }

    #[test]
    fn a_table_matches_what_an_attention_computes_not_its_name_or_tiles() {
        let chosen = Blocks {
            block_q: 32,
            block_k: 128,
        };
        let defaults = Blocks {
            block_q: 64,
            block_k: 64,
        };
        let local = kernel("k <= q && q - k < 512", 64);
        let table = TileTable::new([(AttentionKey::of(&local), chosen)]);
        let renamed = AttentionKernel {
            name: "other".into(),
            scale: 1.0,
            block_q: 16,
            merge_heads: true,
            ..local.clone()
        };
        assert_eq!(table.blocks(&renamed, defaults), chosen);
        // Another window, head dim or score modifier is another attention.
        let wider = kernel("k <= q && q - k < 1024", 64);
        assert_eq!(table.blocks(&wider, defaults), defaults);
        assert_eq!(
            table.blocks(&kernel("k <= q && q - k < 512", 128), defaults),
            defaults
        );
        let capped = AttentionKernel {
            score: Some(parse_expr("50.0 * tanh(score / 50.0)").unwrap()),
            ..local
        };
        assert_eq!(table.get(&capped), None);
        assert_eq!(
            AttentionKey::of(&capped).to_string(),
            "mask `k <= q && q - k < 512`, score `50.0 * tanh(score / 50.0)`, 8 heads (2 KV), head dim 64"
        );
    }
}
