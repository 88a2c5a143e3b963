"""In-process tier: a solver becomes nodes through its registration alone (issue 20), and what the pack publishes
about its nodes (help pages, results boxes, node_list.json) is generated from the node classes, so a default
declared once in a settings class reaches every place a user reads it."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy

ROOT = Path(__file__).resolve().parents[2]
DEG = dict(type="gaussian_blur", blur_kernel_size=9, blur_sigma=2.0, sr_factor=4, box_top=0, box_left=0,
           box_height=8, box_width=8, random_box_size=16, random_box_seed=0, jpeg_quality=10)


def _pack(comfy_host, name: str):
    """A module of the pack as the host loaded it (``custom_nodes.comfyui-silo...``)."""
    root = comfy_host.node_class("SILOKSampler").__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{root}.{name}")


def _toy_solver(core):
    """A solver written against the core alone: ``||y − A(D(ẑ₀))||`` with Euler steps and the gradient at ẑ₀."""

    @dataclasses.dataclass(frozen=True)
    class ToySettings(core.GuidanceSettings):
        OWNER = "Toy"
        eta: float = core.eta_field(0.25, 5.0, "Toy guidance strength.")
        early_stop: int | None = core.early_stop_field()

    class ToySolver(core.Solver):
        name, key = "Toy", "toy"

        def __init__(self, measurement, degradation, decoder):
            self._loss = core.MeasurementLoss("Toy", measurement, lambda z: degradation(decoder(z)), "toy {shape}")

        def loss(self, z0):
            return self._loss(z0)

    def sample_toy(model, x, sigmas, extra_args=None, callback=None, disable=None, *, measurement, degradation,
                   decoder, settings=None, trace=None, progress=None, parameterization="vp", **options):
        settings, schedule = core.split_options(ToySettings, settings, options)
        guidance = core.Guidance.of(settings, parameterization, schedule, update="euler", gradient="x0",
                                    grad_clamp=None)
        return core.guided_sample(model, x, sigmas, extra_args, callback, disable,
                                  solver=ToySolver(measurement, degradation, decoder), guidance=guidance,
                                  trace=trace, progress=progress)

    return ToySettings, sample_toy


def test_a_toy_solver_gets_its_two_nodes_help_page_and_results_box_from_one_registration(comfy_host, sd15_small,
                                                                                         monkeypatch):
    solvers, pack = _pack(comfy_host, "nodes.solvers"), _pack(comfy_host, "nodes")
    pages = _pack(comfy_host, "nodes.help_pages")
    settings_cls, sample_toy = _toy_solver(_pack(comfy_host, "samplers.core"))
    before = pack.node_list()
    monkeypatch.setitem(solvers.SOLVERS, "SILOToy", ())  # the registration below is undone afterwards

    ks, sampler = solvers.register(solvers.SolverNodes(
        "SILOToy", "Toy", settings_cls, sample_toy, description="A toy solver registered by a test: " + "x" * 20,
        sampler_description="The toy solver as a SAMPLER for SamplerCustom."))

    nodes = pack.node_list()
    assert [c for c in nodes if c not in before] == [ks, sampler]
    ks_info, s_info = ks.GET_NODE_INFO_V1(), sampler.GET_NODE_INFO_V1()
    assert (ks_info["name"], ks_info["display_name"]) == ("SILOToyKSampler", "Toy KSampler")
    assert (s_info["name"], s_info["display_name"]) == ("SILOToySampler", "Toy Sampler")
    assert list(ks_info["input"]["required"])[-4:] == ["measurement", "vae", "eta", "early_stop"]
    assert ks_info["input"]["required"]["eta"][1]["default"] == 0.25
    page = pages.help_page(ks)
    assert page.startswith("# Toy KSampler\n") and "- **eta** — Toy guidance strength. Default 0.25, 0–5." in page
    assert "SILOToyKSampler" in pages.text_nodes(nodes) and "SILOToySampler" not in pages.text_nodes(nodes)
    assert '"SILOToyKSampler"' in pages.text_nodes_js(nodes)
    assert '"SILOToySampler": "Toy Sampler"' in pages.node_list_json(nodes)

    # and the node runs through the one glue path: VAE decoder prepared, the measurement checked, a trace recorded
    model, clip, vae = sd15_small
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a photo", clip=clip)
    (deg,) = comfy_host.run_node("SILODegradation", **DEG)
    photo = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    meas, latent = comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=deg,
                                       noise_sigma=0.01)
    with torch.inference_mode():
        out = ks.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(
            model=model, seed=0, steps=3, cfg=1.0, scheduler="normal", positive=cond, negative=cond,
            latent_image=latent, denoise=1.0, measurement=meas, vae=vae, eta=0.5, early_stop=-1)
    samples, trace = out.args
    assert samples["samples"].shape == latent["samples"].shape and torch.isfinite(samples["samples"]).all()
    assert len(trace) == 3 and all(e["grad_norm"] and e["grad_norm"][0] > 0 for e in trace)
    assert out.ui.as_dict()["text"][0].startswith("consistency ‖y − A(D(ẑ₀))‖: step 0")


def _with_default(monkeypatch, cls, name: str, value) -> None:
    """Change the declared default of ``cls.name`` for this test (the field's declaration, as an edit would)."""
    field = cls.__dataclass_fields__[name]
    changed = dataclasses.field(default=value, metadata={"setting": {**field.metadata["setting"], "default": value}})
    changed.name, changed.type, changed._field_type = field.name, field.type, field._field_type
    monkeypatch.setitem(cls.__dataclass_fields__, name, changed)


def test_a_default_changed_in_the_settings_reaches_widget_cli_help_page_and_workflows(comfy_host, monkeypatch):
    silo = _pack(comfy_host, "samplers.silo")
    pages, config = _pack(comfy_host, "nodes.help_pages"), _pack(comfy_host, "config.fields")
    ks = comfy_host.node_class("SILOKSampler")
    assert "Default 0.5 (paper" in pages.help_page(ks)
    from comfyui_silo.samplers.silo import SiloSettings  # the package as the CLI and the workflow builder import it

    for cls in {silo.SiloSettings, SiloSettings}:  # the host loads the pack a second time, as a custom node
        _with_default(monkeypatch, cls, "eta", 0.75)

    assert ks.GET_NODE_INFO_V1()["input"]["required"]["eta"][1]["default"] == 0.75  # the widget
    parser = argparse.ArgumentParser()
    config.add_cli_arguments(parser, silo.SiloSettings)
    assert "(default 0.75" in " ".join(parser.format_help().split())  # the CLI's help
    assert silo.SiloSettings.from_cli(parser.parse_args([])).eta == 0.75  # ... and what it runs with
    assert "Default 0.75 (paper" in pages.help_page(ks)  # the help page
    # the generated workflows: every shipped graph sets eta automatically (eta_mode auto, eta its ceiling), so a
    # changed default of another SILO field shows what reaches them
    for cls in {silo.SiloSettings, SiloSettings}:
        _with_default(monkeypatch, cls, "grad_clamp", 0.5)
    shipped = [w for _stem, node_type, w in _shipped_widgets(_builder()) if node_type == "SILOKSampler"]
    assert shipped and {w["grad_clamp"] for w in shipped} == {0.5}
    assert {(w["eta_mode"], w["eta"]) for w in shipped} == {("auto", 100.0)}


class _Recorder:
    """Stands in for the builder's WorkflowBuilder (which needs a server's /object_info): records widgets."""

    def __init__(self):
        self.nodes: list[tuple[str, dict]] = []

    def node(self, type, pos, widgets=None, inputs=None, **_kw):  # noqa: A002 - WorkflowBuilder's signature
        self.nodes.append((type, dict(widgets or {})))
        return self

    def out(self, which=0):
        return self, which

    def __getattr__(self, name):  # connect, note, group_around, ...: layout only
        return lambda *a, **kw: None


def _shipped_widgets(builder) -> list[tuple[str, str, dict]]:
    rows = []
    for stem, (_title, build) in builder.workflow_specs().items():
        build(rec := _Recorder())
        rows += [(stem, t, w) for t, w in rec.nodes]
    return rows


def _builder():
    """scripts/build_workflows.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("build_workflows_under_test", ROOT / "scripts" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_published_files_are_what_the_node_classes_give(comfy_host):
    """web/docs, web/js/silo_nodes.js and node_list.json equal what scripts/build_docs.py writes (run it after a
    change), and every number a page shows comes from the schema."""
    spec = importlib.util.spec_from_file_location("build_docs_under_test", ROOT / "scripts" / "build_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stale = [str(p.relative_to(ROOT)) for p, text in module.generated_files().items()
             if not p.is_file() or p.read_text(encoding="utf-8") != text]
    assert not stale, f"run `python scripts/build_docs.py`: {stale}"
    pages = _pack(comfy_host, "nodes.help_pages")
    for cls in _pack(comfy_host, "nodes").node_list():
        info = cls.GET_NODE_INFO_V1()
        source = (ROOT / "docs" / "nodes" / f"{info['name']}.md").read_text(encoding="utf-8")
        for name, (_kind, opts) in pages._inputs(info).items():
            line = next((ln for ln in source.splitlines() if ln.startswith(f"- **{name}** —")), None)
            assert line is not None, f"docs/nodes/{info['name']}.md has no line for input {name!r}"
            if "default" in opts and opts.get("max", 0) < 2**31 - 1:  # seeds: no default worth a placeholder
                assert "{default}" in line, f"{info['name']}.{name}: write its default as {{default}}"
            if opts.get("min") is not None and opts.get("max", 0) < 2**31 - 1:
                assert "{range}" in line, f"{info['name']}.{name}: write its range as {{range}}"
