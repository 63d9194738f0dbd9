"""The command palette lists the keys of the screen it was opened from.

Every binding active where the focus is (the screen's and the focused widget's, as the footer
shows them) becomes a palette command running the same action, so every action is reachable by
name as well as by key. Textual's own widget keys (cursor moves in an Input, a table's paging)
stay out: only bindings declared by this app's classes are listed. Add ``BindingCommands`` to a
screen's ``COMMANDS``.
"""

from __future__ import annotations

from functools import partial

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider


def own_actions(node) -> set[str]:
    """Actions bound by the node's classes outside Textual itself."""
    actions = set()
    for cls in type(node).__mro__:
        if cls.__module__.startswith("textual."):
            continue
        for binding in cls.__dict__.get("BINDINGS", []):
            actions.add(binding.action if isinstance(binding, Binding) else binding[1])
    return actions


class BindingCommands(Provider):
    def _commands(self):
        seen = set()
        for active in self.screen.active_bindings.values():
            binding = active.binding
            if not binding.description or binding.system or (active.node, binding.action) in seen:
                continue
            if binding.action not in own_actions(active.node):
                continue
            seen.add((active.node, binding.action))
            keys = self.app.get_key_display(binding)
            run = partial(self.app.run_action, binding.action, active.node)
            yield binding.description, f"key: {keys}", run

    async def discover(self) -> Hits:
        for name, help_text, run in sorted(self._commands(), key=lambda command: command[0]):
            yield DiscoveryHit(name, run, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, run in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), run, help=help_text)
