//! The CUDA executor: runs a GPU artifact (`plan.json` and `kernels.ptx`) through the CUDA
//! driver, loaded at run time (cudarc's dynamic loading), so that everything builds and runs
//! on machines without CUDA; there, `CudaModel::load` says that no driver was found.
//!
//! The plan is the CPU's: the same steps, operands and memory slots (values whose lifetimes do
//! not overlap share one device buffer). Host-side preparation is shared with the CPU
//! executor (input checks, tile schedules, RoPE tables, packed weights). Kernel steps launch
//! `{symbol}_grid` with one thread per program (or their tensor-core entry), all on one
//! stream, each with its table of buffer pointers and its dims.
//!
//! Device memory is kept from run to run, as on the CPU: slots, workspaces and inputs grow
//! to the largest size a run has needed and are neither reallocated nor cleared when shapes
//! repeat, so that a decode step or a training step costs its launches and a few small
//! copies: the inputs, the dims (one copy for every step), the pointer tables (one copy for
//! every step, and only when a buffer has moved), a decode step's new cache position (one
//! copy per kind of cache: caches that keep the same slots share their positions).

use std::collections::BTreeMap;
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
    BuiltSchedule, RuntimeError, Tensor, as_words, build_schedule, cache_bytes, check_inputs,
    check_moments, fill, fill_caches, held_beside, next_position, optimizer_of, raw_weights,
    rope_tables, stepped, trained_sizes, words, words_of_i64,
};
use crate::kv::KvCache;
use crate::plan::{ElemType, HYPER, Operand, Plan, Step, volume};

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
    /// Shared with the decode plan's model when generating ([`CudaModel::load_pair`]).
    weights: Vec<Arc<Grown>>,
    packed: Vec<Arc<Grown>>,
    constants: Vec<CudaSlice<u8>>,
    masks: Vec<(Expr, Support)>,
    memory: RunMemory,
    /// A decode plan's KV caches: on the host their layouts and sizes (no data), on the GPU
    /// their keys and values (room for the plan's whole context, allocated once) and the index of
    /// their slots' positions in `cache_positions`.
    host_caches: Vec<KvCache>,
    caches: Vec<[CudaSlice<u8>; 2]>,
    cache_position_of: Vec<usize>,
    /// The slots' positions of each kind of cache ([`shared_positions`]), with its first
    /// cache (whose spec says which slot a position takes).
    cache_positions: Vec<(usize, CudaSlice<u8>)>,
    cached_tokens: usize,
    cache_batch: usize,
    /// A training plan's optimizer state.
    optimizer: OptimizerMemory,
    /// The GPU's name, for reports.
    pub device: String,
}

fn bytes_of(words: &[u64]) -> &[u8] {
    // SAFETY: any initialized u64 is 8 initialized bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
}

impl CudaModel {
    /// Loads a GPU artifact and its weights on device 0.
    pub fn load(dir: &Path, weights: &Weights) -> Result<CudaModel, RuntimeError> {
        CudaModel::load_with(dir, weights, None)
    }

    /// Loads two plans of one model (its prefill and decode plans) with its weights, which
    /// are then on the GPU once for both.
    pub fn load_pair(
        first: &Path,
        second: &Path,
        weights: &Weights,
    ) -> Result<(CudaModel, CudaModel), RuntimeError> {
        let one = CudaModel::load(first, weights)?;
        let two = CudaModel::load_with(second, weights, Some(&one))?;
        Ok((one, two))
    }

    fn load_with(
        dir: &Path,
        weights: &Weights,
        beside: Option<&CudaModel>,
    ) -> Result<CudaModel, RuntimeError> {
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
            memory: RunMemory::default(),
            host_caches: Vec::new(),
            caches: Vec::new(),
            cache_position_of: Vec::new(),
            cache_positions: Vec::new(),
            cached_tokens: 0,
            cache_batch: 0,
            optimizer: OptimizerMemory::default(),
            device,
        };
        model.constants = model
            .plan
            .constants
            .clone()
            .iter()
            .map(|c| model.upload(&as_words(&[*c])))
            .collect::<Result<_, _>>()?;
        model.set_weights_beside(weights, beside)?;
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

