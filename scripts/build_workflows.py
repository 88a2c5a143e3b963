"""Build the shipped example workflows (``workflows/*.json``) and their thumbnails (``workflows/*.jpg``).

The graphs are described here in a few lines each; :class:`comfyui_silo.tools.workflow_build.WorkflowBuilder`
turns them into UI-format files with the host's own widget order (from ``/object_info``). A server-tier test
rebuilds them against the running host and fails if the committed files differ, so they never drift from the nodes.

    python scripts/build_workflows.py                      # starts a headless host ($COMFYUI_PATH) for /object_info
    python scripts/build_workflows.py --object-info oi.json
    python scripts/build_workflows.py --thumbnails-only    # no host needed
    python scripts/build_workflows.py --no-thumbnails      # the .json files only

The SD1.x graphs cover every task; ``FAMILIES`` adds a deblur and a training graph for SDXL (Load Checkpoint) and
for Flux (Load Diffusion Model + DualCLIPLoader clip_l/t5xxl type flux + Load VAE ae, FluxGuidance on the prompt at
CFG 1), with each family's starting settings (README, "Model families").

Thumbnails show the photo and what the degradation does to it (computed with the pack's own degradations); they
never show a made-up restoration.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "workflows"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
POSITIVE = "a high quality photograph, sharp focus, natural detail"
NEGATIVE = "blurry, low quality, jpeg artifacts, noise, watermark"

COMMON_NOTE = (
    "How to use\n"
    "1. Load Checkpoint: your SD1.x checkpoint (for SDXL and Flux open 'silo_sdxl_gaussian_deblur' / "
    "'silo_flux_gaussian_deblur': they load those models as their users do, with an operator of that family).\n"
    "2. Load Image: the degraded photo{photo_hint}.\n"
    "3. Latent Degradation Operator: an operator trained for THIS degradation and THIS model family, from "
    "ComfyUI/models/latent_operators. None yet? Run the workflow 'silo_train_operator_from_generated_images' "
    "(or `python -m comfyui_silo train-operator`) with the same Degradation settings and the file name "
    "'{operator_stem}'.\n"
    "4. Queue. The result is saved under output/silo/; the preview shows the photo next to the restoration. The "
    "nodes show their results: SILO KSampler and the chart how consistency with the photo fell step by step, "
    "Restoration Metrics how well the result explains the photo (RMSE next to the noise floor).\n\n"
    "Settings: {steps} steps with eta_mode 'auto': the guidance strength is set every step from the photo's noise "
    "floor (SILO KSampler's text shows the floor and the eta it chose; eta is its ceiling). To set eta by hand, switch "
    "eta_mode to 'fixed': the paper samples 999 DDPM steps with eta 0.5 (1.0 for inpainting) at CFG 1, and fewer steps "
    "need a larger eta (about 1 at 250 steps, 2 for inpainting). gradient 'x0' is faster and needs far "
    "less VRAM (no backward pass through the UNet). early_stop k returns the denoised estimate at step k: smoother, "
    "closer to the photo (less hallucinated detail)."
)

STEPS = 250
# The guidance strength of every shipped graph: set automatically from the photo's noise floor (issue 21), with eta
# as its ceiling at the widget's top, so that auto chooses. An explicit override of the settings' defaults ('fixed',
# the paper's 0.5 at 999 steps), which keep saved workflows as they were. Every other solver value of every graph is
# its settings' default.
AUTO_ETA_CEILING = 100.0
AUTO = {"eta_mode": "auto", "eta": AUTO_ETA_CEILING}

# (file stem, title, degradation widgets, operator stem, photo hint, extra note)
TASKS = [
    ("silo_gaussian_deblur", "Gaussian deblur",
     {"type": "gaussian_blur", "blur_kernel_size": 61, "blur_sigma": 3.0}, "gaussian_blur_sd15",
     " (sides a multiple of 8, e.g. 512x512)", ""),
    ("silo_super_resolution_x4", "Super-resolution x4",
     {"type": "super_resolution", "sr_factor": 4}, "super_resolution_x4_sd15",
     " (the SMALL photo, e.g. 128x128 for a 512x512 result; its sides times 4 must be multiples of 8)", ""),
    ("silo_super_resolution_x8", "Super-resolution x8",
     {"type": "super_resolution", "sr_factor": 8}, "super_resolution_x8_sd15",
     " (the SMALL photo, e.g. 64x64 for a 512x512 result)", ""),
    ("silo_box_inpainting", "Box inpainting",
     {"type": "box_inpaint", "box_top": 128, "box_left": 128, "box_height": 256, "box_width": 256},
     "box_inpaint_sd15", " whose missing box is given by the Degradation node's box_* widgets (pixels)", ""),
    ("silo_mask_inpainting", "Mask inpainting (draw the mask)",
     {"type": "mask_inpaint"}, "mask_inpaint_sd15",
     "; right-click it → Open in MaskEditor and paint the missing region (painted = missing)",
     "The operator must be trained for mask_inpaint (it then takes the mask as an extra input and works for any "
     "mask)."),
    ("silo_jpeg_restoration", "JPEG restoration",
     {"type": "jpeg", "jpeg_quality": 10}, "jpeg_q10_sd15", " (a heavily compressed JPEG)", ""),
]

# Other model families (README "Model families"): what a user of each loads, and the settings to start from.
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
FLUX_MODEL, FLUX_CLIP_L, FLUX_T5, FLUX_VAE = ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                                              "ae.safetensors")
FLUX_GUIDANCE = 3.5
# (their SILO settings are SiloSettings' defaults but for AUTO, as in every graph)
FAMILIES = {
    "sdxl": {"label": "SDXL", "steps": 200, "scheduler": "normal", "size": 1024, "batch": 4,
             "operator": "gaussian_blur_sdxl"},
    "flux": {"label": "Flux", "steps": 50, "scheduler": "simple", "size": 1024, "batch": 4,
             "operator": "gaussian_blur_flux"},
}
BLUR = {"type": "gaussian_blur", "blur_kernel_size": 61, "blur_sigma": 3.0}

FAMILY_LOAD = {
    "sdxl": (
        "1. Load Checkpoint: your SDXL checkpoint (sd_xl_base_1.0.safetensors or an SDXL fine-tune, from "
        "models/checkpoints)."),
    "flux": (
        "1. Load Diffusion Model: the Flux model from models/diffusion_models (e.g. flux1-dev.safetensors; weight_dtype "
        "fp8_e4m3fn halves its memory). DualCLIPLoader: clip_l.safetensors and t5xxl_fp16.safetensors (or "
        "t5xxl_fp8_e4m3fn.safetensors) from models/text_encoders, type flux. Load VAE: ae.safetensors from models/vae. "
        "An all-in-one Flux checkpoint (e.g. flux1-dev-fp8.safetensors) loads with Load Checkpoint instead: connect "
        "its MODEL, CLIP and VAE where these three loaders' outputs go."),
}

FAMILY_NOTE = (
    "How to use ({label})\n"
    "{load}\n"
    "2. Load Image: the degraded photo (sides a multiple of 8, e.g. {size}x{size}).\n"
    "3. Latent Degradation Operator: an operator trained for THIS degradation and the {label} VAE's latent space, from "
    "ComfyUI/models/latent_operators (an operator of another family, e.g. gaussian_blur_sd15, is refused: its latent "
    "space differs). None yet? Run the workflow '{train}' with the same Degradation settings; it writes "
    "'{operator_stem}'.\n"
    "4. Queue. The result is saved under output/silo/; the preview shows the photo next to the restoration. The "
    "nodes show their results: SILO KSampler and the chart how consistency with the photo fell step by step, "
    "Restoration Metrics how well the result explains the photo (RMSE next to the noise floor).\n\n"
    "Settings for {label}: {settings} gradient 'x0' is faster and needs far less VRAM (no backward pass through the "
    "model): use it when 'unet' runs out of memory. early_stop k returns the denoised estimate at step k: smoother, "
    "closer to the photo (less hallucinated detail)."
)
FAMILY_SETTINGS = {
    "sdxl": ("{steps} DDPM steps at CFG 1 with eta_mode 'auto' (the strength set every step from the photo's noise "
             "floor; eta is its ceiling) are a starting point (100-200 steps). With eta_mode 'fixed', fewer steps need a "
             "larger eta (about 1 at 200 steps)."),
    "flux": ("Flux is a flow-matching model: SILO reads that from the model and guides in the flow parameterization; "
             "eta is in the paper's units, so the same eta pulls about as hard as on SD1.5. {steps} steps (scheduler "
             "simple) with eta_mode 'auto' (set every step from the photo's noise floor; eta is its ceiling) are a "
             "starting point. CFG stays 1: Flux dev is "
             "guidance-distilled and FluxGuidance {guidance} on the prompt sets its strength; the negative input "
             "takes the same conditioning (not evaluated at CFG 1)."),
}


NOTE_WIDTH = 1640.0
GAP = 40.0  # between columns
PURPLE, BROWN, GREEN = "#3f789e", "#8a6e3e", "#3e8a5a"


def _columns(top: float, *widths: float) -> list:
    """Columns of the given widths, left to right with GAP between them, their first node's title bar at ``top``
    plus room for a group title band."""
    from comfyui_silo.tools.workflow_build import GROUP_TITLE_H, TITLE_H, Column

    cols, x = [], 0.0
    for w in widths:
        cols.append(Column(x, top + GROUP_TITLE_H + 12 + TITLE_H, width=w))
        x += w + GAP
    return cols


def _top(text: str, width: float = NOTE_WIDTH) -> float:
    """Where the node columns start: under the workflow's note, which sits at the top left."""
    from comfyui_silo.tools.workflow_build import TITLE_H, note_height

    return 80.0 + note_height(text, width) + TITLE_H


