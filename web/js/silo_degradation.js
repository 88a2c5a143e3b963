// comfyui-silo: Degradation (SILO) shows only the widgets of the chosen `type` (blur fields on a blur, the JPEG
// quality on a JPEG degradation). Each type's widgets are marked by the server with the input option
// `silo_degradation_type` (nodes/degradation.py); hidden widgets keep their values, are still saved with the
// workflow and sent with the prompt (the node ignores the other types' values), so saved workflows are unchanged.
import { app } from "../../../scripts/app.js";

const NODE = "SILODegradation";

function typeOfWidgets(nodeData) {
  const owner = {};
  for (const group of [nodeData?.input?.required, nodeData?.input?.optional]) {
    for (const [name, spec] of Object.entries(group ?? {})) {
      const kind = Array.isArray(spec) ? spec[1]?.silo_degradation_type : undefined;
      if (kind) owner[name] = kind;
    }
  }
  return owner;
}

// A hidden widget must also take no room: the frontend skips hidden widgets when it computes the node's size, but
// still stacks every widget when it draws the node (and grows the node to hold them all), so a hidden widget
// reports no height (the frontend adds 4 px to each widget's own height).
const NO_ROOM = () => [0, -4];

function setHidden(w, hidden) {
  if (hidden && w.computeSize !== NO_ROOM) {
    w.siloComputeSize = Object.prototype.hasOwnProperty.call(w, "computeSize") ? w.computeSize : undefined;
    w.computeSize = NO_ROOM;
  } else if (!hidden && w.computeSize === NO_ROOM) {
    if (w.siloComputeSize) w.computeSize = w.siloComputeSize;
    else delete w.computeSize;
  }
  w.hidden = hidden;
}

function showChosenType(node, owner) {
  const kind = node.widgets?.find((w) => w.name === "type")?.value;
  let changed = false;
  for (const w of node.widgets ?? []) {
    if (!(w.name in owner)) continue;
    const hidden = owner[w.name] !== kind;
    if (!!w.hidden !== hidden) changed = true;
    setHidden(w, hidden);
  }
  return changed;
}

app.registerExtension({
  name: "comfyui-silo.DegradationWidgets",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const owner = typeOfWidgets(nodeData);

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const kindWidget = this.widgets?.find((w) => w.name === "type");
      if (kindWidget) {
        const callback = kindWidget.callback;
        const node = this;
        kindWidget.callback = function () {
          const out = callback?.apply(this, arguments);
          if (showChosenType(node, owner)) {
            // fit the node to what it now shows (its width stays)
            node.setSize([node.size[0], node.computeSize()[1]]);
            node.setDirtyCanvas?.(true, true);
          }
          return out;
        };
      }
      showChosenType(this, owner);
      return r;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      showChosenType(this, owner); // a loaded workflow: its saved type decides
      return r;
    };
  },
});
