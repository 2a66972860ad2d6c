"""trainer/tools/harness (the lm-evaluation-harness backend): on a glm-4-debug model trained a few steps and exported
with --format hf, the backend's per-request log-likelihoods on the shipped local tasks equal lm-eval's own `hf`
backend on the export (1e-4), also at tp=2, and would not without GLM-4's [gMASK] <sop> prefix; on a GLM
blank-infilling model the cloze (Part B) scores equal the model run directly on samples built by hand from
GLM-SPEC section 1, batched or not; the rolling log-likelihood is lm-eval's windows scored as continuations;
train.eval_tasks evaluations land in metrics.jsonl and TensorBoard at the configured steps, a resume neither
repeats nor skips one, and the last equals glm-eval's on the final checkpoint; the config refuses them where the
live model is not whole (pp > 1, ZeRO-3); glm-eval --harness writes lm-eval's results JSON, and refuses an
unknown task, a malformed YAML, a task lm-eval cannot build and a checkpoint without a tokenizer in one
`error:` line, writing nothing."""
import json

import pytest
import torch
from lm_eval.api.instance import Instance

from tests.distributed import run_distributed
from tests.glm_processes import REPO, run_train, start_ranks, tiny_overrides, wait_all
from tests.test_generate import TEXTS, _setup
from trainer.tools import ckpt as ckpt_cli
from trainer.checkpoint.export import write_export
from trainer.data.tokenizer import load_tokenizer
from trainer.tools.evaluate import main
from trainer.tools.harness.backend import GLMHarnessLM, default_layout
from trainer.tools.harness.run import evaluate_tasks, flat_metrics, prepare_tasks
from trainer.model.mask import segments_of_sep

TASKS, LIMIT = ["glm_lastword", "glm_cloze"], 6
IN_LOOP = ["train.eval_interval=2", "data.valid_fraction=0.05", "train.eval_batches=1",
           "train.eval_tasks=[glm_lastword,glm_cloze]", "train.eval_tasks_limit=4"]


