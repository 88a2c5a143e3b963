"""Browser tier: what a user sees in the real ComfyUI frontend (headless Chromium, DevTools protocol).

Every shipped workflow opens with all its node types known, its widget values where they belong and no node
covering another in the live layout; the deblurring workflow runs from the browser (64x64, 2 steps, the random
checkpoint) and its nodes show their results (SILO KSampler's consistency summary, Restoration Metrics' text, the
operator's facts, the consistency chart). Screenshots go to tests/_out/browser/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from comfyui_silo.tools.workflow_build import TEXT_NODES, layout_problems

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
OUT = ROOT / "tests" / "_out" / "browser"
FILE_COMBOS = {"ckpt_name", "image", "operator_name", "unet_name", "clip_name1", "clip_name2", "vae_name"}  # their options are the files this test server happens to have

def load_workflow(page, path: Path) -> None:
    wf = json.loads(path.read_text(encoding="utf-8"))
    page.evaluate(f"(async () => {{ await app.loadGraphData({json.dumps(wf)}, true, true, "
                  f"{json.dumps(path.stem)}); return true; }})()")
    expected = json.dumps(sorted(f"{n['id']}:{n['type']}" for n in wf["nodes"]), separators=(",", ":"))
    page.wait_for(f"JSON.stringify(app.graph._nodes.map((n) => n.id + ':' + n.type).sort()) === {json.dumps(expected)}",
                  timeout=30, what=f"{path.name} to load")
    time.sleep(0.5)  # let the DOM widgets (text boxes) attach


LIVE_GRAPH = """(() => {
  const reg = LiteGraph.registered_node_types;
  const nodes = app.graph._nodes.map((n) => {
    const widgets = (n.widgets || []).map((w) => ({
      name: w.name, type: w.type,
      value: (w.value !== null && typeof w.value === 'object') ? null : w.value,
      serialize: w.serialize !== false && w.options?.serialize !== false,
      options: Array.isArray(w.options?.values) ? w.options.values : null,
      scroll: w.element ? [w.element.scrollHeight, w.element.clientHeight] : null,
    }));
    const saved = n.serialize().widgets_values ?? [];
    return {id: n.id, type: n.type, title: n.title, registered: !!reg[n.type], has_errors: !!n.has_errors, saved,
            rect: Array.from(n.boundingRect), size: Array.from(n.size), min: Array.from(n.computeSize()), widgets};
  });
  const groups = (app.graph._groups || app.graph.groups || []).map((g) => ({
    title: g.title, rect: Array.from(g.boundingRect ?? g._bounding)}));
  return {nodes, groups};
})()"""


def live_graph(page) -> dict:
    return page.evaluate(LIVE_GRAPH)


SPAN = """(() => { const r = app.graph._nodes.map((n) => Array.from(n.boundingRect));
  const c = app.canvas.canvas.getBoundingClientRect();
  return [Math.min(...r.map((b) => b[0])), Math.min(...r.map((b) => b[1])),
          Math.max(...r.map((b) => b[0] + b[2])), Math.max(...r.map((b) => b[1] + b[3])), c.left, c.top]; })()"""


def fit_and_shoot(page, path: Path, scale: float | None = None, size=(1600, 1000), margin: int = 30) -> Path:
    """Screenshot the whole graph: fitted to the window, or at ``scale`` with the window grown to hold it."""
    w, h = size
    if scale is not None:
        x0, y0, x1, y1, left, top = page.evaluate(SPAN)
        w = int(left + (x1 - x0) * scale + 2 * margin)
        h = int(top + (y1 - y0) * scale + 2 * margin + 60)  # the zoom controls sit at the bottom
    page.send("Emulation.setDeviceMetricsOverride", {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False})
    time.sleep(0.5)
    if scale is None:
        page.evaluate("(async () => { await app.extensionManager.command.execute('Comfy.Canvas.FitView'); "
                      "return true; })()")
    else:
        page.evaluate(f"""(() => {{ const ds = app.canvas.ds; ds.scale = {scale};
            ds.offset[0] = {margin} / {scale} - ({x0}); ds.offset[1] = {margin} / {scale} - ({y0});
            app.canvas.setDirty(true, true); return true; }})()""")
    time.sleep(1.0)  # a few frames for the canvas and the DOM widgets to follow
    return page.screenshot(path)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflow_opens_clean_in_the_frontend(page, path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    load_workflow(page, path)
    graph = live_graph(page)
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert len(nodes) == len(wf["nodes"])
    missing = sorted({n["type"] for n in graph["nodes"] if not n["registered"] or n["has_errors"]})
    assert not missing, f"{path.name}: the frontend does not know {missing}"

    # widget values: the frontend saves back exactly what the file holds (nothing shifted, the results box not
    # saved), and combos hold one of their options
    for saved in wf["nodes"]:
        live = nodes[saved["id"]]
        assert live["saved"] == saved.get("widgets_values", []), f"{path.name}: node {saved['id']} ({saved['type']})"
        for w in live["widgets"]:
            if w["options"] is not None and w["name"] not in FILE_COMBOS and w["serialize"]:
                assert w["value"] in w["options"], f"{path.name}: {live['type']}.{w['name']} = {w['value']!r}"
        if saved["type"] in TEXT_NODES:
            assert [(w["name"], w["serialize"]) for w in live["widgets"]][-1] == ("results", False), live["type"]

    # the live layout: nothing overlaps, groups hold whole nodes, no widget squeezed, notes need no scroll bar
    rects = {f"{n['id']} {n['title']}": tuple(n["rect"]) for n in graph["nodes"]}
    groups = {g["title"]: tuple(g["rect"]) for g in graph["groups"]}
    assert len(groups) == len(wf["groups"])
    assert layout_problems(rects, groups) == []
    for n in graph["nodes"]:
        assert n["size"][0] >= n["min"][0] - 0.5 and n["size"][1] >= n["min"][1] - 0.5, \
            f"{path.name}: {n['title']} is {n['size']}, the frontend needs {n['min']}"
    fit_and_shoot(page, OUT / f"{path.stem}.png")
    # the note at 100 % (text boxes are hidden when zoomed out): its text fits without a scroll bar
    for n in graph["nodes"]:
        if n["type"] == "Note":
            x, y = n["rect"][0], n["rect"][1]
            page.evaluate(f"(() => {{ const ds = app.canvas.ds; ds.scale = 1; ds.offset[0] = 20 - ({x}); "
                          f"ds.offset[1] = 20 - ({y}); app.canvas.setDirty(true, true); return true; }})()")
            time.sleep(0.6)
            scroll = page.evaluate(f"(() => {{ const el = app.graph.getNodeById({n['id']}).widgets[0].element;"
                                   "return el ? [el.scrollHeight, el.clientHeight] : null; })()")
            assert scroll and scroll[1] > 0, f"{path.name}: the note's text box is not shown at 100 %"
            assert scroll[0] <= scroll[1] + 2, f"{path.name}: the note needs a scroll bar ({scroll})"


SET_UP_RUN = """(() => {
  const set = (type, name, value) => {
    const found = app.graph._nodes.filter((n) => n.type === type);
    if (!found.length) throw new Error('no ' + type);
    for (const n of found) { const w = n.widgets.find((w) => w.name === name); w.value = value; w.callback?.(value); }
  };
  set('CheckpointLoaderSimple', 'ckpt_name', %(ckpt)s);
  set('LoadImage', 'image', 'browser_photo.png');
  set('SILOKSampler', 'steps', 2);
  const api = window.comfyAPI.api.api;
  if (!window.__silo) {  // one set of listeners per page, however many runs
    api.addEventListener('execution_success', () => { window.__silo.done = true; });
    api.addEventListener('execution_error', (e) => { window.__silo.errors.push(e.detail); window.__silo.done = true; });
    api.addEventListener('progress', (e) => {
      window.__silo.progress += 1;
      window.__silo.bars.push([String(e.detail.node), e.detail.value, e.detail.max]);
    });
  }
  window.__silo = {done: false, errors: [], progress: 0, bars: []};
  return true;
})()"""

RESULTS = """(() => app.graph._nodes.map((n) => {
  const w = (n.widgets || []).find((w) => w.name === 'results');
  const out = app.nodeOutputs?.[String(n.id)] ?? null;
  return {id: n.id, type: n.type, title: n.title, text: w ? w.value : null,
          shown: w?.element ? w.element.value : null, images: (out?.images || n.imgs || []).length};
}))()"""


def run_in_browser(page, small_checkpoint) -> dict:
    """Queue the loaded workflow (the small checkpoint, the test photo, 2 steps) and wait for it to finish."""
    page.evaluate(SET_UP_RUN % {"ckpt": json.dumps(small_checkpoint.name)})
    page.evaluate("(async () => { await app.queuePrompt(0, 1); return true; })()")
    state = page.wait_for("window.__silo.done && window.__silo", timeout=600, poll=1.0, what="the run to finish")
    assert not state["errors"], json.dumps(state["errors"], indent=1)[:3000]
    return state


def bars_never_move_back(bars) -> dict:
    """Per node, the positions of its progress bar that moved backwards (none expected)."""
    last, back = {}, {}
    for node, value, total in bars:
        at = value / total if total else 0.0
        if at < last.get(node, 0.0) - 1e-9:
            back.setdefault(node, []).append((last[node], at))
        last[node] = at
    return back


def test_deblur_runs_from_the_browser_and_its_nodes_show_the_results(page, small_checkpoint):
    load_workflow(page, ROOT / "workflows" / "silo_gaussian_deblur.json")
    state = run_in_browser(page, small_checkpoint)
    assert state["progress"] >= 2, "the sampler reported its steps to the progress bar"
    assert not bars_never_move_back(state["bars"]), bars_never_move_back(state["bars"])
    time.sleep(1.0)
    results = {r["type"]: r for r in page.evaluate(RESULTS)}

    ks = results["SILOKSampler"]
    assert "consistency" in (ks["text"] or "") and "2 steps" in ks["text"], ks
    assert ks["shown"] == ks["text"], "the box on the node shows the text"
    metrics = results["SILORestorationMetrics"]
    assert "noise floor" in (metrics["text"] or ""), metrics
    operator = results["SILOLatentOperatorLoader"]
    assert "Gaussian blur" in (operator["text"] or ""), operator
    assert results["SILOTracePlot"]["images"] >= 1, "the consistency chart is shown on its node"
    assert results["PreviewImage"]["images"] >= 1
    shot = fit_and_shoot(page, OUT / "silo_gaussian_deblur_after_run.png", scale=0.8)
    assert shot.stat().st_size > 50_000


def test_the_template_browser_names_the_pack_category(page):
    """Pack templates are titled by file name (the host offers packs no titles or order); the category label comes
    from the pack's locales/en/main.json, which the frontend loads from /i18n."""
    label = page.evaluate("(async () => { const r = await fetch('/i18n'); const j = await r.json();"
                          "return j?.en?.templateWorkflows?.category?.['comfyui-silo'] ?? null; })()")
    assert label == "SILO restoration"
    names = page.evaluate("(async () => (await (await fetch('/workflow_templates')).json())['comfyui-silo'])()")
    assert sorted(names) == sorted(p.stem for p in WORKFLOWS)


