//! Runs the tensor-core attention kernels of an attention artifact (`zebra compile --for
//! attention --target sm_90 --emit artifact`) on random 16-bit inputs: times each with CUDA
//! events, counts the FLOPs of the visible score elements, and checks sampled output rows
//! against an f64 reference computed here from the same 16-bit inputs.

use std::path::Path;

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use crate::artifact::AttentionArtifact;
use crate::attention_check::codec;
pub use crate::attention_check::{
    AttentionCase, bf16_bits, bf16_value, f16_bits, f16_value, tolerance,
};
use crate::cpu::RuntimeError;
use crate::cuda::cuda_error;

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

/// Runs every kernel of the attention artifact in `dir` on GPU 0.
pub fn run_attention(
    dir: &Path,
    options: &AttentionOptions,
) -> Result<Vec<AttentionRun>, RuntimeError> {
    let (artifact, ptx) = AttentionArtifact::load(dir)?;
    codec(&artifact.dtype)?;
    crate::cuda::require_driver()?;
    if options.seq_len == 0 || options.batch == 0 {
        return Err(RuntimeError::Empty);
    }
    let ctx = cudarc::driver::CudaContext::new(0).map_err(cuda_error("cannot open GPU 0"))?;
    let device = ctx.name().unwrap_or_else(|_| "GPU 0".into());
    crate::cuda::check_context(&ctx, dir, &artifact.target, &device)?;
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
        let h = kernel.heads;
        let case = AttentionCase::new(kernel, &artifact.dtype, b, t, options.seed)?;
        let upload16 = |values: &[u16]| -> Result<CudaSlice<u16>, RuntimeError> {
            let mut padded = values.to_vec();
            padded.resize(values.len() + 64, 0);
            stream
                .clone_htod(&padded)
                .map_err(cuda_error("copying to the GPU"))
        };
        let (q_dev, k_dev, v_dev) = (upload16(&case.q)?, upload16(&case.k)?, upload16(&case.v)?);
        let out_dev: CudaSlice<u16> = stream
            .alloc_zeros(b * h * t * d + 64)
            .map_err(cuda_error("allocating GPU memory"))?;
        let word_devs = case
            .word_buffers()
            .iter()
            .map(|w| {
                stream
                    .clone_htod(w)
                    .map_err(cuda_error("copying to the GPU"))
            })
            .collect::<Result<Vec<CudaSlice<u64>>, _>>()?;
        let mut pointers = vec![
            q_dev.device_ptr(&stream).0,
            k_dev.device_ptr(&stream).0,
            v_dev.device_ptr(&stream).0,
            out_dev.device_ptr(&stream).0,
        ];
        pointers.extend(word_devs.iter().map(|s| s.device_ptr(&stream).0));
        let table = stream
            .clone_htod(&pointers)
            .map_err(cuda_error("copying a pointer table"))?;
        let dims_dev = stream
            .clone_htod(&case.dims())
            .map_err(cuda_error("copying dims"))?;
        // The kernel's shared memory is dynamic; above 48 KiB a block must opt in.
        crate::cuda::opt_in_shared(&function, &kernel.entry, kernel.shared_bytes)?;
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

        let (tiles_visited, tiles_total) = case.tiles(kernel);
        let visible = case.visible(kernel);
        let tflops = visible as f64 * 4.0 * d as f64 / (time_ms * 1e-3) / 1e12;
        let worst = case.worst_error(
            kernel,
            &artifact.dtype,
            out,
            options.check_rows,
            options.seed,
        );
        if let Some(save) = &options.save {
            case.save(save, kernel, out)?;
        }
        runs.push(AttentionRun {
            name: kernel.name.clone(),
            device: device.clone(),
            dtype: artifact.dtype.clone(),
            target: artifact.target.clone(),
            batch: b,
            seq_len: t,
            heads: h,
            kv_heads: kernel.kv_heads,
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
            checked_rows: case.checked_rows(kernel, options.check_rows),
            worst_error: worst,
            ok: worst <= 1.0,
        });
    }
    Ok(runs)
}
