"""--resume: a prune interrupted after layer k continues from its checkpoint to the same bytes."""

from __future__ import annotations

import hashlib
import importlib

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from faspx.checkpoint import Checkpoint, checkpoint_dir, load_layer
from faspx.cli import main
from tests.conftest import save_tiny

prune_module = importlib.import_module("faspx.prune")


@pytest.fixture
def model_dir(tmp_path, opt_tokenizer):
    return save_tiny("llama-wide", tmp_path / "dense", opt_tokenizer)  # three layers


def prune_args(model_dir, text_file, out, *extra):
    return ["prune", "--model", str(model_dir), "--sparsity", "0.3", "--calib", str(text_file), "--nsamples", "4",
            "--seqlen", "64", "--out", str(out), "-q", *extra]


def sha256(directory) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("recipe", [["--recipe", "paper"], ["--recipe", "quality", "--distill", "2"],
                                    ["--recipe", "paper", "--structure", "auto"]])
def test_a_resumed_prune_writes_the_bytes_of_an_uninterrupted_one(model_dir, text_file, tmp_path, monkeypatch,
                                                                   recipe):
    whole = CliRunner().invoke(main, prune_args(model_dir, text_file, tmp_path / "whole", *recipe))
    assert whole.exit_code == 0, whole.output
    real_save, real_layer = Checkpoint.save, prune_module.prune_layer

    def save_then_interrupt_after_layer_1(self, done, *args):
        real_save(self, done, *args)
        if done == 2:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    monkeypatch.setattr(Checkpoint, "save", save_then_interrupt_after_layer_1)
    first = CliRunner().invoke(main, prune_args(model_dir, text_file, out, *recipe, "--resume"))
    assert first.exit_code == 1 and "2 of 3 layers are pruned and saved" in first.output, first.output
    assert not out.exists() and (checkpoint_dir(out) / "state.json").exists()

    monkeypatch.setattr(Checkpoint, "save", real_save)
    calls = []
    monkeypatch.setattr(prune_module, "prune_layer", lambda *a, **k: (calls.append(1), real_layer(*a, **k))[1])
    second = CliRunner().invoke(main, prune_args(model_dir, text_file, out, *recipe, "--resume"))
    assert second.exit_code == 0, second.output
    assert len(calls) == 1  # only layer 2 was pruned again (no split search either)
    assert sha256(out) == sha256(tmp_path / "whole")
    assert not checkpoint_dir(out).exists()  # removed once the output is complete


def test_a_checkpoint_of_another_command_is_refused_before_any_work(model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real = prune_module.prune_layer

    def interrupted(layer, stream, pairs, budget, recipe, *, index=0, residual=None):
        if index == 1:
            raise KeyboardInterrupt
        return real(layer, stream, pairs, budget, recipe, index=index, residual=residual)

    monkeypatch.setattr(prune_module, "prune_layer", interrupted)
    CliRunner().invoke(main, prune_args(model_dir, text_file, out, "--recipe", "paper", "--resume"))
    assert checkpoint_dir(out).exists()
    args = prune_args(model_dir, text_file, out, "--recipe", "paper", "--resume")
    args[args.index("0.3")] = "0.2"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "made by another command" in result.output and "sparsity" in result.output
    # without --resume the run starts over, says so, and removes the checkpoint when done
    monkeypatch.setattr(prune_module, "prune_layer", real)
    result = CliRunner().invoke(main, prune_args(model_dir, text_file, out, "--recipe", "paper"))
    assert result.exit_code == 0 and "pass --resume" in result.output
    assert not checkpoint_dir(out).exists()


def test_load_layer_restores_pruned_shapes():
    layer = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8))
    pruned = {"0.weight": torch.randn(4, 8), "0.bias": torch.randn(4), "2.weight": torch.randn(8, 4),
              "2.bias": torch.randn(8)}
    load_layer(layer, pruned)
    assert layer[0].out_features == 4 and layer[2].in_features == 4
    assert torch.equal(layer[2].weight, pruned["2.weight"])
    assert layer(torch.randn(2, 8)).shape == (2, 8)
