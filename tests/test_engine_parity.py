"""The spine of the project: the same config gives the same losses on every (tp, pp, dp) layout,
and a resumed run continues the same loss curve. CPU, gloo, fp32, dropout 0 (configs/glm-debug.yaml), on
packed rows of short documents (several samples per row), and once without packing."""
import dataclasses
import json

import pytest
import torch

from tests.distributed import run_distributed
from trainer.checkpoint.run_record import sha256
from trainer.config import load_config
from trainer.data.corpus import embedded_paragraphs_corpus
from trainer.data.packing import build_sequences
from trainer.tools.preflight import preflight

STEPS = 8
# DeepSpeedCPUAdam (optimizer offload to the host) against the single process's torch AdamW: measured 1.2e-7
# relative at most over the 8 losses and 2 validation losses at dp=2 under ZeRO-2 and ZeRO-3, as close as ZeRO-3
# with torch's AdamW (1.1e-7): asserted at 1e-6.
CPU_ADAM_RTOL = 1e-6
# A short, fast variant of the debug config; every layout below runs exactly this. Rows of 128 slots hold
# two or three paragraph samples each.
BASE = ["model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "data.seq_length=128",
        f"data.path={embedded_paragraphs_corpus()}", "data.packing=true",
        "model.max_sequence_length=128", "parallel.micro_batch_size=2", "parallel.global_batch_size=8",
        f"train.steps={STEPS}", "optim.warmup_steps=2", "optim.decay_steps=6", "train.save_interval=0",
        "train.eval_interval=4", "data.valid_fraction=0.1"]


def _train(rank, world_size, config, out_path):
    from trainer.engine.loop import train

    torch.set_num_threads(1)
    result = train(config)
    if rank == 0:
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        valid = [r["valid_loss"] for r in records if "valid_loss" in r]
        out_path.write_text(json.dumps(result.losses + valid))
        out_path.with_suffix(".norms.json").write_text(json.dumps([r["grad_norm"] for r in records]))


def _losses(tmp_path, name, overrides, world_size=1, config_path="configs/glm-debug.yaml", base=BASE):
    out = tmp_path / f"{name}.json"
    overrides = base + overrides + [f"train.run_dir={tmp_path / name}"]
    config = preflight(load_config(config_path, overrides), world_size)  # as glm-train does
    run_distributed(_train, world_size, config, out)
    return json.loads(out.read_text())


def _grad_norms(tmp_path, name):
    return json.loads((tmp_path / f"{name}.norms.json").read_text())


def _train_losses(values):
    return values[:STEPS]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    return _losses(root, "single", []), root / "single"


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run[0]


@pytest.fixture(scope="module")
def reference_norms(reference_run):
    return _grad_norms(reference_run[1].parent, "single")


@pytest.mark.parametrize("name, overrides", [
    ("tp2", ["parallel.tp=2"]),
    ("pp2", ["parallel.pp=2"]),
    ("dp2", []),
    # DeepSpeed's plain engine (pp = 1) with sharded gradients, and with sharded weights too
    ("dp2_zero2", ["optim.zero_stage=2"]),
    ("dp2_zero3", ["optim.zero_stage=3"]),
    # DeepSpeedCPUAdam on the host (CPU_ADAM_RTOL)
    ("dp2_zero3_offload", ["optim.zero_stage=3", "optim.offload_optimizer=cpu"]),
])
def test_two_process_layouts_match_single_process(reference, reference_norms, tmp_path, name, overrides):
    losses = _losses(tmp_path, name, overrides, world_size=2)
    assert len(losses) == STEPS + 2  # 8 training losses, then the validation loss at steps 4 and 8
    rtol = CPU_ADAM_RTOL if "offload_optimizer=cpu" in overrides else 1e-5
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=rtol, atol=0)
    # The gradient norm clipping uses (the trainer's own at tp=2 and pp=2, DeepSpeed's under ZeRO-1 at dp=2):
    # measured within 1.1e-7 of the single process's, whose per-gradient norms are accumulated in fp64 on
    # CPU (engine/grad_norm.py).
    torch.testing.assert_close(torch.tensor(_grad_norms(tmp_path, name), dtype=torch.float64),
                               torch.tensor(reference_norms, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name, overrides", [
    ("tp2_pp2", ["parallel.tp=2", "parallel.pp=2"]),
    ("pp2_dp2", ["parallel.pp=2"]),
    ("tp2_dp2_zero2", ["parallel.tp=2", "optim.zero_stage=2"]),
    # each tensor rank's shards partitioned over its data-parallel group
    ("tp2_dp2_zero3", ["parallel.tp=2", "optim.zero_stage=3"]),
])
def test_four_process_layouts_match_single_process(reference, reference_norms, tmp_path, name, overrides):
    losses = _losses(tmp_path, name, overrides, world_size=4)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(_grad_norms(tmp_path, name), dtype=torch.float64),
                               torch.tensor(reference_norms, dtype=torch.float64), rtol=1e-6, atol=0)