    /// Replaces the weights (packed on the host, then copied to the GPU).
    pub fn set_weights(&mut self, weights: &Weights) -> Result<(), RuntimeError> {
        self.set_weights_beside(weights, None)
    }

    /// Sets the weights, taking those `beside` holds from it (when it was given the same).
    /// A training step replaces every weight: into the buffers of the last ones, unless
    /// another model shares them.
    fn set_weights_beside(
        &mut self,
        weights: &Weights,
        beside: Option<&CudaModel>,
    ) -> Result<(), RuntimeError> {
        let raw = raw_weights(&self.plan, weights)?;
        let (mut shared, mut shared_packed) = held_beside(
            &self.plan,
            beside.map(|other| (&other.plan, &other.weights[..], &other.packed[..])),
        );
        let stream = self.stream.clone();
        let put = |buffer: Option<&mut Arc<Grown>>,
                   held: Option<Arc<Grown>>,
                   words: &dyn Fn() -> Buffer| {
            if let Some(held) = held {
                return Ok(held);
            }
            // The last buffer if no other model reads it, else a new one.
            let mut grown = buffer
                .map(std::mem::take)
                .and_then(|b| Arc::try_unwrap(b).ok())
                .unwrap_or_default();
            grown.write(&stream, bytes_of(&words()))?;
            Ok::<_, RuntimeError>(Arc::new(grown))
        };
        let mut old = std::mem::take(&mut self.weights);
        self.weights = raw
            .iter()
            .enumerate()
            .map(|(i, values)| {
                let held = shared.get_mut(i).and_then(Option::take);
                put(old.get_mut(i), held, &|| as_words(values))
            })
            .collect::<Result<_, _>>()?;
        let mut old = std::mem::take(&mut self.packed);
        self.packed = self
            .plan
            .packed
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let held = shared_packed.get_mut(i).and_then(Option::take);
                let norm = p.norm.map(|n| &*raw[n]);
                put(old.get_mut(i), held, &|| {
                    crate::cpu::packed_words(&raw[p.weight], norm, p)
                })
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
        self.run_at(inputs, 0, &|_| true)
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
        let (mut host, batch, tokens) =
            fill_caches(&self.plan, prefill, Some(self.plan.max_seq_len))?;
        self.caches = host
            .iter()
            .map(|c| Ok([self.upload(&c.keys)?, self.upload(&c.values)?]))
            .collect::<Result<_, RuntimeError>>()?;
        let (position_of, kinds) = shared_positions(&host);
        self.cache_positions = kinds
            .iter()
            .map(|&c| Ok((c, self.upload(&host[c].positions)?)))
            .collect::<Result<_, RuntimeError>>()?;
        self.cache_position_of = position_of;
        // The GPU holds the keys, values and positions from here on: the host keeps the
        // caches' layouts and sizes only.
        for cache in &mut host {
            cache.keys = Buffer::default();
            cache.values = Buffer::default();
            cache.positions = Buffer::default();
        }
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
        for (c, device) in &mut self.cache_positions {
            let slot = self.host_caches[*c].spec.slot(position);
            let mut view = device.slice_mut(slot * 8..slot * 8 + 8);
            self.stream
                .memcpy_htod(&(position as i64).to_le_bytes(), &mut view)
                .map_err(cuda_error("writing a cache position"))?;
        }
        let inputs = BTreeMap::from([("tokens".to_string(), Tensor::I64(tokens.clone()))]);
        let outputs = self.run_at(&inputs, position, &|_| true)?;
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

    /// The device address of an operand (once the run has made room for its buffers).
    fn address(&self, operand: &Operand) -> u64 {
        let (stream, memory, optimizer) = (&self.stream, &self.memory, &self.optimizer);
        let ptr = |grown: &Grown| grown.pointer(stream);
        let device = |slice: &CudaSlice<u8>| slice.device_ptr(stream).0;
        match *operand {
            Operand::Input(i) => ptr(&memory.inputs[i]),
            Operand::Weight(i) => ptr(&self.weights[i]),
            Operand::Packed(i) => ptr(&self.packed[i]),
            Operand::Value(i) => ptr(&memory.slots[self.plan.values[i].slot]),
            Operand::Constant(i) => device(&self.constants[i]),
            Operand::Positions => ptr(&memory.positions),
            Operand::Workspace(i) => ptr(&memory.workspaces[i]),
            Operand::ScheduleRows(i) => ptr(&memory.schedules[i][0]),
            Operand::ScheduleTiles(i) => ptr(&memory.schedules[i][1]),
            Operand::ScheduleColumns(i) => ptr(&memory.schedules[i][2]),
            Operand::ScheduleColumnTiles(i) => ptr(&memory.schedules[i][3]),
            Operand::RopeCos(i) => ptr(&memory.ropes[i][0]),
            Operand::RopeSin(i) => ptr(&memory.ropes[i][1]),
            Operand::CacheKeys(i) => device(&self.caches[i][0]),
            Operand::CacheValues(i) => device(&self.caches[i][1]),
            Operand::CachePositions(i) => {
                device(&self.cache_positions[self.cache_position_of[i]].1)
            }
            Operand::MomentM(i) => ptr(&optimizer.moments[i][0]),
            Operand::MomentV(i) => ptr(&optimizer.moments[i][1]),
            Operand::Partials(at) => ptr(&optimizer.partials) + 4 * at as u64,
            Operand::Hyper => ptr(&optimizer.hyper),
        }
    }

    /// Launches a kernel's grid of programs, one GPU thread each.
    fn launch_grid(
        &self,
        kernel: usize,
        table: u64,
        dims: u64,
        programs: i64,
    ) -> Result<(), RuntimeError> {
        if programs <= 0 {
            return Ok(());
        }
        let blocks = (programs as u64).div_ceil(u64::from(THREADS_PER_BLOCK));
        let config = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = self.stream.launch_builder(&self.functions[kernel]);
        builder.arg(&table);
        builder.arg(&dims);
        builder.arg(&programs);
        // SAFETY: the entry takes (buffers, dims, programs); the buffers are sized by the
        // plan for these dims, as on the CPU.
        unsafe { builder.launch(config) }.map_err(cuda_error(&format!(
            "launching {}",
            self.plan.kernels[kernel].symbol
        )))?;
        Ok(())
    }

    /// Runs the optimizer's norm steps, or (`update`) its update steps.
    fn run_optimizer(&mut self, update: bool) -> Result<(), RuntimeError> {
        let optimizer = optimizer_of(&self.plan)?;
        let steps: Vec<Step> = optimizer
            .norm
            .iter()
            .chain(&optimizer.update)
            .cloned()
            .collect();
        let phase = if update {
            optimizer.norm.len()..steps.len()
        } else {
            0..optimizer.norm.len()
        };
        let (pointers, tables) = pointer_tables(&steps, |operand| self.address(operand));
        let stream = self.stream.clone();
        let memory = &mut self.optimizer;
        if memory.tables_held != pointers {
            memory.tables.write(&stream, bytes_of(&pointers))?;
            memory.tables_held = pointers;
        }
        // Optimizer steps' grids are constant: their dims never change.
        if memory.dims.0.is_none() {
            memory.dims.write(&stream, bytes_of(&[1, 1, 0, 0]))?;
        }
        let (base, dims) = (memory.tables.pointer(&stream), memory.dims.pointer(&stream));
        for i in phase {
            let Step::Kernel { kernel, grid, .. } = &steps[i] else {
                continue;
            };
            let table = base + 8 * tables[i].expect("kernel steps have pointer tables") as u64;
            self.launch_grid(*kernel, table, dims, grid.programs(1, 1) as i64)?;
        }
        Ok(())
    }

    /// As [`CudaModel::run`], reading back only the outputs `keep` accepts by name (a
    /// training step's loss, not its gradients).
    pub fn run_keeping(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<BTreeMap<String, ArrayD<f32>>, RuntimeError> {
        if self.is_decode() {
            return Err(RuntimeError::Decode(
                "this is a decode plan: run it with `decode`".into(),
            ));
        }
        self.run_at(inputs, 0, keep)
    }

    /// The optimizer's partial sums of squares of the last step's gradients (on the GPU;
    /// only these floats are copied back).
    pub fn grad_partials(&mut self) -> Result<Vec<f32>, RuntimeError> {
        let count = optimizer_of(&self.plan)?.partials;
        stepped(self.memory.slots.len(), &self.plan)?;
        self.optimizer.partials.reserve(&self.stream, count * 4)?;
        self.run_optimizer(false)?;
        self.optimizer.partials.read_f32(&self.stream, count)
    }

    /// AdamW on every trained weight with these scalars, then the packed weights packed
    /// again: all on the GPU.
    pub fn apply_update(&mut self, hyper: &[f32; HYPER]) -> Result<(), RuntimeError> {
        let sizes = trained_sizes(&self.plan)?;
        stepped(self.memory.slots.len(), &self.plan)?;
        if self.optimizer.moments.len() != sizes.len() {
            let mut moments = Vec::new();
            for &n in &sizes {
                let mut pair: [Grown; 2] = Default::default();
                for grown in &mut pair {
                    grown.reserve(&self.stream, n * 4)?;
                }
                moments.push(pair);
            }
            self.optimizer.moments = moments;
        }
        self.optimizer
            .hyper
            .write(&self.stream, bytes_of(&as_words(hyper)))?;
        self.run_optimizer(true)
    }

    /// The weights as they are now on the GPU, in the order of `plan().weights`.
    pub fn read_weights(&mut self) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self.plan
            .weights
            .iter()
            .zip(&self.weights)
            .map(|(spec, grown)| grown.read_f32(&self.stream, spec.len()))
            .collect()
    }

    /// AdamW's moments `(m, v)` of each trained weight (zeros before the first update).
    pub fn moments(&mut self) -> Result<Vec<crate::optim::MomentPair>, RuntimeError> {
        let sizes = trained_sizes(&self.plan)?;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| match self.optimizer.moments.get(i) {
                Some([m, v]) => Ok((m.read_f32(&self.stream, n)?, v.read_f32(&self.stream, n)?)),
                None => Ok((vec![0.0; n], vec![0.0; n])),
            })
            .collect()
    }

