"""Settings declared once: a frozen dataclass per solver / training run whose fields carry their own declaration.

Each field is made with :func:`setting`, which stores a :class:`SettingSpec` (default, range, step, choices,
tooltip, the widget value that stands for ``None``) in the field's metadata. Everything else derives from it:

* validation (:meth:`Settings.__post_init__`) — one place, one message style, the failing field named
  (:class:`SettingError` carries ``.field`` so a node can name its widget without parsing text);
* the node widgets (``nodes/`` turns each spec into a ComfyUI input; the host is never imported here);
* the command-line options (:func:`add_cli_arguments` / :meth:`Settings.from_cli`);
* :meth:`Settings.from_values`, which maps widget/CLI values (``-1`` for "off", say) to the dataclass's own.

Example::

    @dataclass(frozen=True)
    class MySettings(Settings):
        eta: float = setting(0.5, min=0.0, max=50.0, step=0.05, tooltip="Guidance step size.")
        early_stop: int | None = setting(None, none_as=-1, min=-1, max=10000, tooltip="-1: run to the end.")
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

__all__ = ["SettingError", "SettingSpec", "Settings", "add_cli_arguments", "setting", "setting_specs"]

_KINDS = ("bool", "int", "float", "str", "choice")


class SettingError(ValueError):
    """A setting outside its declared type or range; ``.field`` names it (the node maps it to its widget)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    """The declaration of one setting. ``kind`` is inferred from the default (or ``choices`` / ``none_as``)."""

    name: str
    default: Any
    kind: str
    tooltip: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple | None = None
    none_as: Any = None  # widget / CLI value that stands for None ("off"), e.g. -1 or 0
    allow_inf: bool = False
    widget: bool = True  # shown as a node input
    widget_max: float | None = None  # the widget's upper end where it is below the accepted range's (None: max)
    optional: bool = False  # an optional node input, placed after the node's other inputs (added later: saved
    #                         workflows without it load and run with the default)

    @property
    def widget_high(self) -> float | None:
        """The widget's upper end: ``widget_max``, else ``max``."""
        return self.widget_max if self.widget_max is not None else self.max

    @property
    def widget_default(self) -> Any:
        """The default as a widget shows it (``none_as`` for a None default)."""
        return self.none_as if self.default is None else self.default

    def check(self, value: Any, owner: str) -> Any:
        """``value`` coerced to this setting's kind, or :class:`SettingError` naming the field and the range. The
        ``none_as`` value ("off") is stored as None, however the settings are built (the one place this is done)."""
        if value is not None and self.none_as is not None and not isinstance(value, bool) and value == self.none_as:
            value = None
        if value is None:
            if self.none_as is not None or self.default is None:
                return None
            raise SettingError(self.name, f"{owner} setting '{self.name}' must not be None")
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise SettingError(self.name, f"{owner} setting '{self.name}' must be true or false, got {value!r}")
        if self.kind in ("str", "choice"):
            if self.choices is not None and value not in self.choices:
                allowed = ", ".join(repr(c) for c in self.choices)
                raise SettingError(self.name, f"{owner} setting '{self.name}' must be one of {allowed}, got {value!r}")
            if not isinstance(value, str):
                raise SettingError(self.name, f"{owner} setting '{self.name}' must be a string, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(self.name, f"{owner} setting '{self.name}' must be a number, got {value!r}")
        if self.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise SettingError(self.name, f"{owner} setting '{self.name}' must be a whole number, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
                raise SettingError(self.name, f"{owner} setting '{self.name}' must be a finite number, got {value!r}")
        if self.min is not None and value < self.min:
            raise SettingError(self.name, f"{owner} setting '{self.name}' must be at least {self.min}, got {value!r}")
        if self.max is not None and value > self.max and not (self.allow_inf and math.isinf(value)):
            raise SettingError(self.name, f"{owner} setting '{self.name}' must be at most {self.max}, got {value!r}")
        return value


def setting(default: Any, *, tooltip: str, min: float | None = None, max: float | None = None,  # noqa: A002
            step: float | None = None, choices: Iterable | None = None, none_as: Any = None, kind: str | None = None,
            allow_inf: bool = False, widget: bool = True, widget_max: float | None = None,
            optional: bool = False) -> Any:
    """A dataclass field declared with everything the widgets, the CLI and validation need (see the module doc).
    ``widget_max``: a lower top for the node widget than the accepted range (e.g. none for the Python API);
    ``optional``: a node input added after a release, optional so that saved workflows keep loading."""
    choices = tuple(choices) if choices is not None else None
    if kind is None:
        probe = none_as if default is None else default
        if choices is not None:
            kind = "choice"
        elif isinstance(probe, bool):
            kind = "bool"
        elif isinstance(probe, int):
            kind = "int"
        elif isinstance(probe, float):
            kind = "float"
        elif isinstance(probe, str):
            kind = "str"
        else:
            raise TypeError(f"setting(): cannot infer the kind of default {default!r}; pass kind=")
    if kind not in _KINDS:
        raise TypeError(f"setting(): kind must be one of {_KINDS}, got {kind!r}")
    spec = dict(default=default, kind=kind, tooltip=tooltip, min=min, max=max, step=step, choices=choices,
                none_as=none_as, allow_inf=allow_inf, widget=widget, widget_max=widget_max, optional=optional)
    return dataclasses.field(default=default, metadata={"setting": spec})


def setting_specs(cls_or_obj) -> list[SettingSpec]:
    """The :class:`SettingSpec` of every declared field, in declaration order."""
    out = []
    for f in dataclasses.fields(cls_or_obj):
        meta = f.metadata.get("setting")
        if meta is not None:
            out.append(SettingSpec(name=f.name, **meta))
    return out


class Settings:
    """Base of the frozen settings dataclasses: validates every declared field once, on construction."""

    OWNER: ClassVar[str] = "solver"  # how messages name the thing set ("SILO", "training", ...)

    def __post_init__(self) -> None:
        for spec in setting_specs(self):
            object.__setattr__(self, spec.name, spec.check(getattr(self, spec.name), self.OWNER))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks (override; raise :class:`SettingError`)."""

    @classmethod
    def specs(cls) -> list[SettingSpec]:
        return setting_specs(cls)

    @classmethod
    def from_values(cls, values: Mapping[str, Any] | None = None, **more: Any):
        """Build from widget or CLI values: a field's ``none_as`` value becomes None; unknown names are an error;
        a field not given takes its declared default (the one the widget and the CLI show)."""
        values = {**(values or {}), **more}
        specs = {s.name: s for s in cls.specs()}
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise SettingError(unknown[0], f"{cls.OWNER} has no setting {unknown[0]!r}; known: {', '.join(specs)}")
        kwargs = {name: spec.default for name, spec in specs.items()}
        for name, value in values.items():
            spec = specs[name]
            if spec.none_as is not None and spec.kind in ("int", "float") and value is not None \
                    and not isinstance(value, bool) and spec.min is not None and value < spec.min:
                value = None  # any value below the range means "off" as well (e.g. early_stop -5)
            kwargs[name] = value
        return cls(**kwargs)

    def widget_values(self) -> dict[str, Any]:
        """The inverse of :meth:`from_values` (None shown as ``none_as``)."""
        return {s.name: (s.none_as if getattr(self, s.name) is None else getattr(self, s.name)) for s in self.specs()}

    def as_dict(self) -> dict[str, Any]:
        return {s.name: getattr(self, s.name) for s in self.specs()}

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_cli(cls, namespace: argparse.Namespace):
        """Build from :func:`add_cli_arguments`' options (only the ones the user gave; the rest keep defaults)."""
        values = {}
        for spec in cls.specs():
            value = getattr(namespace, spec.name, None)
            if value is not None:
                values[spec.name] = value
        return cls.from_values(values)


def add_cli_arguments(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    """One ``--name`` option per declared setting (``_`` written ``-``), with its tooltip, range and default."""
    for spec in cls.specs():
        flag = "--" + spec.name.replace("_", "-")
        dest = spec.name
        default_text = spec.widget_default
        rng = ""
        if spec.min is not None or spec.max is not None:
            rng = f", range {spec.min if spec.min is not None else '-inf'}..{spec.max if spec.max is not None else 'inf'}"
        off = f"; {spec.none_as} = off" if spec.none_as is not None else ""
        helptext = f"{spec.tooltip} (default {default_text}{rng}{off})".replace("%", "%%")
        if spec.kind == "bool":
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif spec.kind == "choice":
            parser.add_argument(flag, dest=dest, choices=list(spec.choices), default=None, help=helptext)
        else:
            conv = {"int": int, "float": float, "str": str}[spec.kind]
            parser.add_argument(flag, dest=dest, type=conv, default=None, help=helptext)
