"""`python -m comfyui_silo train-operator`: loads the VAE through the host's loader, trains from a folder, writes
an operator file, and resumes from a saved state."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.comfy


def test_train_operator_cli_writes_a_loadable_operator_and_resumes(tmp_path, small_checkpoint, host_available):
    from PIL import Image

    from comfyui_silo.operators.io import load_operator

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        arr = (torch.rand(80, 96, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / ("sub" if i else "") / f"im{i}.png")
    out, state = tmp_path / "op.safetensors", tmp_path / "state.safetensors"
    base = [sys.executable, "-m", "comfyui_silo", "train-operator", "--checkpoint", str(small_checkpoint),
            "--images", str(folder), "--degradation", "super_resolution_x4", "--batch-size", "2",
            "--crop-size", "64", "--pool-size", "4", "--eval-every", "2", "--cpu", "--comfyui", str(host_available),
            "--state", str(state)]
    proc = subprocess.run(base + ["--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 images" in proc.stdout and "held-out latent error" in proc.stdout
    # the CLI has the VAE: decoded fidelity next to the VAE's own floor, and the verdict (issue 18)
    assert "VAE floor" in proc.stdout and any(v in proc.stdout for v in ("good:", "usable:", "WARNING")), proc.stdout
    op = load_operator(out)
    assert op.degradation == {"type": "super_resolution", "factor": 4}
    assert op.latent_format["name"] == "SD15" and op.training["steps"] == 2

    out2 = tmp_path / "op2.safetensors"
    proc = subprocess.run(base + ["--steps", "4", "--out", str(out2), "--resume", str(state)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_operator(out2).training["resumed_from"] == 2


def test_cli_rejects_a_bad_degradation_with_a_clear_message(tmp_path, host_available):
    proc = subprocess.run([sys.executable, "-m", "comfyui_silo", "train-operator", "--checkpoint", "x.safetensors",
                           "--images", str(tmp_path), "--degradation", "blurry", "--out", str(tmp_path / "o"),
                           "--comfyui", str(host_available)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--degradation must be one of" in proc.stderr


def test_cli_checks_settings_and_the_output_name_before_loading_anything(tmp_path, host_available):
    base = [sys.executable, "-m", "comfyui_silo", "train-operator", "--checkpoint", "missing.safetensors",
            "--images", str(tmp_path), "--comfyui", str(host_available)]
    proc = subprocess.run(base + ["--out", str(tmp_path / ("a" * 300 + ".safetensors"))], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "--out:" in proc.stderr and "at most 100" in proc.stderr
    proc = subprocess.run(base + ["--out", str(tmp_path / "o.safetensors"), "--pool-size", "2"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "--pool-size" in proc.stderr and "at least batch_size" in proc.stderr
    proc = subprocess.run(base[:4] + ["--help"], capture_output=True, text=True, timeout=120)
    text = " ".join(proc.stdout.split())
    assert "--learning-rate" in text and "(default 1000," in text, "one declaration, the node's default of 1000"
