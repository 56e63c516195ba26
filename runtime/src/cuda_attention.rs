//! Runs the tensor-core attention kernels of an attention artifact (`zebra compile --for
//! attention --target sm_90 --emit artifact`) on random 16-bit inputs: times each with CUDA
//! events, counts the FLOPs of the visible score elements, and checks sampled output rows
//! against an f64 reference computed here from the same 16-bit inputs.

use std::path::Path;

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zebra_ir::Var;
use zebra_ir::expr::{Env, Expr, Scalar, parse_expr};
use zebra_ir::schedule::Support;

use crate::artifact::{AttentionArtifact, AttentionEntry};
use crate::cpu::{RuntimeError, build_schedule, words_of_i64};
use crate::cuda::cuda_error;
use crate::plan::ScheduleSpec;

/// What `zebra-run attention` is asked for.
#[derive(Clone, Debug)]
pub struct AttentionOptions {
    pub seq_len: usize,
    pub batch: usize,
    /// Timed launches (the median is reported), after one warm-up launch.
    pub repeats: usize,
    /// Output rows (batch row, head, query) checked against the f64 reference; 0: none.
    pub check_rows: usize,
    pub seed: u64,
    /// Where to write `q`, `k`, `v` and `out` (as f32 .npy) for other tools to compare.
    pub save: Option<std::path::PathBuf>,
}

/// One kernel's run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttentionRun {
    pub name: String,
    pub device: String,
    pub dtype: String,
    pub target: String,
    pub batch: usize,
    pub seq_len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub mask: String,
    /// Median time of one launch.
    pub time_ms: f64,
    /// Visible (unmasked) score elements, all heads and batch rows.
    pub visible: u64,
    /// `4 * head_dim` FLOPs per visible element.
    pub tflops: f64,
    /// Key tiles visited, against all `ceil(T / block_q) * ceil(T / block_k)` of them.
    pub tiles_visited: usize,
    pub tiles_total: usize,
    /// What the driver's compiler made of the kernel: registers per thread, local memory
    /// (spills) per thread, and shared memory per block.
    pub registers: i32,
    pub local_bytes: i32,
    pub shared_bytes: usize,
    pub checked_rows: usize,
    /// The largest `|out - reference| / (atol + rtol * |reference|)` over the checked
    /// elements: at most 1 passes.
    pub worst_error: f64,
    pub ok: bool,
}

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
type Codec = (fn(f32) -> u16, fn(u16) -> f32);

