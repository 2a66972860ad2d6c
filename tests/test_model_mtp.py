"""The MTP layer (trainer/model/mtp.py): t+1 is the next slot of t's own sample; no slot's MTP output sees
another sample or a token past t+1; the loss is main + weight * (the MTP layer's mean over its loss tokens); eval
mode (decoding, validation) gives the logits of the model without it; and through the trainer (packed rows,
QK-norm on), mtp_loss is logged, a weight of 0 leaves the main model's losses untouched, the weight enters the
step-1 loss exactly, and tp=2 and dp=2 reproduce the single process's losses and gradient norms; on
configs/glm-4.5-debug.yaml (MoE, the MTP layer's block MoE too) tp=2 and ep=2 do, the checkpoint holds it, and
its glm4_moe export gives the trainer's logits in transformers with the trained MTP layer in its files. The
pipeline (pp = 2): tests/test_mtp_pipeline.py."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from tests.distributed import run_distributed
from trainer.checkpoint import hf
from trainer.checkpoint.model_source import build_model, read_weights
from trainer.config import load_config
from trainer.data.corpus import embedded_paragraphs_corpus
from trainer.errors import ConfigError
from trainer.model.config import ModelConfig
from trainer.model.glm import GLMLoss, GLMModel
from trainer.model.mask import segments_of_sep, stack_segments
from trainer.model.mtp import NO_NEXT_TOKEN, MTPOutputs, mtp_batch, next_in_sample
from trainer.tools.preflight import preflight

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=50, max_sequence_length=16,
                     position_embedding="rope_1d", normalization="rmsnorm", mlp="swiglu", add_bias_linear=False,
                     qk_norm=True, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0, mtp_layers=1)
# One row of 10 slots packing two samples and padding: sample 1 = slots 0-4 (Part A 0-1, Part B 2-4), sample 2 =
# slots 5-8 (Part A 5, Part B 6-8), padding slot 9.
START = torch.tensor([[0, 0, 0, 0, 0, 5, 5, 5, 5, 9]])
SEP = torch.tensor([[2, 2, 2, 2, 2, 6, 6, 6, 6, 10]])
LOSS_MASK = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1, 0]])
POSITIONS = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
BLOCKS = torch.tensor([[0, 0, 1, 2, 3, 0, 1, 2, 3, 0]])


def _inputs(input_ids: torch.Tensor) -> tuple:
    """The model's inputs in training: the row's and the next-token ids (trainer/engine/loop.py pipeline_format)."""
    next_ids = mtp_batch(input_ids, input_ids, LOSS_MASK, START).next_input_ids
    return input_ids, POSITIONS, BLOCKS, stack_segments(START, SEP), next_ids


def _model(config: ModelConfig = CONFIG) -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(config, seed=3).train()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, CONFIG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(seed))


def test_t_plus_one_is_the_next_slot_of_the_same_sample():
    assert next_in_sample(START).tolist() == [[True, True, True, True, False, True, True, True, False, False]]
    labels = torch.arange(10)[None]
    next_ids, shifted, mask = mtp_batch(labels + 20, labels, LOSS_MASK, START)
    assert shifted[0, :9].tolist() == list(range(1, 10))
    assert next_ids.tolist() == [[21, 22, 23, 24, NO_NEXT_TOKEN, 26, 27, 28, NO_NEXT_TOKEN, NO_NEXT_TOKEN]]
    # counted at t where labels[t+1] is a loss token of t's sample: the last Part A slot (1) predicts Part B's
    # first label; slot 4 (sample 1's last) and slot 8 (sample 2's last) predict nothing across the boundary
    assert mask.tolist() == [[0, 1, 1, 1, 0, 1, 1, 1, 0, 0]]


def test_no_mtp_output_sees_another_sample_or_a_token_past_t_plus_one():
    model = _model()
    ids = _ids()
    base = model.head_inputs(_inputs(ids))[0]
    assert isinstance(base, MTPOutputs)
    other_sample = ids.clone()
    other_sample[0, 5:] = (ids[0, 5:] + 7) % CONFIG.vocab_size  # every token of sample 2 and the padding
    changed = model.head_inputs(_inputs(other_sample))[0]
    assert_close(changed.mtp[:, :5], base.mtp[:, :5], atol=0, rtol=0)
    assert_close(changed.main[:, :5], base.main[:, :5], atol=0, rtol=0)
    later = ids.clone()
    later[0, 4] = (ids[0, 4] + 7) % CONFIG.vocab_size  # x_4 is t+1 of slot 3 only (Part B is causal)
    changed = model.head_inputs(_inputs(later))[0]
    assert_close(changed.mtp[:, :3], base.mtp[:, :3], atol=0, rtol=0)
    assert not torch.equal(changed.mtp[:, 3], base.mtp[:, 3])


def test_the_loss_is_main_plus_weight_times_the_mtp_mean():
    model, loss_fn = _model(), GLMLoss(CONFIG)
    ids, labels = _ids(), _ids(seed=2)
    handover, weight = model.head_inputs(_inputs(ids))
    mtp_fields = mtp_batch(ids, labels, LOSS_MASK, START)
    total = loss_fn((handover, weight), (labels, LOSS_MASK, LOSS_MASK.sum(), None, mtp_fields.loss_mask.sum(),
                                         mtp_fields.labels, mtp_fields.loss_mask))

    def mean_ce(hidden, mask, targets):
        per_token = torch.nn.functional.cross_entropy((hidden @ weight.T)[0, :, :CONFIG.vocab_size], targets[0],
                                                      reduction="none")
        return (per_token * mask[0]).sum() / mask.sum()

    main = mean_ce(handover.main, LOSS_MASK, labels)
    mtp_mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 0, 0]])
    mtp = mean_ce(handover.mtp, mtp_mask, torch.roll(labels, -1, dims=1))
    assert_close(total, main + CONFIG.mtp_loss_weight * mtp)
    recorded, calls = loss_fn.take_recorded()
    assert calls == 1 and recorded.keys() == {"mtp_loss"}
    assert_close(recorded["mtp_loss"], mtp.detach())
    assert loss_fn.take_recorded() == ({}, 0)
    total.backward()
    assert model.mtp.layers[0].eh_proj.weight.grad.abs().sum() > 0  # the MTP layer is trained


def test_eval_mode_gives_the_logits_of_the_model_without_the_mtp_layer():
    model = _model().eval()
    plain = GLMModel(dataclasses.replace(CONFIG, mtp_layers=0), seed=3).eval()
    assert plain.load_state_dict(model.state_dict(), strict=False).unexpected_keys  # the MTP layer's, only
    ids = _ids()
    with torch.no_grad():
        assert_close(model(*_inputs(ids)[:4]), plain(*_inputs(ids)[:4]), atol=0, rtol=0)


def test_more_than_one_mtp_layer_is_refused():
    with pytest.raises(ConfigError, match="model.mtp_layers=2: one MTP layer"):
        dataclasses.replace(CONFIG, mtp_layers=2).validate()
    overrides = ["model.mtp_layers=1", "model.num_layers=2"]
    load_config("configs/glm-debug.yaml", overrides + ["parallel.cp=2"]).validate()  # tests/test_context_parallel.py
    load_config("configs/glm-debug.yaml", overrides + ["parallel.pp=2"]).validate()  # tests/test_mtp_pipeline.py


STEPS = 3
BASE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "data.seq_length=64",
        f"data.path={embedded_paragraphs_corpus()}", "data.packing=true", "model.max_sequence_length=64",
        "model.qk_norm=true", "model.position_embedding=rope_1d", "parallel.micro_batch_size=2",
        "parallel.global_batch_size=4", f"train.steps={STEPS}", "optim.warmup_steps=1", "optim.decay_steps=2",
        "train.save_interval=0"]


def _train(rank, world_size, config, out_path):
    from trainer.engine.loop import train

    torch.set_num_threads(1)
    result = train(config)
    if rank == 0:
        out_path.write_text((result.run_dir / "metrics.jsonl").read_text())


def _metrics(tmp_path, name: str, overrides: list[str], world_size: int = 1) -> list[dict]:
    config = preflight(load_config("configs/glm-debug.yaml", BASE + overrides + [f"train.run_dir={tmp_path / name}"]),
                       world_size)
    run_distributed(_train, world_size, config, tmp_path / f"{name}.jsonl")
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _metrics(tmp_path_factory.mktemp("mtp"), "single", ["model.mtp_layers=1"])


def _column(records: list[dict], key: str) -> torch.Tensor:
    return torch.tensor([record[key] for record in records], dtype=torch.float64)


def test_training_logs_the_mtp_loss_and_its_weight_enters_the_loss(single, tmp_path):
    without = _metrics(tmp_path, "without", [])
    unweighted = _metrics(tmp_path, "unweighted", ["model.mtp_layers=1", "model.mtp_loss_weight=0"])
    assert "mtp_loss" not in without[0] and all(record["mtp_loss"] > 0 for record in single)
    # weight 0: the MTP layer is computed and logged but the main model trains exactly as without it
    assert_close(_column(unweighted, "loss"), _column(without, "loss"), rtol=1e-6, atol=0)
    # step 1 runs the initial weights, the same in both runs: loss = main + 0.3 * mtp_loss
    assert_close(_column(single, "mtp_loss")[0], _column(unweighted, "mtp_loss")[0], rtol=1e-6, atol=0)
    assert_close(_column(single, "loss")[0], _column(without, "loss")[0] + 0.3 * _column(single, "mtp_loss")[0],
                 rtol=1e-6, atol=0)


def _assert_same_curves(records: list[dict], reference: list[dict], keys: tuple[str, ...]) -> None:
    for key in keys:
        assert_close(_column(records, key), _column(reference, key), rtol=1e-6 if key == "grad_norm" else 1e-5, atol=0)


@pytest.mark.parametrize("name, overrides", [("tp2", ["parallel.tp=2"]), ("dp2", [])])
def test_two_process_layouts_match_single_process(single, tmp_path, name, overrides):
    records = _metrics(tmp_path, name, ["model.mtp_layers=1"] + overrides, world_size=2)
    _assert_same_curves(records, single, ("loss", "mtp_loss", "grad_norm"))


MOE = ["model.mtp_layers=1", "data.seq_length=64", "model.max_sequence_length=64", "parallel.micro_batch_size=2",
       "parallel.global_batch_size=4", f"train.steps={STEPS}", "optim.warmup_steps=1", "optim.decay_steps=2",
       "train.save_interval=0", f"data.path={embedded_paragraphs_corpus()}"]
"""configs/glm-4.5-debug.yaml (QK-norm, a dense first block, MoE blocks with a shared expert), shortened, with its
MTP layer, whose block is a MoE block too."""


def _moe_metrics(tmp_path, name: str, overrides: list[str], world_size: int = 1) -> list[dict]:
    overrides = MOE + overrides + [f"train.run_dir={tmp_path / name}"]
    config = preflight(load_config("configs/glm-4.5-debug.yaml", overrides), world_size)
    run_distributed(_train, world_size, config, tmp_path / f"{name}.jsonl")
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """(metrics, run directory) of the single-process MoE + MTP run."""
    root = tmp_path_factory.mktemp("moe")
    return _moe_metrics(root, "single", []), root / "single"


@pytest.fixture(scope="module")
def moe_single(moe_run):
    return moe_run[0]


@pytest.mark.parametrize("name, overrides", [("tp2", ["parallel.tp=2"]),
                                             ("ep2", ["parallel.ep=2", "optim.zero_stage=0"])])  # ep: no ZeRO yet
def test_the_moe_mtp_layer_matches_single_process_at_tp2_and_ep2(moe_single, tmp_path, name, overrides):
    records = _moe_metrics(tmp_path, name, overrides, world_size=2)
    _assert_same_curves(records, moe_single, ("loss", "mtp_loss", "grad_norm", "moe_load_imbalance"))
    config, weights = read_weights(tmp_path / name, None)  # the run's last checkpoint holds the MTP layer
    assert config.mtp_layers == 1 and "mtp.layers.0.block.mlp.experts.gate_up_weight" in weights


def test_the_trained_mtp_layer_is_exported_to_transformers(moe_run, tmp_path):
    """The run's checkpoint exported as glm4_moe: Glm4MoeForCausalLM gives the trainer's logits and the files hold
    the trained MTP layer under model.layers.N.*."""
    transformers = pytest.importorskip("transformers")
    config, weights = read_weights(moe_run[1], None)
    hf.write_hf(weights, config, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    segments = segments_of_sep(torch.ones(2, dtype=torch.long), 16)
    with torch.no_grad():
        ours = build_model(config, weights)(ids, positions, torch.zeros_like(positions), segments)
        assert_close(ours[..., :config.vocab_size], theirs(ids).logits, atol=1e-5, rtol=1e-5)
    written = load_file(str(tmp_path / "hf" / hf.WEIGHTS))
    n = config.num_layers
    assert torch.equal(written[f"model.layers.{n}.eh_proj.weight"], weights["mtp.layers.0.eh_proj.weight"])
    assert torch.equal(written[f"model.layers.{n}.mlp.experts.0.down_proj.weight"],
                       weights["mtp.layers.0.block.mlp.experts.down_weight"][0])
