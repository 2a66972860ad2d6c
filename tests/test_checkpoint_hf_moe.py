"""The transformers glm4_moe bridge: a random tiny Glm4MoeForCausalLM (partial rotary 0.5 with rotate_half pairs,
QK-norm, QKV biases, norm gains and biases perturbed away from their init) with an MTP layer added to its
safetensors files (transformers drops model.layers.N.*), imported, gives transformers' logits (fp32, 1e-5), also
at tp=2 and ep=2; its MTP layer computes transformers' own decoder-layer math on eh_proj([enorm(emb(t+1)); hnorm(h_t)]);
exported back, Glm4MoeForCausalLM loads it with the same logits and the MTP tensors are byte-identical; the MoE
model imported at ep=2 (each rank holding half the experts) gives transformers' logits too."""
import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from tests.distributed import run_distributed
from trainer.checkpoint import hf
from trainer.checkpoint.model_source import build_model, read_weights
from trainer.model.mask import segments_of_sep
from trainer.model.mtp import MTPOutputs, mtp_batch
from trainer.parallel.topology import Topology

transformers = pytest.importorskip("transformers")
VOCAB, SEQ, LAYERS = 160, 12, 2
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
             tie_word_embeddings=False, attention_bias=True, partial_rotary_factor=0.5, use_qk_norm=True,
             n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
             routed_scaling_factor=2.5, pad_token_id=0)


def causal_inputs(input_ids: torch.Tensor):
    """The trainer's inputs for a causal sequence: positions 0..s-1, block positions 0, Part A of one token."""
    b, s = input_ids.shape
    positions = torch.arange(s).expand(b, s)
    return input_ids, positions, torch.zeros_like(positions), segments_of_sep(torch.ones(b, dtype=torch.long), s)


def _random_model(layers: int, dense_layers: int):
    config = transformers.Glm4MoeConfig(num_hidden_layers=layers, first_k_dense_replace=dense_layers,
                                        num_nextn_predict_layers=1, **SHAPE)
    config._attn_implementation = "sdpa"  # causal without a mask, for the MTP reference below
    torch.manual_seed(0)
    model = transformers.Glm4MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(torch.randn(module.e_score_correction_bias.shape) * 0.1)
    return model


def _save_with_mtp(model, directory):
    """save_pretrained a model of LAYERS + 1 layers as one of LAYERS main layers whose last layer, with random
    enorm / hnorm / eh_proj / shared_head.norm and the copies of the head and the embedding, is the MTP layer."""
    model.save_pretrained(directory)
    files = sorted(directory.glob("*.safetensors"))
    assert len(files) == 1
    tensors = load_file(str(files[0]))
    generator = torch.Generator().manual_seed(2)
    h, mtp = SHAPE["hidden_size"], f"model.layers.{LAYERS}."
    tensors.update({mtp + "enorm.weight": 1 + 0.3 * torch.randn(h, generator=generator),
                    mtp + "hnorm.weight": 1 + 0.3 * torch.randn(h, generator=generator),
                    mtp + "eh_proj.weight": 0.1 * torch.randn(h, 2 * h, generator=generator),
                    mtp + "shared_head.norm.weight": 1 + 0.3 * torch.randn(h, generator=generator),
                    mtp + "shared_head.head.weight": tensors["lm_head.weight"].clone(),
                    mtp + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone()})
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    meta = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**meta, "num_hidden_layers": LAYERS}))
    return tensors


