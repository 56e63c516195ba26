//! KV caches for decoding: per attention layer, the keys and values its mask can still show
//! to a later query (see [`CacheSpec`]), in the layouts the decode kernel reads. Caches grow
//! as tokens come, doubling, a ring up to its sinks and ring slots: a window wider than any
//! context the model is run at costs what the tokens use, not the window.

use crate::buffer::Buffer;
use crate::plan::CacheSpec;

/// One layer's cache for `batch` rows.
pub struct KvCache {
    pub spec: CacheSpec,
    pub batch: usize,
    /// Keys `[S / block][B][KV][D][block]`, values `[S][B][KV][D]`, positions `i64 [S]`.
    pub keys: Buffer,
    pub values: Buffer,
    pub positions: Buffer,
    /// Slots allocated (a multiple of the block).
    slots: usize,
}

/// Words of slack after each buffer, as for every kernel buffer.
const SLACK_WORDS: usize = 64;

impl KvCache {
    pub fn new(spec: CacheSpec, batch: usize) -> KvCache {
        let mut cache = KvCache {
            spec,
            batch,
            keys: Buffer::default(),
            values: Buffer::default(),
            positions: Buffer::default(),
            slots: 0,
        };
        cache.reserve(cache.spec.slots_for(256));
        cache
    }

    fn row(&self) -> usize {
        self.batch * self.spec.kv_heads * self.spec.head_dim
    }

    /// Makes room for `slots` slots (keeping what is held).
    pub fn reserve(&mut self, slots: usize) {
        if slots <= self.slots {
            return;
        }
        let block = self.spec.block.max(1);
        // Doubling, so that growing slot by slot copies each slot a bounded number of
        // times; a ring never past its capacity (its slots are `slot(p) < sinks + ring`).
        let grown = slots.max(self.spec.slots_for(self.slots.saturating_mul(2)));
        let new_slots = grown.div_ceil(block) * block;
        let floats = new_slots * self.row();
        let mut keys = Buffer::zeroed(floats.div_ceil(2) + SLACK_WORDS);
        let mut values = Buffer::zeroed(floats.div_ceil(2) + SLACK_WORDS);
        let mut positions = Buffer::zeroed(new_slots + SLACK_WORDS);
        // Both layouts put the slot (block) outermost: what is held is a prefix.
        let held = self.slots * self.row();
        let held_words = held.div_ceil(2);
        keys[..held_words].copy_from_slice(&self.keys[..held_words]);
        values[..held_words].copy_from_slice(&self.values[..held_words]);
        for (i, p) in positions.iter_mut().enumerate() {
            *p = if i < self.slots {
                self.positions[i]
            } else {
                -1i64 as u64
            };
        }
        self.keys = keys;
        self.values = values;
        self.positions = positions;
        self.slots = new_slots;
    }

    /// Marks slot `slot` as holding position `position`.
    pub fn set_position(&mut self, slot: usize, position: usize) {
        self.positions[slot] = position as u64;
    }

    /// Writes the key and value of (batch row, KV head) at `slot`.
    pub fn write(&mut self, slot: usize, batch: usize, kv: usize, key: &[f32], value: &[f32]) {
        let (d, block) = (self.spec.head_dim, self.spec.block);
        let pair = batch * self.spec.kv_heads + kv;
        let key_base = ((slot / block) * self.batch * self.spec.kv_heads + pair) * d * block;
        let value_base = (slot * self.batch * self.spec.kv_heads + pair) * d;
        let keys = floats_mut(&mut self.keys);
        for (dd, &x) in key.iter().enumerate() {
            keys[key_base + dd * block + slot % block] = x;
        }
        floats_mut(&mut self.values)[value_base..value_base + d].copy_from_slice(value);
    }

    /// Bytes of keys and values held after `tokens` tokens.
    pub fn bytes(&self, tokens: usize) -> usize {
        self.spec.slots_for(tokens) * self.row() * 2 * 4
    }
}

fn floats_mut(buffer: &mut Buffer) -> &mut [f32] {
    let words: &mut [u64] = buffer;
    // SAFETY: f32 is less aligned than u64 and two fit in each word.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<f32>(), words.len() * 2) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ring: Option<usize>) -> CacheSpec {
        CacheSpec {
            kv_heads: 2,
            kv_heads_held: vec![0, 1],
            prefill_outputs: 0,
            head_dim: 4,
            sinks: 0,
            ring,
            min_prompt: 0,
            block: 8,
            layer: None,
        }
    }

    #[test]
    fn a_full_cache_grows_and_keeps_what_it_holds() {
        let mut cache = KvCache::new(spec(None), 1);
        for p in 0..300 {
            cache.reserve(p + 1);
            cache.set_position(p, p);
            cache.write(p, 0, 1, &[p as f32; 4], &[-(p as f32); 4]);
        }
        assert!(cache.slots >= 300 && cache.slots.is_multiple_of(8));
        assert_eq!(cache.positions[299] as i64, 299);
        assert_eq!(cache.positions[300] as i64, -1);
        let values = floats_mut(&mut cache.values);
        assert_eq!(values[(7 * 2 + 1) * 4], -7.0);
        let keys = floats_mut(&mut cache.keys);
        // Slot 9: block 1, lane 1; KV head 1, dim 2.
        assert_eq!(keys[(2 + 1) * 4 * 8 + 2 * 8 + 1], 9.0);
    }

    #[test]
    fn a_ring_grows_to_its_capacity_and_no_further() {
        let cache = KvCache::new(spec(Some(12)), 2);
        assert_eq!(cache.slots, 16);
        assert_eq!(cache.bytes(100), 12 * 2 * 2 * 4 * 8);
        assert_eq!(cache.bytes(5), 5 * 2 * 2 * 4 * 8);
        // A window of a trillion keys: room for what the tokens use, doubling up to it.
        let mut wide = KvCache::new(spec(Some(1 << 40)), 1);
        assert_eq!(wide.slots, 256);
        for p in 0..1000 {
            let slot = wide.spec.slot(p);
            wide.reserve(slot + 1);
            wide.set_position(slot, p);
        }
        assert_eq!(wide.slots, 1024);
        assert_eq!(wide.positions[999] as i64, 999);
        assert_eq!(wide.positions[1000] as i64, -1);
        // A ring of 300: 256, then its capacity (rounded to the block), not 512.
        let mut ring = KvCache::new(spec(Some(300)), 1);
        assert_eq!(ring.slots, 256);
        ring.reserve(257);
        assert_eq!(ring.slots, 304);
    }
}