/// The 16-bit codec of an artifact's dtype.
fn codec(dtype: &str) -> Result<Codec, RuntimeError> {
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

/// Runs every kernel of the attention artifact in `dir` on GPU 0.
pub fn run_attention(
    dir: &Path,
    options: &AttentionOptions,
) -> Result<Vec<AttentionRun>, RuntimeError> {
    let (artifact, ptx) = AttentionArtifact::load(dir)?;
    let (encode, decode) = codec(&artifact.dtype)?;
    crate::cuda::require_driver()?;
    if options.seq_len == 0 || options.batch == 0 {
        return Err(RuntimeError::Empty);
    }
    let ctx = cudarc::driver::CudaContext::new(0).map_err(cuda_error("cannot open GPU 0"))?;
    let device = ctx.name().unwrap_or_else(|_| "GPU 0".into());
    let stream = ctx.default_stream();
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
        .map_err(cuda_error("the driver refused the PTX"))?;
    let mut runs = Vec::new();
    for kernel in &artifact.kernels {
        let function = module
            .load_function(&kernel.entry)
            .map_err(|_| RuntimeError::Symbol(kernel.entry.clone()))?;
        let (b, t, d) = (options.batch, options.seq_len, kernel.head_dim);
        let (h, kv) = (kernel.heads, kernel.kv_heads);
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
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
        let upload16 = |values: &[u16]| -> Result<CudaSlice<u16>, RuntimeError> {
            let mut padded = values.to_vec();
            padded.resize(values.len() + 64, 0);
            stream
                .clone_htod(&padded)
                .map_err(cuda_error("copying to the GPU"))
        };
        let words = |buffer: &crate::buffer::Buffer| -> Result<CudaSlice<u64>, RuntimeError> {
            let mut w: Vec<u64> = buffer.to_vec();
            w.resize(w.len() + 8, 0);
            stream
                .clone_htod(&w)
                .map_err(cuda_error("copying to the GPU"))
        };
        let (q_dev, k_dev, v_dev) = (upload16(&q)?, upload16(&k)?, upload16(&v)?);
        let out_dev: CudaSlice<u16> = stream
            .alloc_zeros(b * h * t * d + 64)
            .map_err(cuda_error("allocating GPU memory"))?;
        let rows_dev = words(&built.rows)?;
        let tiles_dev = words(&built.tiles)?;
        let side_devs = side_buffers
            .iter()
            .map(&words)
            .collect::<Result<Vec<_>, _>>()?;
        let mut pointers = vec![
            q_dev.device_ptr(&stream).0,
            k_dev.device_ptr(&stream).0,
            v_dev.device_ptr(&stream).0,
            out_dev.device_ptr(&stream).0,
            rows_dev.device_ptr(&stream).0,
            tiles_dev.device_ptr(&stream).0,
        ];
        pointers.extend(side_devs.iter().map(|s| s.device_ptr(&stream).0));
        let table = stream
            .clone_htod(&pointers)
            .map_err(cuda_error("copying a pointer table"))?;
        let dims = [b as i64, t as i64, i64::from(built.per_batch)];
        let dims_dev = stream
            .clone_htod(&dims)
            .map_err(cuda_error("copying dims"))?;
        // The kernel's shared memory is dynamic; above 48 KiB a block must opt in.
        if kernel.shared_bytes > 48 * 1024 {
            function
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    kernel.shared_bytes as i32,
                )
                .map_err(|e| {
                    RuntimeError::Cuda(format!(
                        "{} needs {} bytes of shared memory, which this GPU refuses: {e:?}",
                        kernel.entry, kernel.shared_bytes
                    ))
                })?;
        }
        let config = LaunchConfig {
            grid_dim: (t.div_ceil(kernel.block_q) as u32, (b * h) as u32, 1),
            block_dim: (kernel.threads as u32, 1, 1),
            shared_mem_bytes: kernel.shared_bytes as u32,
        };
        let launch = || -> Result<(), RuntimeError> {
            let mut builder = stream.launch_builder(&function);
            builder.arg(&table);
            builder.arg(&dims_dev);
            // SAFETY: the entry takes (buffers, dims); every buffer is sized for B and T
            // above, padded past its end.
            unsafe { builder.launch(config) }
                .map(|_| ())
                .map_err(|e| RuntimeError::Cuda(format!("launching {}: {e:?}", kernel.entry)))
        };
        launch()?;
        stream
            .synchronize()
            .map_err(cuda_error("running the kernel"))?;
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::new();
        for _ in 0..options.repeats.max(1) {
            let start = ctx
                .new_event(flags)
                .map_err(cuda_error("creating an event"))?;
            let end = ctx
                .new_event(flags)
                .map_err(cuda_error("creating an event"))?;
            start
                .record(&stream)
                .map_err(cuda_error("recording an event"))?;
            launch()?;
            end.record(&stream)
                .map_err(cuda_error("recording an event"))?;
            times.push(f64::from(
                start.elapsed_ms(&end).map_err(cuda_error("timing"))?,
            ));
        }
        times.sort_by(f64::total_cmp);
        let time_ms = times[times.len() / 2];
        let out: Vec<u16> = stream
            .clone_dtoh(&out_dev)
            .map_err(cuda_error("copying from the GPU"))?;
        let out = &out[..b * h * t * d];

        let tiles_total = t.div_ceil(kernel.block_q) * t.div_ceil(kernel.block_k);
        // The schedule's buffers are padded: its entries end where its last row does.
        let schedules = if built.per_batch { b } else { 1 };
        let tiles_visited = built.rows[schedules * t.div_ceil(kernel.block_q)] as usize / schedules;
        let visible = count_visible(kernel, &mask, &sides, b, t, &built);
        let tflops = visible as f64 * 4.0 * d as f64 / (time_ms * 1e-3) / 1e12;

        // Sampled rows against the f64 reference.
        let (atol, rtol) = tolerance(&artifact.dtype);
        let mut worst: f64 = 0.0;
        let mut pick = ChaCha8Rng::seed_from_u64(options.seed ^ 0x5eed);
        let group = h / kv;
        for r in 0..options.check_rows {
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
                    sides: &sides,
                    seq: t,
                };
                if !visible_at(&mask, &at) {
                    continue;
                }
                let dot: f64 = (0..d)
                    .map(|c| qrow[c] * f64::from(decode(k[(kv_head + ki) * d + c])))
                    .sum();
                at.score = dot * kernel.scale;
                let s = match &score {
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
        if let Some(save) = &options.save {
            save_arrays(save, kernel, b, t, [&q, &k, &v, out], decode)?;
            // The mask of batch row 0 and head 0, [T, T] of 0 and 1.
            let mask_values: Vec<f32> = (0..t * t)
                .map(|i| {
                    let at = At {
                        q: (i / t) as i64,
                        k: (i % t) as i64,
                        h: 0,
                        b: 0,
                        score: 0.0,
                        sides: &sides,
                        seq: t,
                    };
                    f32::from(u8::from(visible_at(&mask, &at)))
                })
                .collect();
            let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[t, t]), mask_values)
                .map_err(|e| RuntimeError::Cuda(format!("mask: {e}")))?;
            let path = save.join(&kernel.name).join("mask.npy");
            zebra_ir::npy::write(&path, &array)
                .map_err(|e| RuntimeError::Cuda(format!("cannot write {}: {e}", path.display())))?;
        }
        runs.push(AttentionRun {
            name: kernel.name.clone(),
            device: device.clone(),
            dtype: artifact.dtype.clone(),
            target: artifact.target.clone(),
            batch: b,
            seq_len: t,
            heads: h,
            kv_heads: kv,
            head_dim: d,
            mask: kernel.mask.clone(),
            time_ms,
            visible,
            tflops,
            tiles_visited,
            tiles_total,
            registers: function.num_regs().unwrap_or(-1),
            local_bytes: function.local_size_bytes().unwrap_or(-1),
            shared_bytes: kernel.shared_bytes,
            checked_rows: options.check_rows,
            worst_error: worst,
            ok: worst <= 1.0,
        });
    }
    Ok(runs)
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
    let rows: Vec<u64> = built.rows.iter().copied().collect();
    let tiles: Vec<u64> = built.tiles.iter().copied().collect();
    let n_qt = seq.div_ceil(kernel.block_q);
    let per_head = mask.vars().contains(&Var::H);
    let heads = if per_head { kernel.heads } else { 1 };
    let mut total = 0u64;
    for b in 0..batch {
        let base = if built.per_batch { b * n_qt } else { 0 };
        for hh in 0..heads {
            for qt in 0..n_qt {
                let (q0, q1) = (qt * kernel.block_q, ((qt + 1) * kernel.block_q).min(seq));
                for &entry in &tiles[rows[base + qt] as usize..rows[base + qt + 1] as usize] {
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