def _flux_loaders(b, col) -> list:
    """Flux as most users load it: the diffusion model, CLIP-L + T5-XXL and the ``ae`` VAE from three files."""
    unet = b.node("UNETLoader", col, {"unet_name": FLUX_MODEL, "weight_dtype": "default"})
    clip = b.node("DualCLIPLoader", col, {"clip_name1": FLUX_CLIP_L, "clip_name2": FLUX_T5, "type": "flux"})
    vae = b.node("VAELoader", col, {"vae_name": FLUX_VAE})
    return [unet, clip, vae]


def _model_and_prompt(b, col, family: str) -> tuple:
    """``(MODEL, CLIP, VAE, positive, negative, nodes)`` as a user of ``family`` builds them. Flux: one prompt with
    FluxGuidance for both conditioning inputs (CFG 1)."""
    if family == "flux":
        unet, clip, vae = made = _flux_loaders(b, col)
        pos = b.node("CLIPTextEncode", col, {"text": POSITIVE}, {"clip": clip.out("CLIP")}, title="Positive",
                     size=(380, 130))
        guided = b.node("FluxGuidance", col, {"guidance": FLUX_GUIDANCE}, {"conditioning": pos.out()})
        return (unet.out("MODEL"), clip.out("CLIP"), vae.out("VAE"), guided.out(), guided.out(),
                [*made, pos, guided])
    ckpt = b.node("CheckpointLoaderSimple", col, {"ckpt_name": SDXL_CHECKPOINT if family == "sdxl" else CHECKPOINT})
    pos = b.node("CLIPTextEncode", col, {"text": POSITIVE}, {"clip": ckpt.out("CLIP")}, title="Positive",
                 size=(380, 130))
    neg = b.node("CLIPTextEncode", col, {"text": NEGATIVE}, {"clip": ckpt.out("CLIP")}, title="Negative",
                 size=(380, 130))
    return ckpt.out("MODEL"), ckpt.out("CLIP"), ckpt.out("VAE"), pos.out(), neg.out(), [ckpt, pos, neg]


