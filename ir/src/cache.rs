//! The KV cache a mask needs at decode time, derived from the mask's support (see
//! [`Support`]): which keys a query at position `q` can ever see decides which keys must be
//! kept once every query up to `q` has been answered.
//!
//! Keys are kept in two regions of slots: a fixed prefix of `sinks` slots holding positions
//! `0..sinks` for ever, and after it either a ring of `ring` slots (position `p >= sinks` in
//! slot `sinks + (p - sinks) % ring`) or, for masks that can see arbitrarily far back, one
//! slot per position. Slots fill from the front, so after `n` tokens the first
//! `min(n, capacity)` slots are in use whatever the policy.
//!
//! - `k <= q` (global): every key, one slot per position.
//! - `k <= q && q - k < W` (sliding window): a ring of `W`.
//! - a window with attention sinks (`... || k < n`): `n` sink slots and a ring of `W`.
//! - `q / C == k / C` (chunked): a ring of `C`, the current chunk at most.
//!
//! Decoding is exact when every query the cache answers sees no key after it; masks that
//! show queries later keys up to a constant (`k < P` of a prefix-LM) need a prompt of at
//! least that many tokens, and masks that see arbitrarily far ahead (bidirectional) cannot
//! be decoded.

use std::fmt;

use crate::expr::Expr;
use crate::schedule::{self, Bound, KeyRange, Support};

/// What a layer's KV cache keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvPolicy {
    /// Slots for the first `sinks` positions, kept for ever.
    pub sinks: u64,
    /// Slots of the ring for positions from `sinks` on; `None`: one slot per position.
    pub ring: Option<u64>,
    /// The shortest prompt for which decoding after it equals a full forward pass: queries
    /// before this position may see later keys (a prefix-LM's prefix).
    pub min_prompt: u64,
}

/// A cache of some of an attention's KV heads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeadCache {
    pub policy: KvPolicy,
    /// The KV heads it holds, in order.
    pub kv_heads: Vec<usize>,
}

/// Why a mask cannot be decoded with a KV cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotCausal {
    pub support: String,
}

impl fmt::Display for NotCausal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "its queries see keys after them (keys {}): a KV cache cannot serve it, \
             generation needs a causal mask",
            self.support
        )
    }
}

impl KvPolicy {
    /// The cache for `mask`.
    pub fn of(mask: &Expr) -> Result<KvPolicy, NotCausal> {
        let support = Support::of(mask);
        let not_causal = || NotCausal {
            support: support.describe(),
        };
        let mut policy = KvPolicy {
            sinks: 0,
            ring: Some(0),
            min_prompt: 0,
        };
        for range in &support.ranges {
            let from = causal_from(range).ok_or_else(not_causal)?;
            policy.min_prompt = policy.min_prompt.max(from);
            match keeps(range) {
                Keep::Prefix(n) => policy.sinks = policy.sinks.max(n),
                Keep::Last(n) => policy.ring = policy.ring.map(|r| r.max(n)),
                Keep::All => policy.ring = None,
            }
        }
        Ok(policy.normalized())
    }

    /// The caches of an attention of `heads` query heads over `kv_heads` KV heads (each
    /// serving `heads / kv_heads` consecutive query heads): a KV head keeps what the masks
    /// of its query heads can see, and KV heads that keep the same keys share a cache. A
    /// mask that does not read `h` (or one with more heads than get schedules of their own,
    /// see [`schedule::per_head`]) gets one cache of every KV head. So a layer of streaming
    /// heads with one retrieval KV head keeps every key for that KV head only.
    pub fn by_kv_head(
        mask: &Expr,
        heads: usize,
        kv_heads: usize,
    ) -> Result<Vec<HeadCache>, NotCausal> {
        let grouped = kv_heads > 0 && heads.is_multiple_of(kv_heads);
        if !grouped || !schedule::per_head(mask, heads) {
            return Ok(vec![HeadCache {
                policy: KvPolicy::of(mask)?,
                kv_heads: (0..kv_heads).collect(),
            }]);
        }
        let group = heads / kv_heads;
        let mut of_head = vec![None; heads];
        for (m, of) in schedule::head_masks(mask, heads) {
            let policy = KvPolicy::of(&m)?;
            for h in of {
                of_head[h] = Some(policy);
            }
        }
        let mut caches: Vec<HeadCache> = Vec::new();
        for kv in 0..kv_heads {
            let policy = of_head[kv * group..(kv + 1) * group]
                .iter()
                .flatten()
                .fold(None, |acc: Option<KvPolicy>, p| {
                    Some(acc.map_or(*p, |a| a.union(p)))
                })
                .expect("every head has a mask");
            match caches.iter_mut().find(|c| c.policy == policy) {
                Some(cache) => cache.kv_heads.push(kv),
                None => caches.push(HeadCache {
                    policy,
                    kv_heads: vec![kv],
                }),
            }
        }
        Ok(caches)
    }

