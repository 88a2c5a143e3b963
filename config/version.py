"""The pack's version, in one place (pyproject.toml's [project] version must match; a unit test checks it)."""

__version__ = "0.1.0"
