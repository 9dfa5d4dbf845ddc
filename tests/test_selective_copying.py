"""The selective-copying demo (benchmarks/selective_copying.py) run with a shortened config: the
selective Mamba model must clearly beat the time-invariant (LTI) one of the same size."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import selective_copying  # noqa: E402

SHORT = dict(ctx_len=16, n_data=4, n_colors=8, d_model=32, n_layer=2, d_state=8, steps=300, batch=32,
             eval_size=512, seed=0)


@pytest.mark.slow
def test_selective_beats_time_invariant():
    report = selective_copying.run(selective_copying.CopyConfig(**SHORT))
    sel, lti = report["results"]
    assert (sel["model"], lti["model"]) == ("selective", "LTI")
    assert abs(sel["params"] - lti["params"]) < 0.05 * sel["params"]  # the same size
    chance = report["chance_accuracy"]
    assert sel["accuracy"] > lti["accuracy"] + 0.15, (sel["accuracy"], lti["accuracy"])
    assert sel["accuracy"] > 2.5 * chance
    assert sel["final_loss"] < lti["final_loss"]


def test_task_batches():
    import torch
    cfg = selective_copying.CopyConfig(ctx_len=10, n_data=3, n_colors=5)
    tokens, targets = selective_copying.make_batch(cfg, 64, torch.Generator().manual_seed(0))
    assert tokens.shape == (64, 13) and targets.shape == (64, 3)
    marker = cfg.n_colors + 1
    assert (tokens[:, 10:] == marker).all()
    for row, tgt in zip(tokens, targets):
        data = row[:10][row[:10] != 0]
        assert torch.equal(data, tgt)  # the data tokens, in order, are the targets
        assert ((tgt >= 1) & (tgt <= cfg.n_colors)).all()
