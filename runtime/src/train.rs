//! The training loop's step: the compiled training graph (loss and gradients), then AdamW.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use zebra_ir::Weights;

use crate::Executor;
use crate::cpu::{CpuModel, RuntimeError, Tensor};
use crate::data::Batch;
use crate::optim::{AdamW, AdamWConfig};

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The mean cross-entropy per scored token (nats).
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub scored: usize,
}

/// A model being trained: its compiled training step, its parameters and the optimizer.
pub struct Trainer {
    model: Box<dyn Executor>,
    pub params: BTreeMap<String, Vec<f32>>,
    shapes: BTreeMap<String, Vec<usize>>,
    pub optimizer: AdamW,
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
        Trainer::with_executor(Box::new(model), weights, optimizer, config)
    }

    /// A trainer on any executor (the CPU's, or a GPU's) whose plan is a training step.
    pub fn with_executor(
        model: Box<dyn Executor>,
        weights: &Weights,
        optimizer: AdamW,
        config: AdamWConfig,
    ) -> Result<Trainer, RuntimeError> {
        let mut params = BTreeMap::new();
        let mut shapes = BTreeMap::new();
        let raw = crate::cpu::raw_weights(model.plan(), weights)?;
        for (spec, values) in model.plan().weights.iter().zip(raw) {
            params.insert(spec.name.clone(), values);
            shapes.insert(spec.name.clone(), spec.shape.clone());
        }
        Ok(Trainer {
            model,
            params,
            shapes,
            optimizer,
            config,
        })
    }

    /// The current weights.
    pub fn weights(&self) -> Weights {
        let mut weights = Weights::new();
        for (name, values) in &self.params {
            weights.insert(
                name.clone(),
                ArrayD::from_shape_vec(IxDyn(&self.shapes[name]), values.clone())
                    .expect("parameters keep their shapes"),
            );
        }
        weights
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

    /// The loss of a batch with the current weights, without updating them: the sum over
    /// scored tokens, and their count.
    pub fn evaluate(&mut self, batch: &Batch) -> Result<(f64, usize), RuntimeError> {
        let inputs = self.inputs(batch);
        let outputs = self.model.run(&inputs)?;
        let loss = f64::from(outputs["loss"].iter().copied().next().unwrap_or(0.0));
        Ok((loss, batch.scored()))
    }

    /// One training step on a batch.
    pub fn step(&mut self, batch: &Batch) -> Result<StepReport, RuntimeError> {
        let inputs = self.inputs(batch);
        let outputs = self.model.run(&inputs)?;
        let scored = batch.scored();
        let loss = f64::from(outputs["loss"].iter().copied().next().unwrap_or(0.0));
        let scale = 1.0 / scored.max(1) as f32;
        let grads: BTreeMap<String, Vec<f32>> = self
            .params
            .keys()
            .filter_map(|name| {
                let grad = outputs.get(&format!("grad:{name}"))?;
                Some((name.clone(), grad.iter().map(|g| g * scale).collect()))
            })
            .collect();
        let shapes = &self.shapes;
        let update = self
            .optimizer
            .update(&self.config, &mut self.params, &grads, &|name| {
                decays(name, &shapes[name])
            });
        self.model.set_weights(&self.weights())?;
        Ok(StepReport {
            loss: loss / scored.max(1) as f64,
            grad_norm: update.grad_norm,
            lr: update.lr,
            scored,
        })
    }
}
