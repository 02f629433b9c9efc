//! What CPU this is and which of our kernels run on it.
//!
//! wick's own CPU kernels (attention, reduced-precision products, fused layers) are compiled for
//! several instruction sets in one binary and one is chosen at run time, so the same binary runs
//! on AVX2-only machines and uses AVX-512 where it exists. `WICK_CPU_ISA=avx2|portable` caps the
//! choice (read once), so the AVX2 path can be run and tested on an AVX-512 machine;
//! [`set_isa_cap`] does the same from code (tests). The f32 matrix product of wick's ops is ours
//! at the AVX-512 and AVX2 levels and the `gemm` crate's at the portable one (`ops::gemm`); gemm,
//! which candle's own matmul also runs, picks its kernels by CPU detection (AVX-512 ones through
//! its `x86-v4` feature) and ignores the cap.

use std::sync::atomic::{AtomicU8, Ordering};

/// Instruction-set levels of our kernels, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust (whatever the compiler's baseline target allows).
    Portable = 0,
    /// AVX2 + FMA + F16C.
    Avx2 = 1,
    /// AVX-512 F/BW/DQ/VL (+ F16C).
    Avx512 = 2,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" => Ok(Isa::Portable),
            "avx2" => Ok(Isa::Avx2),
            "avx512" | "avx-512" => Ok(Isa::Avx512),
            other => Err(format!("unknown instruction set {other:?}: expected avx512, avx2 or portable")),
        }
    }
}

/// The best level this CPU supports.
pub fn detected_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        static LEVEL: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            match (avx512 && avx2, avx2) {
                (true, _) => Isa::Avx512,
                (false, true) => Isa::Avx2,
                _ => Isa::Portable,
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Isa::Portable
}

/// The levels this CPU can run, lowest first: tests run a kernel at each and compare.
pub fn available_levels() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2, Isa::Avx512].into_iter().filter(|&l| l <= detected_isa()).collect()
}

/// 255 = no cap set from code yet (then the environment decides).
static CAP: AtomicU8 = AtomicU8::new(255);

fn env_cap() -> Isa {
    static ENV: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ENV.get_or_init(|| match std::env::var("WICK_CPU_ISA") {
        Ok(s) if !s.trim().is_empty() => s.parse().unwrap_or_else(|e| {
            eprintln!("warning: WICK_CPU_ISA: {e}; using the best the CPU has");
            Isa::Avx512
        }),
        _ => Isa::Avx512,
    })
}

/// Caps the level of our kernels for the whole process (`None`: back to `WICK_CPU_ISA` / the CPU).
pub fn set_isa_cap(cap: Option<Isa>) {
    CAP.store(cap.map_or(255, |c| c as u8), Ordering::Relaxed);
}

/// The level our kernels use now: the CPU's best, capped by [`set_isa_cap`] or `WICK_CPU_ISA`.
pub fn isa() -> Isa {
    let cap = match CAP.load(Ordering::Relaxed) {
        0 => Isa::Portable,
        1 => Isa::Avx2,
        2 => Isa::Avx512,
        _ => env_cap(),
    };
    detected_isa().min(cap)
}

/// Whether the CPU has AVX-512 VNNI (`vpdpbusd`), whatever the level: the integer kernels that use
/// it also check that the level they run at is AVX-512.
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The CPU's model name (from /proc/cpuinfo), or "unknown CPU".
pub fn model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The x86 features that matter to our kernels and to gemm, as present on this CPU.
pub fn features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! present {
            ($($f:tt),*) => { [$(($f, is_x86_feature_detected!($f))),*] };
        }
        present!("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16", "avx512fp16")
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(f, _)| f)
            .collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    Vec::new()
}

/// The 1-minute load average, if the OS tells it.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Read bandwidth in bytes/s: a sum over a 1 GiB buffer (far past any cache), split over the
/// rayon pool's threads like the decoding products; the best of 5 passes. What the benches of
/// memory-bound products (decoding) print their limit from.
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).into_par_iter().map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let chunk = words.div_ceil(rayon::current_num_threads() * 4);
    let mut best = 0f64;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        // Integer sums vectorise (no float reassociation needed), so this is bound by memory.
        let sum: u64 = buf.par_chunks(chunk).map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v))).reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / start.elapsed().as_secs_f64());
    }
    best
}

/// Makes the calling thread worker 0 of rayon's global pool (RAYON_NUM_THREADS threads in all,
/// this one included), so that the parallel ops it calls run on it directly. Otherwise each op
/// called from a thread outside the pool is handed to the pool's threads (a futex wake) while
/// the caller sleeps on a latch (another), a round trip per op: a BERT forward calls hundreds.
/// Alternating old/new runs on a 2-core Intel Xeon (session 17, `notes/cpu-speed.md`): MiniLM
/// training step new/old 1.02 (median of 14 pairs), BERT-base forward 1.035 (5 pairs), MLP
/// training 1.08–1.22 (3 pairs), LeNet-5 1.02–1.24 (4 pairs).
///
/// Call it first in `main` of a program whose main thread does the compute (the `wick` command,
/// the examples, the benches). Not in a server whose work arrives from other threads: rayon runs
/// work injected from outside only on the pool's other threads, never on this one unless it
/// calls into rayon itself (with a pool of one thread, such work would wait for it). Returns false (and changes nothing) when the global pool was already
/// built.
pub fn join_thread_pool() -> bool {
    rayon::ThreadPoolBuilder::new().use_current_thread().build_global().is_ok()
}

/// One line for benchmark output: CPU, features, the kernels chosen, the f32 matrix product's
/// kernel, load.
pub fn describe() -> String {
    format!(
        "cpu: {}; features: {}; wick kernels: {}; f32 matmul: {}; load average: {}",
        model_name(),
        features().join(" "),
        isa().name(),
        crate::ops::gemm::kernel_name(),
        load_average().map_or("?".into(), |l| format!("{l:.2}"))
    )
}

/// The same as JSON fields, for the benches' JSON lines.
pub fn describe_json() -> serde_json::Value {
    serde_json::json!({"cpu": model_name(), "isa": isa().name(), "features": features().join(" "), "load_avg": load_average()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_the_description_names_the_cpu() {
        // (The cap itself is process-wide state: tests of kernels pass a level explicitly.)
        assert!(isa() <= detected_isa());
        assert!("AVX2".parse::<Isa>() == Ok(Isa::Avx2) && "sse".parse::<Isa>().is_err());
        assert!(describe().contains(&model_name()));
    }
}
