"""Tests of swimjax.beyond and experiments/beyond.py: configuration checks,
the target table, and resume after an interruption with one row per point."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from swimjax import beyond, results

SMALL = dict(n_train=256, n_test=100, mc_runs=8, train_epochs=1, finetune_epochs=1,
             budgets=(0.05, 1.0), progress=False,
             combinations=("plain/swim", "gaussian/ggn_sampled", "gaussian+sa/swim"))


def test_config_validation():
    with pytest.raises(ValueError, match="combination"):
        beyond.BeyondConfig(combinations=("plain",))
    with pytest.raises(ValueError, match="training"):
        beyond.BeyondConfig(combinations=("uniform/swim",))
    with pytest.raises(ValueError, match="method"):
        beyond.BeyondConfig(combinations=("plain/magnitude",))
    with pytest.raises(ValueError, match="budgets"):
        beyond.BeyondConfig(budgets=(1.5,))
    with pytest.raises(ValueError, match="rounds"):
        beyond.BeyondConfig(rounds=0)
    assert beyond.parse_combination("rcg+sa/ggn") == ("rcg+sa", "ggn")
    with pytest.raises(ValueError, match="finetune_schedule must be one of"):
        beyond.BeyondConfig(finetune_schedule="linear")
    # the fine-tuning rate suits the model's optimizer unless given
    assert beyond.BeyondConfig().finetune_lr == 1e-3  # LeNet: Adam
    assert beyond.BeyondConfig(model="resnet20").finetune_lr == 2e-3  # SGD
    assert beyond.BeyondConfig(model="resnet20", finetune_lr=0.05).finetune_lr == 0.05
    with pytest.raises(ValueError, match="finetune_lr"):
        beyond.BeyondConfig(finetune_lr=0.0)
    with pytest.raises(ValueError, match="finetune_batch_norm must be one of"):
        beyond.BeyondConfig(finetune_batch_norm="running")
    # the fine-tuning's sigma is the deployment's unless given
    assert beyond.BeyondConfig(sigma_d=0.2).finetune_sigma == 0.2
    assert beyond.BeyondConfig(sigma_d=0.2, finetune_sigma=0.25).finetune_sigma == 0.25
    with pytest.raises(ValueError, match="finetune_sigma"):
        beyond.BeyondConfig(finetune_sigma=-0.1)


def test_checkpoint_labels_name_every_training_setting():
    """A base model or a fine-tuned one is never loaded for other settings:
    the noise's sigma and tau, and the fine-tuning's epochs, rate and
    schedule, are in the checkpoint names."""
    c = beyond.BeyondConfig(sigma_d=0.3)
    assert beyond.base_label(c, "plain") == "plain"
    assert beyond.base_label(c, "gaussian") == "gaussian-s0.3"
    assert beyond.base_label(c, "rcg") == "rcg-s0.3-t1"
    c2 = beyond.BeyondConfig(sigma_d=0.3, train_sigma=0.1, rcg_tau=0.5)
    assert beyond.base_label(c2, "gaussian") == "gaussian-s0.1"
    assert beyond.base_label(c2, "rcg") == "rcg-s0.1-t0.5"
    labels = {beyond.finetune_label(beyond.BeyondConfig(**kw)) for kw in (
        {}, dict(finetune_epochs=3), dict(finetune_lr=3e-3), dict(finetune_schedule="cosine"),
        dict(finetune_batch_norm="batch"), dict(finetune_sigma=0.4))}
    assert len(labels) == 6
    # the deployment's sigma, given or not, names the same fine-tuned model
    assert (beyond.finetune_label(beyond.BeyondConfig(finetune_sigma=0.3))
            == beyond.finetune_label(beyond.BeyondConfig()))


def test_row_identity_holds_its_own_trainings_settings_only():
    """Rows of a training do not depend on another training's settings, so
    they are reused when only those change (SWIM's baseline and A_full when
    the fine-tuning changes); they do depend on their own."""
    finetune = set(beyond.TRAINING_FIELDS["+sa"])
    for name, own in (("plain", set()), ("gaussian", {"train_sigma"}),
                      ("rcg", {"train_sigma", "rcg_tau"}), ("plain+sa", finetune),
                      ("rcg+sa", finetune | {"train_sigma", "rcg_tau"})):
        left_out = set(beyond.identity_fields(name))
        assert not own & left_out, name
        every = {f for fs in beyond.TRAINING_FIELDS.values() for f in fs}
        assert every - own <= left_out, name
        assert {"budgets", "combinations"} <= left_out
        assert not {"sigma_d", "seed", "mc_runs", "model"} & left_out


def _row(training, method, budget, mean, sem, p1, cost=1.0):
    return dict(training=training, method=method, budget=budget, nwc=budget, acc_mean=mean,
                acc_sem=sem, acc_p1=p1, acc_p5=p1, clean_acc=0.99, train_cost_steps=cost,
                train_cost_seconds=cost)


def test_summary_gaps_and_target():
    rows = [_row("plain", "swim", 1.0, 0.97, 0.001, 0.95),
            _row("plain", "swim", 0.02, 0.90, 0.003, 0.80),
            _row("plain", "swim", 0.05, 0.93, 0.003, 0.85),
            _row("gaussian", "ggn", 0.02, 0.962, 0.001, 0.94, 1.2),
            _row("gaussian", "ggn", 0.05, 0.967, 0.001, 0.945, 1.2)]
    md = beyond.summary_markdown(rows, "t")
    assert "A_full = 97.00%" in md and "P1_full = 95.00%" in md
    plain = next(line for line in md.splitlines() if line.startswith("| plain/swim"))
    assert "-7.00" in plain and "-4.00" in plain and "not met" in plain
    noise = next(line for line in md.splitlines() if line.startswith("| gaussian/ggn"))
    se = 100 * np.hypot(0.001, 0.001)
    assert f"-0.80 ({se:.2f})" in noise and "-0.30" in noise and "| met |" in noise
    assert "1.20" in noise


@pytest.mark.slow
def test_experiment_resumes_after_an_interruption_with_one_row_per_point(tmp_path, capsys):
    """A run killed after some rows is resumed: the rows already written are kept,
    the others are added, and every (training, method, budget) has exactly one
    row; a third run computes nothing and changes nothing."""
    from experiments import beyond as binary  # noqa: F401  (flags defined)

    out = str(tmp_path / "run")
    config = beyond.BeyondConfig(**SMALL)
    full = beyond.run_beyond(config, out)
    points = {(t, m, b) for c in config.combinations for t, m in [c.split("/")]
              for b in config.budgets}
    assert {(r["training"], r["method"], r["budget"]) for r in full} == points
    path = os.path.join(out, "results.jsonl")
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    assert len(lines) == len(points)
    for key in ("model", "dataset", "training", "method", "budget", "nwc", "acc_mean",
                "acc_std", "acc_sem", "acc_p1", "acc_p5", "mc_runs", "seed"):
        assert key in json.loads(lines[0])
    # interrupt: keep the first 3 rows (the first combination and part of the
    # second) and a torn fourth line
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines[:3])
        f.write(lines[3][:20])
    resumed = beyond.run_beyond(config, out)
    rows = results.read_rows(path)
    keys = [(r["training"], r["method"], r["budget"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(points)
    before = {(r["training"], r["method"], r["budget"]): r["acc_mean"] for r in full}
    after = {(r["training"], r["method"], r["budget"]): r["acc_mean"] for r in resumed}
    assert after == before  # same keys, checkpoints reused: the same numbers
    # and the same training cost in seconds: each round's as it was when it ran
    cost = {(r["training"], r["method"], r["budget"]): r["train_cost_seconds"] for r in full}
    assert {(r["training"], r["method"], r["budget"]): r["train_cost_seconds"]
            for r in resumed} == cost
    beyond.run_beyond(config, out)
    assert len(results.read_rows(path)) == len(points)
    assert os.path.exists(os.path.join(out, "accuracy_vs_nwc.png"))
    with open(os.path.join(out, "summary.md"), encoding="utf-8") as f:
        a_full = [line for line in f if line.startswith("A_full")]
    assert len(a_full) == 1
    # a run of one more combination (here: one already done) still measures it
    # against this configuration's full write-verify row, from the file
    beyond.run_beyond(dataclasses.replace(config, combinations=("gaussian+sa/swim",),
                                          budgets=(0.05,)), out)
    with open(os.path.join(out, "summary.md"), encoding="utf-8") as f:
        text = f.read()
    assert a_full[0] in text and "| gaussian+sa/swim |" in text
    # changing only the fine-tuning recomputes the fine-tuned rows alone
    n_before = len(results.read_rows(path))
    retuned = beyond.run_beyond(dataclasses.replace(
        config, rounds=1, combinations=("plain/swim", "gaussian+sa/swim"), budgets=(0.05, 1.0)),
        out)
    assert len(results.read_rows(path)) == n_before + 2
    assert ({r["acc_mean"] for r in retuned if r["training"] == "plain"}
            == {r["acc_mean"] for r in full if r["training"] == "plain"})
    # another configuration never mixes with these rows
    other = beyond.BeyondConfig(**dict(SMALL, sigma_d=0.2, combinations=("plain/swim",)))
    rows2 = beyond.run_beyond(other, out)
    assert {r["sigma_d"] for r in rows2} == {0.2}
    assert len(rows2) == len(other.budgets)
