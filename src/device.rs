//! Where `zebra run`, `train`, `generate` and `eval` run their compiled plans: on this CPU's
//! threads, or on an NVIDIA GPU (`--device cuda`), for which the plans are compiled to PTX
//! (`--target`, by default the GPU's own, and `--dtype` for tensor cores). On the CPU,
//! `--dtype bf16` keeps the projections' weights in bf16.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use zebra_codegen::artifact::BuildOptions;
use zebra_codegen::kernels::attention_mma::Half;
use zebra_codegen::ptx::GpuTarget;
use zebra_ir::{Graph, Weights};
use zebra_runtime::{CpuModel, Executor};

/// The command line's device options, shared by the commands that run models.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DeviceArgs {
    /// `cpu`, or `cuda` for an NVIDIA GPU (device 0).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// With --device cuda: `sm_80` or `sm_90` (default: the GPU's).
    #[arg(long)]
    pub target: Option<String>,
    /// With --device cuda: `f32` (the default), or `bf16` or `f16` to run the projections
    /// and the attention on tensor cores (f32 accumulation). On the CPU: `bf16` keeps the
    /// projections' weights in bf16 (half the bytes a generated token reads; f32 arithmetic;
    /// not for training).
    #[arg(long)]
    pub dtype: Option<String>,
}

/// A device, checked: its GPU present, its target and type known.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Device {
    Cpu {
        threads: usize,
        /// The projections' weights in bf16 (`--dtype bf16`).
        bf16_weights: bool,
    },
    Cuda {
        target: GpuTarget,
        half: Option<Half>,
    },
}

impl Device {
    /// The device the options name; `--device cuda` without a driver, or options that do
    /// not go together, are errors that say so.
    pub fn from_args(args: &DeviceArgs, threads: usize) -> Result<Device> {
        match args.device.as_str() {
            "cpu" => {
                if args.target.is_some() {
                    bail!("--target chooses the GPU's kernels: use it with --device cuda");
                }
                let bf16_weights = match args.dtype.as_deref() {
                    None | Some("f32") => false,
                    Some("bf16") => true,
                    Some(name) => bail!(
                        "--dtype `{name}` on the CPU: `f32` (the default) or `bf16` (the \
                         projections' weights in bf16)"
                    ),
                };
                Ok(Device::Cpu {
                    threads,
                    bf16_weights,
                })
            }
            "cuda" => {
                let half = match args.dtype.as_deref() {
                    None | Some("f32") => None,
                    Some(name) => Some(Half::from_name(name).ok_or_else(|| {
                        anyhow!("unknown --dtype `{name}`: `f32`, `bf16` or `f16`")
                    })?),
                };
                let named =
                    match &args.target {
                        Some(name) => Some(GpuTarget::from_name(name).ok_or_else(|| {
                            anyhow!("unknown --target `{name}`: `sm_80` or `sm_90`")
                        })?),
                        None => None,
                    };
                if !zebra_runtime::cuda::driver_present() {
                    bail!(
                        "--device cuda: no NVIDIA driver was found (libcuda.so cannot be \
                         loaded); run on a machine with an NVIDIA GPU, or use --device cpu"
                    );
                }
                let target = match named {
                    Some(target) => target,
                    None => {
                        let (major, minor) = zebra_runtime::cuda::compute_capability()?;
                        match major {
                            9.. => GpuTarget { sm: 90 },
                            8 => GpuTarget { sm: 80 },
                            _ => bail!(
                                "the GPU has compute capability {major}.{minor}: Zebra's GPU \
                                 kernels need sm_80 or later"
                            ),
                        }
                    }
                };
                Ok(Device::Cuda { target, half })
            }
            other => bail!("unknown --device `{other}`: `cpu` or `cuda`"),
        }
    }

    /// The device in words, for reports.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu {
                bf16_weights: false,
                ..
            } => "the CPU".into(),
            Device::Cpu {
                bf16_weights: true, ..
            } => "the CPU (bf16 weights)".into(),
            Device::Cuda {
                target,
                half: Some(half),
            } => format!("the GPU ({}, {})", target.name(), half.name()),
            // The f32 plans' kernels are correct everywhere, and slow on a GPU: say so.
            Device::Cuda { target, half: None } => format!(
                "the GPU ({}, f32 without tensor cores: --dtype bf16 puts the projections and \
                 attention on them)",
                target.name()
            ),
        }
    }

    /// A short name for cache keys.
    pub fn key(&self) -> String {
        match self {
            Device::Cpu { bf16_weights, .. } => {
                if *bf16_weights { "cpu-bf16" } else { "cpu" }.into()
            }
            Device::Cuda { target, half } => {
                format!("{}-{}", target.name(), half.map_or("f32", Half::name))
            }
        }
    }

    /// The optimizer's options for this device: on the CPU with the tiles the tuning
    /// database recorded for this machine.
    pub fn optimizer_options(&self) -> zebra_passes::Options {
        match self {
            Device::Cpu { .. } => crate::tune::options(zebra_passes::Target::Cpu),
            Device::Cuda { .. } => zebra_passes::Options::default(),
        }
    }

    /// Compiles `graph` into the artifact directory `dir` for this device.
    pub fn build(&self, graph: &Graph, dir: &Path, options: &BuildOptions) -> Result<()> {
        match self {
            Device::Cpu { bf16_weights, .. } => zebra_codegen::artifact::build_cpu(
                graph,
                dir,
                options,
                None,
                zebra_codegen::plan::PlanOptions {
                    bf16_weights: *bf16_weights,
                },
            )?,
            Device::Cuda { target, half } => zebra_codegen::artifact::build_gpu(
                graph,
                dir,
                options,
                *target,
                half.map(|half| zebra_codegen::kernels::attention_mma::TensorCores {
                    half,
                    // The tuning database's settings for this GPU's attentions.
                    attention: crate::tune::mma_choice(
                        if target.sm >= 90 {
                            zebra_passes::Target::Sm90
                        } else {
                            zebra_passes::Target::Sm80
                        },
                        Default::default(),
                        graph,
                    )
                    .0,
                }),
            )?,
        };
        Ok(())
    }

    /// Loads an artifact built by [`Device::build`] with its weights.
    pub fn load(&self, dir: &Path, weights: &Weights) -> Result<Box<dyn Executor>> {
        Ok(match self {
            Device::Cpu { threads, .. } => Box::new(CpuModel::load(dir, weights, *threads)?),
            Device::Cuda { .. } => Box::new(zebra_runtime::cuda::CudaModel::load(dir, weights)?),
        })
    }

    /// Loads the prefill and decode artifacts of one model with its weights, which both
    /// plans then read from one copy.
    pub fn load_generation(
        &self,
        prefill: &Path,
        decode: &Path,
        weights: &Weights,
    ) -> Result<(Box<dyn Executor>, Box<dyn Executor>)> {
        Ok(match self {
            Device::Cpu { threads, .. } => {
                let (first, second) = CpuModel::load_pair(prefill, decode, weights, *threads)?;
                (Box::new(first), Box::new(second))
            }
            Device::Cuda { .. } => {
                let (first, second) =
                    zebra_runtime::cuda::CudaModel::load_pair(prefill, decode, weights)?;
                (Box::new(first), Box::new(second))
            }
        })
    }
}
