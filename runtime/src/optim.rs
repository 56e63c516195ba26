//! AdamW with decoupled weight decay, global-norm gradient clipping, and a learning rate that
//! warms up linearly then decays along a cosine. f32 master weights; deterministic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::plan::{HYPER, Hyper};

/// The optimizer's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// The peak learning rate.
    pub lr: f64,
    /// The learning rate at the end of the cosine decay, as a fraction of the peak.
    pub min_lr_ratio: f64,
    pub warmup_steps: u64,
    /// Steps of the whole schedule (the cosine reaches its floor here).
    pub total_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norm gains).
    pub weight_decay: f64,
    /// Gradients are scaled down so that their global L2 norm is at most this (0: no clipping).
    pub clip_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> AdamWConfig {
        AdamWConfig {
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 100,
            total_steps: 1000,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip_norm: 1.0,
        }
    }
}

impl AdamWConfig {
    /// Refuses settings outside their range, naming the command-line flag that sets each.
    pub fn check(&self) -> Result<(), String> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!("--lr must be a positive number, found {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(format!(
                "--min-lr-ratio must be between 0 and 1 (a fraction of the peak learning rate), \
                 found {}",
                self.min_lr_ratio
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(format!(
                "--weight-decay must be 0 or a positive number, found {}",
                self.weight_decay
            ));
        }
        if !(self.clip_norm >= 0.0 && self.clip_norm.is_finite()) {
            return Err(format!(
                "--clip must be 0 (no clipping) or a positive norm, found {}",
                self.clip_norm
            ));
        }
        Ok(())
    }

    /// The learning rate of step `step` (counted from 0).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// The scalars of the compiled optimizer's update (in the order of
    /// [`crate::plan::Hyper`]) at step `t` (counted from 1) with learning rate `lr`, the
    /// gradients multiplied by `grad_scale`.
    pub fn hyper(&self, lr: f64, t: u64, grad_scale: f64) -> [f32; HYPER] {
        let t = t.min(i32::MAX as u64) as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let mut out = [0.0f32; HYPER];
        for (h, value) in [
            (Hyper::Lr, lr),
            (Hyper::Beta1, b1),
            (Hyper::OneMinusBeta1, 1.0 - b1),
            (Hyper::Beta2, b2),
            (Hyper::OneMinusBeta2, 1.0 - b2),
            (Hyper::InvCorrection1, 1.0 / (1.0 - b1.powi(t))),
            (Hyper::InvCorrection2, 1.0 / (1.0 - b2.powi(t))),
            (Hyper::Eps, self.eps),
            (Hyper::WeightDecay, self.weight_decay),
            (Hyper::GradScale, grad_scale),
        ] {
            out[h as usize] = value as f32;
        }
        out
    }

    /// The factor clipping scales gradients of global norm `norm` by.
    pub fn clip(&self, norm: f64) -> f64 {
        if self.clip_norm > 0.0 && norm > self.clip_norm {
            self.clip_norm / norm
        } else {
            1.0
        }
    }
}

/// A trained weight's AdamW moments `(m, v)`, as executors hold them.
pub type MomentPair = (Vec<f32>, Vec<f32>);

/// The moments of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// AdamW's state: the step count and the moments of every parameter, by name. Training
/// runs AdamW's compiled kernels where the weights are ([`crate::plan::OptimizerPlan`]);
/// [`AdamW::update`] is their reference, in f64 on the host.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct AdamW {
    pub step: u64,
    pub moments: BTreeMap<String, Moments>,
}

