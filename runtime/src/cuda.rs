//! The CUDA executor: runs a GPU artifact (`plan.json` and `kernels.ptx`) through the CUDA
//! driver, loaded at run time (cudarc's dynamic loading), so that everything builds and runs
//! on machines without CUDA; there, `CudaModel::load` says that no driver was found.
//!
//! The plan is the CPU's: the same steps, operands and memory slots (values whose lifetimes do
//! not overlap share one device buffer). Host-side preparation is shared with the CPU
//! executor (input checks, tile schedules, RoPE tables, packed weights); each kernel step
//! uploads its table of buffer pointers and its dims and launches `{symbol}_grid` with one
//! thread per program, all on one stream.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use ndarray::{ArrayD, IxDyn};
use zebra_ir::Weights;
use zebra_ir::expr::Expr;
use zebra_ir::schedule::Support;

use crate::artifact::Artifact;
use crate::buffer::Buffer;
use crate::cpu::{
    BuiltSchedule, RuntimeError, Tensor, as_words, build_schedule, cache_bytes, check_inputs, fill,
    fill_caches, next_position, rope_tables, words, words_of_i64,
};
use crate::kv::KvCache;
use crate::pack::pack;
use crate::plan::{ElemType, Operand, Plan, Step, volume};

/// Threads per block of every launch (as the PTX entries expect nothing else).
const THREADS_PER_BLOCK: u32 = 64;

/// Bytes of slack after every device buffer, as on the CPU.
const SLACK_BYTES: usize = 512;

/// Whether a CUDA driver can be loaded here.
pub fn driver_present() -> bool {
    // SAFETY: this only tries to open the driver library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The compute capability (major, minor) of GPU 0.
pub fn compute_capability() -> Result<(u32, u32), RuntimeError> {
    require_driver()?;
    let ctx = CudaContext::new(0).map_err(cuda_error("cannot open GPU 0"))?;
    capability(&ctx)
}

/// The name of GPU 0, as its driver gives it (`NVIDIA H100 80GB HBM3`).
pub fn device_name() -> Result<String, RuntimeError> {
    require_driver()?;
    let ctx = CudaContext::new(0).map_err(cuda_error("cannot open GPU 0"))?;
    ctx.name().map_err(cuda_error("cannot read GPU 0's name"))
}

/// The compute capability (major, minor) of a context's GPU.
fn capability(ctx: &CudaContext) -> Result<(u32, u32), RuntimeError> {
    let (major, minor) = ctx
        .compute_capability()
        .map_err(cuda_error("cannot read GPU 0's compute capability"))?;
    Ok((major.max(0) as u32, minor.max(0) as u32))
}

/// An error unless PTX built for `target` (its last word: `sm_80`, `sm_90`, `sm_90a`, ...)
/// runs on a GPU of compute capability `(major, minor)`, named `device`. PTX runs on its
/// target's GPUs and later ones (the driver compiles it), except arch-specific PTX (`sm_90a`:
/// `wgmma`), which runs on its own compute capability only. A target that names no `sm_`
/// number is left to the driver.
pub fn check_target(
    what: &str,
    target: &str,
    (major, minor): (u32, u32),
    device: &str,
) -> Result<(), RuntimeError> {
    let name = target.split_whitespace().last().unwrap_or_default();
    let Some(number) = name.strip_prefix("sm_") else {
        return Ok(());
    };
    let (digits, specific) = match number.strip_suffix('a') {
        Some(digits) => (digits, true),
        None => (number, false),
    };
    let Ok(sm) = digits.parse::<u32>() else {
        return Ok(());
    };
    let have = major * 10 + minor;
    if have == sm || (have > sm && !specific) {
        return Ok(());
    }
    let advice = match major {
        9.. if specific => "recompile it with --target sm_90 (and --mma sync, without wgmma)",
        9.. => "recompile it with --target sm_90",
        8 => "recompile it with --target sm_80",
        _ => "Zebra's GPU kernels need compute capability 8.0 (sm_80) or later",
    };
    let only = if specific && have > sm {
        format!(
            " ({name} kernels run on compute capability {}.{} only)",
            sm / 10,
            sm % 10
        )
    } else {
        String::new()
    };
    Err(RuntimeError::Cuda(format!(
        "{what} was compiled for {name}{only}, and GPU 0 ({device}) has compute capability \
         {major}.{minor}: {advice}"
    )))
}

/// [`check_target`] for the GPU of `ctx` (named `device`), before an artifact's PTX is loaded.
pub(crate) fn check_context(
    ctx: &CudaContext,
    dir: &Path,
    target: &str,
    device: &str,
) -> Result<(), RuntimeError> {
    check_target(&dir.display().to_string(), target, capability(ctx)?, device)
}

/// An error unless a CUDA driver can be loaded here (cudarc panics on first use without one).
pub(crate) fn require_driver() -> Result<(), RuntimeError> {
    if driver_present() {
        return Ok(());
    }
    Err(RuntimeError::Cuda(
        "no NVIDIA driver was found (libcuda.so cannot be loaded): running on the GPU needs \
         an NVIDIA GPU and its driver"
            .into(),
    ))
}

pub(crate) fn cuda_error(what: &str) -> impl Fn(cudarc::driver::DriverError) -> RuntimeError + '_ {
    move |e| RuntimeError::Cuda(format!("{what}: {e:?}"))
}

