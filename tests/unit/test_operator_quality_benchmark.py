"""The real-autoencoder operator benchmark's own code, on a tiny random TAESD-format autoencoder, so it never rots
(the taef2 run itself is tier ``realvae`` and BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout root: `benchmarks` is not installed

from benchmarks.autoencoders import random_taesd, taesd_pair  # noqa: E402
from benchmarks.operator_quality import chart, run, split_by_template, table_lines  # noqa: E402

pytestmark = pytest.mark.unit


def test_run_table_and_chart_on_a_tiny_random_autoencoder(tmp_path):
    ae = random_taesd(latent_channels=4)
    g = torch.Generator().manual_seed(0)
    train = [torch.rand(3, 48, 48, generator=g) for _ in range(4)]
    held = [torch.rand(3, 40, 40, generator=g) for _ in range(2)]
    logs = []
    rows = run(ae, train, held, ["blur", "box"], crop=32, log=logs.append,
               settings={"steps": 3, "batch_size": 2, "pool_size": 4, "eval_every": 3})
    assert [r["degradation"] for r in rows] == ["blur", "box"]
    for r in rows:
        fid = r["fidelity"]
        assert set(fid["latent"]) == {"operator", "identity", "naive_latent"}
        dec = fid["decoded"]
        assert {"operator", "floor", "identity"} <= set(dec) and dec["crops"] == 10  # 2 images x 5 crops
        assert r["architecture"] == "PhysicsOperator" and r["encodes"] == 8 and r["wall_seconds"] > 0
        assert fid["verdict"]["level"] in ("good", "usable", "weak")
    assert rows[1]["spec"] == {"type": "box_inpaint", "top": 8, "left": 8, "height": 16, "width": 16}
    lines = table_lines(rows, "t", "facts")
    assert len(lines) == 6 + len(rows) and lines[-1].startswith("| box |")
    json.dumps(rows)  # the JSON the benchmark writes
    png = chart(rows, tmp_path / "q.png", "title")
    assert png.stat().st_size > 1000
    assert any("blur:" in m for m in logs)


def test_split_keeps_a_templates_thumbnails_together():
    paths = [f"/t/{n}-{i}.webp" for n in ("a", "b", "c", "d", "e", "f", "g", "h", "i") for i in (1, 2)] + ["/t/z.webp"]
    train, held = split_by_template(paths, every=4, offset=1)
    assert set(held) == {"/t/b-1.webp", "/t/b-2.webp", "/t/f-1.webp", "/t/f-2.webp", "/t/z.webp"}  # groups b, f, z
    assert not set(train) & set(held) and len(train) + len(held) == len(paths)


def test_taesd_files_are_read_from_their_shapes_not_their_names(tmp_path):
    """A TAESD-format pair round-trips through its files: channels and the FLUX.2 variant come from the tensors."""
    from benchmarks import autoencoders

    enc, dec = autoencoders._encoder(32, True), autoencoders._decoder(32, True)
    torch.save(enc.state_dict(), tmp_path / "anything_encoder.pth")
    torch.save(dec.state_dict(), tmp_path / "anything_decoder.pth")
    pair = taesd_pair(tmp_path)
    assert pair.latent_channels == 32 and pair.downscale == 8
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pair.encode(x), enc(x), atol=1e-5)
        assert pair.decode(pair.encode(x)).shape == x.shape
    (tmp_path / "anything_decoder.pth").unlink()
    torch.save(autoencoders._decoder(32, False).state_dict(), tmp_path / "anything_decoder.pth")
    with pytest.raises(ValueError, match="different TAESD variants"):
        taesd_pair(tmp_path)


def test_bounds_on_an_exact_autoencoder_and_a_random_one():
    """``--bounds``: with an exactly invertible autoencoder (pixel unshuffle) the floor, A(D(E x)) and the oracle are
    all perfect and identity is not; with a random TAESD the numbers are finite and the table has one row each."""
    from types import SimpleNamespace

    from benchmarks.operator_quality import autoencoder_bounds, bounds_lines

    g = torch.Generator().manual_seed(0)
    held = [torch.rand(3, 40, 40, generator=g) for _ in range(2)]
    exact = SimpleNamespace(encode=lambda x: torch.nn.functional.pixel_unshuffle(x, 8),
                            decode=lambda z: torch.nn.functional.pixel_shuffle(z, 8))
    rows = autoencoder_bounds(exact, held, ["blur", "jpeg"], crop=32)
    for r in rows:
        assert r["floor"] > 100 and r["guess"] > 100 and r["oracle"] > 100 and r["identity"] < 60, r
        assert r["oracle_gap"] == pytest.approx(1.0, abs=1e-6)
    noisy = autoencoder_bounds(random_taesd(latent_channels=4), held, ["sr4"], crop=32)
    assert all(torch.isfinite(torch.tensor([r["floor"], r["identity"], r["guess"], r["oracle"]])).all() for r in noisy)
    lines = bounds_lines(rows, "facts")
    assert len(lines) == 4 + len(rows) and lines[-1].startswith("| jpeg | ")