def test_the_template_browser_shows_the_training_workflow_first(page):
    """Issue 19, item 6: the workflow every note says to run first is the first card of the pack's category (the
    host itself lists the folder in whatever order the file system gives)."""
    order = page.evaluate("(async () => { const all = await window.comfyAPI.api.api.getWorkflowTemplates();"
                          "return Object.values(all).find((names) => names.includes('silo_gaussian_deblur')); })()")
    assert order[0] == "silo_train_operator_from_generated_images", order
    assert sorted(order) == sorted(p.stem for p in WORKFLOWS)
    assert order.index("silo_gaussian_deblur") < order.index("silo_sdxl_gaussian_deblur"), order
    page.evaluate("(async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); "
                  "return true; })()")
    try:
        page.wait_for("""(() => { const item = [...document.querySelectorAll('.p-dialog li, .p-dialog button')]
          .find((e) => e.innerText.trim() === 'SILO restoration'); if (item) item.click(); return !!item; })()""",
                      timeout=30, what="the pack's category in the template browser")
        cards = page.wait_for(r"""(() => {
          const shown = [...document.querySelectorAll('.p-dialog *')]
            .filter((e) => e.children.length === 0 && /^silo_\w+$/.test((e.innerText || '').trim()))
            .map((e) => e.innerText.trim());
          return shown.length ? [...new Set(shown)] : null; })()""", timeout=30, what="the pack's template cards")
        assert cards[0] == "silo_train_operator_from_generated_images", cards
        page.screenshot(OUT / "template_browser.png")
    finally:
        page.evaluate("(() => { document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')"
                      ".forEach((b) => b.click()); return true; })()")


