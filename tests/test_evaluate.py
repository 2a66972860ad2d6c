"""glm-eval: cloze scores equal the chained next-token log-probabilities of the verbalizer filling the
blank (computed token by token through glm-generate's recompute path), and accuracy follows them."""
import json

import torch

from tests.test_generate import _setup
from trainer.checkpoint.export import write_export
from trainer.tools.evaluate import evaluate_cloze, main, score_labels
from trainer.tools.decoding import encode_prompt, recompute_step

VERBALIZERS = {"animal": " cat", "place": " the bush"}  # one and several tokens
RECORDS = [{"text": "the [MASK] sat on the mat.", "label": "animal"},
           {"text": "a bird in [MASK] is worth two.", "label": "place"},
           {"text": "the dog sat on the [MASK].", "label": "place"}]


def _chained_log_likelihood(model, tokenizer, text, word, vocab_size):
    part_a, (mask,) = encode_prompt(text, tokenizer)
    step = recompute_step(model, len(part_a), vocab_size)
    total = 0.0
    with torch.no_grad():
        step(part_a, list(range(len(part_a))), [0] * len(part_a))
        feed = [tokenizer.sop_id] + word
        for j, token in enumerate(word):
            logits = step([feed[j]], [mask], [j + 1])
            total += float(torch.log_softmax(logits, dim=-1)[token])
    return total


def test_scores_are_verbalizer_log_likelihoods_and_accuracy_follows():
    tokenizer, config, model, _ = _setup()
    words = {label: tokenizer.encode(word) for label, word in VERBALIZERS.items()}
    assert len(words["place"]) > 1
    correct = 0
    for record in RECORDS:
        scores = score_labels(model, tokenizer, record["text"], words, config.vocab_size)
        expected = {label: _chained_log_likelihood(model, tokenizer, record["text"], word, config.vocab_size)
                    for label, word in words.items()}
        torch.testing.assert_close(torch.tensor(list(scores.values())), torch.tensor(list(expected.values())),
                                   rtol=1e-5, atol=1e-5)
        correct += max(expected, key=expected.get) == record["label"]
    result = evaluate_cloze(model, tokenizer, RECORDS, "{text}", VERBALIZERS, config.vocab_size)
    assert result == {"accuracy": correct / 3, "correct": correct, "examples": 3}


def test_cli_reports_accuracy_and_rejects_bad_input(tmp_path, capsys):
    tokenizer, config, model, weights = _setup()
    tokenizer.save(tmp_path / "tokenizer.json")
    write_export(weights, config, tmp_path / "export", tmp_path / "tokenizer.json")
    task = tmp_path / "task.jsonl"
    template = "{sentence}"
    task.write_text("\n".join(json.dumps({"sentence": r["text"], "label": r["label"]}) for r in RECORDS))
    args = [str(tmp_path / "export"), "--data", str(task), "--template", template,
            "--verbalizers", json.dumps(VERBALIZERS)]
    assert main(args) == 0
    expected = evaluate_cloze(model, tokenizer, RECORDS, "{text}", VERBALIZERS, config.vocab_size)
    assert json.loads(capsys.readouterr().out) == expected
    assert main(args[:-1] + ['{"animal": " cat"}']) == 2
    assert main(args[:3] + ["--template", "{missing}", "--verbalizers", json.dumps(VERBALIZERS)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    for template, message in (("{sentence", "is not a str.format template"), ("{0}", "is not a str.format template"),
                              ("{sentence}" + " and more words" * 40, "positions but the model holds")):
        assert main(args[:3] + ["--template", template, "--verbalizers", json.dumps(VERBALIZERS)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (template, err)
