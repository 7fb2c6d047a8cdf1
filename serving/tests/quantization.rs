//! Quantization on load: every weight format loads and runs, and its perplexity on a fixed text
//! stays close to the f32 reference (the GGUF's Q4_1 weights, dequantized exactly).

mod common;

use llmo_serve::model::{load, LoadedModel, Quantization};

const TEXT: &str = include_str!("data/perplexity.txt");
const WINDOW: usize = 192;

/// Perplexity over the first `WINDOW` tokens of the text.
pub fn perplexity(m: &LoadedModel) -> f64 {
    let tokens = m.tokenizer.encode(TEXT);
    let tokens = &tokens[..WINDOW.min(tokens.len())];
    let logits = common::logits_of(&m.model, tokens);
    common::perplexity_of(&logits, tokens)
}

#[test]
fn quantized_formats_stay_close_to_f32() {
    llmo_serve::set_compute_threads(1);
    let path = common::model_path();
    let reference = perplexity(&load(&path, Quantization::F32, 512, 1).unwrap());
    assert!(
        reference > 1.0 && reference < 40.0,
        "f32 perplexity {reference} is implausible for English prose"
    );
    for (q, tolerance) in [
        (Quantization::Int8, 1.05),
        (Quantization::Stored, 1.05),
        (Quantization::Q6K, 1.10),
        (Quantization::Int4, 1.05),
    ] {
        let m = load(&path, q, 512, 1).unwrap();
        let p = perplexity(&m);
        eprintln!(
            "{q}: perplexity {p:.3} (f32 {reference:.3}), weights {} MiB",
            m.model.weight_bytes() >> 20
        );
        assert!(
            p < reference * tolerance,
            "{q}: perplexity {p} vs f32 {reference}"
        );
    }
}