@pytest.fixture(scope="module", params=["dense", "moe"])
def hf_model(request, tmp_path_factory):
    """(directory, the Glm4MoeForCausalLM of LAYERS layers transformers loads from it, the LAYERS + 1-layer model
    whose last layer is the MTP block, the files' tensors). dense: every layer (the MTP one too) dense; moe: the
    first layer dense, the rest (the MTP one too) MoE with a shared expert."""
    if request.param == "moe":
        pytest.importorskip("trainer.model.moe", reason="the MoE layer (branch moe) is not merged yet")
    full = _random_model(LAYERS + 1, LAYERS + 1 if request.param == "dense" else 1)
    directory = tmp_path_factory.mktemp("hf") / f"glm4-moe-{request.param}"
    tensors = _save_with_mtp(full, directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(model).__name__ == "Glm4MoeForCausalLM" and len(model.model.layers) == LAYERS
    return directory, model, full, tensors


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def test_imported_model_gives_transformers_logits(hf_model, input_ids):
    directory, model, _, _ = hf_model
    config, weights = read_weights(directory, None)
    # heads of 16 dims at width 32 / 4 heads (GLM-4.5's 96 x 128 at 5120): model.kv_channels takes head_dim
    assert (config.qk_norm, config.rotary_dim, config.rotary_pairing, config.mtp_layers) == (True, 8, "half", 1)
    assert config.kv_channels == config.head_dim == 16
    ours = build_model(config, weights)(*causal_inputs(input_ids))[..., :VOCAB]
    with torch.no_grad():
        assert_close(ours, model(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_imported_mtp_layer_computes_transformers_decoder_layer_math(hf_model, input_ids):
    """At t < s-1: logits = lm_head(shared_head.norm(layer_N(eh_proj([enorm(emb(x_{t+1})); hnorm(h_t)])))), h_t
    the main model's final (normed) hidden state, layer_N transformers' own decoder layer (causal, 0-based
    positions)."""
    directory, model, full, tensors = hf_model
    config, weights = read_weights(directory, None)
    ours = build_model(config, weights).train()  # the MTP layer runs in training mode (dropout is 0)
    with torch.no_grad():
        inputs = causal_inputs(input_ids)  # + the next-token ids, the MTP layer's fifth input
        next_ids = mtp_batch(input_ids, input_ids, torch.ones_like(input_ids), inputs[3][:, 0]).next_input_ids
        handover, weight = ours.head_inputs(inputs + (next_ids,))
        assert isinstance(handover, MTPOutputs)
        mtp_logits = (handover.mtp @ weight.T)[:, :-1, :VOCAB]

        def rms(x, gain):
            return gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + SHAPE["rms_norm_eps"])

        p = f"model.layers.{LAYERS}."
        h = model.model(input_ids).last_hidden_state[:, :-1]  # [b, s-1, h]
        embedded = model.model.embed_tokens(input_ids[:, 1:])
        x = torch.cat([rms(embedded, tensors[p + "enorm.weight"]), rms(h, tensors[p + "hnorm.weight"])], -1)
        x = x @ tensors[p + "eh_proj.weight"].T
        positions = torch.arange(SEQ - 1)[None]
        x = full.model.layers[LAYERS](x, position_embeddings=full.model.rotary_emb(x, positions),
                                      position_ids=positions)
        expected = model.lm_head(rms(x, tensors[p + "shared_head.norm.weight"]))
    assert_close(mtp_logits, expected, atol=1e-5, rtol=1e-5)


def _parallel_logits(rank, world_size, directory, input_ids, expected, tp, ep):
    topology = Topology.create(tp=tp, pp=1, ep=ep)
    config, weights = read_weights(directory, None)
    with torch.no_grad():
        shard = build_model(config, weights, topology.tp_group, ep_group=topology.ep_group)(*causal_inputs(input_ids))
    if tp > 1:  # [b, s, V_pad / tp] -> [b, s, V_pad]
        shards = [torch.empty_like(shard) for _ in range(tp)]
        dist.all_gather(shards, shard.contiguous(), group=topology.tp_group)
        shard = torch.cat(shards, dim=-1)
    assert_close(shard[..., :VOCAB], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp, ep", [(2, 1), (1, 2)], ids=["tp2", "ep2"])
def test_imported_model_at_tp2_and_ep2_gives_transformers_logits(hf_model, input_ids, tp, ep):
    directory, model, _, _ = hf_model
    if ep > 1 and not read_weights(directory, None)[0].moe_num_experts:
        pytest.skip("a dense model has no experts to split")
    with torch.no_grad():
        expected = model(input_ids).logits
    run_distributed(_parallel_logits, 2, directory, input_ids, expected, tp, ep)


def test_exported_model_loads_with_the_same_logits_and_the_mtp_tensors_unchanged(hf_model, input_ids, tmp_path):
    directory, model, _, tensors = hf_model
    config, weights = read_weights(directory, None)
    hf.write_hf(weights, config, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / hf.CONFIG).read_text())
    assert (meta["model_type"], meta["num_nextn_predict_layers"]) == ("glm4_moe", 1)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "Glm4MoeForCausalLM"
    with torch.no_grad():
        assert_close(reloaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)
    written = load_file(str(tmp_path / "out" / hf.WEIGHTS))
    mtp = {name: value for name, value in tensors.items() if name.startswith(f"model.layers.{LAYERS}.")}
    assert mtp and {name: written[name] for name in mtp}.keys() == mtp.keys()
    assert all(written[name].dtype == value.dtype and torch.equal(written[name], value) for name, value in mtp.items())
    again_config, again = read_weights(tmp_path / "out", None)
    assert again_config == config and all(torch.equal(again[name], value) for name, value in weights.items())


def test_a_save_pretrained_copy_without_the_mtp_tensors_imports_without_the_mtp_layer(hf_model, tmp_path):
    """transformers drops the MTP layer on load, so its save_pretrained has none: the import says mtp_layers 0."""
    _, model, _, _ = hf_model
    model.save_pretrained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / hf.CONFIG).read_text())["num_nextn_predict_layers"] == 1
    config, weights = read_weights(tmp_path / "copy", None)
    assert config.mtp_layers == 0 and not any(name.startswith("mtp.") for name in weights)
