"""Which mappings a mapping sweep scores, and what prefix sharing saves on them.

Three sources: a list (a plan's `mappings`, a mappings file); the mapping families of
engine.ops.mapping_families (SOLAR DUS, band repeats, MIDAS middle copies, every k-th layer,
keep-ends stretches); and, for small models, every non-decreasing mapping (the source
experiment's set). ``sweep_candidates`` decides: families when asked for, or when the
non-decreasing set is too large to score (2·10^17 mappings of 30 layers at depth 36 — evenly
spread picks of that set are degenerate, e.g. layer 0 repeated for most of the stack).

No torch here: the CLI lists candidates and their prefix-sharing ratio without loading a model
(``widen sweep families``), and engine.grow.sweep scores them.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Sequence
from fractions import Fraction
from math import comb
from pathlib import Path

from engine.errors import WidenError
from engine.ops.mapping_families import (
    FAMILIES,
    FAMILY_NAMES,
    HANDFUL,
    MAX_NON_DECREASING,
    Candidate,
    FamilyError,
    FamilySpec,
    as_spec,
    family_candidates,
    select_candidates,
)

# More non-decreasing mappings than this (32 -> 48 layers has ~10^13) are not all scored: the
# families stand in for them (or, asked for directly, a limit spreads them).
MAX_MAPPINGS = MAX_NON_DECREASING


class SweepError(WidenError, ValueError):
    """A sweep that cannot run as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# every non-decreasing mapping (small models)
#
# Non-decreasing sequences over 0..n-1 are multisets; their lexicographic order has a closed-form
# rank, so a limited, evenly spread selection never enumerates the (possibly astronomic) list.


def _count_non_decreasing(length: int, low: int, num_layers: int) -> int:
    """Non-decreasing sequences of `length` values in low..num_layers-1."""
    values = num_layers - low
    if length == 0:
        return 1
    return comb(values + length - 1, length) if values > 0 else 0


def _unrank(rank: int, length: int, num_layers: int, low: int = 0) -> list[int]:
    """The rank-th (lexicographic) non-decreasing sequence of `length` values >= low."""
    out, asked = [], rank
    for position in range(length):
        remaining = length - position - 1
        for value in range(low, num_layers):
            count = _count_non_decreasing(remaining, value, num_layers)
            if rank < count:
                out.append(value)
                low = value
                break
            rank -= count
    if len(out) != length:
        raise ValueError(f"rank {asked} is past the last non-decreasing sequence of {length} values")
    return out


def _rank(sequence: list[int], num_layers: int) -> int:
    rank, low = 0, 0
    for position, value in enumerate(sequence):
        remaining = len(sequence) - position - 1
        rank += sum(_count_non_decreasing(remaining, v, num_layers) for v in range(low, value))
        low = value
    return rank


def _check_shape(num_layers: int, depth: int, keep_ends: bool) -> None:
    if num_layers < 1:
        raise SweepError(f"the source model has {num_layers} layers — nothing to map")
    if depth < 1:
        raise SweepError(f"depth {depth}: a stacked model needs at least one layer")
    if keep_ends and num_layers > 1 and depth < 2:
        raise SweepError(f"depth {depth} cannot keep both the first and the last source layer — "
                         "use depth >= 2 or --no-keep-ends")


def count_mappings(num_layers: int, depth: int, keep_ends: bool = True) -> int:
    """How many mappings ``non_decreasing_mappings`` enumerates before any limit."""
    _check_shape(num_layers, depth, keep_ends)
    if keep_ends and num_layers > 1:
        return _count_non_decreasing(depth - 2, 0, num_layers)
    return _count_non_decreasing(depth, 0, num_layers)


def stretched_mapping(num_layers: int, depth: int) -> list[int]:
    """The most identity-like mapping: ends kept, the middle stretched evenly (the identity when
    depth == num_layers; [0,1,1,1,2,2,2,3] for 4 -> 8, the source note's choice). The same rule
    as ``map_layers``' keep_ends helper, so a sweep row and a plan's helper agree."""
    from engine.ops.params import KeepEnds, MapLayersParams

    if depth < 2:
        return [0] * depth
    return MapLayersParams(keep_ends=KeepEnds(depth=depth)).resolve(num_layers)


