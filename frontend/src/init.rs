//! Deterministic random weights for a model (`zebra init`).

use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use zebra_ir::Weights;

use crate::spec::{Init, ModelSpec};

/// Draws every weight of the model: normal(0, 0.02) matrices and all-ones norm scales, as
/// Hugging Face initializes Llama. The same seed always gives the same weights, on every
/// machine (ChaCha8, one stream per weight in name order).
pub fn random_weights(model: &ModelSpec, seed: u64) -> Weights {
    let mut weights = Weights::new();
    for (index, spec) in model.weight_specs().into_iter().enumerate() {
        let count: usize = spec.shape.iter().product();
        let values: Vec<f32> = match spec.init {
            Init::Ones => vec![1.0; count],
            Init::Zeros => vec![0.0; count],
            Init::Normal(std) => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(index as u64);
                let normal = Normal::new(0.0, std).expect("a positive standard deviation");
                (0..count).map(|_| normal.sample(&mut rng) as f32).collect()
            }
        };
        let tensor = ArrayD::from_shape_vec(IxDyn(&spec.shape), values)
            .expect("the value count matches the shape");
        weights.insert(spec.name, tensor);
    }
    weights
}