MICRO_BATCH_RUN = ["train.steps=4", "optim.decay_steps=2"]
"""4 steps of one global batch of 8 packed rows each, validated at step 4 (BASE's eval_interval)."""


@pytest.fixture(scope="module")
def micro_batch_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    return _losses(root, "mb1_dp1", MICRO_BATCH_RUN + ["parallel.micro_batch_size=1"])


@pytest.mark.parametrize("dp, micro_batch_size", [(1, 2), (1, 4), (2, 1), (2, 2), (2, 4)])
def test_the_step_loss_does_not_depend_on_micro_batching(micro_batch_reference, tmp_path, dp, micro_batch_size):
    """One global batch split into micro-batches of 1, 2 or 4 rows on 1 or 2 data-parallel ranks: the same
    training and validation losses, since every step's loss is the mean over all its loss tokens
    (trainer/engine/step_loss.py); a mean per micro-batch differs by 5e-3 (6e-4 relative) at step 1 here."""
    losses = _losses(tmp_path, f"mb{micro_batch_size}_dp{dp}",
                     MICRO_BATCH_RUN + [f"parallel.micro_batch_size={micro_batch_size}"], world_size=dp)
    assert len(losses) == 5  # 4 training losses, then the validation loss at step 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(micro_batch_reference), rtol=1e-6, atol=0)


def test_unpacked_rows_match_across_layouts_too(tmp_path):
    unpacked = ["data.packing=false"]
    single = _losses(tmp_path, "unpacked1", unpacked)
    tp2 = _losses(tmp_path, "unpacked_tp2", unpacked + ["parallel.tp=2"], world_size=2)
    torch.testing.assert_close(torch.tensor(tp2), torch.tensor(single), rtol=1e-5, atol=0)


def test_activation_checkpointing_changes_no_loss(reference, tmp_path):
    losses = _losses(tmp_path, "recompute", ["parallel.recompute_interval=1"])
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)


def test_losses_change_over_steps(reference):
    # Guards the parity test against a trainer that does not train (equal constant losses would pass it).
    train_losses = _train_losses(reference)
    assert train_losses[-1] < train_losses[0] and len(set(train_losses)) == STEPS
    assert reference[STEPS + 1] < reference[STEPS]  # validation loss fell between step 4 and step 8


