"""Settings declared once (config.fields): validation, sentinel mapping, CLI options — pure Python."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from comfyui_silo.config import SettingError, Settings, setting
from comfyui_silo.config.fields import add_cli_arguments

pytestmark = pytest.mark.unit


@dataclasses.dataclass(frozen=True)
class Demo(Settings):
    OWNER = "Demo"
    eta: float = setting(0.5, min=0.0, max=50.0, step=0.05, tooltip="step size")
    update: str = setting("ddpm", choices=("ddpm", "euler"), tooltip="update rule")
    early_stop: int | None = setting(None, none_as=-1, min=0, max=10000, tooltip="early stop step")
    grad_clamp: float | None = setting(1.0, none_as=0.0, min=0.0, max=100.0, tooltip="clamp")
    gamma: float = setting(40.0, min=0.0, max=1000.0, allow_inf=True, tooltip="gamma")
    flip: bool = setting(True, tooltip="flip")
    steps: int = setting(1000, min=1, max=100000, tooltip="steps", widget=False)

    def validate(self):
        if self.update == "euler" and self.eta > 10:
            raise SettingError("eta", "Demo setting 'eta' must be at most 10 with euler")


def test_defaults_and_kinds():
    d = Demo()
    assert (d.eta, d.update, d.early_stop, d.grad_clamp, d.flip, d.steps) == (0.5, "ddpm", None, 1.0, True, 1000)
    kinds = {s.name: s.kind for s in Demo.specs()}
    assert kinds == {"eta": "float", "update": "choice", "early_stop": "int", "grad_clamp": "float",
                     "gamma": "float", "flip": "bool", "steps": "int"}
    assert [s.name for s in Demo.specs()][:3] == ["eta", "update", "early_stop"]  # declaration order


@pytest.mark.parametrize("field,value", [("eta", -0.1), ("eta", 51.0), ("eta", math.nan), ("eta", "x"),
                                         ("update", "heun"), ("early_stop", 2.5), ("flip", 1), ("steps", 0),
                                         ("eta", True)])
def test_bad_values_name_their_field(field, value):
    with pytest.raises(SettingError) as e:
        Demo(**{field: value})
    assert e.value.field == field
    assert f"'{field}'" in str(e.value) and "Demo" in str(e.value)


def test_cross_field_validation_and_frozen():
    with pytest.raises(SettingError, match="with euler"):
        Demo(update="euler", eta=20.0)
    d = Demo()
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.eta = 2.0  # type: ignore[misc]


def test_sentinels_map_to_none_and_back():
    d = Demo.from_values(early_stop=-1, grad_clamp=0.0, eta=2)
    assert d.early_stop is None and d.grad_clamp is None and d.eta == 2.0 and isinstance(d.eta, float)
    assert Demo.from_values(early_stop=-7).early_stop is None  # anything below the range is "off" too
    assert Demo.from_values(early_stop=3).early_stop == 3
    assert d.widget_values()["early_stop"] == -1 and d.widget_values()["grad_clamp"] == 0.0
    assert Demo.from_values(d.widget_values()) == d
    assert Demo(gamma=math.inf).gamma == math.inf


def test_unknown_value_is_an_error():
    with pytest.raises(SettingError, match="no setting 'etaa'"):
        Demo.from_values(etaa=1.0)


def test_cli_options_from_declarations():
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser, Demo)
    ns = parser.parse_args(["--eta", "2", "--update", "euler", "--early-stop", "-1", "--steps", "5"])
    d = Demo.from_cli(ns)
    assert (d.eta, d.update, d.early_stop, d.steps, d.flip) == (2.0, "euler", None, 5, True)
    helptext = parser.format_help()
    assert "step size (default 0.5, range 0.0..50.0)" in helptext and "-1 = off" in helptext
    assert "--flip" in helptext and "--no-flip" in helptext
    with pytest.raises(SystemExit):
        parser.parse_args(["--update", "heun"])
