"""Build UI-format workflows (what ComfyUI's frontend saves) in tests, without hand-writing every field.

`node(3, "KSampler", [seed, "randomize", ...], inputs=[("model", "MODEL", link_id), ("seed", "INT", 10, True)],
outputs=[("LATENT", "LATENT", [7])])`: an input tuple with a fourth item True is a widget converted to a socket.
Links are `[link_id, origin_id, origin_slot, target_id, target_slot, type]`, as saved.
"""

from __future__ import annotations


def node(id: int, type: str, widgets: list | None = None, inputs=(), outputs=(), mode: int = 0,
         title: str | None = None) -> dict:
    entry = {"id": id, "type": type, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": id, "mode": mode,
             "inputs": [dict(name=n, type=t, link=link, **({"widget": {"name": n}} if widget else {}))
                        for n, t, link, *widget in inputs],
             "outputs": [{"name": n, "type": t, "links": links, "slot_index": i}
                         for i, (n, t, links) in enumerate(outputs)],
             "properties": {"Node name for S&R": type}}
    if widgets is not None:
        entry["widgets_values"] = widgets
    if title:
        entry["title"] = title
    return entry


def workflow(nodes: list[dict], links: list[list]) -> dict:
    return {"id": "00000000-0000-0000-0000-000000000000", "revision": 0,
            "last_node_id": max(n["id"] for n in nodes), "last_link_id": max([l[0] for l in links], default=0),
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}