    /// Sets AdamW's moments (a resumed run's), one pair per trained weight.
    pub fn set_moments(
        &mut self,
        moments: &[crate::optim::MomentPair],
    ) -> Result<(), RuntimeError> {
        check_moments(&self.plan, moments)?;
        let mut held = Vec::new();
        for (m, v) in moments {
            let mut pair: [Grown; 2] = Default::default();
            for (grown, values) in pair.iter_mut().zip([m, v]) {
                grown.write(&self.stream, bytes_of(&as_words(values)))?;
            }
            held.push(pair);
        }
        self.optimizer.moments = held;
        Ok(())
    }

    fn run_at(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        offset: usize,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<BTreeMap<String, ArrayD<f32>>, RuntimeError> {
        let (batch, seq) = check_inputs(&self.plan, inputs)?;
        let stream = self.stream.clone();
        let plan = &self.plan;
        let memory = &mut self.memory;
        let mut host_inputs: Vec<Buffer> = Vec::new();
        for spec in &plan.inputs {
            let mut buffer = Buffer::default();
            fill(&mut buffer, &inputs[&spec.name]);
            host_inputs.push(buffer);
        }
        memory.inputs.resize_with(host_inputs.len(), Grown::default);
        for (device, host) in memory.inputs.iter_mut().zip(&host_inputs) {
            device.write(&stream, bytes_of(host))?;
        }
        // Memory: each slot sized for its largest value, each workspace for itself.
        let mut slot_bytes = vec![0usize; plan.slots];
        for v in &plan.values {
            let bytes = volume(&v.shape, batch, seq) * v.elem.size();
            slot_bytes[v.slot] = slot_bytes[v.slot].max(words(bytes) * 8);
        }
        memory.slots.resize_with(plan.slots, Grown::default);
        for (slot, &bytes) in memory.slots.iter_mut().zip(&slot_bytes) {
            slot.reserve(&stream, bytes)?;
        }
        memory
            .workspaces
            .resize_with(plan.workspaces.len(), Grown::default);
        for (ws, (shape, elem)) in memory.workspaces.iter_mut().zip(&plan.workspaces) {
            ws.reserve(&stream, volume(shape, batch, seq) * elem.size())?;
        }
        // Positions and RoPE tables: the same for runs of the same length and first position.
        if memory.positions_held != Some((seq, offset)) {
            let positions = words_of_i64(
                (offset as i64..(offset + seq) as i64)
                    .collect::<Vec<_>>()
                    .into_iter(),
            );
            memory.positions.write(&stream, bytes_of(&positions))?;
            memory
                .ropes
                .resize_with(plan.rope_tables.len(), Default::default);
            for (device, (rope, dim)) in memory.ropes.iter_mut().zip(&plan.rope_tables) {
                let (cos, sin) = rope_tables(rope, *dim, seq, offset);
                device[0].write(&stream, bytes_of(&cos))?;
                device[1].write(&stream, bytes_of(&sin))?;
            }
            memory.positions_held = Some((seq, offset));
        }
        // Schedules depend on the inputs only: all of them before the first launch. One
        // over indices only is the same for every run of the same length.
        memory
            .schedules
            .resize_with(plan.schedules.len(), Default::default);
        memory.schedules_held.resize(plan.schedules.len(), None);
        for step in &plan.steps {
            if let Step::Schedule { id } = *step {
                if !plan.schedules[id].per_batch() && memory.schedules_held[id] == Some(seq) {
                    continue;
                }
                let (mask, support) = &self.masks[id];
                let built: BuiltSchedule =
                    build_schedule(&plan.schedules[id], mask, support, batch, seq, &host_inputs);
                let device = &mut memory.schedules[id];
                device[0].write(&stream, bytes_of(&built.rows))?;
                device[1].write(&stream, bytes_of(&built.tiles))?;
                device[2].write(&stream, bytes_of(&built.columns))?;
                device[3].write(&stream, bytes_of(&built.column_tiles))?;
                memory.schedules_held[id] = Some(seq);
            }
        }
        let dims = run_dims(batch, seq, offset);
        if memory.dims_held != dims {
            memory
                .dims
                .write(&stream, bytes_of(&dims.map(|d| d as u64)))?;
            memory.dims_held = dims;
        }
        let (pointers, tables) = pointer_tables(&plan.steps, |operand| self.address(operand));
        // The pointers move only when a buffer was reallocated.
        if self.memory.tables_held != pointers {
            self.memory.tables.write(&stream, bytes_of(&pointers))?;
            self.memory.tables_held = pointers;
        }
        let memory = &self.memory;
        let tables_base = memory.tables.pointer(&stream);
        let dims_base = memory.dims.pointer(&stream);
        for (step, table) in plan.steps.iter().zip(tables) {
            let Step::Kernel {
                kernel,
                grid,
                schedule,
                ..
            } = step
            else {
                continue;
            };
            let table = tables_base + 8 * table.expect("kernel steps have pointer tables") as u64;
            let per_batch = schedule.is_some_and(|id| plan.schedules[id].per_batch());
            let dims = dims_base + DIMS_BYTES * u64::from(per_batch);
            let programs = grid.programs(batch, seq) as i64;
            if let Some(launch) = &plan.kernels[*kernel].tensor_cores {
                // The launch, then its second launch where it has one.
                let mut launches = vec![(launch, &self.functions[*kernel])];
                if let (Some(then), Some(function)) = (&launch.then, &self.then_functions[*kernel])
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
                    let mut builder = stream.launch_builder(function);
                    builder.arg(&table);
                    builder.arg(&dims);
                    // SAFETY: the entry takes (buffers, dims), the buffers of the kernel it
                    // replaces, sized by the plan for these dims.
                    unsafe { builder.launch(config) }
                        .map_err(cuda_error(&format!("launching {}", launch.entry)))?;
                }
            } else {
                self.launch_grid(*kernel, table, dims, programs)?;
            }
        }
        let mut outputs = BTreeMap::new();
        for (name, v) in &plan.outputs {
            if !keep(name) {
                continue;
            }
            let spec = &plan.values[*v];
            let shape: Vec<usize> = spec.shape.iter().map(|e| e.resolve(batch, seq)).collect();
            let count: usize = shape.iter().product();
            debug_assert_eq!(spec.elem, ElemType::F32);
            let values = memory.slots[spec.slot].read_f32(&stream, count)?;
            outputs.insert(
                name.clone(),
                ArrayD::from_shape_vec(IxDyn(&shape), values).expect("the count matches the shape"),
            );
        }
        Ok(outputs)
    }
}

