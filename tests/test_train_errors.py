"""Bad input to glm-train: each kind gets its own one-line message naming the fix, exit status 2, and
nothing written to the run directory (checked before any process group starts)."""
import json

import pytest

from trainer.train import main

CONFIG = "configs/glm-debug.yaml"


def _run(capsys, tmp_path, *overrides, config=CONFIG, run_dir=None):
    run_dir = run_dir or tmp_path / "run"
    argv = ["--config", str(config), "--set", f"train.run_dir={run_dir}"]
    for item in overrides:
        argv += ["--set", item]
    code = main(argv)
    err = capsys.readouterr().err
    return code, err, run_dir


def _files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {num_layers: [\n")
    bad_json = tmp_path / "ds.json"
    bad_json.write_text("{not json")
    batch_json = tmp_path / "batch.json"
    batch_json.write_text('{"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {"bad_yaml": bad_yaml, "bad_json": bad_json, "a_file": a_file, "batch_json": batch_json}


CASES = [
    ("unknown key", ["train.stpes=3"], "did you mean train.steps"),
    ("unknown section", ["trainn.steps=3"], "did you mean train"),
    ("wrong type", ["train.steps=many"], "train.steps expects int"),
    ("malformed --set", ["train.steps"], "section.key=value"),
    ("tp does not divide heads", ["parallel.tp=3"], "not divisible by parallel.tp=3"),
    ("pp above layers", ["parallel.pp=5"], "greater than model.num_layers"),
    ("batch arithmetic", ["parallel.global_batch_size=6"], "micro-batch * grad-accumulation * dp"),
    ("hidden vs heads", ["model.hidden_size=66"], "not divisible by model.num_attention_heads"),
    ("sequence above positions", ["data.seq_length=256"], "exceeds model.max_sequence_length"),
    ("unknown precision", ["train.precision=fp8"], "train.precision='fp8' is not one of"),
    ("zero steps", ["train.steps=0"], "train.steps must be >= 1"),
    ("dropout range", ["model.hidden_dropout=1.5"], "model.hidden_dropout must be in [0, 1)"),
    ("unknown mode", ["data.modes={mask: 1, span: 1}"], "unknown mode"),
    ("gmask range", ["data.gmask_ratio_min=0.9", "data.gmask_ratio_max=0.5"], "gmask_ratio_min/max"),
    ("zero stage", ["optim.zero_stage=4"], "optim.zero_stage=4 is not a ZeRO stage"),
    ("zero-2 with a pipeline", ["optim.zero_stage=2", "parallel.pp=2"], "pipeline engine allows ZeRO-1 at most"),
    ("offload without zero", ["optim.zero_stage=0", "optim.offload_optimizer=cpu"], "needs ZeRO"),
    ("params offload below zero-3", ["optim.zero_stage=2", "optim.offload_params=cpu"], "needs sharded weights"),
    ("unknown offload device", ["optim.zero_stage=3", "optim.offload_optimizer=disk"], "is not one of none, cpu, nvme"),
    ("nvme optimizer below zero-3", ["optim.zero_stage=2", "optim.offload_optimizer=nvme", "optim.nvme_path=/tmp"],
     "DeepSpeed swaps optimizer states to NVMe under ZeRO-3 only"),
    ("nvme without a path", ["optim.zero_stage=3", "optim.offload_optimizer=nvme"], "set optim.nvme_path"),
    ("eval without split", ["train.eval_interval=5", "data.valid_fraction=0"], "needs a validation split"),
    ("resume without checkpoint", ["train.resume=true"], "holds no checkpoint"),
    ("unknown position embedding", ["model.position_embedding=alibi"], "model.position_embedding='alibi'"),
    ("negative save interval", ["train.save_interval=-1"], "train.save_interval must be >= 0, got -1"),
    ("zero log interval", ["train.log_interval=0"], "train.log_interval must be >= 1, got 0"),
    ("negative lr", ["optim.lr=-1"], "optim.lr must be a finite number > 0, got -1"),
    ("lr not a number", ["optim.lr=.nan"], "optim.lr must be a finite number > 0, got nan"),
    ("beta1 above 1", ["optim.beta1=1.5"], "optim.beta1 must be a finite number in [0, 1)"),
    ("min lr ratio above 1", ["optim.min_lr_ratio=2"], "optim.min_lr_ratio must be a finite number in [0, 1]"),
    ("negative grad clip", ["optim.grad_clip=-1"], "optim.grad_clip must be a finite number >= 0"),
    ("negative ffn width", ["model.ffn_hidden_size=-8"], "model.ffn_hidden_size must be > 0"),
    ("negative layernorm epsilon", ["model.layernorm_epsilon=-1e-5"], "model.layernorm_epsilon must be a finite"),
    ("run dir on a pseudo file system", ["train.run_dir=/proc/glm-run"], "a file system without storage"),
    ("resume and overwrite", ["train.resume=true", "train.overwrite=true"], "continue the run (resume) or delete"),
    ("span length not a number", ["data.poisson_lambda=.nan"], "data.poisson_lambda must be a finite number in (0, 1000.0]"),
    ("span length infinite", ["data.poisson_lambda=.inf"], "got inf"),
    ("mode weight not a number", ["data.modes={mask: .nan, gmask: 1}"], "data.modes weights must be finite numbers"),
    ("mode weight infinite", ["data.modes={mask: .inf}"], "'mask': inf"),
    ("mode weight a string", ["data.modes={mask: lots}"], "'mask': 'lots'"),
    ("collective timeout not a number", ["train.collective_timeout_minutes=.nan"],
     "train.collective_timeout_minutes must be a finite number in (0, 525600]"),
    ("collective timeout infinite", ["train.collective_timeout_minutes=.inf"], "(a year), got inf"),
    ("seed of 2^64", ["train.seed=18446744073709551616"], "train.seed must be in [0, 2**63), got 18446744073709551616"),
    ("negative seed", ["train.seed=-1"], "train.seed must be in [0, 2**63), got -1"),
    ("negative warmup", ["optim.warmup_steps=-5"], "optim.warmup_steps must be >= 0"),
    ("negative decay", ["optim.decay_steps=-1"], "optim.decay_steps must be >= 0"),
    ("negative batch warmup", ["optim.batch_size_warmup_steps=-3"], "optim.batch_size_warmup_steps must be >= 0"),
    ("negative recompute interval", ["parallel.recompute_interval=-1"], "parallel.recompute_interval must be >= 0"),
    ("empty run dir", ["train.run_dir="], "train.run_dir is empty"),
    ("blank run dir", ["train.run_dir='  '"], "name a directory for metrics.jsonl"),
    ("sequence above 2^21", ["data.seq_length=4194304", "model.max_sequence_length=4194304"],
     "data.seq_length=4194304 is above 2097152 tokens"),
    ("data entry weight infinite", ["data.datasets=[{path: '', weight: .inf}]"], "each entry must be {path: PREFIX"),
    ("long value quoted short", ["model.num_layers=[" + ", ".join(["1"] * 500) + "]"], "got [1, 1, 1"),
]


def test_a_precision_the_device_lacks_is_refused(capsys, tmp_path, monkeypatch):
    """fp16 where the accelerator has none (most CPUs: DeepSpeed's CPU accelerator reports fp16 only where
    oneDNN has fp16 kernels, as on AVX512-FP16 machines, so the device's answer is fixed here)."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    code, err, run_dir = _run(capsys, tmp_path, "train.precision=fp16")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "train.precision=fp16 is not supported on this device" in lines[0], err
    assert not run_dir.exists()


@pytest.mark.parametrize("value", ["0", "3,x", "[3]"])
def test_a_bad_fault_injection_is_refused_before_the_process_group(capsys, tmp_path, monkeypatch, value):
    from trainer.engine.faults import INJECT_NAN_STEPS

    monkeypatch.setenv(INJECT_NAN_STEPS, value)
    code, err, run_dir = _run(capsys, tmp_path)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and f"{INJECT_NAN_STEPS}={value!r} must be comma-separated" in lines[0], err
    assert not run_dir.exists()


@pytest.mark.parametrize("name, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_bad_overrides(capsys, tmp_path, name, overrides, message):
    code, err, run_dir = _run(capsys, tmp_path, *overrides)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not run_dir.exists()


def test_steps_at_or_below_the_checkpoint_are_refused(capsys, tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "global_step5").mkdir(parents=True)
    (checkpoints / "latest").write_text("global_step5")
    code, err, _ = _run(capsys, tmp_path, "train.resume=true", "train.steps=5")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "is at step 5" in lines[0] and "train.steps=5" in lines[0], err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["global_step5", "latest"]


def test_resuming_another_model_shape_is_refused_naming_the_keys(capsys, tmp_path):
    from trainer.config import load_config

    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "global_step2").mkdir(parents=True)
    (checkpoints / "latest").write_text("global_step2")
    recorded = load_config(CONFIG, ["model.vocab_size=4096"]).model.shape()
    (checkpoints / "global_step2" / "run.json").write_text(json.dumps({"model": recorded}))
    code, err, _ = _run(capsys, tmp_path, "train.resume=true", "model.hidden_size=32", "model.num_layers=2")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert "model.hidden_size: checkpoint 64, this run 32" in lines[0] and "model.num_layers: checkpoint 4" in lines[0]
    assert "model.ffn_size: checkpoint 256, this run 128" in lines[0]
    assert sorted(p.name for p in (checkpoints / "global_step2").iterdir()) == ["run.json"]
    from trainer.tools.preflight import check_resume_shape

    same = load_config(CONFIG, ["model.vocab_size=4096", "train.resume=true", f"train.run_dir={tmp_path / 'run'}"])
    check_resume_shape(same)  # the recorded shape: accepted


def test_a_yaml_merge_key_is_read(tmp_path):
    """`<<: *anchor` (YAML's merge key) brings an anchored mapping's keys in, and the mapping's own keys win."""
    from trainer.config import load_config

    config = tmp_path / "merge.yaml"
    config.write_text("data:\n  datasets:\n    - &base {path: '', weight: 1, seq_length: 64}\n"
                      "    - {<<: *base, weight: 2}\n")
    assert load_config(config).data.datasets == [{"path": "", "weight": 1, "seq_length": 64},
                                                 {"path": "", "weight": 2, "seq_length": 64}]


def test_messages_are_distinct():
    assert len({message for _, _, message in CASES}) == len(CASES)


def test_bad_files(capsys, tmp_path):
    files = _files(tmp_path)
    checks = [
        (dict(config=tmp_path / "missing.yaml"), (), "does not exist"),
        (dict(config=files["bad_yaml"]), (), "not valid YAML"),
        (dict(), (f"train.deepspeed_config={tmp_path / 'none.json'}",), "train.deepspeed_config"),
        (dict(), (f"train.deepspeed_config={files['bad_json']}",), "is not valid JSON"),
        (dict(), (f"train.deepspeed_config={files['batch_json']}",), "sets train_batch_size=64 but parallel.global_batch_size gives 8"),
        (dict(run_dir=files["a_file"]), (), "is a file"),
        (dict(run_dir=files["a_file"] / "sub"), (), "cannot be created"),
    ]
    for kwargs, overrides, message in checks:
        code, err, _ = _run(capsys, tmp_path, *overrides, **kwargs)
        assert code == 2 and message in err, (kwargs, overrides, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "bad.yaml", "batch.json", "ds.json"]


def _prepared(tmp_path):
    """A small prepared corpus made with glm-prep (in-process)."""
    from trainer.data.prep import main as prep

    tmp_path.mkdir()
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert prep(["--input", str(text), "--output-prefix", str(tmp_path / "corpus"), "--vocab-size", "300"]) == 0
    return tmp_path / "corpus"


def test_bad_data_files(capsys, tmp_path):
    prefix = _prepared(tmp_path / "data")
    bare = tmp_path / "bare.json"
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(bare))
    truncated = tmp_path / "truncated"
    for suffix in (".idx", ".tokenizer.json"):
        (truncated.parent / f"truncated{suffix}").write_bytes(prefix.with_suffix(suffix).read_bytes())
    (truncated.parent / "truncated.bin").write_bytes(prefix.with_suffix(".bin").read_bytes()[:100])
    bad_magic = tmp_path / "magic"
    for suffix in (".bin", ".tokenizer.json"):
        (bad_magic.parent / f"magic{suffix}").write_bytes(prefix.with_suffix(suffix).read_bytes())
    (bad_magic.parent / "magic.idx").write_bytes(b"NOTGLM00" + prefix.with_suffix(".idx").read_bytes()[8:])
    checks = [
        ([f"data.path={tmp_path / 'nothing'}"], "nothing"),
        ([f"data.path={truncated}"], "truncated.bin"),
        ([f"data.path={bad_magic}"], "magic.idx"),
        ([f"data.path={prefix}", f"data.tokenizer={bare}"], "special token"),
        ([f"data.path={prefix}", "model.vocab_size=100"], "model.vocab_size=100 is smaller than the tokenizer"),
        (["data.seq_length=4"], "data.seq_length=4 is too short"),
    ]
    for overrides, message in checks:
        code, err, run_dir = _run(capsys, tmp_path, *overrides)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0], (overrides, err)
        assert not run_dir.exists()
