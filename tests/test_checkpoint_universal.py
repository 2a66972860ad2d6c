"""Resume at another layout: a run trained at tp=2 and resumed at tp=1 x pp=2 (and at dp=2) continues the
loss curve of an uninterrupted run (fp32, 1e-5 relative), weights and the ZeRO-1 Adam state carried over
through trainer.checkpoint.universal.load_any_layout, on the real trainer (configs/glm-debug.yaml)."""
import json

import pytest
import torch

from tests.distributed import run_distributed
from trainer.config import load_config

STEPS, FIRST = 6, 3
BASE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.mlp=geglu",
        "data.seq_length=32", "model.max_sequence_length=32", "parallel.micro_batch_size=2",
        "parallel.global_batch_size=4", "optim.warmup_steps=2", "optim.decay_steps=4", "train.save_interval=0"]


def _train(rank, world_size, overrides, resume_from, out_path):
    """Train (optionally first loading the newest checkpoint of resume_from at this layout) and write the losses."""
    from trainer.engine.checkpoint import choose_tag
    from trainer.engine.loop import Trainer
    from trainer.engine.schedule import consumed_samples_at
    from trainer.checkpoint.universal import load_any_layout

    torch.set_num_threads(1)
    config = load_config("configs/glm-debug.yaml", BASE + overrides)
    trainer = Trainer(config)
    if resume_from is not None:
        resumed = load_any_layout(trainer.engine, trainer.topology, config.model, resume_from, choose_tag(resume_from))
        assert resumed is not None  # a layout change: handled here, not by DeepSpeed
        trainer.step = resumed[0]
        trainer.consumed = consumed_samples_at(trainer.step, config, trainer.unit)
    losses = trainer.run().losses
    if rank == 0:
        out_path.write_text(json.dumps(losses))


def _losses(tmp_path, name, overrides, world_size, resume_from=None):
    out = tmp_path / f"{name}.json"
    run_distributed(_train, world_size, overrides + [f"train.run_dir={tmp_path / name}"], resume_from, out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def first_half(tmp_path_factory):
    root = tmp_path_factory.mktemp("universal")
    reference = _losses(root, "uninterrupted", ["parallel.tp=2", f"train.steps={STEPS}"], 2)
    first = _losses(root, "tp2", ["parallel.tp=2", f"train.steps={FIRST}"], 2)
    return root, reference, first


@pytest.mark.parametrize("name, overrides", [("tp1_pp2", ["parallel.pp=2"]), ("dp2", [])])
def test_resume_at_another_layout_continues_the_curve(first_half, name, overrides):
    root, reference, first = first_half
    second = _losses(root, name, overrides + [f"train.steps={STEPS}"], 2, resume_from=root / "tp2" / "checkpoints")
    assert len(first) == FIRST and len(second) == STEPS - FIRST
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(reference), rtol=1e-5, atol=0)
    assert len(set(reference)) == STEPS  # the curve moves: equal constants would not test anything
