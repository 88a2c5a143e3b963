"""Operators trained in a real learned latent space: FLUX.2's tiny autoencoder taef2 on real photos (the host's
workflow-template thumbnails), measured on held-out templates. A short version of BENCHMARKS.md's
"Operator quality" run (benchmarks/operator_quality.py, the same code): 128-px crops, 300 steps, a pool of 128
pairs. Skipped, with a banner, unless ``SILO_TAEF2_DIR`` points at a folder with ``taef2_encoder.pth`` and
``taef2_decoder.pth`` (github.com/madebyollin/taesd; never committed here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout root: `benchmarks` is not installed

pytestmark = [pytest.mark.realvae, pytest.mark.slow]


@pytest.fixture(scope="module")
def quality_rows():
    from benchmarks.autoencoders import taesd_pair
    from benchmarks.operator_quality import load_images, run, split_by_template, template_thumbnails

    ae = taesd_pair(os.environ["SILO_TAEF2_DIR"])
    try:
        paths = template_thumbnails()
    except SystemExit as e:
        pytest.skip(f"REAL-VAE TEST SKIPPED: {e}")
    train, held = split_by_template(paths)
    torch.manual_seed(0)
    return {r["degradation"]: r for r in run(ae, load_images(train[::3], 512), load_images(held[:8], 512),
                                             ["blur", "box"], crop=128, log=lambda m: None,
                                             settings={"steps": 300, "pool_size": 128, "eval_every": 150})}


def test_short_training_beats_both_baselines_and_closes_much_of_the_decoded_gap(quality_rows):
    for name, row in quality_rows.items():
        lat, dec = row["fidelity"]["latent"], row["fidelity"]["decoded"]
        best = min(lat["identity"]["rel_l2"], lat["naive_latent"]["rel_l2"])
        assert lat["operator"]["rel_l2"] < 0.75 * best, (name, lat)
        assert dec["floor"]["psnr"] > dec["operator"]["psnr"] > dec["identity"]["psnr"] + 3, (name, dec)
        assert dec["gap_closed"] > 0.45, (name, dec)
        assert row["fidelity"]["verdict"]["level"] in ("good", "usable"), row["fidelity"]["verdict"]


def test_the_report_states_cost_for_gpu_users(quality_rows):
    row = quality_rows["blur"]
    assert row["steps_per_second"] > 0 and row["encodes_per_second"] > 0 and row["encodes"] == 256
