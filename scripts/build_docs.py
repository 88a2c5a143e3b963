"""Write what the pack publishes about its nodes, from the node classes (``nodes/help_pages.py``):

* ``web/docs/<node_id>.md`` — every node's help page (hand-written text in ``docs/nodes/``, defaults and ranges
  from the schema, i.e. from the settings where they are declared);
* ``web/js/silo_nodes.js`` — the nodes that get a results box in the browser;
* ``node_list.json`` — every node id and display name, for ComfyUI Manager.

    python scripts/build_docs.py            # write the files
    python scripts/build_docs.py --check    # exit 1 when a file differs from what the node classes give

Imports the pack's node classes in-process (needs ComfyUI's ``comfy_api``: ``$COMFYUI_PATH``, default
``~/ComfyUI``); starts no server.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generated_files() -> dict[Path, str]:
    """``{path: text}`` of every generated file."""
    from comfyui_silo.tools.host_process import import_host

    import_host(cpu=True)
    from comfyui_silo.nodes import node_list
    from comfyui_silo.nodes.help_pages import help_page, node_list_json, text_nodes_js

    nodes = node_list()
    files = {ROOT / "web" / "docs" / f"{c.GET_NODE_INFO_V1()['name']}.md": help_page(c) for c in nodes}
    files[ROOT / "web" / "js" / "silo_nodes.js"] = text_nodes_js(nodes)
    files[ROOT / "node_list.json"] = node_list_json(nodes)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated_files().items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(text, encoding="utf-8")
    verb = "differ" if args.check else "written"
    print(f"{len(stale)} file(s) {verb}" + "".join(f"\n  {p}" for p in stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
