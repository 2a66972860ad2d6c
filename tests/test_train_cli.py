"""glm-train run directly, as the README's first command does (shortened): it trains, says where its
outputs went, the held-out perplexity beside a unigram baseline's, and blanks of held-out samples filled by
the model; --print-model prints the closed-form count."""
import re
import signal
import subprocess
import sys

from tests.glm_processes import REPO, _env, metrics, run_train, train_args, wait_for_step


def test_single_process_main_job(tmp_path):
    result = run_train(train_args(tmp_path / "run", 3))  # the main job's config: a validation split, no eval_interval
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"metrics:      {tmp_path / 'run' / 'metrics.jsonl'}" in result.stdout
    assert f"tensorboard --logdir {tmp_path / 'run' / 'tb'}" in result.stdout
    assert f"checkpoint:   {tmp_path / 'run' / 'checkpoints' / 'global_step3'}" in result.stdout
    assert "blank-infilling demo (held-out sample" in result.stdout and "[MASK]" in result.stdout
    assert "held-out perplexity (" in result.stdout and "unigram baseline" in result.stdout
    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    # one held-out perplexity, logged: the demo's, from the checkpoint read back, is the run's last valid_ppl
    assert [r["step"] for r in records if "valid_ppl" in r] == [3]  # a validation split is scored at the end
    shown = float(re.search(r"held-out perplexity \(.*\): model ([0-9.]+),", result.stdout).group(1))
    assert abs(shown - records[-1]["valid_ppl"]) <= 0.05 + 1e-4 * shown, (shown, records[-1]["valid_ppl"])
    assert "step 3/3 loss" in result.stdout and "\r" not in result.stderr  # not a terminal: lines, not a bar


def test_print_model_resolves_the_tokenizer_vocabulary(tmp_path):
    result = run_train(["--config", "configs/glm-debug.yaml", "--print-model"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vocab 4096 padded to 4096" in result.stdout  # taken from the embedded tokenizer
    assert "counted == closed form" in result.stdout


def test_sigint_says_where_it_stopped_and_a_resume_says_where_it_resumed(tmp_path):
    """Ctrl-C: the step's checkpoint is saved, the last line says how to resume, and no end-of-run demo runs;
    the resume's first line names the step it continues from."""
    run_dir = tmp_path / "run"
    args = train_args(run_dir, 400)
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 2, [proc])
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = metrics(run_dir)[-1]["step"]
    assert f"interrupted at step {stopped}: checkpoint {run_dir / 'checkpoints' / f'global_step{stopped}'}" in out
    assert "resume with: glm-train --config" in out and "--set train.resume=true" in out
    assert "blank-infilling demo" not in out and "held-out perplexity" not in out
    resumed = run_train(train_args(run_dir, stopped + 1, "train.resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped} of {stopped + 1}" in resumed.stdout
