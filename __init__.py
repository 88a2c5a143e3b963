"""comfyui-silo: SILO latent-operator guidance for ComfyUI.

ComfyUI loads this folder as a custom-node pack and calls :func:`comfy_entrypoint`.
Plain Python can ``import comfyui_silo.operators`` / ``comfyui_silo.samplers`` without ComfyUI:
nothing at import time here touches the host.
"""

WEB_DIRECTORY = "./web"


def __getattr__(name: str):
    """``__version__``, read from its one definition (config/version.py) when asked for. Nothing is imported at
    module level: test runners may import this file by path, outside any package, when they collect the checkout
    folder (whatever its name), and a relative import there would fail."""
    if name == "__version__":
        from .config.version import __version__

        return __version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def comfy_entrypoint():
    """V3 entry point: imported lazily so the pure-torch core stays importable without ComfyUI."""
    from .nodes import SiloExtension

    return SiloExtension()