    /// What both caches keep.
    pub fn union(&self, other: &KvPolicy) -> KvPolicy {
        KvPolicy {
            sinks: self.sinks.max(other.sinks),
            ring: self.ring.zip(other.ring).map(|(a, b)| a.max(b)),
            min_prompt: self.min_prompt.max(other.min_prompt),
        }
        .normalized()
    }

    /// Every key leaves no sinks; a cache of sinks alone (or of nothing) keeps one slot of
    /// ring for the new token, which the decode step writes before it attends (its mask
    /// hides it where it must).
    fn normalized(mut self) -> KvPolicy {
        match self.ring {
            None => self.sinks = 0,
            Some(0) => self.ring = Some(1),
            Some(_) => {}
        }
        self
    }

    /// The slots the cache holds at most (`None`: as many as positions).
    pub fn capacity(&self) -> Option<u64> {
        self.ring.map(|r| self.sinks + r)
    }

    /// The slots in use after `tokens` tokens.
    pub fn used(&self, tokens: u64) -> u64 {
        match self.capacity() {
            Some(c) => tokens.min(c),
            None => tokens,
        }
    }

    /// The slot of position `p`.
    pub fn slot(&self, p: u64) -> u64 {
        match self.ring {
            None => p,
            Some(_) if p < self.sinks => p,
            Some(0) => self.sinks,
            Some(r) => self.sinks + (p - self.sinks) % r,
        }
    }
}

impl fmt::Display for KvPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.sinks, self.ring) {
            (_, None) => write!(f, "every key"),
            (0, Some(r)) => write!(f, "a ring of {r} keys"),
            (s, Some(1)) if s > 0 => write!(f, "the first {s} keys and the newest"),
            (s, Some(r)) => write!(f, "the first {s} keys and a ring of {r}"),
        }
    }
}

enum Keep {
    /// Keys `0..n`.
    Prefix(u64),
    /// The last `n` keys up to the query.
    Last(u64),
    All,
}

/// Which keys a range can still show to some later query.
fn keeps(range: &KeyRange) -> Keep {
    // A constant upper bound: only the first keys.
    let prefix = range
        .highs
        .iter()
        .filter_map(|h| match h {
            Bound::Linear { a: 0, d } => Some((*d).max(-1).saturating_add(1)),
            _ => None,
        })
        .min();
    if let Some(n) = prefix {
        return Keep::Prefix(n as u64);
    }
    // A lower bound that follows the query: the last keys.
    let last = range
        .lows
        .iter()
        .filter_map(|l| match l {
            Bound::Linear { a: 1, d } if *d <= 0 => Some(1i64.saturating_sub(*d)),
            Bound::Chunk { c, end: false } => Some(*c),
            _ => None,
        })
        .min();
    match last {
        Some(n) => Keep::Last(n as u64),
        None => Keep::All,
    }
}

