"""Node widgets derived from the core's settings declarations (``config.fields``): one declaration, no re-typing.

``widget_inputs(SettingsClass)`` gives the ComfyUI inputs for every declared field (names, defaults, ranges,
tooltips exactly as declared; a field whose ``None`` is shown as a sentinel gets the sentinel as its default and
lowest value). ``settings_from_widgets(SettingsClass, node, **values)`` builds the frozen settings from the values
the executor passes, and turns a :class:`~comfyui_silo.config.SettingError` into the node's input error.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from ..config import SettingError, SettingSpec

__all__ = ["settings_from_widgets", "widget_input", "widget_inputs"]


def _low(spec: SettingSpec):
    if spec.none_as is not None and not isinstance(spec.none_as, bool) and spec.min is not None:
        return min(spec.min, spec.none_as)
    return spec.min


def widget_input(spec: SettingSpec, **overrides: Any) -> io.Input:
    """The ComfyUI input for one declared setting (``overrides`` replace single attributes, e.g. a tooltip)."""
    tooltip = overrides.pop("tooltip", spec.tooltip)
    if spec.optional:
        overrides.setdefault("optional", True)
    default = overrides.pop("default", spec.widget_default)
    if spec.kind == "bool":
        return io.Boolean.Input(spec.name, default=default, tooltip=tooltip, **overrides)
    if spec.kind == "choice":
        return io.Combo.Input(spec.name, options=list(spec.choices), default=default, tooltip=tooltip, **overrides)
    if spec.kind == "str":
        return io.String.Input(spec.name, default=default, tooltip=tooltip, **overrides)
    kw = {"min": _low(spec), "max": spec.widget_high, "step": spec.step}
    kw = {k: v for k, v in kw.items() if v is not None}
    kw.update(overrides)
    cls = io.Int if spec.kind == "int" else io.Float
    return cls.Input(spec.name, default=default, tooltip=tooltip, **kw)


def widget_inputs(settings_cls, optional: bool | None = None, **overrides: dict) -> list[io.Input]:
    """Inputs for every declared (widget) field of ``settings_cls``, in declaration order (``overrides``: a field's
    name -> attributes to replace, e.g. the tooltip a node words its own way); ``optional``: only the optional
    (True) or the other (False) fields."""
    return [widget_input(s, **overrides.get(s.name, {})) for s in settings_cls.specs()
            if s.widget and (optional is None or s.optional == optional)]


def settings_from_widgets(settings_cls, node: str, **values: Any):
    """``settings_cls.from_values(values)``, with a bad value reported as the node's input error."""
    from .common import SiloInputError

    try:
        return settings_cls.from_values(values)
    except SettingError as e:
        raise SiloInputError(node, e.field, f"{e}.", "Change the value on the node.") from None