/// The largest local memory (stack) a kernel of the PTX needs per thread.
fn local_bytes(ptx: &str) -> usize {
    ptx.lines()
        .filter_map(|line| {
            let at = line.find("__local_depot")?;
            let rest = &line[at..];
            let open = rest.find('[')?;
            let close = rest.find(']')?;
            rest[open + 1..close].parse::<usize>().ok()
        })
        .max()
        .unwrap_or(0)
}

/// Lets a kernel use more than 48 KiB of dynamic shared memory, as blocks must opt in.
pub(crate) fn opt_in_shared(
    function: &CudaFunction,
    entry: &str,
    bytes: usize,
) -> Result<(), RuntimeError> {
    if bytes <= 48 * 1024 {
        return Ok(());
    }
    function
        .set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|e| {
            RuntimeError::Cuda(format!(
                "{entry} needs {bytes} bytes of shared memory, which this GPU refuses: {e:?}"
            ))
        })
}

/// A model loaded on an NVIDIA GPU.
pub struct CudaModel {
    plan: Plan,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    functions: Vec<CudaFunction>,
    /// Per kernel, the function of its tensor-core launch's second launch, if any.
    then_functions: Vec<Option<CudaFunction>>,
    weights: Vec<CudaSlice<u8>>,
    packed: Vec<CudaSlice<u8>>,
    constants: Vec<CudaSlice<u8>>,
    masks: Vec<(Expr, Support)>,
    slots: Vec<CudaSlice<u8>>,
    workspaces: Vec<CudaSlice<u8>>,
    /// A decode plan's KV caches: on the host for their layout and sizes, on the GPU their
    /// keys, values and positions (room for the plan's whole context, allocated once).
    host_caches: Vec<KvCache>,
    caches: Vec<[CudaSlice<u8>; 3]>,
    cached_tokens: usize,
    cache_batch: usize,
    /// The GPU's name, for reports.
    pub device: String,
}

fn bytes_of(buffer: &Buffer) -> &[u8] {
    let words: &[u64] = buffer;
    // SAFETY: any initialized u64 is 8 initialized bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
}