def _train_stem(family: str) -> str:
    return ("silo_train_operator_from_generated_images" if family == "sd15"
            else f"silo_{family}_train_operator_from_generated_images")


def settings_widgets(kind: str) -> dict:
    """The widget values of a solver's (``silo``, ``latent_dps``, ``resample``) or the operator training's
    (``train``) settings at their one declaration's defaults (``SiloSettings()``, ...). The graphs re-type none of
    these values: where a graph wants another one, it overrides it, with its reason, where it builds the node."""
    from comfyui_silo.operators.training import TrainSettings
    from comfyui_silo.samplers.latent_dps import LatentDPSSettings
    from comfyui_silo.samplers.resample import ReSampleSettings
    from comfyui_silo.samplers.silo import SiloSettings

    cls = {"silo": SiloSettings, "latent_dps": LatentDPSSettings, "resample": ReSampleSettings,
           "train": TrainSettings}[kind]
    return {s.name: s.widget_default for s in cls.specs() if s.widget}  # the declaration's defaults, as widgets show them


def _restoration_note(operator_stem: str, photo_hint: str, extra: str, compare: bool,
                      family: str) -> tuple[str, int, str]:
    """``(note, steps, scheduler)`` of a restoration graph."""
    steps, scheduler = STEPS, "normal"
    if family == "sd15":
        note = COMMON_NOTE.format(photo_hint=photo_hint, operator_stem=operator_stem, steps=STEPS)
    else:
        fam = FAMILIES[family]
        steps, scheduler = fam["steps"], fam["scheduler"]
        settings = FAMILY_SETTINGS[family].format(steps=steps, guidance=FLUX_GUIDANCE)
        note = FAMILY_NOTE.format(label=fam["label"], load=FAMILY_LOAD[family], size=fam["size"],
                                  train=_train_stem(family), operator_stem=operator_stem, settings=settings)
    if compare:
        note = ("Degrade -> restore -> compare: load a CLEAN photo; Apply Degradation blurs it (plus noise 0.01) so "
                "the original is known. SILO and two baselines that need no operator but decode with the VAE "
                "every step (Latent DPS, ReSample: much slower) restore it from the same measurement; the saved "
                "image shows original | degraded | SILO | Latent DPS | ReSample and the Metrics nodes show PSNR, "
                "SSIM and measurement consistency of each. Bypass (Ctrl+B) a baseline to skip it.\n\n"
                + note.replace("the degraded photo" + photo_hint, "a clean photo"))
    if extra:
        note += "\n\n" + extra
    return note, steps, scheduler


