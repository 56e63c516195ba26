//! What is checked of a tensor-core attention kernel, wherever it ran (on a GPU through
//! CUDA, or on the CPU through the warp emulator): random 16-bit inputs, the tile schedule
//! built from the mask, the visible score elements, and an f64 reference of sampled output
//! rows computed from the same 16-bit inputs.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zebra_ir::Var;
use zebra_ir::expr::{Env, Expr, Scalar, parse_expr};
use zebra_ir::schedule::Support;

use crate::artifact::AttentionEntry;
use crate::cpu::{BuiltSchedule, RuntimeError, build_schedule, words_of_i64};
use crate::plan::ScheduleSpec;

/// The check's tolerance, `(atol, rtol)`: about two units in the last place of the 16-bit
/// output, plus the rounding of the probabilities to 16 bits before `P V`.
pub fn tolerance(dtype: &str) -> (f64, f64) {
    match dtype {
        "f16" => (2e-3, 4e-3),
        _ => (1e-2, 2e-2),
    }
}

/// The nearest bf16 of an f32 (ties to even), as bits.
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

pub fn bf16_value(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// The nearest IEEE half of an f32 (ties to even), as bits.
pub fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rounded = (m + half - 1 + ((m >> shift) & 1)) >> shift;
        return sign | rounded as u16;
    }
    let rounded = man + 0xfff + ((man >> 13) & 1);
    let (e, m) = if rounded & 0x80_0000 != 0 {
        (e + 1, 0)
    } else {
        (e, rounded >> 13)
    };
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    sign | ((e as u16) << 10) | m as u16
}

pub fn f16_value(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = i32::from((h >> 10) & 0x1f);
    let m = f32::from(h & 0x3ff);
    match e {
        0 => sign * m * (2f32).powi(-24),
        0x1f if m == 0.0 => sign * f32::INFINITY,
        0x1f => f32::NAN,
        _ => sign * (1.0 + m / 1024.0) * (2f32).powi(e - 15),
    }
}

/// Rounds an f32 to a 16-bit type, and reads one back.
pub type Codec = (fn(f32) -> u16, fn(u16) -> f32);

/// The 16-bit codec of an artifact's dtype.
pub fn codec(dtype: &str) -> Result<Codec, RuntimeError> {
    match dtype {
        "bf16" => Ok((bf16_bits, bf16_value)),
        "f16" => Ok((f16_bits, f16_value)),
        other => Err(RuntimeError::Cuda(format!(
            "the artifact's dtype `{other}` is neither bf16 nor f16"
        ))),
    }
}

/// The side inputs of a run: every side input holds the document id of four equal
/// documents, `4 t / T`.
fn side_values(batch: usize, seq: usize) -> Vec<i64> {
    (0..batch)
        .flat_map(|_| (0..seq).map(move |t| (4 * t / seq.max(1)) as i64))
        .collect()
}

struct At<'a> {
    q: i64,
    k: i64,
    h: i64,
    b: i64,
    score: f64,
    sides: &'a [(String, Vec<i64>)],
    seq: usize,
}

impl Env for At<'_> {
    fn var(&self, v: Var) -> Scalar {
        match v {
            Var::Q => Scalar::Int(self.q),
            Var::K => Scalar::Int(self.k),
            Var::H => Scalar::Int(self.h),
            Var::B => Scalar::Int(self.b),
            Var::Score => Scalar::Float(self.score),
        }
    }

    fn side(&self, name: &str, index: Var) -> i64 {
        let at = match index {
            Var::K => self.k,
            _ => self.q,
        };
        self.sides
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, values)| values.get(self.b as usize * self.seq + at as usize))
            .copied()
            .unwrap_or(0)
    }
}

fn visible_at(mask: &Expr, at: &At) -> bool {
    matches!(mask.eval(at), Scalar::Bool(true))
}

/// The inputs of one kernel's run, and the checks of its output.
pub struct AttentionCase {
    pub batch: usize,
    pub seq: usize,
    /// `[B, H, T, D]`, `[B, KV, T, D]`, `[B, KV, T, D]`, 16-bit.
    pub q: Vec<u16>,
    pub k: Vec<u16>,
    pub v: Vec<u16>,
    sides: Vec<(String, Vec<i64>)>,
    side_buffers: Vec<crate::buffer::Buffer>,
    built: BuiltSchedule,
    mask: Expr,
    score: Option<Expr>,
    decode: fn(u16) -> f32,
}