def non_decreasing_mappings(num_layers: int, depth: int, keep_ends: bool = True, limit: int | None = None
                            ) -> list[list[int]]:
    """The generic generator, for small models: non-decreasing mappings of `depth` target layers
    over `num_layers` source layers, in lexicographic order; with `keep_ends` the first and last source layers stay in place (the
    source experiment's rule: others did worse). `limit` keeps that many, evenly spread over the
    full list, always including ``stretched_mapping`` (the identity when depth == num_layers)."""
    total = count_mappings(num_layers, depth, keep_ends)
    fixed_ends = keep_ends and num_layers > 1
    middle = depth - 2 if fixed_ends else depth

    def mapping_at(rank: int) -> list[int]:
        inner = _unrank(rank, middle, num_layers)
        return [0, *inner, num_layers - 1] if fixed_ends else inner

    if limit is not None and limit < 1:
        raise SweepError(f"limit {limit}: keep at least one mapping")
    if limit is None or limit >= total:
        if total > MAX_MAPPINGS:
            raise SweepError(f"{total:,} mappings of {depth} layers over {num_layers} — too many to score "
                             f"all: pass a limit (--limit 50) or a mappings file")
        return [mapping_at(r) for r in range(total)]
    # exact: in floats, i·(total−1)/(limit−1) rounds past the last rank once total is large (2·10^17
    # mappings of 30 layers at depth 31), and that rank unranks to a shorter mapping
    ranks = sorted({round(Fraction(i * (total - 1), max(limit - 1, 1))) for i in range(limit)})
    stretched = stretched_mapping(num_layers, depth)
    inner = stretched[1:-1] if fixed_ends else stretched
    anchor = _rank(inner, num_layers)
    if anchor not in ranks:  # replace the nearest pick by it: the count stays `limit`
        nearest = min(ranks, key=lambda r: (abs(r - anchor), r))
        ranks = sorted(set(ranks) - {nearest} | {anchor})
    return [mapping_at(r) for r in ranks]


# ---------------------------------------------------------------------------------------------
# what a sweep scores by default


def resolve_families(families: Iterable[FamilySpec | str], where: str = "--family") -> list[FamilySpec]:
    """Family specs (``"dus"``, ``"band:times=3"``, ``"all"`` for every family), each once, in
    the order given; SweepError naming `where` for an unknown name or parameter."""
    out: list[FamilySpec] = []
    for item in families:
        try:
            specs = [as_spec(f.name) for f in FAMILIES] if item == "all" else [as_spec(item, where)]
        except FamilyError as e:
            raise SweepError(str(e)) from None
        out += [spec for spec in specs if spec not in out]
    return out


def uses_families(num_layers: int, depth: int, keep_ends: bool = True, families: Sequence | None = None) -> bool:
    """Whether a sweep draws from the families: when given, or when growing the model and every
    non-decreasing mapping is too many to score (not growing, the families have little to say:
    a limit spreads the non-decreasing ones)."""
    return bool(families) or (depth > num_layers and count_mappings(num_layers, depth, keep_ends) > MAX_MAPPINGS)


def sweep_candidates(num_layers: int, depth: int, keep_ends: bool = True, limit: int | None = None,
                     families: Sequence[FamilySpec | str] | None = None, per_family: int | None = None,
                     where: str = "--family") -> list[Candidate]:
    """The mappings a sweep scores when none are given, with their family and label.

    With `families` (or, growing, when the non-decreasing set is larger than MAX_MAPPINGS: then
    every family), a handful of each family's mappings — `per_family` each (default HANDFUL), `limit`
    in all, canonical settings first (``select_candidates``). Otherwise the non-decreasing set,
    evenly spread down to `limit`. Grouped by family, each group sorted: the prefix walk's order."""
    _check_shape(num_layers, depth, keep_ends)
    if limit is not None and limit < 1:
        raise SweepError(f"limit {limit}: keep at least one mapping")
    if per_family is not None and per_family < 1:
        raise SweepError(f"per_family {per_family}: keep at least one mapping of each family")
    if not uses_families(num_layers, depth, keep_ends, families):
        return [Candidate(tuple(m)) for m in non_decreasing_mappings(num_layers, depth, keep_ends, limit)]
    specs = resolve_families(families or FAMILY_NAMES, where)
    for spec in specs if families else ():
        if not family_candidates(spec, num_layers, depth):
            raise SweepError(f"{where}: {spec} gives no mapping of {depth} layers over {num_layers} — "
                             f"{spec.name} fits {spec.family.fits}; pick another family or depth")
    chosen = select_candidates(specs, num_layers, depth, per_family or HANDFUL, limit)
    if not chosen:  # no family fits this shape (two source layers, say): spread the generic ones
        return [Candidate(tuple(m)) for m in non_decreasing_mappings(num_layers, depth, keep_ends, limit)]
    return chosen


