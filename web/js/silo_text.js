// comfyui-silo: show the text a node sends back after it runs (metrics, the training report, the operator's
// facts, the consistency summary, warnings) in a read-only box on the node itself, the way core's Preview Any does.
//
// The server sends a node's `ui.PreviewText` output as `{"text": [...]}` in the `executed` websocket message; the
// frontend hands it to the node's `onExecuted`. Custom nodes get no text display from the frontend by themselves,
// so this extension adds a read-only multiline widget named "results" (never saved with the workflow, so saved
// widget values and the node's inputs are unchanged).
//
// TEXT_NODES get the box when they are created, so a workflow opens with room for it; the shipped workflows'
// layout (scripts/build_workflows.py, tools/workflow_build.py TEXT_NODES) reserves that room and a unit test keeps
// both lists equal. Any other node of this pack that sends text gets the box on its first result.
//
// The box always shows the node's latest result:
// - a cached node: the text nodes are output nodes (nodes/*.py), and the host re-sends a cached output node's
//   result on every run, so a re-run whose node is cached still fills the box;
// - tab switches and re-opened workflows: the frontend swaps `app.nodeOutputs` (it keeps each tab's results) and
//   tells extensions through `onNodeOutputsUpdated`; the boxes are refilled from there (images come back the
//   same way in core). Each text is also kept in the tab's record (`remember`), which the frontend itself skips
//   for results that arrive before it has stored the run's prompt (a fully cached re-run).
// After Train Latent Operator runs, the node lists are refreshed (core's "Refresh Node Definitions"), so the new
// operator file is in every Latent Degradation Operator's list at once.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const TEXT_NODES = [
  "SILOKSampler",
  "SILOLatentDPSKSampler",
  "SILOReSampleKSampler",
  "SILORestorationMetrics",
  "SILOPixelUncertainty",
  "SILORestoreSeeds",
  "SILOLatentOperatorLoader",
  "SILOTrainLatentOperator",
];
const WIDGET = "results";
const PLACEHOLDER = "results appear here after a run";

function isOurs(nodeData) {
  const module = String(nodeData?.python_module ?? "");
  return String(nodeData?.name ?? "").startsWith("SILO") && module.startsWith("custom_nodes.");
}

function resultsWidget(node, create) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget && create) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not a widget value: saved workflows and the prompt stay as they are
    if (widget.options) widget.options.serialize = false;
    if (widget.element) {
      widget.element.readOnly = true;
      widget.element.placeholder = PLACEHOLDER;
      widget.element.dataset.siloResults = "1";
      widget.element.style.fontFamily = "monospace";
    }
  }
  return widget;
}

function textOf(message) {
  const text = message?.text;
  if (text == null) return null;
  return (Array.isArray(text) ? text : [text]).map((t) => String(t)).join("\n");
}

function showText(node, text) {
  const existed = !!resultsWidget(node, false);
  const widget = resultsWidget(node, true);
  widget.value = text;
  if (widget.element) widget.element.value = text;
  if (!existed) {
    // a late box: grow the node so the box has room (its inputs keep theirs)
    const min = node.computeSize();
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

function clearText(node) {
  const widget = resultsWidget(node, false);
  if (!widget) return;
  widget.value = "";
  if (widget.element) widget.element.value = "";
}

function remember(node, message) {
  // Keep the text in the tab's own record of results, which the frontend restores on a tab switch. The frontend
  // writes that record itself only when it already knows the run's prompt: the text of a fully cached re-run can
  // arrive before it does, and would be lost on the next tab switch.
  const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
  if (!tracker) return;
  tracker.nodeOutputs ??= {};
  const id = String(node.id);
  tracker.nodeOutputs[id] = { ...(tracker.nodeOutputs[id] ?? {}), text: message.text };
}

const TRAINING_NODE = "SILOTrainLatentOperator";
let refreshing = null;

function refreshOperatorLists() {
  // core's "Refresh Node Definitions": every combo (the operator lists included) re-read from the server
  refreshing ??= Promise.resolve(app.refreshComboInNodes?.())
    .catch((e) => console.warn("[comfyui-silo] could not refresh the operator lists:", e))
    .finally(() => { refreshing = null; });
  return refreshing;
}

// Error dialogs are titled with the node's class; show ours with the name users see on the canvas. This module is
// loaded before the frontend adds its own websocket handlers (which open the dialog), so this listener runs first.
const DISPLAY_NAMES = {};
api.addEventListener("execution_error", ({ detail }) => {
  const shown = DISPLAY_NAMES[detail?.node_type];
  if (shown) detail.node_type = shown;
});

app.registerExtension({
  name: "comfyui-silo.NodeResults",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isOurs(nodeData)) return;
    if (nodeData.display_name) DISPLAY_NAMES[nodeData.name] = nodeData.display_name;
    const eager = TEXT_NODES.includes(nodeData.name);

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      if (eager) resultsWidget(this, true);
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = textOf(message);
      if (text != null) {
        showText(this, text);
        remember(this, message);
      }
      if (nodeData.name === TRAINING_NODE) refreshOperatorLists();
    };
  },

  onNodeOutputsUpdated(outputs) {
    // another tab's (or a re-opened workflow's) results: what the page holds for each of our nodes
    for (const node of app.graph?._nodes ?? []) {
      if (!resultsWidget(node, false)) continue;
      const text = textOf(outputs?.[String(node.id)]);
      if (text != null) showText(node, text);
      else clearText(node);
    }
  },
});