impl AttentionCase {
    /// Random inputs (uniform, variance 1) for `kernel` at `batch` rows of `seq` tokens, and
    /// its tile schedule.
    pub fn new(
        kernel: &AttentionEntry,
        dtype: &str,
        batch: usize,
        seq: usize,
        seed: u64,
    ) -> Result<AttentionCase, RuntimeError> {
        let (encode, decode) = codec(dtype)?;
        if seq == 0 || batch == 0 {
            return Err(RuntimeError::Empty);
        }
        let (b, t, d) = (batch, seq, kernel.head_dim);
        let (h, kv) = (kernel.heads, kernel.kv_heads);
        // Q, K and V, and the output beside them, 2 bytes an element.
        let bytes = [h, kv, kv, h].iter().fold(0u64, |n, &heads| {
            n.saturating_add(crate::memory::product([b, heads, t, d, 2]))
        });
        if let Some(available) = crate::memory::short_of(bytes) {
            return Err(RuntimeError::TooLarge(format!(
                "random inputs of {b} x {t} tokens for `{}` need {} of memory, and {} is \
                 available",
                kernel.name,
                crate::memory::human(bytes),
                crate::memory::human(available)
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut random = |n: usize| -> Vec<u16> {
            (0..n)
                .map(|_| {
                    // Uniform on [-sqrt(3), sqrt(3)]: variance 1.
                    encode((rng.random::<f32>() * 2.0 - 1.0) * 3f32.sqrt())
                })
                .collect()
        };
        let q = random(b * h * t * d);
        let k = random(b * kv * t * d);
        let v = random(b * kv * t * d);
        let mask = parse_expr(&kernel.mask).map_err(|_| RuntimeError::Mask(kernel.mask.clone()))?;
        let score = match &kernel.score {
            Some(s) => Some(parse_expr(s).map_err(|_| RuntimeError::Mask(s.clone()))?),
            None => None,
        };
        let sides: Vec<(String, Vec<i64>)> = kernel
            .sides
            .iter()
            .map(|name| (name.clone(), side_values(b, t)))
            .collect();
        let side_buffers: Vec<crate::buffer::Buffer> = sides
            .iter()
            .map(|(_, values)| {
                let padded: Vec<i64> = values
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, 8))
                    .collect();
                words_of_i64(padded.into_iter())
            })
            .collect();
        let spec = ScheduleSpec {
            mask: kernel.mask.clone(),
            heads: h,
            block_q: kernel.block_q,
            block_k: kernel.block_k,
            sides: kernel
                .sides
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
        };
        let support = Support::of(&mask);
        let built = build_schedule(&spec, &mask, &support, b, t, &side_buffers);
        Ok(AttentionCase {
            batch,
            seq,
            q,
            k,
            v,
            sides,
            side_buffers,
            built,
            mask,
            score,
            decode,
        })
    }

    /// The kernel's dims: `B`, `T`, and whether the schedule has one set of rows per batch
    /// row.
    pub fn dims(&self) -> [i64; 3] {
        [
            self.batch as i64,
            self.seq as i64,
            i64::from(self.built.per_batch),
        ]
    }

    /// The word buffers the kernel reads after `q`, `k`, `v` and `out`: the schedule's row
    /// offsets and tiles, then the side inputs, each padded by 8 words.
    pub fn word_buffers(&self) -> Vec<Vec<u64>> {
        std::iter::once(&self.built.rows)
            .chain(std::iter::once(&self.built.tiles))
            .chain(&self.side_buffers)
            .map(|buffer| {
                let mut w: Vec<u64> = buffer.to_vec();
                w.resize(w.len() + 8, 0);
                w
            })
            .collect()
    }

    /// Key tiles visited per batch row and head (on average over them), and all `ceil(T /
    /// block_q) * ceil(T / block_k)` of them.
    pub fn tiles(&self, kernel: &AttentionEntry) -> (usize, usize) {
        let t = self.seq;
        let n_qt = t.div_ceil(kernel.block_q);
        let total = n_qt * t.div_ceil(kernel.block_k);
        let mut visited = 0;
        for b in 0..self.batch {
            for h in 0..kernel.heads {
                visited += (0..n_qt)
                    .map(|qt| self.built.row(b, h, n_qt, qt).len())
                    .sum::<usize>();
            }
        }
        (visited / (self.batch * kernel.heads).max(1), total)
    }

    /// Visible score elements over every batch row and head.
    pub fn visible(&self, kernel: &AttentionEntry) -> u64 {
        count_visible(
            kernel,
            &self.mask,
            &self.sides,
            self.batch,
            self.seq,
            &self.built,
        )
    }

    /// The largest `|out - reference| / (atol + rtol * |reference|)` over `rows` sampled
    /// output rows (the first and the last always among them): at most 1 passes.
    /// The rows [`AttentionCase::worst_error`] checks when asked for `rows`: at most every
    /// output row (they are drawn at random).
    pub fn checked_rows(&self, kernel: &AttentionEntry, rows: usize) -> usize {
        rows.min(self.batch * kernel.heads * self.seq)
    }

    pub fn worst_error(
        &self,
        kernel: &AttentionEntry,
        dtype: &str,
        out: &[u16],
        rows: usize,
        seed: u64,
    ) -> f64 {
        let decode = self.decode;
        let (b, t, d) = (self.batch, self.seq, kernel.head_dim);
        let (h, kv) = (kernel.heads, kernel.kv_heads);
        let (q, k, v) = (&self.q, &self.k, &self.v);
        let sides = &self.sides;
        let (atol, rtol) = tolerance(dtype);
        let mut worst: f64 = 0.0;
        let mut pick = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let group = h / kv;
        for r in 0..self.checked_rows(kernel, rows) {
            let (bi, hi, qi) = match r {
                0 => (0, 0, 0),
                1 => (b - 1, h - 1, t - 1),
                _ => (
                    pick.random_range(0..b),
                    pick.random_range(0..h),
                    pick.random_range(0..t),
                ),
            };
            let qrow: Vec<f64> = (0..d)
                .map(|c| f64::from(decode(q[((bi * h + hi) * t + qi) * d + c])))
                .collect();
            let kv_head = (bi * kv + hi / group) * t;
            let mut scores: Vec<(usize, f64)> = Vec::new();
            for ki in 0..t {
                let mut at = At {
                    q: qi as i64,
                    k: ki as i64,
                    h: hi as i64,
                    b: bi as i64,
                    score: 0.0,
                    sides,
                    seq: t,
                };
                if !visible_at(&self.mask, &at) {
                    continue;
                }
                let dot: f64 = (0..d)
                    .map(|c| qrow[c] * f64::from(decode(k[(kv_head + ki) * d + c])))
                    .sum();
                at.score = dot * kernel.scale;
                let s = match &self.score {
                    Some(expr) => match expr.eval(&at) {
                        Scalar::Float(x) => x,
                        Scalar::Int(x) => x as f64,
                        Scalar::Bool(_) => at.score,
                    },
                    None => at.score,
                };
                scores.push((ki, s));
            }
            let max = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
            let mut reference = vec![0.0f64; d];
            let total: f64 = scores.iter().map(|s| (s.1 - max).exp()).sum();
            for &(ki, s) in &scores {
                let p = (s - max).exp() / total;
                for (c, acc) in reference.iter_mut().enumerate() {
                    *acc += p * f64::from(decode(v[(kv_head + ki) * d + c]));
                }
            }
            for (c, want) in reference.iter().enumerate() {
                let got = f64::from(decode(out[((bi * h + hi) * t + qi) * d + c]));
                let error = (got - want).abs() / (atol + rtol * want.abs());
                worst = if error.is_nan() {
                    f64::INFINITY
                } else {
                    worst.max(error)
                };
            }
        }
        worst
    }

    /// Writes `q`, `k`, `v`, `out` and the mask of batch row 0 and head 0 as f32 .npy files
    /// under `dir/{kernel name}/`, for other tools to compare.
    pub fn save(
        &self,
        dir: &Path,
        kernel: &AttentionEntry,
        out: &[u16],
    ) -> Result<(), RuntimeError> {
        let t = self.seq;
        save_arrays(
            dir,
            kernel,
            self.batch,
            t,
            [&self.q, &self.k, &self.v, out],
            self.decode,
        )?;
        // The mask of batch row 0 and head 0, [T, T] of 0 and 1.
        let mask_values: Vec<f32> = (0..t * t)
            .map(|i| {
                let at = At {
                    q: (i / t) as i64,
                    k: (i % t) as i64,
                    h: 0,
                    b: 0,
                    score: 0.0,
                    sides: &self.sides,
                    seq: t,
                };
                f32::from(u8::from(visible_at(&self.mask, &at)))
            })
            .collect();
        let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[t, t]), mask_values)
            .map_err(|e| RuntimeError::Cuda(format!("mask: {e}")))?;
        let path = dir.join(&kernel.name).join("mask.npy");
        zebra_ir::npy::write(&path, &array)
            .map_err(|e| RuntimeError::Cuda(format!("cannot write {}: {e}", path.display())))
    }
}

