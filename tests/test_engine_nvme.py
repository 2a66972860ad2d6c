"""NVMe offload (optim.offload_optimizer / offload_params = nvme) on CPU ranks: ZeRO-3 at dp=2 with its optimizer
states and weights in swap files under optim.nvme_path gives the single process's losses and gradient norms, its
checkpoint reads back on another layout, and a checkpoint of another layout resumes into it on the same curve.

The model is wider than tests/test_engine_parity.py's: DeepSpeed swaps only tensors of at least 1 MiB
(deepspeed/runtime/swap_tensor/utils.py: MIN_AIO_BYTES) and keeps smaller ones in host memory, so with
hidden_size 32 nothing would reach the files. At hidden_size 128 each rank's decayed parameter group (~0.4 M
fp32 elements) and its half of the word embedding (1 MiB) are swapped; the test checks that the files exist."""
import json
import shutil

import pytest
import torch

from tests.test_engine_parity import STEPS, _grad_norms, _losses

WIDE = ["model.num_layers=1", "model.hidden_size=128", "train.save_interval=4"]


def _aio_missing() -> str:
    """Why DeepSpeed's async-io op cannot be built here, or "" when it can."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False):
        return ""
    import ctypes.util

    if ctypes.util.find_library("aio") is None:
        return "libaio is not installed (apt-get install libaio-dev): DeepSpeed's AsyncIOBuilder cannot build"
    return ""  # libaio is there: let the run fail and say why the op does not build


AIO_MISSING = _aio_missing()
pytestmark = pytest.mark.skipif(bool(AIO_MISSING), reason=AIO_MISSING or "DeepSpeed's async-io op can be built")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 single-process steps of the wide model, checkpoints at steps 4 and 8."""
    root = tmp_path_factory.mktemp("nvme_ref")
    return _losses(root, "single", WIDE), root


def _nvme(tmp_path, params: str) -> list[str]:
    return ["optim.zero_stage=3", "optim.offload_optimizer=nvme", f"optim.offload_params={params}",
            f"optim.nvme_path={tmp_path / 'nvme'}"]


def _read_state(tag_dir):
    from trainer.checkpoint.model_source import read_weights
    from trainer.checkpoint.universal import read_training_state

    config, _ = read_weights(tag_dir, None)
    return read_training_state(tag_dir, config)


def test_zero3_with_optimizer_and_weights_on_nvme_matches_single_process(reference, tmp_path):
    losses, root = reference
    nvme = _losses(tmp_path, "nvme", WIDE + _nvme(tmp_path, params="nvme"), world_size=2)
    assert len(nvme) == STEPS + 2
    torch.testing.assert_close(torch.tensor(nvme), torch.tensor(losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(_grad_norms(tmp_path, "nvme"), dtype=torch.float64),
                               torch.tensor(_grad_norms(root, "single"), dtype=torch.float64), rtol=1e-6, atol=0)
    # The states really went through the files: fp32 master partition and both moments of each rank's decayed
    # group, and each rank's half of the word embedding (the only weight of at least 1 MiB per rank).
    swap = tmp_path / "nvme" / "zero_stage_3"
    for rank in (0, 1):
        names = {path.name.split("-")[0] for path in (swap / "optimizer" / f"rank{rank}").glob("*.tensor.swp")}
        assert {"exp_avg", "exp_avg_sq"} <= names and len(names) >= 3, names
        assert len(list((swap / "float32params" / f"rank{rank}").glob("*.tensor.swp"))) == 1
    # The checkpoint holds empty tensors for the swapped groups and a copy of the swap files; read on another
    # layout it is the single process's state (measured: weights within 7.7e-6, moments within 1.2e-8).
    ours, theirs = (_read_state(run / "checkpoints" / f"global_step{STEPS}")
                    for run in (tmp_path / "nvme", root / "single"))
    assert ours.optimizer_step == theirs.optimizer_step == STEPS
    torch.testing.assert_close(ours.weights, theirs.weights, rtol=0, atol=2e-5)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ours.moments[key], theirs.moments[key], rtol=0, atol=1e-7)


def test_resume_into_an_nvme_offloaded_optimizer_continues_the_same_curve(reference, tmp_path):
    """The single process's step-4 checkpoint (Adam moments included) resumed by ZeRO-3 at dp=2 with the optimizer
    on NVMe: the Adam states are written into the swap files, and steps 5-8 are the straight run's."""
    losses, root = reference
    run = tmp_path / "resumed"
    shutil.copytree(root / "single", run, ignore=shutil.ignore_patterns(f"global_step{STEPS}"))
    (run / "checkpoints" / "latest").write_text("global_step4")
    after = _losses(tmp_path, "resumed", WIDE + _nvme(tmp_path, params="none") + ["train.resume=true"], world_size=2)
    # steps 5-8, then the validation losses metrics.jsonl holds: step 4's (the single run's) and step 8's
    torch.testing.assert_close(torch.tensor(after), torch.tensor(losses[4:]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(_grad_norms(tmp_path, "resumed")[4:], dtype=torch.float64),
                               torch.tensor(_grad_norms(root, "single")[4:], dtype=torch.float64), rtol=1e-6, atol=0)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