@pytest.fixture(scope="module")
def glm4_run(tmp_path_factory):
    """A tiny glm-4-debug run: 3 steps with train.eval_tasks every 2 steps, then resumed to 6."""
    run_dir = tmp_path_factory.mktemp("glm4") / "run"
    config = ["--config", str(REPO / "configs" / "glm-4-debug.yaml")]
    for steps, extra in ((3, []), (6, ["train.resume=true"])):
        done = run_train(config + tiny_overrides(run_dir, steps, *IN_LOOP, *extra))
        assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def hf_export(glm4_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "glm4"
    assert ckpt_cli.main(["export", str(glm4_run), "--out", str(out), "--format", "hf"]) == 0
    return out


def requests(names=TASKS, limit=LIMIT) -> list[Instance]:
    """The loglikelihood requests lm-eval builds for the first `limit` documents of each task."""
    instances = []
    for task in prepare_tasks(names).load(names)["tasks"].values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        instances += task.instances
    return instances


def hf_loglikelihoods(export, glm4_prefix: bool = True) -> list[tuple[float, bool]]:
    """lm-eval's own hf backend on the export, its tokenizer loaded by transformers from the export's files: it
    prepends GLM-4's [gMASK] <sop> (as GLM-4's own tokenizer does with add_special_tokens), the layout the model
    was trained on; glm4_prefix False: that prefix taken off again."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export))
    ours = load_tokenizer(export / "tokenizer.json")
    assert tokenizer("a b").input_ids[:2] == [ours.gmask_id, ours.sop_id]  # as exported
    if not glm4_prefix:
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A", special_tokens=[])
    hf = HFLM(pretrained=str(export), tokenizer=tokenizer, device="cpu", dtype="float32", batch_size=4,
              add_bos_token=True)
    return hf.loglikelihood(requests())


def assert_same_scores(ours, theirs):
    assert len(ours) == len(theirs) > 2 * LIMIT
    torch.testing.assert_close(torch.tensor([s for s, _ in ours], dtype=torch.float64),
                               torch.tensor([s for s, _ in theirs], dtype=torch.float64), atol=1e-4, rtol=0)
    assert [g for _, g in ours] == [g for _, g in theirs]


def test_causal_loglikelihoods_equal_lm_evals_hf_backend_on_the_export(glm4_run, hf_export):
    lm = GLMHarnessLM.from_source(glm4_run)
    assert lm.layout == "causal"
    ours = lm.loglikelihood(requests())
    assert_same_scores(ours, hf_loglikelihoods(hf_export))
    # the comparison tells layouts apart: without the [gMASK] <sop> prefix the scores move by far more than 1e-4
    plain = hf_loglikelihoods(hf_export, glm4_prefix=False)
    assert max(abs(a - b) for (a, _), (b, _) in zip(ours, plain)) > 1e-3


def _tp2_loglikelihoods(rank, world_size, run_dir, out):
    import torch.distributed as dist

    lm = GLMHarnessLM.from_source(run_dir)
    assert lm.tp_group is not None
    scores = lm.loglikelihood(requests())
    gathered = [None, None]
    dist.all_gather_object(gathered, scores)
    assert gathered[0] == gathered[1]  # every tensor rank returns the same numbers
    if rank == 0:
        torch.save(scores, out)


def test_causal_loglikelihoods_at_tp2_equal_lm_evals_hf_backend(glm4_run, hf_export, tmp_path):
    run_distributed(_tp2_loglikelihoods, 2, glm4_run, tmp_path / "tp2.pt")
    assert_same_scores(torch.load(tmp_path / "tp2.pt"), hf_loglikelihoods(hf_export))


def test_in_loop_evaluations_at_the_configured_steps_and_a_resume_neither_repeats_nor_skips_one(glm4_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (glm4_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # every 2 steps, the end of the first run (3) and of the resumed one (6), each once, beside the valid loss
    evaluated = [r["step"] for r in records if "harness/glm_cloze/acc" in r]
    assert evaluated == [2, 3, 4, 6]
    assert [r["step"] for r in records if "valid_loss" in r] == evaluated
    assert all("harness/glm_lastword/perplexity" in r for r in records if r["step"] in evaluated)
    events = EventAccumulator(str(glm4_run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/harness/glm_lastword/acc")] == evaluated
    # the last in-loop evaluation is the offline one on the final checkpoint
    offline = flat_metrics(evaluate_tasks(GLMHarnessLM.from_source(glm4_run), TASKS, prepare_tasks(TASKS), 4))
    assert {f"harness/{key}": pytest.approx(value, rel=1e-6) for key, value in offline.items()} == \
           {key: value for key, value in records[-1].items() if key.startswith("harness/")}


def test_in_loop_evaluations_at_tp2_equal_those_at_tp1(glm4_run, tmp_path):
    config = ["--config", str(REPO / "configs" / "glm-4-debug.yaml")]
    ranks = start_ranks(config + tiny_overrides(tmp_path / "tp2", 3, *IN_LOOP, "parallel.tp=2"), 2, tmp_path)
    assert wait_all(ranks) == [0, 0], (tmp_path / "rank1.log").read_text()[-3000:]
    tp1, tp2 = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:3]
                for run in (glm4_run, tmp_path / "tp2"))  # steps 2 and 3 (the end of glm4_run's first part)
    for one, two in zip(tp1, tp2):
        harness = {key: value for key, value in one.items() if key.startswith("harness/")}
        assert len(harness) == 4 and {key: two[key] for key in harness} == pytest.approx(harness, rel=1e-5)


@pytest.mark.parametrize("change, words", [
    (["parallel.pp=2"], "at parallel.pp = 1"), (["optim.zero_stage=3"], "optim.zero_stage <= 2"),
    (["train.eval_interval=0"], "set train.eval_interval"), (["train.eval_tasks_limit=-1"], "eval_tasks_limit be >= 0")])
def test_in_loop_tasks_refuse_a_layout_they_cannot_run_on(change, words):
    from trainer.config import load_config
    from trainer.errors import ConfigError

    config = load_config(str(REPO / "configs" / "glm-4-debug.yaml"), IN_LOOP + change)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        config.validate()


def _blank_model():
    tokenizer, config, model, weights = _setup("glm")
    assert default_layout(config) == "blank"
    return tokenizer, config, model, weights


def _part_b_by_hand(model, tokenizer, vocab_size, context, continuation, mask_id):
    """GLM-SPEC section 1: Part A = [CLS] context [MASK] at positions 0..sep-1, block position 0; Part B =
    <sop> continuation[:-1], every token at the mask's position, block positions 1..m; Part A attends to Part A
    only, Part B to Part A and causally to itself; position j of Part B predicts continuation[j]."""
    a = [tokenizer.cls_id] + tokenizer.encode(context) + [mask_id]
    word = tokenizer.encode(continuation)
    b = [tokenizer.sop_id] + word[:-1]
    sep, m = len(a), len(word)
    ids = torch.tensor([a + b])
    positions = torch.tensor([list(range(sep)) + [sep - 1] * m])
    blocks = torch.tensor([[0] * sep + list(range(1, m + 1))])
    with torch.no_grad():
        logits = model(ids, positions, blocks, segments_of_sep(torch.tensor([sep]), sep + m))[0, sep:, :vocab_size]
    return float(torch.log_softmax(logits, dim=-1)[range(m), word].sum())


def _instance(context, continuation, kind="loglikelihood"):
    arguments = (context, continuation) if kind == "loglikelihood" else (continuation,)
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


PAIRS = [("the cat sat on the", " mat."), ("a bird in the hand is worth", " two in the bush."),
         ("the dog", " sat on the log."), ("", " the cat")]


@pytest.mark.parametrize("mask_token", ["[MASK]", "[gMASK]"])
def test_blank_layout_scores_part_b_as_the_model_does_on_a_sample_built_by_hand(mask_token):
    tokenizer, config, model, _ = _blank_model()
    mask_id = tokenizer.mask_id if mask_token == "[MASK]" else tokenizer.gmask_id
    expected = [_part_b_by_hand(model, tokenizer, config.vocab_size, c, w, mask_id) for c, w in PAIRS]
    for batch_size in (1, 3):
        lm = GLMHarnessLM(model, tokenizer, config, mask_token=mask_token, batch_size=batch_size)
        scores = lm.loglikelihood([_instance(c, w) for c, w in PAIRS])
        torch.testing.assert_close(torch.tensor([s for s, _ in scores]), torch.tensor(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["causal", "blank"])
def test_rolling_loglikelihood_of_a_short_text_is_its_loglikelihood_after_nothing(layout):
    tokenizer, config, model, _ = _blank_model()
    lm = GLMHarnessLM(model, tokenizer, config, layout=layout, mask_token="[gMASK]")
    text = TEXTS[0]
    (rolled,) = lm.loglikelihood_rolling([_instance(None, text, "loglikelihood_rolling")])
    ((direct, _),) = lm.loglikelihood([_instance("", text)])
    assert rolled == pytest.approx(direct, abs=1e-5)
    # a long text: lm-eval's disjoint windows of `room` tokens, each after the one token before it (the last
    # after as many as fill it), every token scored once
    tokens = tokenizer.encode(" ".join(TEXTS[:20]))
    room = config.max_sequence_length - 2
    assert len(tokens) > 3 * room and len(tokens) % room
    windows = [(tokens[max(0, min(start + room, len(tokens)) - room - 1):start] if start else [],
                tokens[start:start + room]) for start in range(0, len(tokens), room)]
    assert len(windows[-1][0]) > 1
    (rolled,) = lm.loglikelihood_rolling([_instance(None, " ".join(TEXTS[:20]), "loglikelihood_rolling")])
    expected = sum(score for score, _ in lm._scores(windows, tokenizer.gmask_id, "windows"))
    assert rolled == pytest.approx(expected, abs=1e-4)


def test_cli_writes_lm_evals_results_json(tmp_path, capsys):
    tokenizer, config, _, weights = _blank_model()
    tokenizer.save(tmp_path / "tokenizer.json")
    write_export(weights, config, tmp_path / "export", tmp_path / "tokenizer.json")
    out = tmp_path / "out" / "results.json"
    assert main([str(tmp_path / "export"), "--harness", "glm_lastword,glm_cloze,glm_docs,glm_lastword_gen",
                 "--limit", "3", "--output", str(out)]) == 0
    assert "layout: blank" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert 0 <= results["results"]["glm_cloze"]["acc,none"] <= 1
    assert results["results"]["glm_lastword"]["perplexity,none"] > 1
    assert results["results"]["glm_docs"]["bits_per_byte,none"] > 0
    assert "exact_match,first_word" in results["results"]["glm_lastword_gen"]
    assert set(results["configs"]) == {"glm_lastword", "glm_cloze", "glm_docs", "glm_lastword_gen"}
    assert list((tmp_path / "out").iterdir()) == [out]  # no temporary file left


def test_bad_inputs_are_one_error_line_and_nothing_written(tmp_path, capsys):
    tokenizer, config, _, weights = _blank_model()
    tokenizer.save(tmp_path / "tokenizer.json")
    write_export(weights, config, tmp_path / "export", tmp_path / "tokenizer.json")
    write_export(weights, config, tmp_path / "bare")  # no tokenizer
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.yaml").write_text("task: bad\ndoc_to_text: [unclosed\n")
    (tmp_path / "unbuildable").mkdir()
    (tmp_path / "unbuildable" / "nofn.yaml").write_text(
        "task: nofn\ncustom_dataset: !function nowhere.docs\noutput_type: loglikelihood\ntest_split: test\n"
        "doc_to_text: '{{x}}'\ndoc_to_target: '{{y}}'\n")
    out = tmp_path / "results.json"
    cases = {"no lm-eval task named no_such_task": [str(tmp_path / "export"), "--harness", "no_such_task"],
             f"task file {tmp_path / 'broken' / 'bad.yaml'} line 3 is not valid YAML":
                 [str(tmp_path / "export"), "--harness", "glm_cloze", "--include-path", str(tmp_path / "broken")],
             "lm-eval cannot build task(s) nofn":
                 [str(tmp_path / "export"), "--harness", "nofn", "--include-path", str(tmp_path / "unbuildable")],
             "no tokenizer": [str(tmp_path / "bare"), "--harness", "glm_cloze"],
             "glm-eval needs --data and --verbalizers (a cloze task), or --harness TASKS": [str(tmp_path / "export")]}
    for message, args in cases.items():
        assert main(args + ["--output", str(out)]) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
        assert not out.exists()