def test_a_node_without_a_results_box_gets_one_when_it_reports_text(page):
    """Warnings can come from any node of the pack (e.g. Encode Measurement): the box appears on the first text and
    the node grows to hold it, its widgets untouched."""
    load_workflow(page, ROOT / "workflows" / "silo_gaussian_deblur.json")
    got = page.evaluate("""(() => {
      const n = app.graph._nodes.find((n) => n.type === 'SILOEncodeMeasurement');
      const before = {names: n.widgets.map((w) => w.name), h: n.size[1]};
      n.onExecuted({text: ['WARNING: the photo is not a multiple of 8', 'results may be off']});
      const w = n.widgets.find((w) => w.name === 'results');
      return {before, names: n.widgets.map((w) => w.name), h: n.size[1], min: n.computeSize()[1],
              value: w ? w.value : null, saved: n.serialize().widgets_values};
    })()""")
    assert "results" not in got["before"]["names"] and got["names"] == [*got["before"]["names"], "results"]
    assert got["value"] == "WARNING: the photo is not a multiple of 8\nresults may be off"
    assert got["h"] >= got["min"] > got["before"]["h"] - 1, got
    wf = json.loads((ROOT / "workflows" / "silo_gaussian_deblur.json").read_text(encoding="utf-8"))
    saved = next(n for n in wf["nodes"] if n["type"] == "SILOEncodeMeasurement")["widgets_values"]
    assert got["saved"] == saved, "the box is never saved with the workflow"