def _restoration(b, title: str, deg_widgets: dict, operator_stem: str, photo_hint: str, extra: str,
                 compare: bool = False, family: str = "sd15") -> None:
    """A SILO restoration graph (``compare``: of a photo degraded in the graph, next to the two baselines)."""
    note, steps, scheduler = _restoration_note(operator_stem, photo_hint, extra, compare, family)
    cols = _columns(_top(note), *((380, 360, 340, 380, 300, 380, 380) if compare else (380, 360, 340, 380, 380, 480)))
    model, _clip, vae, positive, negative, model_nodes = _model_and_prompt(b, cols[0], family)
    photo = b.node("LoadImage", cols[1], {"image": "example.png"}, title="Clean photo" if compare else
                   "Degraded photo", size=(360, 360))
    deg = b.node("SILODegradation", cols[1], deg_widgets,
                 {"mask": photo.out("MASK")} if deg_widgets["type"] == "mask_inpaint" else None)
    applied = None
    if compare:
        applied = b.node("SILOApplyDegradation", cols[1], {"noise_sigma": 0.01, "seed": 0},
                         {"image": photo.out("IMAGE"), "degradation": deg.out("DEGRADATION")})
    enc = b.node("SILOEncodeMeasurement", cols[2], {"noise_sigma": 0.01},
                 {"image": applied.out("measurement") if compare else photo.out("IMAGE"), "vae": vae,
                  "degradation": deg.out("DEGRADATION")})
    op = b.node("SILOLatentOperatorLoader", cols[2], {"operator_name": operator_stem + ".safetensors"})
    sampling = {"seed": 0, "steps": steps, "cfg": 1.0, "scheduler": scheduler, "denoise": 1.0}
    common = {"model": model, "positive": positive, "negative": negative,
              "latent_image": enc.out("LATENT"), "measurement": enc.out("MEASUREMENT")}
    ks = b.node("SILOKSampler", cols[3], {**sampling, **settings_widgets("silo"), **AUTO},
                {**common, "operator": op.out()})
    dec = b.node("VAEDecode", cols[4], None, {"samples": ks.out("LATENT"), "vae": vae})
    prefix = "silo/" + title.lower().split(" (")[0].replace(" ", "_").replace("-", "_")
    groups = [("Model and prompt", model_nodes, PURPLE)]
    if compare:
        dps, rs = _baselines(b, cols[3], sampling, {**common, "vae": vae})
        decoded = [dec, *(b.node("VAEDecode", cols[4], None, {"samples": n.out("LATENT"), "vae": vae})
                          for n in (dps, rs))]
        _compare_outputs(b, cols[4:], prefix, photo, applied, enc, decoded)
        groups += [("Photo and degradation", [photo, deg, applied], BROWN),
                   ("Restore: SILO and two baselines", [enc, op, ks, dps, rs], GREEN)]
    else:
        _restoration_outputs(b, cols[4:], prefix, photo, enc, ks, dec)
        groups += [("Photo and degradation", [photo, deg], BROWN), ("SILO restoration", [enc, op, ks], GREEN)]
    b.note(note, (0, 80), size=(NOTE_WIDTH, 0), title=f"SILO: {title}")
    for name, refs, color in groups:
        b.group_around(name, refs, color)


def _baselines(b, col, sampling: dict, inputs: dict) -> tuple:
    """Latent DPS (automatic eta, as SILO) and ReSample (no operator, the VAE in every step) at their settings'
    defaults, on the inputs SILO gets."""
    dps = b.node("SILOLatentDPSKSampler", col, {**sampling, **settings_widgets("latent_dps"), **AUTO}, inputs,
                 title="Latent DPS (baseline)")
    rs = b.node("SILOReSampleKSampler", col, {**sampling, **settings_widgets("resample")}, inputs,
                title="ReSample (baseline)")
    return dps, rs


