"""configs/glm-4.5-debug.yaml (a tiny GLM-4.5 mixture of experts) trained by the loop: the same losses and gradient
norms at tp=2, pp=2 (MoE layers on both stages, the auxiliary losses' gradients from each), dp=2 (the expert
loads summed over the data-parallel ranks for the bias update) and dp=2 under ZeRO-3 as one process; the step's
MoE metrics."""
import json

import pytest
import torch

from tests.test_engine_parity import _grad_norms, _losses
from trainer.data.corpus import embedded_paragraphs_corpus

CONFIG = "configs/glm-4.5-debug.yaml"
STEPS = 6
RUN = [f"train.steps={STEPS}", "train.save_interval=0", "train.eval_interval=0", "optim.warmup_steps=2",
       "optim.decay_steps=4", f"data.path={embedded_paragraphs_corpus()}", "data.seq_length=64",
       "model.max_sequence_length=64", "model.moe_bias_update_rate=0.01", "model.moe_aux_loss_coeff=0.01",
       "model.moe_z_loss_coeff=0.001", "model.mtp_layers=0"]
"""6 steps of 8 rows of 64 slots (micro-batches of 4); a faster bias and larger auxiliary losses than the config's,
so that both move the numbers the layouts are compared on."""


def _run(tmp_path, name, overrides=(), world_size=1):
    return _losses(tmp_path, name, list(overrides), world_size=world_size, config_path=CONFIG, base=RUN)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return _run(root, "single"), _grad_norms(root, "single"), root / "single"


def test_the_debug_moe_trains_and_reports_its_routing(reference):
    losses, _, run_dir = reference
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1
    records = _records(run_dir)
    for record in records:
        # L_bal = sum_i f_i P_i is at most E / k (all tokens on the experts of all the score) and near 1 balanced;
        # the bias also chooses, so the choices need not follow the scores and it can fall a little below 1
        assert 0.5 < record["moe_aux_loss"] <= 8 / 2
        assert record["moe_z_loss"] > 0 and record["moe_load_imbalance"] >= 1.0
    assert len({record["moe_load_imbalance"] for record in records}) > 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert {"train/moe_aux_loss", "train/moe_z_loss", "train/moe_load_imbalance"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize("name, overrides", [
    ("tp2", ["parallel.tp=2"]),
    ("pp2", ["parallel.pp=2"]),  # blocks 1-2 on stage 0 (dense, MoE), 3-4 on stage 1 (MoE, MoE)
    ("dp2", []),
    ("dp2_zero3", ["optim.zero_stage=3"]),  # the router's weight gathered again for backward, the bias saved whole
])
def test_two_process_layouts_match_single_process(reference, tmp_path, name, overrides):
    losses, norms, _ = reference
    torch.testing.assert_close(torch.tensor(_run(tmp_path, name, overrides, world_size=2)), torch.tensor(losses),
                               rtol=1e-5, atol=0)
    # within 1e-6 absolute (norms near 1, logged in fp32: the tp ranks' sums in another order move the last bits)
    torch.testing.assert_close(torch.tensor(_grad_norms(tmp_path, name), dtype=torch.float64),
                               torch.tensor(norms, dtype=torch.float64), rtol=0, atol=1e-6)


def test_the_auxiliary_losses_and_the_bias_change_what_the_layouts_are_compared_on(reference, tmp_path):
    """Guards the parity test: a layout that lost the auxiliary losses' gradient or updated the bias from its own
    rank's loads alone would not give the reference's numbers."""
    losses, norms, _ = reference
    _run(tmp_path, "no_aux", ["model.moe_aux_loss_coeff=0", "model.moe_z_loss_coeff=0"])
    assert abs(_grad_norms(tmp_path, "no_aux")[0] / norms[0] - 1) > 1e-5  # step 1: the bias is still 0
    frozen = _run(tmp_path, "frozen_bias", ["model.moe_bias_update_rate=0"])
    assert frozen[0] == losses[0] and abs(frozen[-1] / losses[-1] - 1) > 1e-5
