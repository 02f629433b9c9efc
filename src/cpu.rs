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
/// calls into rayon itself (with a pool of one thread, such work would wait for it). Returns
/// false (and changes nothing) when the global pool was already built.
pub fn join_thread_pool() -> bool {
    rayon::ThreadPoolBuilder::new().use_current_thread().build_global().is_ok()
}

/// While alive, the rayon pool's other threads spin, running any work they find, instead of
/// going to sleep between parallel ops (OpenMP's active wait, which PyTorch runs with). A
/// sleeping thread costs the thread that wakes it a futex wake, an inter-processor interrupt
/// (expensive in a VM), and the op waits for the wake-up: GPT-2 decoding calls ~50 parallel
/// products a token with serial work between them long enough for rayon's threads to sleep
/// (`perf`: ~12% of a bf16 decoding step in the scheduler). For a burst of many small parallel
/// ops (one decoding step: `ops::on_cpu_pool`); the spinning threads burn their cores until the
/// guard drops. The pool is the caller's (the global one outside any pool). A MiniLM training
/// step measured no gain (median new/old 1.02 over 6 noisy pairs): its ops are long enough.
pub struct KeepPoolAwake {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Dropped on the thread that made it (it counts in that thread's `STEPS_HERE`).
    _same_thread: std::marker::PhantomData<*const ()>,
}

thread_local! {
    /// Guarded steps running on this thread (nested ones too).
    static STEPS_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How long a [`KeepPoolAwake`] spinner waits for work before it returns to rayon (which then
/// sleeps as usual): longer than the gaps between a decoding step's products, short enough that
/// a task it sits on top of is not held up for long.
const MAX_IDLE_SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// Threads spinning for a [`KeepPoolAwake`] right now, in any pool (for the tests).
static SPINNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl KeepPoolAwake {
    pub fn new() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        STEPS_HERE.with(|n| n.set(n.get() + 1));
        let flag = stop.clone();
        rayon::spawn_broadcast(move |_| {
            // Never on a thread inside a guarded step, the caller's own included: rayon starts
            // a broadcast job wherever a thread looks for work, also while a step there waits
            // for a stolen task, and a spinner above that step would keep it from finishing.
            if STEPS_HERE.with(|n| n.get()) > 0 {
                return;
            }
            SPINNING.fetch_add(1, Ordering::Relaxed);
            // Leave after a while without work: a thread can also start this job while it waits
            // inside another task (a stolen half of a step's product), which cannot go on until
            // this returns; that step's own guard may be the one this spinner waits for.
            let mut idle_since = std::time::Instant::now();
            while !flag.load(Ordering::Acquire) {
                if matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                    idle_since = std::time::Instant::now();
                } else if idle_since.elapsed() > MAX_IDLE_SPIN {
                    break;
                } else {
                    std::hint::spin_loop();
                }
            }
            SPINNING.fetch_sub(1, Ordering::Relaxed);
        });
        Self { stop, _same_thread: std::marker::PhantomData }
    }
}

impl Default for KeepPoolAwake {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KeepPoolAwake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        STEPS_HERE.with(|n| n.set(n.get() - 1));
    }
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

    /// Work inside the guard gives the right results, callers on two threads at once finish
    /// (a server's), and the pool's threads let go when the guards drop: a failure here is a
    /// hang, so each part runs against a deadline.
    #[test]
    fn keeping_the_pool_awake_runs_the_work_and_lets_go() {
        use rayon::prelude::*;
        let within = |what: &str, secs: u64, job: Box<dyn FnOnce() + Send>| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                job();
                let _ = tx.send(());
            });
            rx.recv_timeout(std::time::Duration::from_secs(secs)).unwrap_or_else(|_| panic!("{what} did not finish in {secs} s"));
        };
        let pool = std::sync::Arc::new(rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap());
        let expected: u64 = (0..100_000u64).map(|i| i * 2).sum();
        let p = pool.clone();
        within("steps on one thread", 60, Box::new(move || {
            for _ in 0..50 {
                let sum: u64 = p.install(|| {
                    let _awake = KeepPoolAwake::new();
                    (0..100_000u64).into_par_iter().map(|i| i * 2).sum()
                });
                assert_eq!(sum, expected);
            }
        }));
        let p = pool.clone();
        within("steps from two threads at once", 60, Box::new(move || {
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..300 {
                            let sum: u64 = p.install(|| {
                                let _awake = KeepPoolAwake::new();
                                (0..100_000u64).into_par_iter().map(|i| i * 2).sum()
                            });
                            assert_eq!(sum, expected);
                        }
                    });
                }
            })
        }));
        // Every spinner stops once its guard has dropped (other tests' decoding steps may spin
        // for a moment too, so wait for none at all).
        within("the spinners to stop", 30, Box::new(|| {
            while SPINNING.load(Ordering::Relaxed) != 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }));
    }

    #[test]
    fn levels_parse_and_the_description_names_the_cpu() {
        // (The cap itself is process-wide state: tests of kernels pass a level explicitly.)
        assert!(isa() <= detected_isa());
        assert!("AVX2".parse::<Isa>() == Ok(Isa::Avx2) && "sse".parse::<Isa>().is_err());
        assert!(describe().contains(&model_name()));
    }
}
