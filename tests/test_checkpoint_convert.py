"""glm-ckpt convert: DeepSpeed pipeline checkpoints written by the real engine at tp=2 and at pp=2,
converted to tp=1 x pp=1 (and back to tp=2), give the logits the source layout computed (fp32, 1e-5)."""
from pathlib import Path

import torch
import torch.distributed as dist

from tests.checkpoint_helpers import OVERRIDES, VOCAB, build_engine, glm_inputs, perturb_, tiny_config
from tests.distributed import run_distributed
from trainer.tools.ckpt import main as glm_ckpt
from trainer.checkpoint.layout import merge_states, shard_state
from trainer.checkpoint.model_source import build_model, read_weights
from trainer.checkpoint.pipeline_files import (canonical_name, layer_file, layers_with_files, read_layout,
                                               read_model_weights, write_layer_files)
from trainer.model.config import ModelConfig

TAG = "global_step0"


def _save_and_reference(rank, world_size, tp, pp, checkpoint_dir, reference_path):
    """Build the engine at (tp, pp), perturb it, save a checkpoint, and compute the source layout's logits
    with a GLMModel at the same tp holding exactly the engine's tensors (gathered over the stages)."""
    from trainer.model import GLMModel
    from trainer.parallel.mappings import gather_from_tp

    config = tiny_config(f"parallel.tp={tp}", f"parallel.pp={pp}")
    engine, topology = build_engine(config, world_size)
    named = [(canonical_name(n, config.model), p) for n, p in engine.module.named_parameters()]
    perturb_(named, config.model, topology.tp_rank)
    engine.save_checkpoint(str(checkpoint_dir), tag=TAG, client_state={"step": 0, "consumed_samples": 0})
    stages: list = [None] * world_size
    dist.all_gather_object(stages, (topology.tp_rank, {n: p.detach().clone() for n, p in named}))
    local = {name: value for tp_rank, state in stages if tp_rank == topology.tp_rank for name, value in state.items()}
    model = GLMModel(config.model, topology.tp_group).eval()
    model.load_state_dict(local)
    with torch.no_grad():
        logits = gather_from_tp(model(*glm_inputs()), topology.tp_group)
    if rank == 0:
        torch.save(logits[..., :VOCAB], reference_path)


def _source(tmp_path: Path, tp: int, pp: int) -> tuple[Path, torch.Tensor]:
    reference = tmp_path / "reference.pt"
    run_distributed(_save_and_reference, tp * pp, tp, pp, tmp_path / "src", reference)
    return tmp_path / "src" / TAG, torch.load(reference)


def _logits(path: Path, config=None) -> torch.Tensor:
    config, weights = read_weights(path, config)
    with torch.no_grad():
        return build_model(config, weights)(*glm_inputs())[..., :VOCAB]


def test_engine_writes_the_files_the_converter_reads(tmp_path):
    source, _ = _source(tmp_path, tp=2, pp=1)
    names = sorted(p.name for p in source.glob("layer_*"))
    assert names == [f"layer_{layer:02d}-model_{rank:02d}-model_states.pt" for layer in range(4) for rank in range(2)]
    assert (read_layout(source).tp, read_layout(source).pp) == (2, 1)
    config = tiny_config().model
    weights = read_model_weights(source, config)
    # The engine's own tp=2 shards equal the split rules applied to the merged (canonical) weights.
    merged = [shard_state(weights, config, 2, rank) for rank in range(2)]
    for rank in range(2):
        state = torch.load(source / f"layer_01-model_{rank:02d}-model_states.pt")
        torch.testing.assert_close(state["attention.query_key_value.weight"],
                                   merged[rank]["transformer.layers.0.attention.query_key_value.weight"], rtol=0, atol=0)
        torch.testing.assert_close(state["mlp.dense_h_to_4h.weight"],
                                   merged[rank]["transformer.layers.0.mlp.dense_h_to_4h.weight"], rtol=0, atol=0)


def test_tp2_to_tp1_gives_the_same_logits(tmp_path):
    source, reference = _source(tmp_path, tp=2, pp=1)
    out = tmp_path / "tp1"
    args = ["convert", str(source), "--to-tp", "1", "--to-pp", "1", "--out", str(out), "--config", "configs/glm-debug.yaml"]
    args += [x for item in OVERRIDES for x in ("--set", item)]
    assert glm_ckpt(args) == 0
    assert (read_layout(out / TAG).tp, read_layout(out / TAG).pp) == (1, 1)
    assert len(list((out / TAG).glob("layer_*"))) == 4
    torch.testing.assert_close(_logits(out, tiny_config().model), reference, rtol=1e-5, atol=1e-5)