def test_resume_continues_the_same_curve(reference, tmp_path):
    first = _losses(tmp_path, "resume", ["train.steps=4", "train.save_interval=2"])
    second = _losses(tmp_path, "resume", ["train.resume=true"])
    # first: 4 losses + the validation at step 4; second: steps 5-8, then the validations that metrics.jsonl
    # holds after the resume (step 4's, kept from the first run, and step 8's)
    assert second[4] == first[4]
    resumed = first[:4] + second[:4] + [first[4], second[5]]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-5, atol=0)
    lines = [json.loads(line) for line in (tmp_path / "resume" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("first, second", [
    # ZeRO-3 at dp=2 with tp=2: one set of partition files per tensor rank, resharded into the pipeline's layers
    ((4, ["parallel.tp=2", "optim.zero_stage=3"]), (4, ["parallel.tp=2", "parallel.pp=2"])),
    ((4, ["parallel.tp=2", "parallel.pp=2"]), (2, ["optim.zero_stage=3"])),
    # the same layout and stage with the Adam states moved to the host: DeepSpeed's own load would hand torch
    # AdamW's parameter groups to DeepSpeedCPUAdam, whose step fails on them
    ((1, ["optim.zero_stage=3"]), (1, ["optim.zero_stage=3", "optim.offload_optimizer=cpu"])),
], ids=["zero3_tp2_dp2_to_tp2_pp2", "tp2_pp2_to_zero3_dp2", "zero3_to_zero3_offloaded"])
def test_resume_across_engines_continues_the_same_curve(reference, tmp_path, first, second):
    """4 steps on one engine and layout, 4 on another engine, layout or optimizer (ZeRO-3's per-parameter
    partitions <-> the pipeline's layer files or one process's module, Adam moments included): the 8 straight
    steps' losses."""
    (world_1, layout_1), (world_2, layout_2) = first, second
    before = _losses(tmp_path, "across", ["train.steps=4", *layout_1], world_size=world_1)
    after = _losses(tmp_path, "across", ["train.resume=true", *layout_2], world_size=world_2)
    resumed = before[:4] + after[:4] + [before[4], after[5]]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-5, atol=0)
    _check_exports_of_both_engines(tmp_path / "across" / "checkpoints", tmp_path / "exports")


def _check_exports_of_both_engines(checkpoints, out):
    """glm-ckpt export reads the files of either engine (ZeRO-3 partitions or pipeline layer files) to the
    weights the resumed run loaded from them."""
    from trainer.tools import ckpt as cli
    from trainer.checkpoint.export import read_export
    from trainer.checkpoint.model_source import read_weights

    for tag in ("global_step4", "global_step8"):
        assert cli.main(["export", str(checkpoints / tag), "--out", str(out / tag)]) == 0
        _, exported = read_export(out / tag)
        _, read = read_weights(checkpoints / tag, None)
        assert exported.keys() == read.keys()
        for name, value in read.items():
            torch.testing.assert_close(exported[name].float(), value, rtol=0, atol=0)


def test_outputs_metrics_tensorboard_and_checkpoint(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses, run_dir = reference_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "padding_fraction"):
        assert all(isinstance(r[key], float) for r in records), key
    rows = build_sequences(load_config("configs/glm-debug.yaml", BASE).data, 1234)
    for r in records:  # the share of the step's slots (every rank's rows) that hold no real token
        step_rows = range(r["consumed_samples"] - r["batch_size"], r["consumed_samples"])
        assert r["padding_fraction"] == 1 - sum(rows.real_tokens(k) for k in step_rows) / (r["batch_size"] * 128)
    assert max(r["padding_fraction"] for r in records) < 0.05
    torch.testing.assert_close(torch.tensor([r["loss"] for r in records]), torch.tensor(_train_losses(losses)))
    assert [r["step"] for r in records if "valid_ppl" in r] == [4, 8]
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/padding_fraction",
            "memory/peak_allocated_bytes"} <= set(scalars)
    tb_losses = [e.value for e in events.Scalars("train/loss")]
    torch.testing.assert_close(torch.tensor(tb_losses), torch.tensor(_train_losses(losses)))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}"
    record = json.loads((run_dir / "checkpoints" / f"global_step{STEPS}" / "run.json").read_text())
    model = dataclasses.replace(load_config("configs/glm-debug.yaml", BASE).model, vocab_size=rows.tokenizer.vocab_size)
    assert record == {"model": dataclasses.asdict(model), "layout": {"tp": 1, "pp": 1, "dp": 1},
                      "tokenizer_sha256": sha256(run_dir / "tokenizer.json")}
    position = json.loads((run_dir / "checkpoints" / f"global_step{STEPS}" / "data_position.json").read_text())
    assert position["first_row"] <= STEPS * 8 and position["fingerprint"] == rows.fingerprint


