"""Vocab-parallel cross entropy against F.cross_entropy on the unpadded vocabulary: the pure partition
math combined by hand, the autograd wrapper without a group, and 2 gloo ranks (loss and gradient)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed import run_distributed
from trainer.parallel.cross_entropy import (logits_gradient, loss_from_statistics, mask_padded_columns,
                                            masked_mean, partition_max, partition_statistics,
                                            vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy)
from trainer.parallel import cross_entropy

B, S, VOCAB, PADDED = 2, 5, 13, 16  # columns 13..15 are vocabulary padding


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(B, S, PADDED, generator=generator)  # [b, s, V_pad]
    logits[..., VOCAB:] = 50.0  # padding columns large enough to dominate the softmax if they leaked in
    labels = torch.randint(0, VOCAB, (B, S), generator=generator)
    labels[0, 0], labels[1, 1] = VOCAB - 1, 0  # the last real column and the first
    loss_mask = (torch.rand(B, S, generator=generator) > 0.3).long()
    loss_mask[0, 0] = 1
    return logits, labels, loss_mask


def _reference(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor):
    """(per-token loss [b, s], gradient of the masked mean w.r.t. the padded logits [b, s, V_pad])."""
    logits = logits.clone().requires_grad_()
    per_token = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), labels.reshape(-1),
                                reduction="none").view(B, S)  # [b, s]
    ((per_token * loss_mask).sum() / loss_mask.sum()).backward()
    return per_token.detach(), logits.grad


def test_partition_math_combined_by_hand_matches_reference():
    logits, labels, _ = _batch()
    parts = [(start, mask_padded_columns(shard, start, VOCAB))
             for start, shard in zip((0, 8), logits.chunk(2, dim=-1))]
    global_max = torch.maximum(*[partition_max(shard) for _, shard in parts])  # what all-reduce MAX gives
    stats = [partition_statistics(shard, labels, global_max, start) for start, shard in parts]
    sum_exp = stats[0][1] + stats[1][1]
    target = stats[0][2] + stats[1][2]
    expected_loss, _ = _reference(logits, labels, torch.ones(B, S))
    torch.testing.assert_close(loss_from_statistics(sum_exp, target), expected_loss)

    grad_loss = torch.full((B, S), 1.0 / (B * S))
    grads = [logits_gradient(exp_logits, sum_exp, labels, start, grad_loss)
             for (start, _), (exp_logits, _, _) in zip(parts, stats)]
    _, expected_grad = _reference(logits, labels, torch.ones(B, S))
    torch.testing.assert_close(torch.cat(grads, dim=-1), expected_grad)


def test_without_group_matches_reference_and_ignores_padding():
    logits, labels, loss_mask = _batch()
    expected_loss, expected_grad = _reference(logits, labels, loss_mask)
    leaf = logits.clone().requires_grad_()
    per_token = vocab_parallel_cross_entropy(leaf, labels, None, vocab_size=VOCAB)
    assert per_token.dtype == torch.float32 and per_token.shape == (B, S)
    torch.testing.assert_close(per_token, expected_loss)
    masked_mean(per_token, loss_mask).backward()
    torch.testing.assert_close(leaf.grad, expected_grad)
    assert torch.all(leaf.grad[..., VOCAB:] == 0)


def test_low_precision_logits_give_fp32_loss_and_own_dtype_gradient():
    logits, labels, _ = _batch()
    leaf = logits.to(torch.bfloat16).requires_grad_()
    per_token = vocab_parallel_cross_entropy(leaf, labels, None, vocab_size=VOCAB)
    assert per_token.dtype == torch.float32
    expected, _ = _reference(leaf.detach().float(), labels, torch.ones(B, S))
    torch.testing.assert_close(per_token, expected)
    per_token.sum().backward()
    assert leaf.grad.dtype == torch.bfloat16


def test_masked_mean():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    torch.testing.assert_close(masked_mean(per_token, mask), torch.tensor(10.0 / 3))
    torch.testing.assert_close(masked_mean(per_token, torch.zeros_like(mask)), torch.tensor(0.0))


def _two_ranks(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=list(range(world_size)))
    logits, labels, loss_mask = _batch()
    expected_loss, expected_grad = _reference(logits, labels, loss_mask)
    shard = logits.chunk(2, dim=-1)[rank].clone().requires_grad_()  # [b, s, V_pad/2]
    per_token = vocab_parallel_cross_entropy(shard, labels, group, vocab_size=VOCAB)
    torch.testing.assert_close(per_token, expected_loss)
    masked_mean(per_token, loss_mask).backward()
    torch.testing.assert_close(shard.grad, expected_grad.chunk(2, dim=-1)[rank])


def test_two_ranks_match_reference():
    run_distributed(_two_ranks, 2)


def _linear_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(B * S, 8, generator=generator)  # [n, h]
    weight = torch.randn(PADDED, 8, generator=generator)  # [V_pad, h]
    _, labels, loss_mask = _batch()
    return hidden, weight, labels.reshape(-1), loss_mask.reshape(-1).float()


def _today(hidden, weight, labels, weights):
    """The loss as GLMLoss computed it before: the full logits, then the per-token cross entropy."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    per_token = vocab_parallel_cross_entropy(F.linear(hidden, weight), labels, None, vocab_size=VOCAB)
    loss = (per_token * weights).sum()
    loss.backward()
    return loss, hidden.grad, weight.grad


def test_linear_cross_entropy_in_chunks_equals_the_full_logits(monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 3 * PADDED)  # 3 rows a chunk: 4 chunks of 10 rows
    hidden, weight, labels, weights = _linear_batch()
    expected, expected_hidden, expected_weight = _today(hidden, weight, labels, weights)
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(hidden, weight, labels, weights, None, vocab_size=VOCAB)
    (2.0 * loss).backward()  # the incoming gradient scales what the forward computed
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, 2.0 * expected_hidden)
    torch.testing.assert_close(weight.grad, 2.0 * expected_weight)
    with torch.no_grad():  # evaluation: no gradients are made
        torch.testing.assert_close(vocab_parallel_linear_cross_entropy(hidden, weight, labels, weights, None,
                                                                       vocab_size=VOCAB), expected)


def _two_ranks_linear(rank: int, world_size: int) -> None:
    cross_entropy.CHUNK_ELEMENTS = 3 * PADDED // 2
    group = dist.new_group(ranks=list(range(world_size)))
    hidden, weight, labels, weights = _linear_batch()
    expected, expected_hidden, expected_weight = _today(hidden, weight, labels, weights)
    hidden = hidden.clone().requires_grad_()
    shard = weight.chunk(2, dim=0)[rank].clone().requires_grad_()  # [V_pad/2, h]
    loss = vocab_parallel_linear_cross_entropy(hidden, shard, labels, weights, group, vocab_size=VOCAB)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, expected_hidden)
    torch.testing.assert_close(shard.grad, expected_weight.chunk(2, dim=0)[rank])


def test_linear_cross_entropy_two_ranks_match_reference():
    run_distributed(_two_ranks_linear, 2)