/// Bytes of one step's dims: `[B, T, per_batch, offset]`.
const DIMS_BYTES: u64 = 32;

/// A run's dims, both kinds: schedules whose rows are per batch row point at the second.
fn run_dims(batch: usize, seq: usize, offset: usize) -> [i64; 8] {
    let (b, t, o) = (batch as i64, seq as i64, offset as i64);
    [b, t, 0, o, b, t, 1, o]
}

/// The pointer tables of the plan's kernel steps, one after another, and where each step's
/// starts (in pointers; `None` for other steps); `pointer` gives an operand's device address.
fn pointer_tables(
    steps: &[Step],
    mut pointer: impl FnMut(&Operand) -> u64,
) -> (Vec<u64>, Vec<Option<usize>>) {
    let mut pointers = Vec::new();
    let starts = steps
        .iter()
        .map(|step| {
            let Step::Kernel { operands, .. } = step else {
                return None;
            };
            let start = pointers.len();
            pointers.extend(operands.iter().map(&mut pointer));
            Some(start)
        })
        .collect();
    (pointers, starts)
}

/// For each cache, the index of the positions buffer it reads, and for each such buffer its
/// first cache: caches that put the same positions in the same slots (same sinks and ring,
/// the same positions held) share one, written once per decode step.
fn shared_positions(caches: &[KvCache]) -> (Vec<usize>, Vec<usize>) {
    let mut firsts: Vec<usize> = Vec::new();
    let mut of = Vec::with_capacity(caches.len());
    for (c, cache) in caches.iter().enumerate() {
        let same = |&first: &usize| {
            let other = &caches[first];
            (other.spec.sinks, other.spec.ring) == (cache.spec.sinks, cache.spec.ring)
                && *other.positions == *cache.positions
        };
        match firsts.iter().position(same) {
            Some(kind) => of.push(kind),
            None => {
                of.push(firsts.len());
                firsts.push(c);
            }
        }
    }
    (of, firsts)
}