def test_pp2_to_pp1_gives_the_same_logits(tmp_path):
    source, reference = _source(tmp_path, tp=1, pp=2)
    out = tmp_path / "pp1"
    from trainer.checkpoint.convert import convert_checkpoint

    convert_checkpoint(source, tiny_config().model, 1, 1, out)
    torch.testing.assert_close(_logits(out / TAG, tiny_config().model), reference, rtol=1e-5, atol=1e-5)
    # And to tp=2 x pp=2: its shards merge back to the same model.
    convert_checkpoint(out / TAG, tiny_config().model, 2, 2, tmp_path / "tp2pp2")
    assert sorted(p.name for p in (tmp_path / "tp2pp2" / TAG).glob("mp_rank_*")) == [f"mp_rank_0{i}_model_states.pt"
                                                                                      for i in range(4)]
    torch.testing.assert_close(_logits(tmp_path / "tp2pp2", tiny_config().model), reference, rtol=1e-5, atol=1e-5)


def test_grouped_query_swiglu_untied_weights_shard_by_their_rules_and_merge_back(tmp_path):
    """q, k, v of unequal sizes and the SwiGLU halves rank-major, the untied output layer vocabulary-parallel
    with its own layer file (N + 2)."""
    from trainer.model import GLMModel

    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                         position_embedding="rope_1d", normalization="rmsnorm", mlp="swiglu", ffn_hidden_size=48,
                         add_bias_linear=False, tie_word_embeddings=False)
    canonical = merge_states([GLMModel(config, seed=1).state_dict()], config)
    shards = [shard_state(canonical, config, 2, rank) for rank in range(2)]
    qkv = canonical["transformer.layers.0.attention.query_key_value.weight"]  # [q 32; k 16; v 16] rows
    q, k, v = qkv.split([32, 16, 16])
    for rank, shard in enumerate(shards):
        torch.testing.assert_close(shard["transformer.layers.0.attention.query_key_value.weight"],
                                   torch.cat([q.chunk(2)[rank], k.chunk(2)[rank], v.chunk(2)[rank]]), rtol=0, atol=0)
        assert shard["output_layer.weight"].shape == (128, 32)  # V_pad = 256 rows over 2 ranks
    merged = merge_states(shards, config)
    assert merged.keys() == canonical.keys()
    assert all(torch.equal(merged[name], value) for name, value in canonical.items())
    write_layer_files(canonical, config, 2, tmp_path)
    assert list(layers_with_files(config)) == [0, 1, 2, 3, 4] and layer_file(tmp_path, 4, 1).is_file()
    assert set(torch.load(layer_file(tmp_path, 4, 0), weights_only=True)) == {"weight"}


def test_replicated_key_value_heads_keep_the_canonical_layout_at_every_tp():
    """Multi-query attention at tp = 2 and 2 key/value heads at tp = 4 replicate the KV heads, yet every rank
    stores the r-th of tp row blocks of q, k and v as at any tp: canonical -> tp 4 -> canonical -> tp 2 ->
    canonical is the identity, and the model built at each tp holds exactly those shards."""
    from trainer.model import GLMModel

    name = "transformer.layers.0.attention.query_key_value.weight"
    for kv_heads in (1, 2):
        config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=kv_heads,
                             vocab_size=100, position_embedding="rope_1d", normalization="rmsnorm", mlp="swiglu",
                             add_bias_linear=False, tie_word_embeddings=False)
        canonical = merge_states([GLMModel(config, seed=1).state_dict()], config)
        q, k, v = canonical[name].split(config.qkv_rows)  # [32, 32], [8 g, 32] twice
        for tp in (4, 2):
            config.validate(tp)
            assert config.replicates_kv_heads(tp) == (kv_heads < tp)
            shards = [shard_state(canonical, config, tp, rank) for rank in range(tp)]
            for rank, shard in enumerate(shards):
                expected = torch.cat([q.chunk(tp)[rank], k.chunk(tp)[rank], v.chunk(tp)[rank]])
                assert torch.equal(shard[name], expected)
            merged = merge_states(shards, config)
            assert merged.keys() == canonical.keys()
            assert all(torch.equal(merged[key], value) for key, value in canonical.items())
            canonical = merged


def _built_shards_equal_the_layout(rank, world_size):
    from trainer.model import GLMModel
    from trainer.parallel.topology import Topology

    config = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=1, vocab_size=100,
                         position_embedding="rope_1d", normalization="rmsnorm", mlp="swiglu", tie_word_embeddings=False)
    canonical = merge_states([GLMModel(config, seed=1).state_dict()], config)
    built = GLMModel(config, Topology.create(tp=2, pp=1).tp_group, seed=1).state_dict()
    expected = shard_state(canonical, config, 2, rank)
    assert built.keys() == expected.keys()
    assert all(torch.equal(built[key], value) for key, value in expected.items())


def test_a_model_replicating_its_key_value_head_at_tp2_starts_from_the_tp1_weights():
    run_distributed(_built_shards_equal_the_layout, 2)


def test_bad_input_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert glm_ckpt(["convert", str(tmp_path / "empty"), "--to-tp", "1", "--to-pp", "1", "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "neither an export" in err[0]
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):  # checked before the source is read
        assert glm_ckpt(["export", str(tmp_path), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out {out} cannot be written") and "is a file" in err[0]