TEXT_SHOWN = ("SILOKSampler", "SILOLatentOperatorLoader", "SILORestorationMetrics")


def shown_texts(page) -> dict:
    return {r["type"]: r["shown"] for r in page.evaluate(RESULTS) if r["type"] in TEXT_SHOWN}


def test_results_stay_on_the_nodes_after_a_cached_rerun_and_a_tab_switch(page, small_checkpoint):
    """Issue 19, item 1: a re-run whose nodes are all cached still fills the boxes of a freshly opened workflow, and
    switching to another tab and back shows them again."""
    path = ROOT / "workflows" / "silo_gaussian_deblur.json"
    load_workflow(page, path)
    run_in_browser(page, small_checkpoint)
    load_workflow(page, path)  # a new tab: new nodes, empty boxes
    assert not any(shown_texts(page).values()), shown_texts(page)
    state = run_in_browser(page, small_checkpoint)  # the same inputs: the loader (at least) is cached
    time.sleep(1.0)
    after_rerun = shown_texts(page)
    assert all(after_rerun.values()), f"every results box shows its text after a cached re-run: {after_rerun}"
    assert "Gaussian blur" in after_rerun["SILOLatentOperatorLoader"]
    assert not bars_never_move_back(state["bars"]), bars_never_move_back(state["bars"])

    load_workflow(page, ROOT / "workflows" / "silo_jpeg_restoration.json")  # another tab ...
    page.evaluate("(async () => { await app.extensionManager.command.execute("
                  "'Workspace.PreviousOpenedWorkflow'); return true; })()")  # ... and back
    page.wait_for("app.graph._nodes.some((n) => n.type === 'SILOLatentOperatorLoader' && "
                  "n.widgets.find((w) => w.name === 'operator_name').value.startsWith('gaussian_blur'))",
                  timeout=30, what="the deblurring tab to come back")
    time.sleep(1.0)
    assert shown_texts(page) == after_rerun, "the boxes show the tab's results again"


def test_a_new_operator_file_is_listed_after_training(page, browser_server):
    """Issue 19, item 2: when Train Latent Operator reports a saved file, every loader's list is re-read."""
    import shutil

    load_workflow(page, ROOT / "workflows" / "silo_gaussian_deblur.json")
    folder = browser_server.base / "models" / "latent_operators"
    new = folder / "gaussian_blur_sd15_2.safetensors"
    shutil.copy(folder / "gaussian_blur_sd15.safetensors", new)
    try:
        listed = "app.graph._nodes.find((n) => n.type === 'SILOLatentOperatorLoader').widgets" \
                 ".find((w) => w.name === 'operator_name').options.values"
        assert new.name not in page.evaluate(f"(() => {listed})()")
        page.evaluate("""(() => { const n = LiteGraph.createNode('SILOTrainLatentOperator'); app.graph.add(n);
          n.onExecuted({text: ['saved gaussian_blur_sd15_2.safetensors']}); return true; })()""")
        page.wait_for(f"({listed}).includes({json.dumps(new.name)})", timeout=30,
                      what="the new operator in the loader's list")
    finally:
        new.unlink(missing_ok=True)


