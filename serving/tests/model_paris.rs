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
