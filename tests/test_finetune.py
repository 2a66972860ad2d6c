"""Fine-tuning: a run started from another run's checkpoint begins at exactly that model's loss, learns a tiny
instruction set (response loss recomputed from the saved weights), answers its prompts under greedy
generation, and keeps frozen weights bit-identical under ZeRO-1 and without ZeRO."""
import json

import pytest
import torch

from tests.glm_processes import zero_stage_overrides
from trainer.checkpoint.model_source import build_model, read_weights
from trainer.config import load_config
from trainer.tools.preflight import preflight
from trainer.data.dataset import collate
from trainer.data.packing import build_sequences
from trainer.data.prep import main as prep_main
from trainer.data.tokenizer import load_tokenizer
from trainer.engine.finetune import is_frozen
from trainer.engine.loop import pipeline_format
from trainer.tools.decoding import fill_blanks
from trainer.model import GLMLoss

RECORDS = [("What is the capital of France?", " Paris."), ("Name a primary colour.", " Blue."),
           ("What is two plus two?", " Four."), ("Who wrote Hamlet?", " William Shakespeare.")]
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.max_sequence_length=32",
        "data.seq_length=32", "parallel.micro_batch_size=4", "parallel.global_batch_size=4", "optim.warmup_steps=0",
        "optim.weight_decay=0.1", "train.save_interval=0", "data.valid_fraction=0"]  # every record is trained
FINETUNE_STEPS = 150


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    """The instruction set (glm-prep --instructions) and the same text as a plain corpus, one tokenizer."""
    root = tmp_path_factory.mktemp("sft")
    records, text = root / "sft.jsonl", root / "text.jsonl"
    records.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in RECORDS))
    text.write_text("".join(json.dumps({"text": p + r}) + "\n" for p, r in RECORDS) * 4)
    assert prep_main(["--input", str(records), "--output-prefix", str(root / "sft"), "--vocab-size", "320",
                      "--instructions"]) == 0
    assert prep_main(["--input", str(text), "--output-prefix", str(root / "text"),
                      "--tokenizer", str(root / "sft.tokenizer.json")]) == 0
    return str(root / "sft"), str(root / "text")


def _config(*overrides):
    """The resolved config, as glm-train's preflight hands it to the trainer."""
    return preflight(load_config("configs/glm-debug.yaml", TINY + list(overrides)), 1)


def _train(config):
    from trainer.engine.loop import train

    torch.set_num_threads(1)
    return train(config)


