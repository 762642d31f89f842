"""The checkpointer on its own: atomic publish, keep-last-k, stale temporaries, Ctrl-C during a save."""

import os
import signal

import pytest
import torch

from lcv_train.errors import CheckpointError
from lcv_train.training.checkpoint import Checkpointer, _finish_before_interrupt


def save(ck, step, value):
    return ck.save(step, {"w": torch.full((3,), float(value))}, {"pos": step}, {"model": {"hidden_size": 8}})


def test_publish_prune_and_load(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        save(ck, step, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000002", "step_0000003"]
    assert ck.latest().name == "step_0000003"
    state = {"w": torch.zeros(3)}
    rank_state = ck.load(ck.latest(), state, {"model": {"hidden_size": 8}})
    assert rank_state == {"pos": 3} and torch.equal(state["w"], torch.full((3,), 3.0))
    with pytest.raises(CheckpointError, match="model.hidden_size"):
        ck.load(ck.latest(), state, {"model": {"hidden_size": 16}})


def test_stale_temporaries_are_removed_and_never_named(tmp_path):
    ck = Checkpointer(tmp_path)
    save(ck, 1, 1)
    (tmp_path / "step_0000002.tmp").mkdir()
    ck.clean_stale()
    assert not (tmp_path / "step_0000002.tmp").exists() and ck.latest().name == "step_0000001"


def test_ctrl_c_during_a_save_finishes_it_then_interrupts(tmp_path):
    ck = Checkpointer(tmp_path)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _finish_before_interrupt():
            os.kill(os.getpid(), signal.SIGINT)  # arrives "during" the save
            save(ck, 5, 5)
            done.append(True)
    assert done and ck.latest().name == "step_0000005"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
