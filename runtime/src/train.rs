//! The training loop's step: the compiled training graph (loss and gradients), then the
//! compiled AdamW.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use zebra_ir::Weights;

use crate::Executor;
use crate::cpu::{CpuModel, RuntimeError, Tensor, optimizer_of, trained_sizes};
use crate::data::Batch;
use crate::optim::{AdamW, AdamWConfig, Moments};

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The mean cross-entropy per scored token (nats).
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub scored: usize,
}

/// A model being trained: its compiled training step and optimizer, whose weights and
/// AdamW moments live in the executor (on a GPU, on the GPU: a step copies back only its
/// loss and the partial sums of squares of its gradients).
pub struct Trainer {
    model: Box<dyn Executor>,
    /// The AdamW updates made.
    steps: u64,
    pub config: AdamWConfig,
}

/// Weight decay goes to matrices, not to norm gains or embedding tables.
pub fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2 && !name.contains("embed")
}

impl Trainer {
    /// Loads the training artifact in `dir` with initial weights.
    pub fn new(
        dir: &Path,
        weights: &Weights,
        optimizer: AdamW,
        config: AdamWConfig,
        threads: usize,
    ) -> Result<Trainer, RuntimeError> {
        let model = CpuModel::load(dir, weights, threads)?;
        Trainer::with_executor(Box::new(model), optimizer, config)
    }

    /// A trainer on any executor (the CPU's, or a GPU's) whose plan is a training step,
    /// loaded with the weights to start from, with the optimizer state `optimizer` (a
    /// resumed run's; moments it lacks start at zero).
    pub fn with_executor(
        mut model: Box<dyn Executor>,
        optimizer: AdamW,
        config: AdamWConfig,
    ) -> Result<Trainer, RuntimeError> {
        let plan = model.plan();
        let moments: Vec<crate::optim::MomentPair> = optimizer_of(plan)?
            .params
            .iter()
            .map(|p| {
                let spec = &plan.weights[p.weight];
                match optimizer.moments.get(&spec.name) {
                    Some(Moments { m, v }) => (m.clone(), v.clone()),
                    None => (vec![0.0; spec.len()], vec![0.0; spec.len()]),
                }
            })
            .collect();
        model.set_moments(&moments)?;
        Ok(Trainer {
            model,
            steps: optimizer.step,
            config,
        })
    }

    /// The number of trained parameters.
    pub fn parameters(&self) -> usize {
        trained_sizes(self.model.plan()).map_or(0, |sizes| sizes.iter().sum())
    }

    /// The current weights (read back from the executor).
    pub fn weights(&mut self) -> Result<Weights, RuntimeError> {
        let values = self.model.read_weights()?;
        let mut weights = Weights::new();
        for (spec, values) in self.model.plan().weights.iter().zip(values) {
            weights.insert(
                spec.name.clone(),
                ArrayD::from_shape_vec(IxDyn(&spec.shape), values)
                    .expect("weights keep their shapes"),
            );
        }
        Ok(weights)
    }

    /// The optimizer's state (read back from the executor), for a checkpoint.
    pub fn optimizer_state(&mut self) -> Result<AdamW, RuntimeError> {
        let moments = self.model.moments()?;
        let plan = self.model.plan();
        let params = &optimizer_of(plan)?.params;
        Ok(AdamW {
            step: self.steps,
            moments: params
                .iter()
                .zip(moments)
                .map(|(p, (m, v))| (plan.weights[p.weight].name.clone(), Moments { m, v }))
                .collect(),
        })
    }

    /// The inputs of the training step for a batch.
    fn inputs(&self, batch: &Batch) -> BTreeMap<String, Tensor> {
        let shape = IxDyn(&[batch.batch, batch.seq]);
        let mut inputs = BTreeMap::new();
        for spec in &self.model.plan().inputs {
            let values = match spec.name.as_str() {
                "tokens" => batch.tokens.clone(),
                "targets" => batch.targets.clone(),
                // Side inputs (document ids).
                _ => batch.documents.clone(),
            };
            inputs.insert(
                spec.name.clone(),
                Tensor::I64(ArrayD::from_shape_vec(shape.clone(), values).expect("[B, T]")),
            );
        }
        inputs
    }

    /// The loss of a batch, summed over its scored tokens: the training step run, only its
    /// loss read back.
    fn loss(&mut self, batch: &Batch) -> Result<f64, RuntimeError> {
        let inputs = self.inputs(batch);
        let outputs = self.model.run_keeping(&inputs, &|name| name == "loss")?;
        Ok(f64::from(
            outputs["loss"].iter().copied().next().unwrap_or(0.0),
        ))
    }

    /// The loss of a batch with the current weights, without updating them: the sum over
    /// scored tokens, and their count.
    pub fn evaluate(&mut self, batch: &Batch) -> Result<(f64, usize), RuntimeError> {
        Ok((self.loss(batch)?, batch.scored()))
    }

    /// One training step on a batch: the loss and gradients, their global norm, then
    /// AdamW (with clipping) on every weight, all where the executor runs. Non-finite
    /// gradients leave the weights untouched and are reported through the norm.
    pub fn step(&mut self, batch: &Batch) -> Result<StepReport, RuntimeError> {
        let loss = self.loss(batch)?;
        let scored = batch.scored();
        let scale = 1.0 / scored.max(1) as f64;
        let squares: f64 = self
            .model
            .grad_partials()?
            .iter()
            .map(|&x| f64::from(x))
            .sum();
        let grad_norm = squares.sqrt() * scale;
        let lr = self.config.lr_at(self.steps);
        if grad_norm.is_finite() {
            self.steps += 1;
            let hyper = self
                .config
                .hyper(lr, self.steps, scale * self.config.clip(grad_norm));
            self.model.apply_update(&hyper)?;
        }
        Ok(StepReport {
            loss: loss * scale,
            grad_norm,
            lr,
            scored,
        })
    }
}