def test_batch_size_warmup_is_layout_independent(tmp_path):
    warmup = ["optim.batch_size_warmup_steps=4", "optim.batch_size_warmup_start=4"]
    single = _losses(tmp_path, "warm1", warmup)
    dp2 = _losses(tmp_path, "warm2", warmup, world_size=2)
    torch.testing.assert_close(torch.tensor(dp2), torch.tensor(single), rtol=1e-5, atol=0)
    records = [json.loads(line) for line in (tmp_path / "warm1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch_size"] for r in records] == [4, 4, 4, 4, 8, 8, 8, 8]


GLM4_DEBUG = "configs/glm-4-debug.yaml"
GLM4_RUN = ["train.steps=10", "train.save_interval=0", "train.eval_interval=0", "optim.warmup_steps=2",
            "optim.decay_steps=8", f"data.path={embedded_paragraphs_corpus()}", "data.seq_length=64",
            "model.max_sequence_length=64"]
"""configs/glm-4-debug.yaml's model, 10 steps of 8 rows of 64 slots (2 micro-batches of 4)."""


def test_glm4_debug_at_tp2_pp2_matches_single_process_and_exports_to_transformers(tmp_path):
    """GLM-4's architecture (GQA, partial interleaved rotary, RMSNorm, SwiGLU, untied output) trained at
    tp=2 x pp=2 gives the single process's losses; its checkpoint exported to transformers loads there and
    gives the trainer's logits."""
    import transformers

    from trainer.tools import ckpt as cli
    from trainer.checkpoint.model_source import build_model, read_weights
    from trainer.model.mask import segments_of_sep

    single = _losses(tmp_path, "glm4_single", [], config_path=GLM4_DEBUG, base=GLM4_RUN)
    layout = _losses(tmp_path, "glm4_tp2_pp2", ["parallel.tp=2", "parallel.pp=2"], world_size=4,
                     config_path=GLM4_DEBUG, base=GLM4_RUN)
    assert len(single) == 10
    torch.testing.assert_close(torch.tensor(layout), torch.tensor(single), rtol=1e-5, atol=0)
    run_dir, out = tmp_path / "glm4_tp2_pp2", tmp_path / "hf"
    assert cli.main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0  # the run describes itself
    config, weights = read_weights(run_dir, None)
    input_ids = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(20).expand(2, 20)
    ours = build_model(config, weights)(input_ids, positions, torch.zeros_like(positions),
                                        segments_of_sep(torch.ones(2, dtype=torch.long), 20))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(input_ids).logits
    torch.testing.assert_close(theirs, ours[..., :config.vocab_size], atol=1e-5, rtol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer.encode("def f(x):", add_special_tokens=False)) == "def f(x):"
    assert tokenizer.encode("def f(x):")[:2] == [tokenizer.convert_tokens_to_ids(t) for t in ("[gMASK]", "<|startofpiece|>")]


def test_a_replicated_key_value_head_at_tp2_matches_single_process_and_resumes_at_tp1(tmp_path):
    """Multi-query attention at tp=2 (the one key/value head computed on both ranks, trainer/model/attention.py)
    gives the single process's losses and gradient norms (the trainer's own norm at tp=2), and its checkpoint
    resumes at tp=1 on the same loss curve."""
    mqa = ["model.num_key_value_heads=1"]
    single = _losses(tmp_path, "mqa_single", mqa, config_path=GLM4_DEBUG, base=GLM4_RUN)
    first = _losses(tmp_path, "mqa", mqa + ["parallel.tp=2", "train.steps=5", "train.save_interval=5"], world_size=2,
                    config_path=GLM4_DEBUG, base=GLM4_RUN)
    torch.testing.assert_close(torch.tensor(_grad_norms(tmp_path, "mqa"), dtype=torch.float64),
                               torch.tensor(_grad_norms(tmp_path, "mqa_single")[:5], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    second = _losses(tmp_path, "mqa", mqa + ["train.resume=true"], config_path=GLM4_DEBUG, base=GLM4_RUN)
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(single), rtol=1e-5, atol=0)