/// A device buffer kept from run to run: reallocated (zeroed) only when a run needs more.
#[derive(Default)]
struct Grown(Option<CudaSlice<u8>>);

impl Grown {
    /// Makes room for `bytes` bytes (and the slack every buffer has).
    fn reserve(&mut self, stream: &Arc<CudaStream>, bytes: usize) -> Result<(), RuntimeError> {
        if self
            .0
            .as_ref()
            .is_none_or(|b| b.len() < bytes + SLACK_BYTES)
        {
            self.0 = None;
            let buffer = stream
                .alloc_zeros::<u8>(bytes + SLACK_BYTES)
                .map_err(cuda_error("allocating GPU memory"))?;
            self.0 = Some(buffer);
        }
        Ok(())
    }

    /// Copies `bytes` to the start of the buffer, making room first.
    fn write(&mut self, stream: &Arc<CudaStream>, bytes: &[u8]) -> Result<(), RuntimeError> {
        self.reserve(stream, bytes.len())?;
        if let (Some(buffer), false) = (&mut self.0, bytes.is_empty()) {
            stream
                .memcpy_htod(bytes, &mut buffer.slice_mut(0..bytes.len()))
                .map_err(cuda_error("copying to the GPU"))?;
        }
        Ok(())
    }

    /// The buffer's device address (0 before its first `reserve`, which every run makes
    /// before it reads one).
    fn pointer(&self, stream: &Arc<CudaStream>) -> u64 {
        self.0.as_ref().map_or(0, |b| b.device_ptr(stream).0)
    }

