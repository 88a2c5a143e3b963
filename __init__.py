"""comfyui-silo: SILO latent-operator guidance for ComfyUI.

ComfyUI loads this folder as a custom-node pack and calls :func:`comfy_entrypoint`.
Plain Python can ``import comfyui_silo.operators`` / ``comfyui_silo.samplers`` without ComfyUI:
nothing at import time here touches the host.
"""

from .config.version import __version__  # noqa: F401  (one definition: config/version.py)

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry point: imported lazily so the pure-torch core stays importable without ComfyUI."""
    from .nodes import SiloExtension

    return SiloExtension()
