# Pure-torch core: never import comfy here.
