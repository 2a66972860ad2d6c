import pytest

from trainer.config import Config, load_config, parse_override
from trainer.errors import ConfigError


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 5, seed: 1}\nmodel: {num_layers: 3}\n")
    config = load_config(path, ["train.steps=7", "optim.lr=0.5", "data.modes={mask: 1, gmask: 1}"])
    assert (config.train.steps, config.train.seed, config.model.num_layers) == (7, 1, 3)
    assert config.optim.lr == 0.5 and config.data.modes == {"mask": 1, "gmask": 1}


def test_int_accepted_for_float_and_optional():
    config = load_config(None, ["optim.lr=1", "model.ffn_hidden_size=96", "model.ffn_hidden_size=null"])
    assert isinstance(config.optim.lr, float) and config.model.ffn_hidden_size is None
    assert load_config(None, ["optim.lr=5e-3"]).optim.lr == 5e-3  # YAML 1.1 would keep "5e-3" a string
    with pytest.raises(ConfigError, match="optim.lr expects float"):
        load_config(None, ["optim.lr=fast"])


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "did you mean train.steps"),
    ("trian.steps=3", "did you mean train"),
    ("train.steps=three", "train.steps expects int"),
    ("train.resume=1", "train.resume expects bool"),
    ("model=3", "model is a section"),
    ("train.steps", "section.key=value"),
])
def test_bad_keys_and_types(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML: .* at line 2, column 1") as raised:
        load_config(bad)
    assert "\n" not in str(raised.value)  # one line, as every error of the commands
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  hidden_size: 64\n  num_layers: 2\n  hidden_size: 128\n")
    with pytest.raises(ConfigError, match="key 'hidden_size' is given twice \\(line 4\\)"):
        load_config(twice)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=3"], 3, "num_attention_heads=4 is not divisible by parallel.tp=3"),
    (["parallel.pp=8", "model.num_layers=4"], 8, "greater than model.num_layers"),
    (["parallel.tp=2"], 3, "tp\\*pp\\*dp != world size"),
    (["parallel.global_batch_size=6", "parallel.micro_batch_size=4"], 1, "micro-batch \\* grad-accumulation \\* dp"),
    (["model.hidden_size=66"], 1, "not divisible by model.num_attention_heads"),
    (["data.seq_length=1024"], 1, "exceeds model.max_sequence_length"),
    (["train.precision=fp8"], 1, "train.precision"),
])
def test_bad_layouts(overrides, world, message):
    config = load_config("configs/glm-debug.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        config.validate(world)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.lr=.inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.beta1=1.5", "optim.beta1 must be a finite number in \\[0, 1\\)"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be a finite number in \\[0, 1\\]"),
    ("optim.grad_clip=-1", "optim.grad_clip must be a finite number >= 0"),
    ("model.ffn_hidden_size=-4", "model.ffn_hidden_size must be > 0"),
    ("model.layernorm_epsilon=-1e-5", "model.layernorm_epsilon must be a finite number > 0"),
])
def test_values_that_would_train_to_nonsense_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/glm-debug.yaml", [override]).validate()


def test_grad_accum_arithmetic():
    config = load_config("configs/glm-debug.yaml", ["parallel.micro_batch_size=2", "parallel.global_batch_size=8"])
    assert config.grad_accum_steps(1) == 4 and config.grad_accum_steps(2) == 2 and config.data_parallel_size(2) == 2


def test_parse_override_nests():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert isinstance(Config().to_dict()["model"], dict)


def test_config_doc_is_current_and_complete():
    from pathlib import Path

    from trainer.config_doc import markdown

    assert Path("docs/CONFIG.md").read_text() == markdown(), "run: python -m trainer.config_doc > docs/CONFIG.md"
    assert "|  |" not in markdown(), "every config field needs a docstring"


def test_a_renamed_key_is_refused_with_its_new_name():
    with pytest.raises(ConfigError, match="parallel.activation_checkpoint_interval is now called parallel.recompute_interval"):
        load_config("configs/glm-debug.yaml", ["parallel.activation_checkpoint_interval=1"])