/// Visible score elements over every batch row and head: full tiles count whole, partial
/// tiles are evaluated element by element (per head only when the mask reads the head).
fn count_visible(
    kernel: &AttentionEntry,
    mask: &Expr,
    sides: &[(String, Vec<i64>)],
    batch: usize,
    seq: usize,
    built: &crate::cpu::BuiltSchedule,
) -> u64 {
    let tiles: Vec<u64> = built.tiles.iter().copied().collect();
    let n_qt = seq.div_ceil(kernel.block_q);
    let per_head = mask.vars().contains(&Var::H);
    let heads = if per_head { kernel.heads } else { 1 };
    let mut total = 0u64;
    for b in 0..batch {
        for hh in 0..heads {
            for qt in 0..n_qt {
                let (q0, q1) = (qt * kernel.block_q, ((qt + 1) * kernel.block_q).min(seq));
                for &entry in &tiles[built.row(b, hh, n_qt, qt)] {
                    let kt = (entry >> 1) as usize;
                    let (k0, k1) = (kt * kernel.block_k, ((kt + 1) * kernel.block_k).min(seq));
                    if entry & 1 == 0 {
                        total += ((q1 - q0) * (k1 - k0)) as u64;
                        continue;
                    }
                    for qi in q0..q1 {
                        for ki in k0..k1 {
                            let at = At {
                                q: qi as i64,
                                k: ki as i64,
                                h: hh as i64,
                                b: b as i64,
                                score: 0.0,
                                sides,
                                seq,
                            };
                            total += u64::from(visible_at(mask, &at));
                        }
                    }
                }
            }
        }
    }
    if per_head {
        total
    } else {
        total * kernel.heads as u64
    }
}

