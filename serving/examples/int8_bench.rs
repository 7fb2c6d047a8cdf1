//! Matmul speed of the weight formats on the shapes of SmolLM2-135M, against f32 in the same run:
//! f32 (candle's GEMM), candle's Q8_0, and llmo's W8A8 and W4A8 kernels, for a few batch sizes.
//! W8A8 and W4A8 run with the CPU's best kernel and again with the AVX2 one (what CPUs without
//! VNNI get).
//!
//! `cargo run --release -p llmo-serve --example int8_bench -- [threads]`

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use llmo_serve::model::int4::Int4Matrix;
use llmo_serve::model::int8::{Int8Matrix, Kernel};

fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let mut reps = 0;
        while t.elapsed().as_secs_f64() < 0.05 {
            f();
            reps += 1;
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

/// `t ÷ f` to two places, or `-` for a kernel this CPU lacks.
fn ratio(t: Option<f64>, f: f64) -> String {
    t.map_or("-".into(), |t| format!("{:.2}", t / f))
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("threads"))
        .unwrap_or(2);
    llmo_serve::set_compute_threads(threads);
    let shapes = [
        ("qkv", 960, 576),
        ("o", 576, 576),
        ("gate_up", 3072, 576),
        ("down", 576, 1536),
        ("lm_head", 49152, 576),
    ];
    println!(
        "| matrix | rows | f32 GFLOP/s | Q8_0 ÷ f32 time | int8 ÷ f32 time | int8 AVX2 ÷ f32 time | int4 ÷ f32 time | int4 AVX2 ÷ f32 time |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let avx2 = Kernel::available().contains(&Kernel::Avx2);
    for (name, n, k) in shapes {
        let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        let q8 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let i8m = Int8Matrix::quantize(&wv, n, k);
        let i4m = Int4Matrix::quantize(&wv, n, k);
        for m in [1usize, 16, 256] {
            if name == "lm_head" && m == 256 {
                continue;
            }
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let f = time(|| {
                x.matmul(&wt).unwrap();
            });
            let q = time(|| {
                q8.forward(&x).unwrap();
            });
            let i = time(|| {
                i8m.matmul(&xv, m);
            });
            let i2 = avx2.then(|| {
                time(|| {
                    i8m.matmul_with(Kernel::Avx2, &xv, m);
                })
            });
            let i4 = time(|| {
                i4m.matmul(&xv, m);
            });
            let i42 = avx2.then(|| {
                time(|| {
                    i4m.matmul_with(Kernel::Avx2, &xv, m);
                })
            });
            let gflops = 2.0 * (m * n * k) as f64 / f / 1e9;
            println!(
                "| {name} | {m} | {gflops:.1} | {:.2} | {:.2} | {} | {:.2} | {} |",
                q / f,
                i / f,
                ratio(i2, f),
                i4 / f,
                ratio(i42, f)
            );
        }
    }
}