/// What one update did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Update {
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    /// Applies one update to `params` from `grads` (same names and sizes; the caller has
    /// already divided the gradients by the number of tokens). `decay` says which parameters
    /// get weight decay. Non-finite gradients leave the parameters untouched and are
    /// reported through the returned norm (`NaN` or infinite).
    pub fn update(
        &mut self,
        config: &AdamWConfig,
        params: &mut BTreeMap<String, Vec<f32>>,
        grads: &BTreeMap<String, Vec<f32>>,
        decay: &dyn Fn(&str) -> bool,
    ) -> Update {
        let norm = grads
            .values()
            .flat_map(|g| g.iter())
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        let lr = config.lr_at(self.step);
        if !norm.is_finite() {
            return Update {
                lr,
                grad_norm: norm,
            };
        }
        let clip = config.clip(norm);
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (config.beta1, config.beta2);
        let correction1 = 1.0 - b1.powi(t);
        let correction2 = 1.0 - b2.powi(t);
        for (name, param) in params.iter_mut() {
            let Some(grad) = grads.get(name) else {
                continue;
            };
            let moments = self.moments.entry(name.clone()).or_insert_with(|| Moments {
                m: vec![0.0; param.len()],
                v: vec![0.0; param.len()],
            });
            let wd = if decay(name) {
                config.weight_decay
            } else {
                0.0
            };
            for i in 0..param.len() {
                let g = f64::from(grad[i]) * clip;
                let m = b1 * f64::from(moments.m[i]) + (1.0 - b1) * g;
                let v = b2 * f64::from(moments.v[i]) + (1.0 - b2) * g * g;
                moments.m[i] = m as f32;
                moments.v[i] = v as f32;
                let step = (m / correction1) / ((v / correction2).sqrt() + config.eps);
                let p = f64::from(param[i]);
                param[i] = (p - lr * (step + wd * p)) as f32;
            }
        }
        Update {
            lr,
            grad_norm: norm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_to_its_floor() {
        let c = AdamWConfig {
            lr: 1.0,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            total_steps: 110,
            ..AdamWConfig::default()
        };
        assert!((c.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(110) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(500) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_a_hand_computed_step() {
        let config = AdamWConfig {
            lr: 0.1,
            warmup_steps: 0,
            total_steps: 1,
            min_lr_ratio: 1.0,
            weight_decay: 0.5,
            clip_norm: 0.0,
            ..AdamWConfig::default()
        };
        let mut params = BTreeMap::from([("w".to_string(), vec![1.0f32, -2.0])]);
        let grads = BTreeMap::from([("w".to_string(), vec![0.5f32, -0.25])]);
        let mut opt = AdamW::default();
        opt.update(&config, &mut params, &grads, &|_| true);
        // First step: m_hat = g, v_hat = g^2, so the step is sign(g) (up to eps).
        let expect = |p: f64, g: f64| p - 0.1 * (g.signum() + 0.5 * p);
        assert!((f64::from(params["w"][0]) - expect(1.0, 0.5)).abs() < 1e-6);
        assert!((f64::from(params["w"][1]) - expect(-2.0, -0.25)).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_the_gradient_to_the_norm() {
        let config = AdamWConfig {
            lr: 1.0,
            warmup_steps: 0,
            total_steps: 1,
            min_lr_ratio: 1.0,
            weight_decay: 0.0,
            clip_norm: 1.0,
            beta1: 0.0,
            beta2: 0.0,
            ..AdamWConfig::default()
        };
        let mut params = BTreeMap::from([("w".to_string(), vec![0.0f32; 2])]);
        let grads = BTreeMap::from([("w".to_string(), vec![3.0f32, 4.0])]);
        let mut opt = AdamW::default();
        let update = opt.update(&config, &mut params, &grads, &|_| false);
        assert!((update.grad_norm - 5.0).abs() < 1e-12);
        // With beta = 0 the step is g / |g| elementwise: clipping does not change its sign.
        assert!((params["w"][0] + 1.0).abs() < 1e-5);
        let bad = BTreeMap::from([("w".to_string(), vec![f32::NAN, 0.0])]);
        let before = params.clone();
        let update = opt.update(&config, &mut params, &bad, &|_| false);
        assert!(update.grad_norm.is_nan());
        assert_eq!(params, before);
    }
}