    /// The first `count` f32s of the buffer.
    fn read_f32(&self, stream: &Arc<CudaStream>, count: usize) -> Result<Vec<f32>, RuntimeError> {
        let Some(buffer) = self.0.as_ref().filter(|_| count > 0) else {
            return Ok(Vec::new());
        };
        let bytes: Vec<u8> = stream
            .clone_dtoh(&buffer.slice(0..count * 4))
            .map_err(cuda_error("copying from the GPU"))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// The device memory of runs, kept from one to the next.
#[derive(Default)]
struct RunMemory {
    inputs: Vec<Grown>,
    slots: Vec<Grown>,
    workspaces: Vec<Grown>,
    positions: Grown,
    ropes: Vec<[Grown; 2]>,
    /// The length and first position `positions` and `ropes` hold.
    positions_held: Option<(usize, usize)>,
    schedules: Vec<[Grown; 4]>,
    /// The length each schedule was last built for.
    schedules_held: Vec<Option<usize>>,
    /// Every kernel step's pointer table, one after another, and what it holds.
    tables: Grown,
    tables_held: Vec<u64>,
    /// The run's dims ([`run_dims`]) and what they hold.
    dims: Grown,
    dims_held: [i64; 8],
}

/// A training plan's optimizer on the GPU: AdamW's moments, the partial sums of squares,
/// the scalars, and the pointer tables and dims of its steps.
#[derive(Default)]
struct OptimizerMemory {
    moments: Vec<[Grown; 2]>,
    partials: Grown,
    hyper: Grown,
    tables: Grown,
    tables_held: Vec<u64>,
    dims: Grown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_step_has_its_table_of_pointers_in_one_array() {
        use crate::plan::Grid;
        let kernel = |kernel: usize, operands: Vec<Operand>| Step::Kernel {
            kernel,
            operands,
            grid: Grid {
                rows: Vec::new(),
                row_chunk: 1,
                cols: 1,
            },
            schedule: None,
        };
        let steps = [
            kernel(0, vec![Operand::Input(0), Operand::Value(3)]),
            Step::Schedule { id: 0 },
            kernel(1, vec![Operand::Weight(2)]),
            kernel(
                0,
                vec![Operand::Value(3), Operand::Positions, Operand::Value(4)],
            ),
        ];
        let address = |operand: &Operand| match *operand {
            Operand::Input(i) => 1000 + i as u64,
            Operand::Value(i) => 2000 + i as u64,
            Operand::Weight(i) => 3000 + i as u64,
            _ => 7,
        };
        let (pointers, starts) = pointer_tables(&steps, address);
        assert_eq!(pointers, [1000, 2003, 3002, 2003, 7, 2004]);
        assert_eq!(starts, [Some(0), None, Some(2), Some(3)]);
    }

    #[test]
    fn per_batch_schedules_read_the_second_dims() {
        let dims = run_dims(2, 17, 40);
        assert_eq!(dims[..4], [2, 17, 0, 40]);
        assert_eq!(dims[4..], [2, 17, 1, 40]);
        assert_eq!(DIMS_BYTES, 4 * 8);
    }

    #[test]
    fn caches_that_keep_the_same_slots_share_their_positions() {
        use crate::plan::CacheSpec;
        let cache = |sinks: usize, ring: Option<usize>, layer: usize, held: usize| {
            let spec = CacheSpec {
                kv_heads: 2,
                kv_heads_held: vec![0, 1],
                prefill_outputs: 0,
                head_dim: 8,
                sinks,
                ring,
                min_prompt: 0,
                block: 4,
                layer: Some(layer),
            };
            let mut cache = KvCache::new(spec.clone(), 1);
            cache.reserve(spec.slots_for(64));
            for p in 0..held {
                cache.set_position(spec.slot(p), p);
            }
            cache
        };
        // Zebra: a global layer, then three local ones, twice; then a local cache with sinks
        // and one that has seen fewer tokens (it may not share).
        let caches = [
            cache(0, None, 0, 20),
            cache(0, Some(8), 1, 20),
            cache(0, Some(8), 2, 20),
            cache(0, Some(8), 3, 20),
            cache(0, None, 4, 20),
            cache(2, Some(8), 5, 20),
            cache(0, Some(8), 6, 5),
        ];
        let (of, firsts) = shared_positions(&caches);
        assert_eq!(of, [0, 1, 1, 1, 0, 2, 3]);
        assert_eq!(firsts, [0, 1, 5, 6]);
        assert!(shared_positions(&[]).0.is_empty());
    }

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