def test_the_degradation_node_shows_only_the_chosen_types_widgets(page):
    """Issue 19, item 6: blur fields on a blur, the JPEG quality on JPEG; hidden widgets are still saved."""
    load_workflow(page, ROOT / "workflows" / "silo_gaussian_deblur.json")
    got = page.evaluate("""(() => {
      const n = app.graph._nodes.find((n) => n.type === 'SILODegradation');
      const shown = () => n.widgets.filter((w) => !w.hidden).map((w) => w.name);
      const before = {shown: shown(), saved: n.serialize().widgets_values.length, h: n.size[1],
                      min: n.computeSize()[1]};
      const kind = n.widgets.find((w) => w.name === 'type');
      kind.value = 'jpeg'; kind.callback?.('jpeg');
      return {before, shown: shown(), saved: n.serialize().widgets_values.length, h: n.size[1]};
    })()""")
    time.sleep(1.0)  # frames: the frontend stacks the widgets again on every draw
    got["h_drawn"] = page.evaluate("app.graph._nodes.find((n) => n.type === 'SILODegradation').size[1]")
    assert got["before"]["shown"] == ["type", "blur_kernel_size", "blur_sigma"], got
    assert got["shown"] == ["type", "jpeg_quality"], got
    assert got["saved"] == got["before"]["saved"], "every widget value is still saved"
    assert got["h"] < got["before"]["h"], "the node shrinks to what it shows"
    assert got["h_drawn"] == got["h"], "hidden widgets take no room when the node is drawn"
    # the shipped layout already fits the shown widgets: no empty block where all eleven were
    assert got["before"]["h"] <= got["before"]["min"] + 1, got


def test_error_dialogs_name_our_nodes_as_users_see_them(page):
    """Issue 19, item 6: the execution-error dialog's title is the node's display name, not its class name."""
    load_workflow(page, ROOT / "workflows" / "silo_gaussian_deblur.json")
    page.evaluate("""(() => { window.comfyAPI.api.api.dispatchCustomEvent('execution_error', {
      prompt_id: 'x', node_id: '1', node_type: 'SILOKSampler', executed: [], exception_type: 'ValueError',
      exception_message: '[comfyui-silo] SILO KSampler: input operator: test', traceback: [],
      current_inputs: {}, current_outputs: {}}); return true; })()""")
    text = page.wait_for("(() => { const d = document.querySelector('.p-dialog'); return d && d.innerText; })()",
                         timeout=20, what="the error dialog")
    try:
        assert "SILO KSampler" in text and "SILOKSampler" not in text, text[:500]
    finally:
        page.evaluate("(() => { document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')"
                      ".forEach((b) => b.click()); return true; })()")


def test_the_validation_dialog_names_our_nodes_as_users_see_them(page, small_checkpoint):
    """Issue 19, item 6: a prompt the server rejects before running (here: an operator file that is not in
    models/latent_operators) opens a dialog that lists the node by its display name, with the error text that says
    how to get the file."""
    load_workflow(page, ROOT / "workflows" / "silo_gaussian_deblur.json")
    page.evaluate(SET_UP_RUN % {"ckpt": json.dumps(small_checkpoint.name)})
    page.evaluate("""(() => { const n = app.graph._nodes.find((n) => n.type === 'SILOLatentOperatorLoader');
      n.widgets.find((w) => w.name === 'operator_name').value = 'not_trained_yet.safetensors'; return true; })()""")
    page.evaluate("(async () => { await app.queuePrompt(0, 1); return true; })()")
    text = page.wait_for("(() => { const d = document.querySelector('.p-dialog'); return d && d.innerText; })()",
                         timeout=30, what="the validation dialog")
    try:
        assert "Latent Degradation Operator" in text and "SILOLatentOperatorLoader" not in text, text[:800]
        assert "not_trained_yet.safetensors" in text, text[:800]
    finally:
        page.evaluate("(() => { document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')"
                      ".forEach((b) => b.click()); return true; })()")


def test_a_text_that_arrives_before_the_page_knows_its_run_survives_a_tab_switch(page):
    """A fully cached re-run can send its texts before the frontend has stored the run's prompt, and the frontend
    then keeps them in no tab; the extension keeps them in the tab's record itself."""
    load_workflow(page, ROOT / "workflows" / "silo_gaussian_deblur.json")
    page.evaluate("(() => { app.graph._nodes.find((n) => n.type === 'SILORestorationMetrics')"
                  ".onExecuted({text: ['consistency: kept across tabs']}); return true; })()")
    load_workflow(page, ROOT / "workflows" / "silo_jpeg_restoration.json")
    page.evaluate("(async () => { await app.extensionManager.command.execute("
                  "'Workspace.PreviousOpenedWorkflow'); return true; })()")
    page.wait_for("app.graph._nodes.some((n) => n.type === 'SILOLatentOperatorLoader' && "
                  "n.widgets.find((w) => w.name === 'operator_name').value.startsWith('gaussian_blur'))",
                  timeout=30, what="the deblurring tab to come back")
    time.sleep(1.0)
    assert shown_texts(page)["SILORestorationMetrics"] == "consistency: kept across tabs"