@pytest.fixture(scope="module")
def pretrained(prefixes, tmp_path_factory):
    """A short pretraining run (blank infilling on the text): the checkpoint fine-tuning starts from."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    _train(_config(f"data.path={prefixes[1]}", "train.steps=3", f"train.run_dir={run_dir}"))
    return run_dir / "checkpoints"


def _response_loss(config, weights, dataset) -> float:
    """GLMLoss of a GLMModel holding `weights` on the first global batch of the instruction set."""
    model = build_model(config.model, weights)
    inputs, targets = pipeline_format(collate([dataset[i] for i in range(config.parallel.global_batch_size)]))
    with torch.no_grad():
        return float(GLMLoss(config.model)(model(*inputs), targets))


def test_finetuning_learns_the_responses_and_generation_answers(prefixes, pretrained, tmp_path):
    config = _config(f"data.path={prefixes[0]}", f"train.steps={FINETUNE_STEPS}", "optim.lr=0.01",
                     f"finetune.init_from={pretrained}", f"train.run_dir={tmp_path / 'sft'}")
    result = _train(config)
    dataset = build_sequences(config.data, config.train.seed)
    _, source = read_weights(pretrained, config.model)
    before = _response_loss(config, source, dataset)
    # Step 1 trains the first global batch from the checkpoint's weights: its loss is that model's loss.
    torch.testing.assert_close(result.losses[0], before, rtol=1e-5, atol=0)
    assert result.engine.global_steps == FINETUNE_STEPS  # the step count started from 0, not from the source's 3
    _, tuned = read_weights(result.checkpoint_dir, config.model)
    after = _response_loss(config, tuned, dataset)
    assert before > 3.0 and after < 0.05 * before, (before, after)
    model, tokenizer = build_model(config.model, tuned), load_tokenizer(f"{prefixes[0]}.tokenizer.json")
    for prompt, response in RECORDS:
        text, spans = fill_blanks(model, tokenizer, prompt, config.model.max_sequence_length,
                                  config.model.vocab_size, max_new_tokens=12)
        assert tokenizer.decode(spans[0]) == response
        assert text == prompt + response


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_frozen_weights_stay_bit_identical(prefixes, pretrained, tmp_path, zero_stage):
    config = _config(f"data.path={prefixes[0]}", "train.steps=3", "optim.lr=0.01", *zero_stage_overrides(zero_stage, tmp_path),
                     f"finetune.init_from={pretrained}", "finetune.freeze_embeddings=true", "finetune.freeze_blocks=1",
                     f"train.run_dir={tmp_path / 'frozen'}")
    result = _train(config)
    _, source = read_weights(pretrained, config.model)
    _, tuned = read_weights(result.checkpoint_dir, config.model)
    frozen = {name for name in source if is_frozen(name, config.finetune)}
    assert any(n.startswith("embedding.") for n in frozen) and any(n.startswith("transformer.layers.0.") for n in frozen)
    assert not any(n.startswith("transformer.layers.1.") for n in frozen)
    for name in source:
        if name in frozen:
            assert torch.equal(tuned[name], source[name]), name
        else:
            assert not torch.equal(tuned[name], source[name]), name


def test_an_export_starts_from_the_same_weights_and_a_mismatch_is_refused(prefixes, pretrained, tmp_path):
    from trainer.checkpoint.export import write_export
    from trainer.errors import CheckpointError

    base = _config(f"data.path={prefixes[0]}", "train.steps=1", f"train.run_dir={tmp_path / 'unused'}")
    source_config, source = read_weights(pretrained, base.model)
    source_config.vocab_size = load_tokenizer(f"{prefixes[0]}.tokenizer.json").vocab_size
    write_export(source, source_config, tmp_path / "export")
    result = _train(_config(f"data.path={prefixes[0]}", "train.steps=1", f"finetune.init_from={tmp_path / 'export'}",
                            f"train.run_dir={tmp_path / 'from_export'}"))
    dataset = build_sequences(base.data, base.train.seed)
    base.model.vocab_size = source_config.vocab_size
    torch.testing.assert_close(result.losses[0], _response_loss(base, source, dataset), rtol=1e-5, atol=0)
    with pytest.raises(CheckpointError, match="hidden_size: source 32, run 64"):
        _train(_config(f"data.path={prefixes[0]}", "train.steps=1", "model.hidden_size=64",
                       f"finetune.init_from={tmp_path / 'export'}", f"train.run_dir={tmp_path / 'mismatch'}"))


SHIPPED = "examples/sft.jsonl"


def test_the_shipped_example_learns_its_records(tmp_path):
    """configs/glm-debug-sft.yaml as it ships, on examples/sft.jsonl, from a short debug pretraining run: the logged
    loss falls clearly, the responses' loss falls below a fifth, and greedy generation gives the answers."""
    from trainer.data.corpus import embedded_corpus

    assert prep_main(["--input", SHIPPED, "--output-prefix", str(tmp_path / "sft"), "--instructions",
                      "--tokenizer", f"{embedded_corpus()}.tokenizer.json"]) == 0
    source = tmp_path / "source"
    _train(preflight(load_config("configs/glm-debug.yaml", ["train.steps=20", f"train.run_dir={source}"]), 1))
    mix = f"data.datasets=[{{path: {tmp_path / 'sft'}, weight: 0.9}}, {{path: '', weight: 0.1}}]"
    config = preflight(load_config("configs/glm-debug-sft.yaml", [
        mix, f"finetune.init_from={source / 'checkpoints'}", f"train.run_dir={tmp_path / 'run'}"]), 1)
    result = _train(config)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-10:]) / 10
    assert last < 0.5 * first, result.losses
    records = load_config("configs/glm-debug-sft.yaml", [f"data.datasets=[{{path: {tmp_path / 'sft'}, weight: 1}}]",
                                                         f"model.vocab_size={config.model.vocab_size}"])
    dataset = build_sequences(records.data, config.train.seed)
    _, before_weights = read_weights(source / "checkpoints", config.model)
    _, tuned = read_weights(result.checkpoint_dir, config.model)
    before, after = _response_loss(config, before_weights, dataset), _response_loss(config, tuned, dataset)
    assert after < 0.2 * before, (before, after)
    model, tokenizer = build_model(config.model, tuned), load_tokenizer(f"{tmp_path / 'sft'}.tokenizer.json")
    answers = []
    for line in open(SHIPPED):
        record = json.loads(line)
        _, spans = fill_blanks(model, tokenizer, record["prompt"], config.model.max_sequence_length,
                               config.model.vocab_size, max_new_tokens=4)
        answers.append((tokenizer.decode(spans[0]), record["response"]))
    assert sum(given == wanted for given, wanted in answers) >= 12, answers
