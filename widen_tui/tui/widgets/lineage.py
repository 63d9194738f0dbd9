"""LineageView: the growth lineage of the compared runs as a tree (base → variants → growths).

The tree is built from `widen_tui.views.lineage.build_lineage`; the line under it describes the
highlighted node (which run trained a base, where a variant branches, what a growth added).
Highlighting a node posts `LineageView.Highlighted`, so the screen can say more without reaching
in here.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Static, Tree
from textual.widgets.tree import TreeNode

from widen_tui.tui.widgets.loss_chart import RUN_COLOURS
from widen_tui.views.lineage import LineageNode, charted_nodes

# the kind of node, shown before its label (plain characters: no true colour or emoji needed)
KIND_MARK = {"group": "", "base": "● ", "run": "○ ", "growth": "▲ "}


def ansi_style(plotext_colour: str) -> str:
    """A plotext colour name ("cyan+") as the Rich style of the same ANSI colour: the tree's
    swatch matches the chart's line in any terminal, true colour or not."""
    from plotext._dict import color_codes

    return f"color({color_codes.get(plotext_colour, 7)})"


class LineageView(Vertical):
    """A tree of `LineageNode`s; `show(roots)` replaces it."""

    DEFAULT_CSS = """
    LineageView { height: 1fr; }
    LineageView > Tree { height: 1fr; padding: 0; }
    LineageView > #lineage-detail { height: auto; max-height: 3; color: $text-muted; }
    """

    class Highlighted(Message):
        """A lineage node was highlighted in the tree."""

        def __init__(self, node: LineageNode) -> None:
            super().__init__()
            self.node = node

    _colours: dict[int, str] = {}

    def compose(self) -> ComposeResult:
        tree: Tree[LineageNode] = Tree("runs compared", id="lineage-tree")
        tree.show_root = False
        tree.guide_depth = 2  # narrow indentation: deep growth chains still fit 80 columns
        yield tree
        yield Static("", id="lineage-detail", markup=False)

    def focus(self, scroll_visible: bool = True):
        """Focusing the view focuses its tree (the keys move through the lineage)."""
        self.query_one(Tree).focus(scroll_visible)
        return self

    def show(self, roots: list[LineageNode]) -> None:
        """Show the lineage; each node with a curve gets a swatch of its colour in the lineage
        chart (which draws `lineage_curves(roots)` in the same order), so the tree is its legend."""
        self._colours = {id(node): RUN_COLOURS[i % len(RUN_COLOURS)] for i, node in enumerate(charted_nodes(roots))}
        tree = self.query_one(Tree)
        tree.clear()
        for root in roots:
            self._add(tree.root, root)
        tree.root.expand_all()
        detail = "↑↓ a node: what it is" if roots else "no runs to trace"
        self.query_one("#lineage-detail", Static).update(detail)

    def _add(self, parent: TreeNode, node: LineageNode) -> None:
        label = Text(KIND_MARK.get(node.kind, "") + node.label)  # plain text: labels are not markup
        colour = self._colours.get(id(node))
        if colour:
            label = Text.assemble(("⠤⠤ ", ansi_style(colour)), label)
        if node.children:
            branch = parent.add(label, data=node, expand=True)
            for child in node.children:
                self._add(branch, child)
        else:
            parent.add_leaf(label, data=node)

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        event.stop()
        node = event.node.data
        if node is None:
            return
        self.query_one("#lineage-detail", Static).update(node.detail or node.label)
        self.post_message(self.Highlighted(node))
