"""The names of what widen ships: built-in corpora by task kind. One list, read by the data
loaders that build them, the plan schema and checker, and the plan builder. Imports nothing, so
any of them can read it cheaply."""

TEXT_CORPORA = ("pydoc", "stdlib-python")            # engine.train.data builds these
GENERATION_CORPORA = ("docstring-code",)             # engine.train.generation builds these


def sources(corpora: tuple[str, ...]) -> tuple[str, ...]:
    """`builtin:<name>` task sources of `corpora`."""
    return tuple(f"builtin:{name}" for name in corpora)
