//! A corpus of bad input, made by the test, run through the `wick` binary: every case must end
//! with a clear one-line error (exit status 1 or clap's 2, `error:` on stderr, naming what is
//! wrong), never a panic, an abort, a hang or a success. Classes: damaged weights, hostile
//! pickles and paths, bad configs, bad data files, bad flag values.

mod common;

use common::fixture_path;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Case {
    class: &'static str,
    name: String,
    args: Vec<String>,
    /// Text the error must contain (the file, tensor or flag it is about).
    needle: String,
}

fn case(class: &'static str, name: impl Into<String>, args: &[&str], needle: impl Into<String>) -> Case {
    Case { class, name: name.into(), args: args.iter().map(|s| s.to_string()).collect(), needle: needle.into() }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// A copy of a fixture model folder under `root/name`, changed by `change`.
fn variant(root: &Path, fixture: &str, name: &str, change: impl FnOnce(&Path)) -> String {
    let dir = root.join(name);
    copy_dir(&fixture_path(fixture), &dir);
    change(&dir);
    dir.to_string_lossy().into_owned()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

/// A zip `pytorch_model.bin` whose pickle calls `os.system` (what a malicious checkpoint does).
fn malicious_pickle(path: &Path, marker: &Path) {
    let pickle = format!("cos\nsystem\n(S'touch {}'\ntR.", marker.display());
    let file = std::fs::File::create(path).unwrap();
    let mut zip = ZipWriter::new(file);
    zip.add("archive/data.pkl", pickle.as_bytes());
    zip.finish();
}

/// The smallest zip writer that `candle`'s reader accepts: stored (uncompressed) entries.
struct ZipWriter {
    file: std::fs::File,
    entries: Vec<(String, u32, u32, u32)>,
    offset: u32,
}

impl ZipWriter {
    fn new(file: std::fs::File) -> Self {
        Self { file, entries: vec![], offset: 0 }
    }
    fn add(&mut self, name: &str, data: &[u8]) {
        use std::io::Write;
        let crc = crc32(data);
        let mut header = vec![];
        header.extend(0x04034b50u32.to_le_bytes());
        header.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        header.extend(crc.to_le_bytes());
        header.extend((data.len() as u32).to_le_bytes());
        header.extend((data.len() as u32).to_le_bytes());
        header.extend((name.len() as u16).to_le_bytes());
        header.extend(0u16.to_le_bytes());
        header.extend(name.as_bytes());
        self.file.write_all(&header).unwrap();
        self.file.write_all(data).unwrap();
        self.entries.push((name.to_string(), crc, data.len() as u32, self.offset));
        self.offset += (header.len() + data.len()) as u32;
    }
    fn finish(mut self) {
        use std::io::Write;
        let mut central = vec![];
        for (name, crc, size, offset) in &self.entries {
            central.extend(0x02014b50u32.to_le_bytes());
            central.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend(crc.to_le_bytes());
            central.extend(size.to_le_bytes());
            central.extend(size.to_le_bytes());
            central.extend((name.len() as u16).to_le_bytes());
            central.extend([0u8; 12]);
            central.extend(offset.to_le_bytes());
            central.extend(name.as_bytes());
        }
        let mut end = vec![];
        end.extend(0x06054b50u32.to_le_bytes());
        end.extend([0u8; 4]);
        end.extend((self.entries.len() as u16).to_le_bytes());
        end.extend((self.entries.len() as u16).to_le_bytes());
        end.extend((central.len() as u32).to_le_bytes());
        end.extend(self.offset.to_le_bytes());
        end.extend(0u16.to_le_bytes());
        self.file.write_all(&central).unwrap();
        self.file.write_all(&end).unwrap();
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn weight_cases(root: &Path, marker: &Path) -> Vec<Case> {
    let gpt2 = "hf/gpt2-tiny";
    let mut cases = vec![];
    let generate = |dir: &str| vec!["generate".to_string(), "--model".into(), dir.to_string(), "--max-new-tokens".into(), "2".into()];
    let bytes = std::fs::read(fixture_path(gpt2).join("model.safetensors")).unwrap();
    for (i, cut) in [0, 3, 8, 20, 100, bytes.len() / 2, bytes.len() - 1].into_iter().enumerate() {
        let dir = variant(root, gpt2, &format!("truncated{i}"), |d| std::fs::write(d.join("model.safetensors"), &bytes[..cut]).unwrap());
        cases.push(Case { class: "weights", name: format!("safetensors cut at {cut} bytes"), args: generate(&dir), needle: "model.safetensors".into() });
    }
    let mut huge_header = bytes.clone();
    huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut bad_json = bytes.clone();
    bad_json[8] = b'[';
    let mut flipped = bytes.clone();
    let end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    flipped[end - 2] = b'x';
    for (name, content) in [("header length u64::MAX", huge_header), ("header not JSON", bad_json), ("header damaged", flipped), ("random bytes", (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect())] {
        let dir = variant(root, gpt2, &name.replace(' ', "_").replace(':', ""), |d| std::fs::write(d.join("model.safetensors"), &content).unwrap());
        cases.push(Case { class: "weights", name: name.into(), args: generate(&dir), needle: "model.safetensors".into() });
    }
    let dir = variant(root, gpt2, "nan_weights", |d| {
        let path = d.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        let key = tensors.keys().find(|k| k.ends_with("ln_f.weight")).unwrap().clone();
        let t = (tensors[&key].clone() * f64::INFINITY).unwrap();
        tensors.insert(key, t);
        candle_core::safetensors::save(&tensors, &path).unwrap();
    });
    cases.push(Case { class: "weights", name: "infinite weights".into(), args: generate(&dir), needle: "ln_f.weight".into() });
    for (name, content) in [("pickle garbage", b"PK\x03\x04garbage".to_vec()), ("pickle empty", vec![])] {
        let dir = variant(root, gpt2, &name.replace(' ', "_"), |d| {
            std::fs::remove_file(d.join("model.safetensors")).unwrap();
            std::fs::write(d.join("pytorch_model.bin"), &content).unwrap();
        });
        cases.push(Case { class: "weights", name: name.into(), args: generate(&dir), needle: "pytorch_model.bin".into() });
    }
    let dir = variant(root, gpt2, "malicious_pickle", |d| {
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        malicious_pickle(&d.join("pytorch_model.bin"), marker);
    });
    cases.push(Case { class: "pickles", name: "pickle that calls os.system".into(), args: generate(&dir), needle: "pytorch_model.bin".into() });
    for (i, shard) in ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"].into_iter().enumerate() {
        let dir = variant(root, gpt2, &format!("shard{i}"), |d| {
            std::fs::write(d.join("model.safetensors.index.json"), serde_json::json!({"weight_map": {"wte.weight": shard}}).to_string()).unwrap();
        });
        cases.push(Case { class: "paths", name: format!("shard {shard}"), args: generate(&dir), needle: "not a file inside the model folder".into() });
    }
    for (i, index) in ["{", "{\"weight_map\": {}}", "{\"weight_map\": 3}"].into_iter().enumerate() {
        let dir = variant(root, gpt2, &format!("index{i}"), |d| std::fs::write(d.join("model.safetensors.index.json"), index).unwrap());
        cases.push(Case { class: "weights", name: format!("shard index {index}"), args: generate(&dir), needle: "model.safetensors.index.json".into() });
    }
    let dir = variant(root, gpt2, "link_out", |d| {
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("model.safetensors")).unwrap();
    });
    cases.push(Case { class: "paths", name: "weights linked to /etc/passwd".into(), args: generate(&dir), needle: "outside the model folder".into() });
    cases.push(case("paths", "revision that is a path", &["generate", "--model", "org/name", "--revision", "/any/folder"], "--revision"));
    cases
}

fn config_cases(root: &Path) -> Vec<Case> {
    let gpt2 = "hf/gpt2-tiny";
    let mut cases = vec![];
    let edits: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>, &str)> = vec![
        ("fewer layers than the weights", Box::new(|c| c["n_layer"] = 1.into()), "do not belong together"),
        ("more layers than the weights", Box::new(|c| c["n_layer"] = 3.into()), "h.2"),
        ("width not the weights'", Box::new(|c| c["n_embd"] = 48.into()), "shape"),
        ("heads do not divide the width", Box::new(|c| c["n_head"] = 5.into()), "n_head"),
        ("zero heads", Box::new(|c| c["n_head"] = 0.into()), "n_head"),
        ("zero vocabulary", Box::new(|c| c["vocab_size"] = 0.into()), "vocab_size"),
        ("negative layers", Box::new(|c| c["n_layer"] = (-1).into()), "config.json"),
        ("layers as a string", Box::new(|c| c["n_layer"] = "two".into()), "config.json"),
        ("unknown activation", Box::new(|c| c["activation_function"] = "swishy".into()), "swishy"),
        ("another model_type", Box::new(|c| c["model_type"] = "llama".into()), "llama"),
        ("context of zero", Box::new(|c| c["n_positions"] = 0.into()), "n_positions"),
    ];
    for (i, (name, edit, needle)) in edits.into_iter().enumerate() {
        let dir = variant(root, gpt2, &format!("config{i}"), |d| edit_config(d, edit));
        cases.push(Case { class: "configs", name: name.into(), args: vec!["generate".into(), "--model".into(), dir, "--max-new-tokens".into(), "2".into()], needle: needle.into() });
    }
    for (i, (name, content)) in [("not JSON", "{ n_layer: 2"), ("empty", ""), ("a JSON list", "[1, 2]"), ("empty object", "{}")].into_iter().enumerate() {
        let dir = variant(root, gpt2, &format!("rawconfig{i}"), |d| std::fs::write(d.join("config.json"), content).unwrap());
        if name != "empty object" {
            // `{}` is a config with every setting at its default: `info` can describe it.
            cases.push(Case { class: "configs", name: format!("config.json {name}"), args: vec!["info".into(), "--model".into(), dir.clone()], needle: "config.json".into() });
        }
        cases.push(Case { class: "configs", name: format!("config.json {name} (generate)"), args: vec!["generate".into(), "--model".into(), dir], needle: "config.json".into() });
    }
    let dir = variant(root, gpt2, "config_dir", |d| {
        std::fs::remove_file(d.join("config.json")).unwrap();
        std::fs::create_dir(d.join("config.json")).unwrap();
    });
    cases.push(Case { class: "configs", name: "config.json is a folder".into(), args: vec!["info".into(), "--model".into(), dir], needle: "not a file".into() });
    let dir = variant(root, "hf/bert-tiny-cls", "no_tokenizer", |d| {
        for f in ["tokenizer.json", "vocab.txt"] {
            std::fs::remove_file(d.join(f)).unwrap();
        }
    });
    cases.push(Case { class: "configs", name: "no tokenizer".into(), args: vec!["embed".into(), "--model".into(), dir, "--text".into(), "x".into()], needle: "tokenizer".into() });
    cases
}

fn data_cases(root: &Path) -> Vec<Case> {
    let mut cases = vec![];
    let write = |name: &str, bytes: &[u8]| -> String {
        let path = root.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_string_lossy().into_owned()
    };
    let empty = write("empty.txt", b"");
    let binary = write("binary.txt", &[0xff, 0xfe, 0x00, 0x80, 0x81]);
    let tiny = write("tiny.txt", b"ab");
    let folder = root.to_string_lossy().into_owned();
    for (name, data) in [("empty corpus", &empty), ("non-UTF-8 corpus", &binary), ("corpus shorter than a sequence", &tiny), ("corpus is a folder", &folder), ("no such corpus", &"/no/such/file.txt".to_string())] {
        cases.push(Case { class: "data", name: format!("char-rnn: {name}"), args: vec!["train".into(), "char-rnn".into(), "--data".into(), data.clone(), "--steps".into(), "2".into(), "--prompt".into(), "a".into()], needle: data.clone() });
        let tokenizer = fixture_path("hf/gpt2-tiny").to_string_lossy().into_owned();
        cases.push(Case { class: "data", name: format!("gpt2: {name}"), args: vec!["train".into(), "gpt2".into(), "--data".into(), data.clone(), "--tokenizer".into(), tokenizer, "--steps".into(), "2".into()], needle: data.clone() });
    }
    cases.push(case("data", "embed: non-UTF-8 input", &["embed", "--model", &fixture_path("hf/bert-tiny-cls").to_string_lossy(), "--input", &binary], "binary.txt"));
    cases.push(case("data", "embed: empty input", &["embed", "--model", &fixture_path("hf/bert-tiny-cls").to_string_lossy(), "--input", &empty], "nothing to embed"));
    // MNIST folders, each with one file damaged.
    let mnist_case = |name: &str, damage: &dyn Fn(&Path)| -> Case {
        let dir = root.join(format!("mnist_{}", name.replace(' ', "_")));
        std::fs::create_dir_all(&dir).unwrap();
        for (prefix, n) in [("train", 20usize), ("t10k", 10)] {
            wick::data::mnist::write_idx(&dir.join(format!("{prefix}-images-idx3-ubyte")), &[n, 28, 28], &vec![7u8; n * 784]).unwrap();
            wick::data::mnist::write_idx(&dir.join(format!("{prefix}-labels-idx1-ubyte")), &[n], &vec![3u8; n]).unwrap();
        }
        damage(&dir);
        let dir = dir.to_string_lossy().into_owned();
        Case { class: "data", name: format!("mnist: {name}"), args: vec!["train".into(), "mnist".into(), "--model".into(), "mlp".into(), "--data".into(), dir.clone(), "--epochs".into(), "1".into()], needle: dir }
    };
    let images = |d: &Path| d.join("train-images-idx3-ubyte");
    cases.push(mnist_case("labels missing", &|d| std::fs::remove_file(d.join("t10k-labels-idx1-ubyte")).unwrap()));
    cases.push(mnist_case("bad magic", &|d| {
        let mut b = std::fs::read(images(d)).unwrap();
        b[2] = 9;
        std::fs::write(images(d), b).unwrap();
    }));
    cases.push(mnist_case("overflowing header", &|d| wick::data::mnist::write_idx(&images(d), &[u32::MAX as usize; 3], &[0; 64]).unwrap()));
    cases.push(mnist_case("truncated images", &|d| {
        let b = std::fs::read(images(d)).unwrap();
        std::fs::write(images(d), &b[..b.len() - 100]).unwrap();
    }));
    cases.push(mnist_case("label 12", &|d| wick::data::mnist::write_idx(&d.join("train-labels-idx1-ubyte"), &[20], &[12; 20]).unwrap()));
    cases.push(mnist_case("images and labels disagree", &|d| wick::data::mnist::write_idx(&d.join("train-labels-idx1-ubyte"), &[19], &[1; 19]).unwrap()));
    cases.push(mnist_case("corrupt gzip", &|d| {
        std::fs::remove_file(images(d)).unwrap();
        std::fs::write(d.join("train-images-idx3-ubyte.gz"), [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
    }));
    cases
}

/// Fine-tuning and prediction data: tiny TSV files around the fixture BERT.
fn text_task_cases(root: &Path) -> Vec<Case> {
    let bert = fixture_path("hf/bert-tiny-cls").to_string_lossy().into_owned();
    let base = fixture_path("hf/bert-tiny-base").to_string_lossy().into_owned();
    let write = |name: &str, text: &str| -> String {
        let path = root.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let good = write("good.tsv", "sentence\tlabel\na fine film\tpos\na dull film\tneg\nfun\tpos\nboring\tneg\n");
    let out = root.join("finetuned").to_string_lossy().into_owned();
    let finetune = |train: &str, extra: &[&str], needle: &str, name: &str| {
        let mut args = vec!["finetune", "--model", &bert, "--train", train, "--eval", &good, "--output", &out, "--epochs", "1", "--batch-size", "2"];
        args.extend_from_slice(extra);
        case("data", format!("finetune: {name}"), &args, needle)
    };
    let empty = write("empty.tsv", "");
    let header_only = write("header.tsv", "sentence\tlabel\n");
    let ragged = write("ragged.tsv", "sentence\tlabel\na\tpos\tEXTRA\nb\tneg\n");
    let no_label = write("nolabel.tsv", "sentence\tscore_x\na\t1\nb\t2\n");
    let one_label = write("onelabel.tsv", "sentence\tlabel\na\tpos\nb\tpos\n");
    let words = write("words.tsv", "sentence1\tsentence2\tscore\na\tb\thigh\nc\td\tlow\n");
    let bad_json = write("bad.jsonl", "{\"sentence\": \"a\", \"label\": 1}\n{not json\n");
    let unknown_eval = write("unknown_eval.tsv", "sentence\tlabel\na\tmaybe\n");
    let mut cases = vec![
        finetune(&empty, &[], "empty.tsv", "empty file"),
        finetune(&header_only, &[], "header.tsv", "header only"),
        finetune(&ragged, &[], "ragged.tsv", "ragged row"),
        finetune(&no_label, &[], "nolabel.tsv", "no label column"),
        finetune(&one_label, &[], "onelabel.tsv", "one label only"),
        finetune(&words, &["--task", "regression"], "words.tsv", "non-numeric regression scores"),
        finetune(&bad_json, &[], "bad.jsonl", "malformed JSON line"),
        finetune(&good, &["--label-column", "stars"], "stars", "unknown label column"),
        finetune(&good, &["--max-len", "100000"], "--max-len", "max-len past the model"),
        finetune(&good, &["--warmup-ratio", "2"], "--warmup-ratio", "warmup ratio 2"),
        finetune(&good, &["--lr", "NaN"], "--lr", "lr NaN"),
        finetune(&good, &["--eval-batch-size", "0"], "--eval-batch-size", "eval batch size 0"),
        finetune(&good, &["--minutes=-1"], "--minutes", "negative minutes"),
        finetune("/no/such.tsv", &[], "/no/such.tsv", "missing file"),
    ];
    let mut unknown = vec!["finetune", "--model", &bert, "--train", &good, "--eval", &unknown_eval, "--output", &out];
    unknown.extend_from_slice(&["--epochs", "1"]);
    cases.push(case("data", "finetune: an evaluation label never trained", &unknown, "maybe"));
    cases.push(case("data", "predict: a base model without a head", &["predict", "--model", &base, "--text", "x"], "no classifier head"));
    cases.push(case("data", "predict: bf16 on the CPU", &["predict", "--model", &bert, "--text", "x", "--dtype", "bf16"], "bf16"));
    cases.push(case("data", "predict: missing input", &["predict", "--model", &bert, "--input", "/no/such.tsv"], "/no/such.tsv"));
    cases.push(case("data", "predict: empty input", &["predict", "--model", &bert, "--input", &empty], "empty.tsv"));
    cases.push(case("data", "predict: a label the model does not know", &["predict", "--model", &bert, "--input", &unknown_eval], "maybe"));
    cases
}

/// Damaged checkpoints under a real run's output folder, then `--resume`.
fn checkpoint_cases(root: &Path) -> Vec<Case> {
    let data = root.join("mnist_for_resume");
    std::fs::create_dir_all(&data).unwrap();
    for (prefix, n) in [("train", 32usize), ("t10k", 8)] {
        wick::data::mnist::write_idx(&data.join(format!("{prefix}-images-idx3-ubyte")), &[n, 28, 28], &vec![9u8; n * 784]).unwrap();
        wick::data::mnist::write_idx(&data.join(format!("{prefix}-labels-idx1-ubyte")), &[n], &vec![4u8; n]).unwrap();
    }
    let data = data.to_string_lossy().into_owned();
    let train = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["train", "mnist", "--model", "mlp", "--data", &data, "--epochs", "1", "--batch-size", "8", "--output"].iter().map(|s| s.to_string()).collect();
        args.push(out.to_string_lossy().into_owned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let trained = |name: &str| -> PathBuf {
        let out = root.join(name);
        let status = Command::new(env!("CARGO_BIN_EXE_wick")).args(train(&out, &["--json"])).stdout(std::process::Stdio::null()).status().unwrap();
        assert!(status.success(), "the run to damage did not train");
        out
    };
    let newest = |out: &Path| -> PathBuf {
        let mut steps: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).collect();
        steps.sort();
        steps.pop().unwrap()
    };
    let mut cases = vec![];
    let out = trained("run_no_state");
    std::fs::remove_file(newest(&out).join("trainer_state.json")).unwrap();
    cases.push(Case { class: "checkpoints", name: "trainer_state.json missing".into(), args: train(&out, &["--resume"]), needle: "trainer_state.json".into() });
    let out = trained("run_bad_state");
    std::fs::write(newest(&out).join("trainer_state.json"), "{ half").unwrap();
    cases.push(Case { class: "checkpoints", name: "trainer_state.json damaged".into(), args: train(&out, &["--resume"]), needle: "trainer_state.json".into() });
    let out = trained("run_bad_weights");
    let weights = newest(&out).join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();
    cases.push(Case { class: "checkpoints", name: "checkpoint weights truncated".into(), args: train(&out, &["--resume"]), needle: "model.safetensors".into() });
    let out = trained("run_changed_batch");
    cases.push(Case { class: "checkpoints", name: "resume with another batch size".into(), args: train(&out, &["--resume", "--batch-size", "4"]), needle: "--batch-size".into() });
    let empty = root.join("run_never_started");
    std::fs::create_dir_all(&empty).unwrap();
    cases.push(Case { class: "checkpoints", name: "resume with nothing to resume".into(), args: train(&empty, &["--resume"]), needle: "resume".into() });
    let out = trained("run_again");
    cases.push(Case { class: "checkpoints", name: "a new run over an earlier one's checkpoints".into(), args: train(&out, &[]), needle: "checkpoints".into() });
    cases
}

fn flag_cases() -> Vec<Case> {
    let gpt2 = fixture_path("hf/gpt2-tiny").to_string_lossy().into_owned();
    let g = |extra: &[&str], needle: &str| {
        let mut args = vec!["generate", "--model", &gpt2];
        args.extend_from_slice(extra);
        case("flags", extra.join(" "), &args, needle)
    };
    vec![
        g(&["--top-p", "1.5"], "--top-p"),
        g(&["--top-p", "NaN"], "--top-p"),
        g(&["--top-p", "0"], "--top-p"),
        g(&["--temperature", "inf"], "--temperature"),
        g(&["--temperature=-0.5"], "--temperature"),
        g(&["--repetition-penalty", "0"], "--repetition-penalty"),
        g(&["--stop", ""], "--stop"),
        g(&["--max-new-tokens", "18446744073709551615"], "context"),
        g(&["--max-new-tokens", "-1"], "--max-new-tokens"),
        g(&["--device", "cuda:abc"], "cuda:abc"),
        g(&["--device", "tpu"], "tpu"),
        g(&["--dtype", "f8"], "f8"),
        g(&["--seed", "-3"], "--seed"),
        g(&["--prompt", ""], "empty"),
        case("flags", "minutes NaN", &["train", "char-rnn", "--data", "x", "--minutes", "NaN"], "--minutes"),
        case("flags", "minutes negative", &["train", "char-rnn", "--data", "x", "--minutes=-2"], "--minutes"),
        case("flags", "minutes 1e300", &["train", "gpt2", "--data", "x", "--minutes", "1e300"], "--minutes"),
        case("flags", "lr 1e400", &["train", "gpt2", "--data", "x", "--lr", "1e400"], "--lr"),
        case("flags", "min-lr-ratio -1", &["train", "gpt2", "--data", "x", "--min-lr-ratio=-1"], "--min-lr-ratio"),
        case("flags", "eval-batches 0", &["train", "gpt2", "--data", "x", "--eval-batches", "0"], "--eval-batches"),
        case("flags", "dropout 2", &["train", "gpt2", "--data", "x", "--dropout", "2"], "--dropout"),
        case("flags", "clip NaN", &["train", "gpt2", "--data", "x", "--clip", "NaN"], "--max-grad-norm"),
        case("flags", "batch size 0", &["train", "mnist", "--data", "x", "--batch-size", "0"], "--batch-size"),
        case("flags", "temperature negative (char-rnn)", &["train", "char-rnn", "--data", "x", "--temperature=-1"], "--temperature"),
        case("flags", "unknown cell", &["train", "char-rnn", "--data", "x", "--cell", "transformer"], "--cell"),
        case("flags", "bf16 training", &["train", "mnist", "--data", "x", "--dtype", "bf16"], "f32"),
        case("flags", "resume without output", &["train", "mnist", "--data", "x", "--resume"], "--output"),
        case("flags", "unknown subcommand", &["serve-me"], "serve-me"),
    ]
}

/// Runs one case with a deadline: a hang is a failure too.
fn run(case: &Case) -> Result<(), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(&case.args)
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            return Err("hung for 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).map_err(|e| e.to_string())?;
    match status.code() {
        None => Err(format!("killed by a signal (abort?):\n{err}")),
        Some(0) => Err("succeeded".into()),
        Some(101) => Err(format!("panicked:\n{err}")),
        Some(_) if err.contains("panicked") => Err(format!("panicked:\n{err}")),
        Some(_) if !err.contains("error") => Err(format!("no error message:\n{err}")),
        Some(_) if !err.contains(&case.needle) => Err(format!("the error does not name {:?}:\n{err}", case.needle)),
        Some(_) => Ok(()),
    }
}

#[test]
fn every_bad_input_in_the_corpus_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let marker: PathBuf = root.path().join("pickle-code-ran");
    let mut cases = weight_cases(root.path(), &marker);
    cases.extend(config_cases(root.path()));
    cases.extend(data_cases(root.path()));
    cases.extend(text_task_cases(root.path()));
    cases.extend(checkpoint_cases(root.path()));
    cases.extend(flag_cases());
    let mut failures = vec![];
    let mut by_class = std::collections::BTreeMap::<&str, usize>::new();
    for case in &cases {
        *by_class.entry(case.class).or_default() += 1;
        if let Err(why) = run(case) {
            failures.push(format!("[{}] {} (wick {}): {why}", case.class, case.name, case.args.join(" ")));
        }
    }
    assert!(!marker.exists(), "the malicious pickle's code ran");
    eprintln!("corpus: {} cases by class: {by_class:?}", cases.len());
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}
