"""The model-parallel RNG: dropout that is identical where activations are replicated and independent where
they are partitioned, and activation recomputation that replays the same dropout masks.

Two streams on the accelerator's generator (the CPU generator on CPU):
- the default generator, seeded alike on every rank of a tensor-parallel group: dropout on replicated
  activations (embedding output, residual branches) draws the same mask on every tensor rank, as it must,
  since every rank holds the same tensor;
- the tracker's "model-parallel" state, seeded per tensor rank and entered with `fork()`: dropout inside
  partitioned regions (the attention probabilities of this rank's heads) draws masks that are independent
  across ranks, as the heads of a single-process model would.
Both seeds are offset by the pipeline stage, so different layers on different stages draw different
masks (Megatron-LM does the same); data-parallel replicas share seeds and see different data.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from deepspeed.accelerator import get_accelerator
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from trainer.parallel.topology import Topology

MODEL_PARALLEL_RNG = "model-parallel-rng"
PIPELINE_SEED_STRIDE = 100
TENSOR_PARALLEL_SEED_OFFSET = 2718


class RNGStatesTracker:
    """Named generator states for the accelerator's default generator. `fork(name)` swaps the named state
    in, runs the block, stores the advanced state back and restores the generator as it was, so the
    default stream does not see the draws made inside the fork."""

    def __init__(self) -> None:
        self._states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        """Register a new state seeded with `seed` (the current generator state is left as it was)."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists; reset() the tracker before seeding it again")
        accelerator = get_accelerator()
        current = accelerator.get_rng_state()
        accelerator.manual_seed(seed)
        self._states[name] = accelerator.get_rng_state()
        accelerator.set_rng_state(current)

    def reset(self) -> None:
        self._states = {}

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every named state (for checkpoints and recomputation)."""
        return dict(self._states)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = dict(states)

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block on the named stream."""
        if name not in self._states:
            raise RuntimeError(f"RNG state {name!r} is not seeded: call "
                               f"trainer.parallel.random.model_parallel_seed(seed, topology) before the model runs")
        accelerator = get_accelerator()
        outside = accelerator.get_rng_state()
        accelerator.set_rng_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = accelerator.get_rng_state()
            accelerator.set_rng_state(outside)


# One tracker per process, like the default generator whose twin it is: the dropout sites are built by
# DeepSpeed LayerSpecs from fixed constructor arguments, and DeepSpeed calls
# activation_checkpoint_func(function, *args), so neither has a place to receive a tracker object.
_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process's tracker: `with get_rng_tracker().fork(): dropout(...)` inside partitioned regions."""
    return _TRACKER


def model_parallel_seed(seed: int, topology: Topology) -> None:
    """Seed the default generator with seed + 100 * pp_rank (alike across a tensor-parallel group) and the
    tracker's model-parallel state with that + 2718 + tp_rank (different on every tensor rank)."""
    stage_seed = seed + PIPELINE_SEED_STRIDE * topology.pp_rank
    torch.manual_seed(stage_seed)
    get_accelerator().manual_seed_all(stage_seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, stage_seed + TENSOR_PARALLEL_SEED_OFFSET + topology.tp_rank)


def get_rng_states() -> dict[str, Any]:
    """Every torch RNG state the model draws from: CPU, accelerator (when not the CPU) and the tracker."""
    accelerator = get_accelerator()
    states: dict[str, Any] = {"cpu": torch.get_rng_state(), "tracker": _TRACKER.get_states()}
    if accelerator.device_name() != "cpu":
        states["accelerator"] = accelerator.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what get_rng_states() returned."""
    torch.set_rng_state(states["cpu"])
    if "accelerator" in states:
        get_accelerator().set_rng_state(states["accelerator"])
    _TRACKER.set_states(states["tracker"])


# How many recompute() replays are running (nested recomputation is possible in principle).
_REPLAYS = [0]


def is_recomputing() -> bool:
    """Whether a recompute() is replaying a forward in backward: what a layer records about its forward (the
    expert loads of trainer/model/moe.py) was recorded when it first ran and must not count twice."""
    return _REPLAYS[0] > 0


def _tracker_contexts() -> tuple[Any, Any]:
    """(forward context that remembers the tracker's states, recompute context that replays them, marks the
    replay (is_recomputing) and then puts back the states the tracker had when the recomputation started)."""
    remembered: dict[str, torch.Tensor] = {}

    @contextmanager
    def remember() -> Iterator[None]:
        remembered.update(_TRACKER.get_states())
        yield

    @contextmanager
    def replay() -> Iterator[None]:
        current = _TRACKER.get_states()
        _TRACKER.set_states(remembered)
        _REPLAYS[0] += 1
        try:
            yield
        finally:
            _REPLAYS[0] -= 1
            _TRACKER.set_states(current)

    return remember(), replay()


def recompute(function: Callable[..., Any], *args: Any) -> Any:
    """function(*args) without keeping its activations: backward recomputes them, with the default and
    accelerator generators (torch's preserve_rng_state) and the tracker's states put back to where the
    forward started, so every dropout mask of the recomputation equals the forward's. Gradients reach
    the function's parameters even when no input requires grad (non-reentrant checkpointing)."""
    return torch_checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True,
                            context_fn=_tracker_contexts)
