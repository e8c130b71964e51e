"""Model checks that need no weights: a damaged config.json, a truncated safetensors file, the device."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from faspx.errors import UsageError
from faspx.models import check_config_file, check_weight_files
from faspx.prune import resolve_device


def test_a_complete_safetensors_file_passes_and_a_cut_one_is_named(tmp_path):
    save_file({"w": torch.zeros(64, 64), "b": torch.zeros(64)}, tmp_path / "model.safetensors")
    check_weight_files(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-1])
    with pytest.raises(UsageError, match=r"model\.safetensors is not a complete safetensors file"):
        check_weight_files(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:20])  # inside the header
    with pytest.raises(UsageError, match="no complete header"):
        check_weight_files(tmp_path)


def test_a_damaged_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"})[:-3])
    with pytest.raises(UsageError, match="config.json is not valid JSON"):
        check_config_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="not a JSON object"):
        check_config_file(tmp_path / "config.json")


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x", "mps"])
def test_unknown_devices_are_usage_errors(device):
    with pytest.raises(UsageError, match="--device"):
        resolve_device(device)
