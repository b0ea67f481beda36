"""How the dataflow graph is drawn: nodes filled by stage (Hamilton's ``module`` tag), the nodes tagged
``output`` outlined, laid out top to bottom so the graph reads on one screen."""

from typing import Any

#: Fill colour of each stage's nodes (a colour-blind-safe palette, Okabe & Ito 2008, lightened).
STAGE_COLOURS = {
    "loading": "#cfe8f7",
    "splitting": "#d5efe3",
    "tokenization": "#fdeccd",
    "modeling": "#f6d6e6",
    "training": "#f9d9c4",
    "prediction": "#e2e2f5",
    "metrics": "#fbf3c2",
    "judging": "#e8d9f0",
    "plots": "#d9f0ee",
    "report": "#ececec",
    "saving": "#c9e4c5",
    "comparing": "#fbf3c2",
}


def _stage_style(*, node, node_class) -> tuple[dict, Any, Any]:
    """Hamilton's ``custom_style_function``: ``(style, node class, legend label)`` of one node."""
    stage = str(node.tags.get("module", "")).rsplit(".", 1)[-1]
    colour = STAGE_COLOURS.get(stage)
    if colour is None:
        return {}, node_class, None
    style = {"fillcolor": colour, "style": "rounded,filled"}
    if node.tags.get("output"):
        style["penwidth"] = "2.5"
    return style, node_class, stage


def graph_style() -> dict:
    """Keyword arguments for ``Driver.visualize_execution`` / ``display_all_functions``."""
    return {
        "custom_style_function": _stage_style,
        "orient": "TB",
        "graphviz_kwargs": {"graph_attr": {"ranksep": "0.35", "nodesep": "0.2", "fontsize": "11"},
                            "node_attr": {"fontsize": "11"}},
    }