def _compare_outputs(b, cols, prefix: str, photo, applied, enc, decoded: list) -> None:
    """original | degraded | SILO | Latent DPS | ReSample, saved, and the metrics of each restoration."""
    c4, c5, c6 = cols
    dec, dec_dps, dec_rs = decoded
    stitch = {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"}
    left = b.node("ImageStitch", c4, stitch, {"image1": photo.out("IMAGE"), "image2": applied.out("upsampled")},
                  title="original | degraded")
    both = b.node("ImageStitch", c4, stitch, {"image1": left.out(), "image2": dec.out()}, title="+ SILO")
    plus_dps = b.node("ImageStitch", c4, stitch, {"image1": both.out(), "image2": dec_dps.out()},
                      title="+ Latent DPS")
    plus_rs = b.node("ImageStitch", c4, stitch, {"image1": plus_dps.out(), "image2": dec_rs.out()},
                     title="original | degraded | SILO | Latent DPS | ReSample")
    b.node("SaveImage", c5, {"filename_prefix": prefix}, {"images": plus_rs.out()}, size=(380, 300))
    b.node("SaveImage", c5, {"filename_prefix": prefix + "_silo"}, {"images": dec.out()}, size=(380, 360))
    for label, img in (("SILO", dec), ("Latent DPS", dec_dps), ("ReSample", dec_rs)):
        b.node("SILORestorationMetrics", c6, None,
               {"image": img.out(), "reference": photo.out("IMAGE"), "measurement": enc.out("MEASUREMENT")},
               title=f"Metrics: {label}")


def _restoration_outputs(b, cols, prefix: str, photo, enc, ks, dec) -> None:
    """The restoration saved, next to the photo, its consistency per step and its consistency with the photo."""
    c4, c5 = cols
    # the restoration is image1 and the photo is stitched to its left: ImageStitch scales image2, so the
    # preview keeps the restored size (a x8 photo is scaled up, never the restoration down)
    side = b.node("ImageStitch", c4, {"direction": "left", "match_image_size": True,
                                      "spacing_width": 8, "spacing_color": "white"},
                  {"image1": dec.out(), "image2": photo.out("IMAGE")}, title="photo | restored")
    b.node("SILOTracePlot", c4, None, {"trace": ks.out("trace")}, title="Consistency per step", size=(380, 300))
    b.node("SaveImage", c5, {"filename_prefix": prefix}, {"images": dec.out()}, size=(480, 360))
    b.node("PreviewImage", c5, None, {"images": side.out()}, size=(480, 300))
    b.node("SILORestorationMetrics", c5, None, {"image": dec.out(), "measurement": enc.out("MEASUREMENT")},
           title="Consistency with the photo")


def _train_note(family: str) -> str:
    recipe = "{steps} steps on a pool of {pool_size} encoded pairs".format(**settings_widgets("train"))
    if family == "sd15":
        return (
            "Train a latent operator from images your own checkpoint generates (no dataset needed).\n"
            "1. Load Checkpoint: the checkpoint you will restore with (the operator learns ITS VAE's latent space).\n"
            "2. Degradation: the degradation to learn (Gaussian blur 61/3.0 here). For the other example workflows use "
            "super_resolution 4 or 8, box_inpaint, mask_inpaint or jpeg 10 and the file names they expect: "
            "super_resolution_x4_sd15, super_resolution_x8_sd15, box_inpaint_sd15, mask_inpaint_sd15, jpeg_q10_sd15. "
            "For box_inpaint set crop_size to 512, the size of the photos you will restore: the box is placed in "
            "pixels of each training crop, so it must fit in the crop where it lies in the photo.\n"
            "3. Queue. The two KSamplers make 16 varied 512x512 images (change the prompts for your kind of photos; "
            "more and more varied images give better operators). Train Latent Operator saves "
            "models/latent_operators/gaussian_blur_sd15.safetensors (never overwriting: an existing name gets _2) and "
            "shows on the node how well it emulates the blur on held-out images: its error next to two trivial "
            "baselines, decoded with your VAE next to the VAE's own limit, and a verdict (good / usable / WARNING); "
            "the chart (Training curve) shows the held-out error falling below the baselines.\n\n"
            f"The settings are the measured defaults: {recipe} take a minute or two on a GPU. More steps and more varied images improve a 'usable' operator. A folder of real photos works "
            "too: `python -m comfyui_silo train-operator`.")
    fam = FAMILIES[family]
    sampling = {"sdxl": "25 steps at CFG 7",
                "flux": f"20 euler steps at CFG 1 with FluxGuidance {FLUX_GUIDANCE}"}[family]
    return (
        f"Train a latent operator for {fam['label']} from images your own model generates (no dataset needed).\n"
        f"{FAMILY_LOAD[family]} The operator learns THIS VAE's latent space ({fam['label']}); the loader refuses it "
        "for a model of another family.\n"
        "2. Degradation: the degradation to learn (Gaussian blur 61/3.0 here, what "
        f"'silo_{family}_gaussian_deblur' expects). For another degradation change it and the file name (e.g. "
        f"super_resolution_x4_{family}).\n"
        f"3. Queue. The two KSamplers make {2 * fam['batch']} varied {fam['size']}x{fam['size']} images ({sampling}; "
        "change the prompts for your kind of photos; more and more varied images give better operators). Train "
        f"Latent Operator saves models/latent_operators/{fam['operator']}.safetensors (never overwriting: an "
        "existing name gets _2) and shows on the node how well it emulates the blur on held-out images (its error "
        "next to two trivial baselines, decoded next to the VAE's own limit, and a verdict); the chart (Training "
        "curve) shows the held-out error falling below the baselines.\n\n"
        f"The settings are the measured defaults: {recipe}. More steps and more varied images improve a 'usable' operator. A folder of real photos works too: `python -m comfyui_silo "
        f"train-operator` with the {fam['label']} checkpoint.")


def train_workflow(b, family: str = "sd15") -> None:
    text = _train_note(family)
    c0, c1, c2, c3 = _columns(_top(text), 380, 360, 360, 400)
    prompts = ["a photograph of a busy city street, natural light, detailed",
               "a close-up photograph of a person's face, natural light, detailed"]
    if family == "flux":
        unet, clip_loader, vae_loader = loaders = _flux_loaders(b, c0)
        model, clip, vae = unet.out("MODEL"), clip_loader.out("CLIP"), vae_loader.out("VAE")
        fam = FAMILIES[family]
        latent = b.node("EmptySD3LatentImage", c0, {"width": fam["size"], "height": fam["size"],
                                                    "batch_size": fam["batch"]})
        made, negative = [*loaders, latent], None
        sampling = {"steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
    else:
        ckpt = b.node("CheckpointLoaderSimple", c0,
                      {"ckpt_name": SDXL_CHECKPOINT if family == "sdxl" else CHECKPOINT})
        model, clip, vae = ckpt.out("MODEL"), ckpt.out("CLIP"), ckpt.out("VAE")
        neg = b.node("CLIPTextEncode", c0, {"text": "painting, illustration, text, watermark, blurry"},
                     {"clip": clip}, title="Negative", size=(380, 120))
        size, batch = (512, 8) if family == "sd15" else (FAMILIES[family]["size"], FAMILIES[family]["batch"])
        latent = b.node("EmptyLatentImage", c0, {"width": size, "height": size, "batch_size": batch})
        made, negative = [ckpt, neg, latent], neg.out()
        sampling = {"steps": 25, "cfg": 7.0, "sampler_name": "euler_ancestral", "scheduler": "normal"}
    decoded = []
    for i, text_i in enumerate(prompts):
        pos = b.node("CLIPTextEncode", c0, {"text": text_i}, {"clip": clip},
                     title=f"Prompt {i + 1}", size=(380, 120))
        made.append(pos)
        positive = pos.out()
        if family == "flux":  # distilled guidance on the prompt; at CFG 1 the negative is not evaluated
            guided = b.node("FluxGuidance", c0, {"guidance": FLUX_GUIDANCE}, {"conditioning": positive})
            made.append(guided)
            positive = guided.out()
        ks = b.node("KSampler", c1, {"seed": 1000 + i, **sampling, "denoise": 1.0},
                    {"model": model, "positive": positive, "negative": negative or positive,
                     "latent_image": latent.out()}, helpers={"seed": "randomize"})
        decoded.append(b.node("VAEDecode", c2, None, {"samples": ks.out(), "vae": vae}))
        made += [ks, decoded[-1]]
    images = b.node("ImageBatch", c2, None, {"image1": decoded[0].out(), "image2": decoded[1].out()})
    preview = b.node("PreviewImage", c2, None, {"images": images.out()}, size=(360, 360))
    # the training widgets at their one declaration's defaults (TrainSettings: the measured recipe, BENCHMARKS.md)
    train = b.node("SILOTrainLatentOperator", c3,
                   {**settings_widgets("train"),
                    "filename": "gaussian_blur_sd15" if family == "sd15" else FAMILIES[family]["operator"]},
                   {"images": images.out(), "model": model, "vae": vae})
    deg = b.node("SILODegradation", c3, BLUR)
    b.connect(deg.out(), train, "degradation")
    curve = b.node("PreviewImage", c3, None, {"images": train.out("curve")}, title="Training curve",
                   size=(400, 300))
    title = "SILO: train an operator" + ("" if family == "sd15" else f" for {FAMILIES[family]['label']}")
    b.note(text, (0, 80), size=(NOTE_WIDTH, 0), title=title)
    b.group_around("Generate training images", [*made, images, preview])
    b.group_around("Train", [train, deg, curve], GREEN)


def uncertainty_workflow(b) -> None:
    """Dirac-style uncertainty: one SILO restoration per seed, their mean, a std heat map and the samples."""
    text = (
        "Where is the restoration sure, and where is it guessing? (DiracDiffusion's pixel-wise uncertainty)\n"
        "1. Load Checkpoint, Load Image (the blurred photo, sides a multiple of 8) and Latent Degradation Operator "
        "(gaussian_blur_sd15, trained for this checkpoint's VAE) as in 'silo_gaussian_deblur'.\n"
        "2. Queue. Restore with N Seeds runs the SILO Sampler once per seed (noise_seed, noise_seed+1, ...; one "
        "restoration in memory at a time) and saves the pixel-wise mean (smoother, closer to the MMSE estimate) "
        "and a heat map of the per-pixel standard deviation: bright where the seeds disagree (detail the blur "
        "destroyed and the model invents), dark where the photo pins the answer down. Metrics shows how well the "
        "mean explains the photo (consistency next to the noise floor).\n\n"
        "Swap the SILO Sampler for Latent DPS / PSLD Sampler or ReSample Sampler (no operator needed, much slower) to "
        "compare how sure each solver is. More seeds give a steadier map; 4 is a quick look, 16+ a report. "
        f"{STEPS} DDPM steps with eta_mode 'auto' at CFG 1 (Basic Guider) as in the other workflows.")
    c0, c1, c2, c3, c4, c5 = _columns(_top(text), 380, 360, 340, 360, 380, 380)
    ckpt = b.node("CheckpointLoaderSimple", c0, {"ckpt_name": CHECKPOINT})
    pos = b.node("CLIPTextEncode", c0, {"text": POSITIVE}, {"clip": ckpt.out("CLIP")}, title="Positive",
                 size=(380, 130))
    photo = b.node("LoadImage", c1, {"image": "example.png"}, title="Degraded photo", size=(360, 360))
    deg = b.node("SILODegradation", c1, BLUR)
    enc = b.node("SILOEncodeMeasurement", c2, {"noise_sigma": 0.01},
                 {"image": photo.out("IMAGE"), "vae": ckpt.out("VAE"), "degradation": deg.out("DEGRADATION")})
    op = b.node("SILOLatentOperatorLoader", c2, {"operator_name": "gaussian_blur_sd15.safetensors"})
    sampler = b.node("SILOSampler", c2, {**settings_widgets("silo"), **AUTO},
                     {"model": ckpt.out("MODEL"), "measurement": enc.out("MEASUREMENT"), "operator": op.out()})
    guider = b.node("BasicGuider", c3, None, {"model": ckpt.out("MODEL"), "conditioning": pos.out()})
    sigmas = b.node("BasicScheduler", c3, {"scheduler": "normal", "steps": STEPS, "denoise": 1.0},
                    {"model": ckpt.out("MODEL")})
    seeds = b.node("SILORestoreSeeds", c3, {"noise_seed": 0, "seeds": 4},
                   {"guider": guider.out(), "sampler": sampler.out(), "sigmas": sigmas.out(),
                    "latent_image": enc.out("LATENT"), "vae": ckpt.out("VAE")},
                   helpers={"noise_seed": "fixed"})
    b.node("SaveImage", c4, {"filename_prefix": "silo/uncertainty_mean"}, {"images": seeds.out("mean")},
           title="Mean of the restorations", size=(380, 360))
    b.node("SaveImage", c4, {"filename_prefix": "silo/uncertainty_map"},
           {"images": seeds.out("uncertainty")}, title="Uncertainty (per-pixel std)", size=(380, 360))
    b.node("PreviewImage", c5, None, {"images": seeds.out("samples")}, title="The restorations",
           size=(380, 360))
    b.node("SILORestorationMetrics", c5, None,
           {"image": seeds.out("mean"), "measurement": enc.out("MEASUREMENT")}, title="Consistency of the mean")
    b.note(text, (0, 80), size=(NOTE_WIDTH, 0), title="SILO: uncertainty from several seeds")
    b.group_around("Model and prompt", [ckpt, pos])
    b.group_around("Photo and degradation", [photo, deg], BROWN)
    b.group_around("Sample N seeds", [enc, op, sampler, guider, sigmas, seeds], GREEN)


def workflow_specs() -> dict[str, tuple[str, Callable]]:
    specs: dict[str, tuple[str, Callable]] = {}
    for stem, title, deg, op, hint, extra in TASKS:
        specs[stem] = (title, lambda b, t=title, d=deg, o=op, h=hint, x=extra: _restoration(b, t, d, o, h, x))
    specs["silo_train_operator_from_generated_images"] = ("Train an operator from generated images", train_workflow)
    specs["silo_degrade_restore_compare"] = (
        "Degrade, restore and compare",
        lambda b: _restoration(b, "Degrade restore compare", BLUR, "gaussian_blur_sd15", "", "", compare=True))
    specs["silo_uncertainty"] = ("Uncertainty from several seeds", uncertainty_workflow)
    for family, fam in FAMILIES.items():
        title = f"{fam['label']} Gaussian deblur"
        specs[f"silo_{family}_gaussian_deblur"] = (
            title, lambda b, t=title, f=family, o=fam["operator"]: _restoration(b, t, BLUR, o, "", "", family=f))
        specs[_train_stem(family)] = (f"Train an operator for {fam['label']}",
                                      lambda b, f=family: train_workflow(b, f))
    return specs


ORDER_JS = ROOT / "web" / "js" / "silo_template_order.js"


def template_order() -> list[str]:
    """The template browser's card order: the SD1.5 training workflow first (every restoration note says to run it
    first), the SD1.5 restorations, then each other family's training and deblur workflows."""
    stems = list(workflow_specs())
    first = [_train_stem("sd15")]
    family = [s for f in FAMILIES for s in (_train_stem(f), f"silo_{f}_gaussian_deblur")]
    return first + [s for s in stems if s not in first and s not in family] + family


def template_order_js() -> str:
    """``web/js/silo_template_order.js``: the order web/js/silo_templates.js gives the pack's template cards (the
    host lists a pack's workflows in its folder's order and offers packs no index)."""
    return ("// Generated by scripts/build_workflows.py (template_order); do not edit.\n"
            f"export const TEMPLATE_ORDER = {json.dumps(template_order())};\n")


def build_all(object_info: dict) -> dict[str, dict]:
    """``{file stem: UI-format workflow}`` for every shipped workflow."""
    from comfyui_silo.tools.workflow_build import WorkflowBuilder

    out = {}
    for stem, (_title, build) in workflow_specs().items():
        b = WorkflowBuilder(object_info, stem)
        build(b)
        out[stem] = b.to_json()
    return out


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


# -------------------------------------------------------------------------------------------------- thumbnails

def _photo(size: int = 256):
    import numpy as np
    import torch
    from skimage import data, transform

    img = data.astronaut()[20:420, 40:440] / 255.0
    img = transform.resize(img, (size, size), anti_aliasing=True)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()


def _to_pil(t):
    from PIL import Image

    arr = (t[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


def _thumbnail_degradation(stem: str) -> dict:
    """The degradation a restoration graph's thumbnail shows (box and mask sized for the 256 px photo)."""
    blur = {"type": "gaussian_blur", "kernel_size": 61, "sigma": 3.0}
    return {
        "silo_gaussian_deblur": blur,
        "silo_super_resolution_x4": {"type": "super_resolution", "factor": 4},
        "silo_super_resolution_x8": {"type": "super_resolution", "factor": 8},
        "silo_box_inpainting": {"type": "box_inpaint", "top": 64, "left": 64, "height": 128, "width": 128},
        "silo_mask_inpainting": {"type": "mask_inpaint"},
        "silo_jpeg_restoration": {"type": "jpeg", "quality": 10},
        "silo_degrade_restore_compare": blur,
        "silo_uncertainty": blur,
        **{f"silo_{family}_gaussian_deblur": blur for family in FAMILIES},
    }[stem]


def _draw_training_images(canvas, draw) -> list[str]:
    """Four photos where a training graph's generated images go; returns the node list's lines."""
    import torch
    from skimage import data, transform

    from comfyui_silo.operators.charts import font

    tiles = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for i, im in enumerate(tiles):
        side = min(im.shape[:2])
        im = transform.resize(im[:side, :side] / 255.0, (120, 120), anti_aliasing=True)
        t = torch.from_numpy(im.copy()).permute(2, 0, 1)[None].float()
        canvas.paste(_to_pil(t), (16 + 124 * (i % 2), 40 + 124 * (i // 2)))
    draw.text((16, 10), "training images", font=font(15, bold=True), fill=(230, 230, 230))
    return ["H(E(x)) ≈ E(A(x))", "", "Train Latent", "Operator", "", "→ models/", "latent_operators/"]


def _draw_degraded_photo(canvas, draw, stem: str, size: int) -> list[str]:
    """The photo, its right half degraded as the graph's degradation does it; returns the node list's lines."""
    import torch

    from comfyui_silo.operators.charts import font
    from comfyui_silo.operators.degradations import add_noise, build_degradation

    spec, x = _thumbnail_degradation(stem), _photo(size)
    mask = None
    if spec["type"] == "mask_inpaint":
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        mask = (((xx - 150) ** 2 / 60 ** 2 + (yy - 110) ** 2 / 35 ** 2) < 1).float()[None, None]
    deg = build_degradation(spec, mask=mask)
    with torch.no_grad():
        y = add_noise(deg(x), 0.01, seed=0).clamp(0, 1)
        shown = deg.lift(y, size=(size, size)).clamp(0, 1) if spec["type"] == "super_resolution" else y
        if spec["type"] == "super_resolution":  # show the pixels, not the bicubic upsampling
            shown = torch.nn.functional.interpolate(y, size=(size, size), mode="nearest")
    canvas.paste(_to_pil(x[:, :, :, : size // 2]), (0, 40))
    canvas.paste(_to_pil(shown[:, :, :, size // 2:]), (size // 2, 40))
    draw.line([(size // 2, 40), (size // 2, 40 + size)], fill=(255, 255, 255), width=2)
    draw.text((8, 10), "photo", font=font(15, bold=True), fill=(230, 230, 230))
    short = {"gaussian_blur": "blur σ=3", "super_resolution": f"low-res ×{spec.get('factor')}",
             "box_inpaint": "missing box", "mask_inpaint": "missing (mask)", "jpeg": "JPEG q=10"}
    draw.text((size // 2 + 8, 10), short[spec["type"]], font=font(15, bold=True), fill=(230, 230, 230))
    if stem == "silo_uncertainty":
        return ["SILO Sampler", "", "Restore with", "N Seeds", "", "→ mean", "→ uncertainty", "    heat map"]
    return ["Encode", "Measurement", "", "Latent", "Degradation", "Operator", "", "SILO KSampler"]


def make_thumbnail(stem: str, title: str) -> None:
    from PIL import Image, ImageDraw

    from comfyui_silo.operators.charts import font

    W, H, P = 512, 320, 256
    canvas = Image.new("RGB", (W, H), (28, 30, 36))
    draw = ImageDraw.Draw(canvas)
    if stem.endswith("train_operator_from_generated_images"):
        label = _draw_training_images(canvas, draw)
    else:
        label = _draw_degraded_photo(canvas, draw, stem, P)
    family = next((f for f in FAMILIES if stem.startswith(f"silo_{f}_")), None)
    if family:  # the model family the graph loads, on top of the node list
        label = [f"[{FAMILIES[family]['label']}]", *label]
    x0 = P + 24
    draw.rounded_rectangle([x0, 40, W - 16, 40 + P], radius=10, outline=(110, 190, 140), width=2)
    yy = 56
    for line in label:
        draw.text((x0 + 14, yy), line, font=font(17, bold=True), fill=(200, 235, 210))
        yy += 26
    draw.rectangle([0, H - 24, W, H], fill=(46, 52, 64))
    draw.text((8, H - 21), f"SILO · {title}", font=font(14, bold=True), fill=(240, 240, 240))
    canvas.save(OUT / f"{stem}.jpg", quality=88)


def fetch_object_info(comfyui: str) -> dict:
    from comfyui_silo.tools.runner import ComfyRunner

    with tempfile.TemporaryDirectory() as base:
        (Path(base) / "custom_nodes").mkdir()
        with ComfyRunner(comfyui, base_directory=base, cpu=True) as runner:
            return runner.object_info()


def main(argv=None) -> int:
    from comfyui_silo.tools.host_process import comfyui_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--object-info", help="a saved /object_info JSON (default: start a headless host)")
    p.add_argument("--comfyui", default=str(comfyui_path()), help="ComfyUI checkout (default $COMFYUI_PATH)")
    p.add_argument("--thumbnails-only", action="store_true")
    p.add_argument("--no-thumbnails", action="store_true", help="write the .json files only")
    args = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    specs = workflow_specs()
    ORDER_JS.write_text(template_order_js(), encoding="utf-8")
    if not args.thumbnails_only:
        info = (json.loads(Path(args.object_info).read_text()) if args.object_info
                else fetch_object_info(args.comfyui))
        for stem, wf in build_all(info).items():
            (OUT / f"{stem}.json").write_text(dumps(wf), encoding="utf-8")
            print(OUT / f"{stem}.json")
    for stem, (title, _build) in ({} if args.no_thumbnails else specs).items():
        make_thumbnail(stem, title)
        print(OUT / f"{stem}.jpg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