/// The position from which no query sees a key after it through this range, or `None` when
/// there is none.
fn causal_from(range: &KeyRange) -> Option<u64> {
    range
        .highs
        .iter()
        .filter_map(|h| match h {
            Bound::Linear { a: 1, d } if *d <= 0 => Some(0),
            // Keys `<= d`: a prompt of `d + 1` tokens holds them all.
            Bound::Linear { a: 0, d } => Some((*d).max(-1).saturating_add(1) as u64),
            _ => None,
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::parse_expr;

    fn policy(mask: &str) -> Result<KvPolicy, NotCausal> {
        KvPolicy::of(&parse_expr(mask).unwrap())
    }

    #[test]
    fn global_keeps_every_key() {
        let p = policy("k <= q").unwrap();
        assert_eq!(p.ring, None);
        assert_eq!(p.capacity(), None);
        assert_eq!((p.slot(0), p.slot(1000)), (0, 1000));
    }

    #[test]
    fn window_keeps_a_ring() {
        let p = policy("k <= q && q - k < 32").unwrap();
        assert_eq!((p.sinks, p.ring), (0, Some(32)));
        assert_eq!((p.slot(31), p.slot(32), p.slot(70)), (31, 0, 6));
        assert_eq!((p.used(10), p.used(100)), (10, 32));
    }

    #[test]
    fn per_head_windows_keep_a_ring_of_the_widest() {
        let p = policy("k <= q && q - k < [8, 32, 16, 32][h % 4]").unwrap();
        assert_eq!((p.sinks, p.ring), (0, Some(32)));
        let p = policy("k <= q && (q - k < [8, 16][h] || k < [2, 4][h / 4])").unwrap();
        assert_eq!((p.sinks, p.ring), (4, Some(16)));
        // A head without sinks reads `k < 0`: no key, and no overflow.
        let p = policy("k <= q && (q - k < [8, 16][h] || k < [0, 3][h])").unwrap();
        assert_eq!((p.sinks, p.ring, p.min_prompt), (3, Some(16), 0));
        assert!(policy("k <= q && k <= 9223372036854775807").is_ok());
        assert!(policy("k <= q && q - k < 9223372036854775807").is_ok());
        assert!(policy("k <= q && q - k <= 9223372036854775807").is_ok());
        // A head that sees every key makes the cache keep every key.
        let p = policy("k <= q && ([0, 1][h] == 1 || q - k < 8)").unwrap();
        assert_eq!(p.ring, None);
        // A table read at a position is not split: every key, conservatively.
        let p = policy("k <= q && q - k < [8, 16][q % 2]").unwrap();
        assert_eq!(p.ring, None);
    }

    #[test]
    fn kv_heads_keep_what_their_query_heads_see() {
        let by_kv = |mask: &str, heads, kv_heads| {
            KvPolicy::by_kv_head(&parse_expr(mask).unwrap(), heads, kv_heads).unwrap()
        };
        let ring = |sinks, ring| KvPolicy {
            sinks,
            ring,
            min_prompt: 0,
        };
        // Retrieval query heads 0-1 and 4-5: KV heads 0 and 2 keep every key; KV head 1's
        // heads keep only the first four keys, and a slot for the new one.
        let caches = by_kv("k <= q && ([1, 1, 0, 0, 1, 1][h] == 1 || k < 4)", 6, 3);
        assert_eq!(caches.len(), 2);
        assert_eq!(
            (caches[0].policy.ring, &caches[0].kv_heads[..]),
            (None, &[0, 2][..])
        );
        assert_eq!(
            (caches[1].policy, &caches[1].kv_heads[..]),
            (ring(4, Some(1)), &[1][..])
        );
        // Per-head windows: a KV head keeps its widest head's window, with its sinks.
        let caches = by_kv(
            "k <= q && (q - k < [4, 12, 7, 9][h] || k < [0, 3, 1, 0][h])",
            4,
            2,
        );
        let got: Vec<_> = caches
            .iter()
            .map(|c| (c.policy, c.kv_heads.clone()))
            .collect();
        assert_eq!(
            got,
            [(ring(3, Some(12)), vec![0]), (ring(1, Some(9)), vec![1])]
        );
        // KV heads that keep the same keys share a cache; no `h`, one cache.
        let caches = by_kv("k <= q && q - k < [8, 8, 16, 8][h]", 4, 4);
        let got: Vec<_> = caches.iter().map(|c| c.kv_heads.clone()).collect();
        assert_eq!(got, [vec![0, 1, 3], vec![2]]);
        let caches = by_kv("k <= q && q - k < 8", 4, 2);
        assert_eq!(
            caches,
            [HeadCache {
                policy: ring(0, Some(8)),
                kv_heads: vec![0, 1]
            }]
        );
        // One head that sees keys after it refuses the layer.
        let mask = parse_expr("k <= q || [0, 1][h] == 1").unwrap();
        assert!(KvPolicy::by_kv_head(&mask, 2, 2).is_err());
    }

    #[test]
    fn a_cache_of_sinks_alone_keeps_a_slot_for_the_new_token() {
        let p = policy("k <= q && k < 4").unwrap();
        assert_eq!((p.sinks, p.ring, p.capacity()), (4, Some(1), Some(5)));
        assert_eq!((p.slot(3), p.slot(4), p.slot(9)), (3, 4, 4));
    }

    #[test]
    fn sinks_keep_a_prefix_and_a_ring() {
        let p = policy("k <= q && (q - k < 16 || k < 4)").unwrap();
        assert_eq!((p.sinks, p.ring, p.min_prompt), (4, Some(16), 0));
        assert_eq!((p.slot(3), p.slot(4), p.slot(20)), (3, 4, 4));
        assert_eq!(p.capacity(), Some(20));
    }

    #[test]
    fn chunks_keep_the_current_chunk() {
        let p = policy("k <= q && q / 8 == k / 8").unwrap();
        assert_eq!((p.sinks, p.ring), (0, Some(8)));
    }

    #[test]
    fn dilated_window_keeps_its_span() {
        let p = policy("k <= q && q - k < 8 * 2 && (q - k) % 2 == 0").unwrap();
        assert_eq!(p.ring, Some(16));
    }

    #[test]
    fn prefix_lm_needs_its_prefix_in_the_prompt() {
        let p = policy("k <= q || k < 10").unwrap();
        assert_eq!((p.ring, p.min_prompt), (None, 10));
    }

    #[test]
    fn bidirectional_masks_are_refused() {
        let error = policy("abs(q - k) <= 4").unwrap_err();
        assert!(error.to_string().contains("causal"), "{error}");
        assert!(policy("true").is_err());
    }
}
