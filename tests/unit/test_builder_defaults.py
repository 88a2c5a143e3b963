"""The workflow builder (scripts/build_workflows.py) takes solver and training values from their settings' one
declaration (SiloSettings, LatentDPSSettings, ReSampleSettings, TrainSettings): a changed default changes the shipped
graphs, and only the documented overrides (SILO's eta in the SD1.x graphs) stay put.

No host: the graph functions run against a recorder standing in for WorkflowBuilder (which would need
``/object_info``), so what is checked is exactly the widget values each graph asks for."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {
    "silo": ("comfyui_silo.samplers.silo", "SiloSettings"),
    "latent_dps": ("comfyui_silo.samplers.latent_dps", "LatentDPSSettings"),
    "resample": ("comfyui_silo.samplers.resample", "ReSampleSettings"),
    "train": ("comfyui_silo.operators.training", "TrainSettings"),
}
NODES = {"silo": ("SILOKSampler", "SILOSampler"), "latent_dps": ("SILOLatentDPSKSampler",),
         "resample": ("SILOReSampleKSampler",), "train": ("SILOTrainLatentOperator",)}


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_workflows_under_test", ROOT / "scripts" / "build_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Ref:
    def out(self, which=0):
        return self, which


class _Recorder:
    """Stands in for WorkflowBuilder: records each node's type and widgets, and the notes."""

    def __init__(self):
        self.nodes: list[tuple[str, dict]] = []
        self.notes: list[str] = []

    def node(self, type, pos, widgets=None, inputs=None, **_kw):  # noqa: A002 - WorkflowBuilder's signature
        self.nodes.append((type, dict(widgets or {})))
        return _Ref()

    def connect(self, *_a, **_kw):
        pass

    def note(self, text, *_a, **_kw):
        self.notes.append(text)

    def group_around(self, *_a, **_kw):
        pass


def _graphs(builder) -> dict[str, _Recorder]:
    out = {}
    for stem, (_title, build) in builder.workflow_specs().items():
        out[stem] = rec = _Recorder()
        build(rec)
    return out


def _widgets(graphs: dict, node_types, stems=None) -> list[dict]:
    found = [w for stem, rec in graphs.items() if stems is None or stem in stems
             for t, w in rec.nodes if t in node_types]
    assert found, f"no {node_types} node in {stems or 'any graph'}"
    return found


def _settings_cls(kind: str):
    module, name = SETTINGS[kind]
    return getattr(importlib.import_module(module), name)


def _defaults(kind: str) -> dict:
    cls = _settings_cls(kind)
    values = cls().widget_values()
    return {s.name: values[s.name] for s in cls.specs() if s.widget}


def _with_default(monkeypatch, kind: str, name: str, value):
    """Swap the settings class for a subclass whose field ``name`` defaults to ``value`` (declaration included)."""
    cls = _settings_cls(kind)
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    assert getattr(cls(), name) != value
    meta = {**field.metadata, "setting": {**field.metadata["setting"], "default": value}}
    ns = {"__annotations__": {name: field.type}, name: dataclasses.field(default=value, metadata=meta),
          "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    patched = dataclasses.dataclass(frozen=True)(type(cls.__name__, (cls,), ns))
    assert getattr(patched(), name) == value
    monkeypatch.setattr(importlib.import_module(SETTINGS[kind][0]), cls.__name__, patched)


OVERRIDDEN = {"silo": {"eta", "eta_mode"}, "latent_dps": {"eta", "eta_mode"}, "train": {"filename"}}


def test_every_solver_and_training_widget_is_its_settings_default_but_the_documented_automatic_eta(builder):
    graphs = _graphs(builder)
    for kind, node_types in NODES.items():
        defaults = _defaults(kind)
        overridden = OVERRIDDEN.get(kind, set())
        for widgets in _widgets(graphs, node_types):
            assert {k: widgets[k] for k in defaults if k not in overridden} == \
                {k: v for k, v in defaults.items() if k not in overridden}, (kind, widgets)
    # every shipped SILO and Latent-DPS node sets its strength automatically, eta its ceiling (issue 21); the
    # settings' own default stays 'fixed' so that saved workflows run as before
    for kind in ("silo", "latent_dps"):
        widgets = _widgets(graphs, NODES[kind])
        assert widgets and {(w["eta_mode"], w["eta"]) for w in widgets} == {("auto", builder.AUTO_ETA_CEILING)}
        assert _defaults(kind)["eta_mode"] == "fixed"


@pytest.mark.parametrize(("kind", "name", "value"), [
    ("silo", "eta", 0.85), ("silo", "update", "euler"), ("silo", "grad_clamp", 0.5), ("silo", "gradient", "x0"), ("silo", "early_stop", 7),
    ("latent_dps", "eta", 3.0), ("latent_dps", "gluing", 0.2), ("latent_dps", "gluing_norm", "plain"),
    ("resample", "latent_steps", 123), ("resample", "gamma", 12.5),
    ("train", "crop_size", 128), ("train", "learning_rate", 2e-3), ("train", "steps", 777),
])
def test_a_changed_default_changes_the_generated_workflows(builder, monkeypatch, kind, name, value):
    before, default = _graphs(builder), _defaults(kind)[name]
    _with_default(monkeypatch, kind, name, value)
    after = _graphs(builder)
    if name in OVERRIDDEN.get(kind, set()):  # the graphs override it on purpose: a new default does not reach them
        assert {w[name] for w in _widgets(after, NODES[kind])} == {w[name] for w in _widgets(before, NODES[kind])}
        return
    assert {w[name] for w in _widgets(after, NODES[kind])} == {value}
    assert {w[name] for w in _widgets(before, NODES[kind])} == {default} != {value}
    if (kind, name) == ("train", "steps"):  # the training notes quote the recipe
        notes = [n for stem, rec in after.items() if "train_operator" in stem for n in rec.notes]
        assert notes and all(f"{value} steps on a pool of" in n for n in notes)