/// Writes `q`, `k`, `v` and `out` of a run as f32 .npy files under `dir/{kernel name}/`.
fn save_arrays(
    dir: &Path,
    kernel: &AttentionEntry,
    batch: usize,
    seq: usize,
    arrays: [&[u16]; 4],
    decode: fn(u16) -> f32,
) -> Result<(), RuntimeError> {
    let folder = dir.join(&kernel.name);
    std::fs::create_dir_all(&folder)
        .map_err(|e| RuntimeError::Cuda(format!("cannot create {}: {e}", folder.display())))?;
    let d = kernel.head_dim;
    for (name, values, heads) in [
        ("q", arrays[0], kernel.heads),
        ("k", arrays[1], kernel.kv_heads),
        ("v", arrays[2], kernel.kv_heads),
        ("out", arrays[3], kernel.heads),
    ] {
        let floats: Vec<f32> = values.iter().map(|&x| decode(x)).collect();
        let array =
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[batch, heads, seq, d]), floats)
                .map_err(|e| RuntimeError::Cuda(format!("{name}: {e}")))?;
        let path = folder.join(format!("{name}.npy"));
        zebra_ir::npy::write(&path, &array)
            .map_err(|e| RuntimeError::Cuda(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversions_round_to_nearest_even() {
        for x in [0.0f32, 1.0, -2.5, 0.1, 65504.0, 1e-5, -3.0e-7, 1234.567] {
            let h = f16_value(f16_bits(x));
            assert!((h - x).abs() <= x.abs() * 1e-3 + 6e-8, "f16 {x} -> {h}");
            let b = bf16_value(bf16_bits(x));
            assert!((b - x).abs() <= x.abs() * 4e-3, "bf16 {x} -> {b}");
        }
        // 1 + 2^-11 lies halfway between two halves: to the even one, 1.0.
        assert_eq!(f16_bits(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f16_bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f16_bits(1e6), 0x7c00);
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
    }
}
