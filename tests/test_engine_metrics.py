"""trainer/engine/metrics.py: one JSON line per step, the same scalars in TensorBoard, nothing written by
ranks other than the logging one, and a resume that rewrites the steps after its checkpoint."""
import json

from trainer.engine.metrics import MetricsWriter


def _steps(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_records_go_to_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2):
        writer.write({"step": step, "loss": 1.0 / step, "grad_norm": None}, {"allocated_bytes": 10.0 * step})
    writer.close()
    assert _steps(tmp_path) == [{"step": 1, "loss": 1.0, "grad_norm": None}, {"step": 2, "loss": 0.5, "grad_norm": None}]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [1.0, 0.5]
    assert [e.value for e in events.Scalars("memory/allocated_bytes")] == [10.0, 20.0]
    assert "train/grad_norm" not in events.Tags()["scalars"]  # None is no scalar


def test_a_rank_that_does_not_log_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False)
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert not (tmp_path / "run").exists()


def test_a_resume_keeps_the_steps_up_to_its_checkpoint_and_rewrites_the_rest(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    resumed = MetricsWriter(tmp_path, enabled=True, resume_step=2)  # the checkpoint was at step 2
    resumed.write({"step": 3, "loss": 30.0})
    resumed.close()
    assert _steps(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]


def test_a_resume_drops_torn_and_garbled_lines_with_one_warning(tmp_path, caplog):
    import logging

    good = [json.dumps({"step": step, "loss": 1.0}) for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join([good[0], "\x00garbage", '["step", 2]', good[1], good[2],
                                                       '{"step": true}']) + '\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING, logger="glm.metrics"):
        MetricsWriter(tmp_path, enabled=True, resume_step=2).close()
    assert _steps(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "had 4 unreadable line(s)" in warnings[0] and "steps 1..2" in warnings[0]