impl CudaModel {
    /// Loads a GPU artifact and its weights on device 0.
    pub fn load(dir: &Path, weights: &Weights) -> Result<CudaModel, RuntimeError> {
        let plan = Artifact::load(dir)?.plan;
        if !plan.library.ends_with(".ptx") {
            return Err(RuntimeError::Cuda(format!(
                "{} was compiled for {}, not for a GPU; compile it with --target sm_80 or \
                 --target sm_90",
                dir.display(),
                plan.target
            )));
        }
        let path = dir.join(&plan.library);
        let ptx = std::fs::read_to_string(&path).map_err(|e| RuntimeError::Library {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        if format!("{:016x}", crate::fnv1a(ptx.as_bytes())) != plan.library_hash {
            return Err(RuntimeError::Library {
                path: path.display().to_string(),
                message: "it is not the PTX this plan was built with; recompile the model".into(),
            });
        }
        require_driver()?;
        let ctx = CudaContext::new(0).map_err(cuda_error("cannot open GPU 0"))?;
        let device = ctx.name().unwrap_or_else(|_| "GPU 0".into());
        check_context(&ctx, dir, &plan.target, &device)?;
        // Each thread's stack holds its kernel's scratch arrays.
        ctx.set_limit(
            cudarc::driver::sys::CUlimit::CU_LIMIT_STACK_SIZE,
            local_bytes(&ptx) + 1024,
        )
        .map_err(cuda_error("cannot set the stack size"))?;
        let stream = ctx.default_stream();
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(cuda_error("the driver refused the PTX"))?;
        let functions = plan
            .kernels
            .iter()
            .map(|k| {
                let entry = match &k.tensor_cores {
                    Some(launch) => launch.entry.clone(),
                    None => format!("{}_grid", k.symbol),
                };
                let function = module
                    .load_function(&entry)
                    .map_err(|_| RuntimeError::Symbol(entry.clone()))?;
                if let Some(launch) = &k.tensor_cores {
                    opt_in_shared(&function, &entry, launch.shared_bytes)?;
                }
                Ok(function)
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let then_functions = plan
            .kernels
            .iter()
            .map(|k| {
                let Some(then) = k.tensor_cores.as_ref().and_then(|t| t.then.as_ref()) else {
                    return Ok(None);
                };
                let function = module
                    .load_function(&then.entry)
                    .map_err(|_| RuntimeError::Symbol(then.entry.clone()))?;
                opt_in_shared(&function, &then.entry, then.shared_bytes)?;
                Ok(Some(function))
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let masks = plan
            .schedules
            .iter()
            .map(|s| {
                let expr = zebra_ir::expr::parse_expr(&s.mask)
                    .map_err(|_| RuntimeError::Mask(s.mask.clone()))?;
                let support = Support::of(&expr);
                Ok((expr, support))
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let mut model = CudaModel {
            plan,
            stream,
            _module: module,
            functions,
            then_functions,
            weights: Vec::new(),
            packed: Vec::new(),
            constants: Vec::new(),
            masks,
            slots: Vec::new(),
            workspaces: Vec::new(),
            host_caches: Vec::new(),
            caches: Vec::new(),
            cached_tokens: 0,
            cache_batch: 0,
            device,
        };
        model.constants = model
            .plan
            .constants
            .clone()
            .iter()
            .map(|c| model.upload(&as_words(&[*c])))
            .collect::<Result<_, _>>()?;
        model.set_weights(weights)?;
        Ok(model)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn upload(&self, buffer: &Buffer) -> Result<CudaSlice<u8>, RuntimeError> {
        let mut bytes = bytes_of(buffer).to_vec();
        bytes.resize(bytes.len() + SLACK_BYTES, 0);
        self.stream
            .clone_htod(&bytes)
            .map_err(cuda_error("copying to the GPU"))
    }

    fn zeroed(&self, bytes: usize) -> Result<CudaSlice<u8>, RuntimeError> {
        self.stream
            .alloc_zeros::<u8>(bytes + SLACK_BYTES)
            .map_err(cuda_error("allocating GPU memory"))
    }

    /// Replaces the weights (packed on the host, then copied to the GPU).
    pub fn set_weights(&mut self, weights: &Weights) -> Result<(), RuntimeError> {
        let mut raw: Vec<Vec<f32>> = Vec::new();
        for spec in &self.plan.weights {
            let tensor = weights
                .get(&spec.name)
                .ok_or_else(|| RuntimeError::MissingWeight {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                })?;
            if tensor.shape() != spec.shape.as_slice() {
                return Err(RuntimeError::WeightShape {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    found: tensor.shape().to_vec(),
                });
            }
            raw.push(tensor.iter().copied().collect());
        }
        self.weights = raw
            .iter()
            .map(|values| self.upload(&as_words(values)))
            .collect::<Result<_, _>>()?;
        self.packed = self
            .plan
            .packed
            .iter()
            .map(|p| {
                let packed = pack(&raw[p.weight], p.norm.map(|n| raw[n].as_slice()), p);
                self.upload(&as_words(&packed))
            })
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Whether this is a decode plan (its attention runs against KV caches).
    pub fn is_decode(&self) -> bool {
        self.plan.is_decode()
    }

    /// Runs the model on `[B, T]` inputs; returns the outputs.
    pub fn run(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, ArrayD<f32>>, RuntimeError> {
        if self.is_decode() {
            return Err(RuntimeError::Decode(
                "this is a decode plan: run it with `decode`".into(),
            ));
        }
        self.run_at(inputs, 0)
    }

    /// Starts decoding after a prompt: the KV caches from a prefill plan's outputs.
    pub fn start_decode(
        &mut self,
        prefill: &BTreeMap<String, ArrayD<f32>>,
    ) -> Result<(), RuntimeError> {
        if !self.is_decode() {
            return Err(RuntimeError::Decode(
                "this plan has no decode step; compile the model for generation".into(),
            ));
        }
        let (host, batch, tokens) = fill_caches(&self.plan, prefill, Some(self.plan.max_seq_len))?;
        self.caches = host
            .iter()
            .map(|c| {
                Ok([
                    self.upload(&c.keys)?,
                    self.upload(&c.values)?,
                    self.upload(&c.positions)?,
                ])
            })
            .collect::<Result<_, RuntimeError>>()?;
        self.host_caches = host;
        self.cache_batch = batch;
        self.cached_tokens = tokens;
        Ok(())
    }

    /// One decode step (`tokens [B, 1]`) at the position after those the caches hold.
    pub fn decode(
        &mut self,
        tokens: &ArrayD<i64>,
    ) -> Result<BTreeMap<String, ArrayD<f32>>, RuntimeError> {
        let position = next_position(
            &self.plan,
            self.caches.len(),
            self.cache_batch,
            self.cached_tokens,
            tokens,
        )?;
        for (host, device) in self.host_caches.iter().zip(&mut self.caches) {
            let slot = host.spec.slot(position);
            let mut view = device[2].slice_mut(slot * 8..slot * 8 + 8);
            self.stream
                .memcpy_htod(&(position as i64).to_le_bytes(), &mut view)
                .map_err(cuda_error("writing a cache position"))?;
        }
        let inputs = BTreeMap::from([("tokens".to_string(), Tensor::I64(tokens.clone()))]);
        let outputs = self.run_at(&inputs, position)?;
        self.cached_tokens += 1;
        Ok(outputs)
    }

    /// Tokens the KV caches have seen.
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// Bytes of keys and values the caches hold, and what full attention would hold.
    pub fn cache_bytes(&self) -> (usize, usize) {
        cache_bytes(&self.host_caches, self.cached_tokens, self.cache_batch)
    }

    fn run_at(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        offset: usize,
    ) -> Result<BTreeMap<String, ArrayD<f32>>, RuntimeError> {
        let (batch, seq) = check_inputs(&self.plan, inputs)?;
        let mut host_inputs: Vec<Buffer> = Vec::new();
        for spec in &self.plan.inputs {
            let mut buffer = Buffer::default();
            fill(&mut buffer, &inputs[&spec.name]);
            host_inputs.push(buffer);
        }
        let device_inputs: Vec<CudaSlice<u8>> = host_inputs
            .iter()
            .map(|b| self.upload(b))
            .collect::<Result<_, _>>()?;
        let mut slot_bytes = vec![0usize; self.plan.slots];
        for v in &self.plan.values {
            let bytes = volume(&v.shape, batch, seq) * v.elem.size();
            slot_bytes[v.slot] = slot_bytes[v.slot].max(words(bytes) * 8);
        }
        self.slots = slot_bytes
            .iter()
            .map(|&b| self.zeroed(b))
            .collect::<Result<_, _>>()?;
        self.workspaces = self
            .plan
            .workspaces
            .iter()
            .map(|(shape, elem)| self.zeroed(volume(shape, batch, seq) * elem.size()))
            .collect::<Result<_, _>>()?;
        let positions = self.upload(&words_of_i64(
            (offset as i64..(offset + seq) as i64)
                .collect::<Vec<_>>()
                .into_iter(),
        ))?;
        let mut ropes = Vec::new();
        for &(base, dim) in &self.plan.rope_tables {
            let (cos, sin) = rope_tables(base, dim, seq, offset);
            ropes.push((self.upload(&cos)?, self.upload(&sin)?));
        }
        let mut schedules: HashMap<usize, ([CudaSlice<u8>; 4], bool)> = HashMap::new();
        // Pointer tables and dims stay alive until the stream has run every launch.
        let mut tables: Vec<CudaSlice<u64>> = Vec::new();
        let mut dims_kept: Vec<CudaSlice<i64>> = Vec::new();
        for s in 0..self.plan.steps.len() {
            match self.plan.steps[s].clone() {
                Step::Schedule { id } => {
                    let (mask, support) = &self.masks[id];
                    let built: BuiltSchedule = build_schedule(
                        &self.plan.schedules[id],
                        mask,
                        support,
                        batch,
                        seq,
                        &host_inputs,
                    );
                    let parts = [
                        self.upload(&built.rows)?,
                        self.upload(&built.tiles)?,
                        self.upload(&built.columns)?,
                        self.upload(&built.column_tiles)?,
                    ];
                    schedules.insert(id, (parts, built.per_batch));
                }
                Step::Kernel {
                    kernel,
                    operands,
                    grid,
                    schedule,
                } => {
                    let ptr = |slice: &CudaSlice<u8>| slice.device_ptr(&self.stream).0;
                    let mut pointers = Vec::with_capacity(operands.len());
                    for operand in &operands {
                        let p = match *operand {
                            Operand::Input(i) => ptr(&device_inputs[i]),
                            Operand::Weight(i) => ptr(&self.weights[i]),
                            Operand::Packed(i) => ptr(&self.packed[i]),
                            Operand::Value(i) => ptr(&self.slots[self.plan.values[i].slot]),
                            Operand::Constant(i) => ptr(&self.constants[i]),
                            Operand::Positions => ptr(&positions),
                            Operand::Workspace(i) => ptr(&self.workspaces[i]),
                            Operand::ScheduleRows(i) => ptr(&schedules[&i].0[0]),
                            Operand::ScheduleTiles(i) => ptr(&schedules[&i].0[1]),
                            Operand::ScheduleColumns(i) => ptr(&schedules[&i].0[2]),
                            Operand::ScheduleColumnTiles(i) => ptr(&schedules[&i].0[3]),
                            Operand::RopeCos(i) => ptr(&ropes[i].0),
                            Operand::RopeSin(i) => ptr(&ropes[i].1),
                            Operand::CacheKeys(i) => ptr(&self.caches[i][0]),
                            Operand::CacheValues(i) => ptr(&self.caches[i][1]),
                            Operand::CachePositions(i) => ptr(&self.caches[i][2]),
                        };
                        pointers.push(p);
                    }
                    let per_batch = schedule
                        .and_then(|id| schedules.get(&id))
                        .is_some_and(|s| s.1);
                    let dims = [
                        batch as i64,
                        seq as i64,
                        i64::from(per_batch),
                        offset as i64,
                    ];
                    let table = self
                        .stream
                        .clone_htod(&pointers)
                        .map_err(cuda_error("copying a pointer table"))?;
                    let dims_dev = self
                        .stream
                        .clone_htod(&dims)
                        .map_err(cuda_error("copying dims"))?;
                    let programs = grid.programs(batch, seq) as i64;
                    if let Some(launch) = &self.plan.kernels[kernel].tensor_cores {
                        // The launch, then its second launch where it has one.
                        let mut launches = vec![(launch, &self.functions[kernel])];
                        if let (Some(then), Some(function)) =
                            (&launch.then, &self.then_functions[kernel])
                        {
                            launches.push((then, function));
                        }
                        for (launch, function) in launches {
                            let (x, y) = launch.grid.blocks(batch, seq, offset);
                            if x * y == 0 {
                                continue;
                            }
                            let config = LaunchConfig {
                                grid_dim: (x as u32, y as u32, 1),
                                block_dim: (launch.threads as u32, 1, 1),
                                shared_mem_bytes: launch.shared_bytes as u32,
                            };
                            let mut builder = self.stream.launch_builder(function);
                            builder.arg(&table);
                            builder.arg(&dims_dev);
                            // SAFETY: the entry takes (buffers, dims), the buffers of the
                            // kernel it replaces, sized by the plan for these dims.
                            unsafe { builder.launch(config) }
                                .map_err(cuda_error(&format!("launching {}", launch.entry)))?;
                        }
                    } else if programs > 0 {
                        let blocks = (programs as u64).div_ceil(u64::from(THREADS_PER_BLOCK));
                        let config = LaunchConfig {
                            grid_dim: (blocks as u32, 1, 1),
                            block_dim: (THREADS_PER_BLOCK, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        let mut launch = self.stream.launch_builder(&self.functions[kernel]);
                        launch.arg(&table);
                        launch.arg(&dims_dev);
                        launch.arg(&programs);
                        // SAFETY: the entry takes (buffers, dims, programs); the buffers are
                        // sized by the plan for these dims, as on the CPU.
                        unsafe { launch.launch(config) }.map_err(cuda_error(&format!(
                            "launching {}",
                            self.plan.kernels[kernel].symbol
                        )))?;
                    }
                    tables.push(table);
                    dims_kept.push(dims_dev);
                }
            }
        }
        let mut outputs = BTreeMap::new();
        for (name, v) in &self.plan.outputs {
            let spec = &self.plan.values[*v];
            let shape: Vec<usize> = spec.shape.iter().map(|e| e.resolve(batch, seq)).collect();
            let count: usize = shape.iter().product();
            debug_assert_eq!(spec.elem, ElemType::F32);
            let bytes: Vec<u8> = self
                .stream
                .clone_dtoh(&self.slots[spec.slot])
                .map_err(cuda_error("copying from the GPU"))?;
            let values: Vec<f32> = bytes[..count * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            outputs.insert(
                name.clone(),
                ArrayD::from_shape_vec(IxDyn(&shape), values).expect("the count matches the shape"),
            );
        }
        drop((tables, dims_kept));
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_memory_is_read_from_the_ptx() {
        let ptx = "\t.local .align 64 .b8 \t__local_depot1[2176];\n\t.local .align 16 .b8 \t__local_depot7[40960];\n";
        assert_eq!(local_bytes(ptx), 40960);
        assert_eq!(local_bytes(""), 0);
    }

    #[test]
    fn ptx_runs_on_its_target_and_later_gpus_arch_specific_on_its_own() {
        let runs = |target: &str, cc: (u32, u32)| check_target("art", target, cc, "GPU").is_ok();
        assert!(runs("nvptx64-nvidia-cuda sm_90", (9, 0)));
        assert!(runs("nvptx64-nvidia-cuda sm_80", (9, 0)));
        assert!(runs("sm_80", (8, 6)));
        assert!(runs("sm_90", (10, 0)));
        assert!(runs("sm_90a", (9, 0)));
        assert!(!runs("sm_90", (8, 0)));
        assert!(!runs("sm_80", (7, 5)));
        assert!(!runs("sm_90a", (10, 0)));
        assert!(!runs("sm_90a", (8, 9)));
        // No sm_ number: the driver decides.
        assert!(runs("x86_64-unknown-linux-gnu", (8, 0)));
        assert!(runs("sm_x", (8, 0)));
        let message = |target: &str, cc: (u32, u32)| {
            check_target("dir/bench", target, cc, "NVIDIA A100")
                .unwrap_err()
                .to_string()
        };
        let m = message("nvptx64-nvidia-cuda sm_90", (8, 0));
        assert!(
            m.contains("dir/bench was compiled for sm_90")
                && m.contains("GPU 0 (NVIDIA A100) has compute capability 8.0")
                && m.contains("--target sm_80"),
            "{m}"
        );
        let m = message("sm_90a", (10, 0));
        assert!(
            m.contains("sm_90a kernels run on compute capability 9.0 only")
                && m.contains("--mma sync"),
            "{m}"
        );
        assert!(message("sm_80", (7, 5)).contains("8.0 (sm_80) or later"));
    }
}
