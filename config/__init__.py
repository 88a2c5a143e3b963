"""Declarations shared by the pure-torch core, the nodes and the command line (pure Python, never imports the host)."""

from .fields import SettingError, Settings, SettingSpec, setting, setting_specs
from .version import __version__

__all__ = ["SettingError", "SettingSpec", "Settings", "__version__", "setting", "setting_specs"]
