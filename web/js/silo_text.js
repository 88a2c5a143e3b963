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
import { app } from "../../../scripts/app.js";
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

app.registerExtension({
  name: "comfyui-silo.NodeResults",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isOurs(nodeData)) return;
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
      if (text == null) return;
      const existed = !!resultsWidget(this, false);
      const widget = resultsWidget(this, true);
      widget.value = text;
      if (widget.element) widget.element.value = text;
      if (!existed) {
        // a late box: grow the node so the box has room (its inputs keep theirs)
        const min = this.computeSize();
        this.setSize([Math.max(this.size[0], min[0]), Math.max(this.size[1], min[1])]);
      }
      this.setDirtyCanvas?.(true, true);
    };
  },
});