def default_mappings(num_layers: int, depth: int, keep_ends: bool = True, limit: int | None = None,
                     families: Sequence[FamilySpec | str] | None = None, per_family: int | None = None
                     ) -> list[list[int]]:
    """``sweep_candidates``' mappings as plain lists, sorted (the prefix walk's order)."""
    return sorted(list(c.mapping) for c in sweep_candidates(num_layers, depth, keep_ends, limit, families,
                                                            per_family))


# ---------------------------------------------------------------------------------------------
# given mappings (a plan's list, a mappings file)


def validate_mappings(mappings, num_layers: int, depth: int, where: str = "mappings") -> list[list[int]]:
    """Mappings as lists of ints, checked (length == depth, indices in range), duplicates dropped."""
    if not isinstance(mappings, list) or not mappings:
        raise SweepError(f"{where}: expected a non-empty list of mappings, e.g. [[0, 1, 1, 2, 2, 3]]")
    out, seen = [], set()
    for i, mapping in enumerate(mappings):
        label = f"{where}: mapping {i} ({json.dumps(mapping)})"
        if not isinstance(mapping, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in mapping):
            raise SweepError(f"{label} is not a list of layer indices — write it as [0, 1, 2, 3]")
        if len(mapping) != depth:
            raise SweepError(f"{label} has {len(mapping)} entries — every mapping needs {depth} (the depth); "
                             f"fix the mapping or the depth")
        bad = sorted({x for x in mapping if not 0 <= x < num_layers})
        if bad:
            raise SweepError(f"{label} uses layer {', '.join(map(str, bad))} — the source model has layers "
                             f"0..{num_layers - 1}")
        if tuple(mapping) not in seen:
            seen.add(tuple(mapping))
            out.append(list(mapping))
    return out


def load_mappings(path: Path | str, num_layers: int, depth: int) -> list[list[int]]:
    """Mappings from a JSON file (a list of lists, or {"mappings": [...]}) or a TOML file
    (``mappings = [[0, 1, 1, 2], ...]``), validated against the source depth and `depth`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SweepError(f"{path}: cannot read the mappings file ({e.strerror or e}) — give an existing "
                         "JSON or TOML file") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise SweepError(f"{path}: not valid {kind} ({str(e).splitlines()[0][:120]}) — write "
                         + ("mappings = [[0, 1, 2, 3], ...]" if kind == "TOML" else "[[0, 1, 2, 3], ...]")) from None
    if isinstance(data, dict):
        if "mappings" not in data:
            raise SweepError(f"{path}: no 'mappings' key — write mappings = [[0, 1, 2, 3], ...]")
        data = data["mappings"]
    return validate_mappings(data, num_layers, depth, where=str(path))



def spread(items: list, limit: int | None) -> list:
    """At most `limit` items, evenly spread over the list (first and last kept)."""
    if limit is None or limit >= len(items):
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / max(limit - 1, 1)) for i in range(limit)})
    return [items[i] for i in picks]


# ---------------------------------------------------------------------------------------------
# one depth per sweep; what prefix sharing saves


def one_depth(mappings: Sequence[Sequence[int]]) -> int | None:
    """The depth every mapping has (None for no mappings); SweepError naming the first mapping of
    another depth — a sweep compares stacks of one depth."""
    if not mappings:
        return None
    depth = len(mappings[0])
    for i, mapping in enumerate(mappings):
        if len(mapping) != depth:
            raise SweepError(f"mappings of different depths [{min(depth, len(mapping))}, "
                             f"{max(depth, len(mapping))}]: mapping {i} has {len(mapping)} layers, mapping 0 "
                             f"has {depth} — sweep one depth at a time")
    return depth


def block_forwards(mappings: Iterable[Sequence[int]]) -> dict[str, int]:
    """Block calls per batch to score `mappings`: "naive" runs each from layer 0, "shared" once per
    distinct prefix (the lexicographic walk of engine.grow.sweep keeps the hidden states along its
    path, so a prefix two mappings share is computed once)."""
    unique = {tuple(m) for m in mappings}
    return {"naive": sum(len(m) for m in unique),
            "shared": len({m[:k] for m in unique for k in range(1, len(m) + 1)})}


def sharing_ratio(mappings: Iterable[Sequence[int]]) -> float | None:
    """Block forwards without sharing / with it (None for no mappings): the speed-up prefix
    sharing can give at most, since nearly all of a sweep's time is block forwards."""
    calls = block_forwards(mappings)
    return calls["naive"] / calls["shared"] if calls["shared"] else None
