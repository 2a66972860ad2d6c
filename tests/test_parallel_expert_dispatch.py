"""Expert dispatch / combine (trainer/parallel/expert_dispatch.py): at ep = 1 and on 2 gloo ranks, outputs and
gradients (tokens, routing weights, expert weights) equal the single-process computation with every expert."""
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from trainer.parallel.expert_dispatch import combine, dispatch

E, K, H, T = 4, 2, 3, 6  # experts, experts per token, hidden, tokens per rank


def _inputs(rank: int):
    """Rank `rank`'s tokens, routing and output gradient; the expert weights (the same on every rank). Expert 3
    gets no token from either rank, so a split of 0 rows is exercised."""
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, H, generator=generator)
    topk_ids = torch.stack([torch.randperm(3, generator=generator)[:K] for _ in range(T)])  # [T, k] in 0..2
    if rank == 1:
        topk_ids[:, 0] = 2  # skewed: rank 1 sends most of its slots to rank 1's expert 2
    weights = torch.rand(T, K, generator=generator)
    grad_out = torch.randn(T, H, generator=generator)
    experts = torch.randn(E, H, H, generator=torch.Generator().manual_seed(7))  # [E, h_out, h_in]
    return x, topk_ids, weights, grad_out, experts


def _run_local_experts(rows: torch.Tensor, counts: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """rows [N, h] grouped by local expert (counts [E_local]) -> each block through its expert."""
    blocks = rows.split(counts.tolist())
    return torch.cat([block @ experts[e].T for e, block in enumerate(blocks)])


def _reference(x, topk_ids, weights, experts) -> torch.Tensor:
    """y_t = sum_j w_tj W_(e_tj) x_t, token by token."""
    per_slot = torch.einsum("tkoi,ti->tko", experts[topk_ids], x)  # [T, k, h]
    return (per_slot * weights.unsqueeze(-1)).sum(1)


def _leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def test_ep1_is_the_local_permutation():
    x, topk_ids, weights, grad_out, experts = _inputs(0)
    x, weights, experts = _leaves(x, weights, experts)
    rows, counts, handle = dispatch(x, topk_ids, E, None)
    assert counts.tolist() == torch.bincount(topk_ids.reshape(-1), minlength=E).tolist()
    y = combine(_run_local_experts(rows, counts, experts), weights, handle)
    y.backward(grad_out)
    x_ref, w_ref, e_ref = _leaves(x.detach(), weights.detach(), experts.detach())
    _reference(x_ref, topk_ids, w_ref, e_ref).backward(grad_out)
    torch.testing.assert_close(y, _reference(x_ref, topk_ids, w_ref, e_ref))
    for got, want in ((x, x_ref), (weights, w_ref), (experts, e_ref)):
        torch.testing.assert_close(got.grad, want.grad)


def _two_ranks(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=list(range(world_size)))
    local = E // world_size
    x, topk_ids, weights, grad_out, experts = _inputs(rank)
    x, weights = _leaves(x, weights)
    mine = experts[rank * local:(rank + 1) * local].clone().requires_grad_()  # this rank's block of experts
    rows, counts, handle = dispatch(x, topk_ids, E, group)
    y = combine(_run_local_experts(rows, counts, mine), weights, handle)
    y.backward(grad_out)

    # The single-process computation: every rank's tokens through all experts, the loss summed over ranks.
    every = [_inputs(r) for r in range(world_size)]
    all_experts = experts.clone().requires_grad_()
    refs = [_leaves(x_r, w_r) for x_r, _, w_r, _, _ in every]
    outputs = [_reference(x_r, ids_r, w_r, all_experts) for (x_r, w_r), (_, ids_r, _, _, _) in zip(refs, every)]
    sum((out * g_r).sum() for out, (_, _, _, g_r, _) in zip(outputs, every)).backward()

    routed = torch.bincount(torch.cat([ids_r.reshape(-1) for _, ids_r, _, _, _ in every]), minlength=E)
    assert counts.tolist() == routed[rank * local:(rank + 1) * local].tolist()
    torch.testing.assert_close(y, outputs[rank])
    torch.testing.assert_close(x.grad, refs[rank][0].grad)
    torch.testing.assert_close(weights.grad, refs[rank][1].grad)
    torch.testing.assert_close(mine.grad, all_experts.grad[rank * local:(rank + 1) * local])


def test_dispatch_and_combine_on_two_ranks_equal_one_process():
    run_distributed(_two_ranks, 2)
