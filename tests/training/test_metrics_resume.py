"""metrics.jsonl after a resume: the steps trained again are not listed twice."""

import json

from lcv_train.config import LoggerConfig
from lcv_train.training.metrics import MetricsLogger


def test_resume_drops_the_rows_after_the_checkpoint(tmp_path):
    """Bug caught: after a kill at step 5 and a resume from the checkpoint of step 2, metrics.jsonl listed
    steps 3-5 twice (once from each run)."""
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "train/loss": float(s)}) for s in range(1, 6)]
    path.write_text("\n".join(rows) + "\n" + '{"step": 6, "train/lo')  # a row torn by the kill
    logger = MetricsLogger(LoggerConfig(kind="none"), tmp_path, rank=0, total_steps=10, start_step=2, config_dict={})
    for s in (3, 4):
        logger.log(s, {"train/loss": 10.0 + s})
    logger.close()
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in got] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_fresh_run_keeps_an_untouched_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    before = path.stat().st_ino
    MetricsLogger(LoggerConfig(kind="none"), tmp_path, rank=0, total_steps=3, start_step=1, config_dict={}).close()
    assert path.read_text() == '{"step": 1}\n' and path.stat().st_ino == before
