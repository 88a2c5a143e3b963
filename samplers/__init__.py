# Pure-torch samplers: never import comfy here.
