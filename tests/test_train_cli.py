"""glm-train run directly, as the README's first command does (shortened): it trains, says where its
outputs went, the held-out perplexity beside a unigram baseline's, and blanks of held-out samples filled by
the model; --print-model prints the closed-form count."""
from tests.glm_processes import metrics, run_train, train_args


def test_single_process_main_job(tmp_path):
    result = run_train(train_args(tmp_path / "run", 3))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"metrics:      {tmp_path / 'run' / 'metrics.jsonl'}" in result.stdout
    assert f"tensorboard --logdir {tmp_path / 'run' / 'tb'}" in result.stdout
    assert f"checkpoint:   {tmp_path / 'run' / 'checkpoints' / 'global_step3'}" in result.stdout
    assert "blank-infilling demo (held-out sample" in result.stdout and "[MASK]" in result.stdout
    assert "held-out perplexity (" in result.stdout and "unigram baseline" in result.stdout
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]


def test_print_model_resolves_the_tokenizer_vocabulary(tmp_path):
    result = run_train(["--config", "configs/glm-debug.yaml", "--print-model"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vocab 4096 padded to 4096" in result.stdout  # taken from the embedded tokenizer
    assert "counted == closed form" in result.stdout
