//! The real model, run in-process through the engine: greedy chat answers the capital question.

mod common;

use std::sync::Arc;

use llmo_serve::engine::{EngineConfig, EngineHandle};
use llmo_serve::metrics::Metrics;
use llmo_serve::model::{load, Quantization};
use llmo_serve::tokenizer::ChatMessage;

fn engine(q: Quantization) -> EngineHandle {
    llmo_serve::set_compute_threads(1);
    let loaded = load(&common::model_path(), q, 2048, 1).expect("load model");
    EngineHandle::start(
        loaded,
        EngineConfig {
            block_size: 16,
            num_blocks: 256,
            max_batch_tokens: 512,
            max_running: 32,
            max_waiting: 64,
            context_length: 2048,
        },
        Arc::new(Metrics::new()),
    )
    .expect("start engine")
}

#[tokio::test]
async fn greedy_chat_answers_paris() {
    let e = engine(Quantization::Auto);
    let tk = &e.tokenizer;
    let text = tk
        .chat_template
        .render(&[ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }])
        .unwrap();
    assert!(text.contains("<|im_start|>user\nWhat is the capital of France?<|im_end|>"));
    let prompt = tk.encode(&text);
    assert_eq!(prompt[0], 1, "chat prompt starts with <|im_start|>");
    let answer = common::generate(&e, prompt, 24).await;
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}

#[tokio::test]
async fn greedy_completion_matches_reference_start() {
    let e = engine(Quantization::Auto);
    let prompt = e.tokenizer.encode("Once upon a time");
    assert_eq!(e.tokenizer.decode(&prompt), "Once upon a time");
    let text = common::generate(&e, prompt, 8).await;
    assert!(text.starts_with(", the city of"), "continuation: {text:?}");
}

/// The W8A8 and W4A8 kernels round each input row on its own, so a request's greedy text does
/// not depend on the other rows in its steps: prompts of different lengths prefill and decode
/// together.
#[tokio::test]
async fn int8_and_int4_requests_in_one_batch_match_each_alone() {
    for q in [Quantization::Int8, Quantization::Int4] {
        batched_matches_alone(q).await;
    }
}

async fn batched_matches_alone(q: Quantization) {
    let e = engine(q);
    let prompts: Vec<Vec<u32>> = [
        "Once upon a time",
        "The river begins as a thin stream of melted snow high in the mountains.",
        "The capital of France is",
        "def fibonacci(n):",
        "A list of fruits: apple, banana,",
        "In 1969 the first people walked on the",
    ]
    .iter()
    .map(|p| e.tokenizer.encode(p))
    .collect();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(common::generate(&e, p.clone(), 20).await);
    }
    let together =
        futures::future::join_all(prompts.iter().map(|p| common::generate(&e, p.clone(), 20)))
            .await;
    assert_eq!(together, alone, "{q}");
    assert!(alone.iter().all(|t| !t.trim().is_empty()), "{q}: {alone:?}");
}
