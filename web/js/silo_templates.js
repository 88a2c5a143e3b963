// comfyui-silo: the pack's cards in the template browser (Workflow > Browse Templates > SILO restoration) in the
// order a newcomer needs them: the training workflow that makes the first operator file comes first (every
// restoration workflow's note says to run it first), then the restorations, then the other model families.
//
// The host lists a pack's workflows in its folder's order and reads no index from packs, so the extension sorts
// the pack's list when the frontend fetches it (`api.getWorkflowTemplates`). The pack is found by its workflow
// names, whatever folder it was installed into; names it does not know keep their place after the known ones.
import { api } from "../../../scripts/api.js";
import { TEMPLATE_ORDER } from "./silo_template_order.js";

const RANK = new Map(TEMPLATE_ORDER.map((name, i) => [name, i]));

export function sortTemplates(names) {
  if (!Array.isArray(names) || !names.some((n) => RANK.has(n))) return names;
  const rank = (n) => (RANK.has(n) ? RANK.get(n) : TEMPLATE_ORDER.length);
  return names
    .map((n, i) => [n, i])
    .sort((a, b) => rank(a[0]) - rank(b[0]) || a[1] - b[1])
    .map(([n]) => n);
}

const getWorkflowTemplates = api.getWorkflowTemplates;
if (typeof getWorkflowTemplates === "function" && !getWorkflowTemplates.siloOrder) {
  api.getWorkflowTemplates = async function () {
    const all = await getWorkflowTemplates.apply(this, arguments);
    for (const [pack, names] of Object.entries(all ?? {})) all[pack] = sortTemplates(names);
    return all;
  };
  api.getWorkflowTemplates.siloOrder = true;
}
