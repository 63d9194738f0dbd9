"""Layer-mapping families: the stackings a researcher means when growing a d-block model to D.

A mapping lists, for each target layer, the source layer it runs ([0, 1, 2, 2, 3] repeats layer
2). Each family turns (d, D, its parameters) into one well-formed mapping and lists every
parameter setting that fits a given (d, D). ``FAMILIES`` is the one registry: name, parameters,
the depths it fits, generator and a one-line description. The mapping sweep picks a handful of
settings per family (``family_candidates``), plans name families in `[sweep] families` and
`widen sweep mapping --family`, and docs/mapping-sweep.md's table is ``families_markdown()``.

A family spec is ``name`` or ``name:param=value,param=value`` (``band:times=3``): fixed
parameters, the others swept over their range.

Pure integer arithmetic, no torch: the CLI's help, the plan's schema and checks read it too. It
sits beside the operators' schemas (rank 2) because the plan (rank 3) validates family names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.errors import WidenError

# Settings per family a sweep scores when no limit says otherwise: enough to see a trend
# (spread over the family's range, its canonical setting first), few enough to read.
HANDFUL = 6
# Above this many non-decreasing mappings (every one scored for small models) a sweep draws from
# the families instead: evenly spread picks of a huge set are degenerate. Here, below the plan,
# so that the plan's checks and engine.grow.sweep_mappings read one number.
MAX_NON_DECREASING = 1000


class FamilyError(WidenError, ValueError):
    """A family spec that names no family or a wrong parameter; one line naming the field."""


@dataclass(frozen=True)
class Param:
    name: str
    help: str


@dataclass(frozen=True)
class Family:
    """One family of layer mappings. `settings(d, D, fixed)` lists every parameter setting that
    fits (d, D) — honouring `fixed` — canonical first, then in the family's natural order;
    `mapping(d, D, **setting)` builds one; `label(d, D, setting)` names it in a table."""

    name: str
    description: str
    params: tuple[Param, ...]
    fits: str
    settings: Callable[[int, int, dict], list[dict]]
    mapping: Callable[..., list[int]]
    label: Callable[[int, int, dict], str]

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


@dataclass(frozen=True, order=True)
class Candidate:
    """One mapping a sweep scores, with where it came from (family "" for a generic mapping)."""

    mapping: tuple[int, ...]
    family: str = field(default="", compare=False)
    label: str = field(default="", compare=False)
    params: tuple[tuple[str, int], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class FamilySpec:
    """A family by name with some parameters fixed (``band:times=3``)."""

    name: str
    fixed: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.fixed) if self.fixed else "")

    @property
    def family(self) -> Family:
        return FAMILIES_BY_NAME[self.name]


# ---------------------------------------------------------------------------------------------
# the families, each: settings (canonical first), generator, label


def _centered_first(settings: list[dict], key: str, center: int) -> list[dict]:
    """The settings with the one whose `key` is nearest `center` moved to the front."""
    if not settings:
        return settings
    best = min(range(len(settings)), key=lambda i: (abs(settings[i][key] - center), i))
    return [settings[best], *settings[:best], *settings[best + 1:]]


def _stretch_settings(d: int, depth: int, fixed: dict) -> list[dict]:
    # at least one interior layer on both sides, or there is nothing to stretch
    ends = range(1, (min(d, depth) - 1) // 2 + 1)
    return [{"ends": e} for e in ends]


def _stretch(d: int, depth: int, ends: int) -> list[int]:
    # the same floor rule as map_layers' keep_ends helper (ends = 1 is exactly it)
    inner_source, inner_target = d - 2 * ends, depth - 2 * ends
    middle = [ends + (j * inner_source) // inner_target for j in range(inner_target)]
    return [*range(ends), *middle, *range(d - ends, d)]


def _dus_settings(d: int, depth: int, fixed: dict) -> list[dict]:
    drop = 2 * d - depth  # dropped at the seam, in all
    if not d < depth <= 2 * d:
        return []
    # each copy keeps at least one layer; SOLAR drops the same number on both sides
    settings = [{"drop_end": m} for m in range(max(0, drop - d + 1), min(drop, d - 1) + 1)]
    return _centered_first(settings, "drop_end", drop // 2)


def _dus(d: int, depth: int, drop_end: int) -> list[int]:
    drop_start = 2 * d - depth - drop_end
    return [*range(d - drop_end), *range(drop_start, d)]


def _width(d: int, depth: int, times: int) -> int:
    return (depth - d) // (times - 1)


def _band_width(d: int, depth: int, times: int) -> int | None:
    """The width of a band repeated `times` times that adds depth − d layers, if one does."""
    extra = depth - d
    if times < 2 or extra < 1 or extra % (times - 1):
        return None
    width = extra // (times - 1)
    return width if width <= d else None


def _band_settings(d: int, depth: int, fixed: dict) -> list[dict]:
    # every number of copies that fits, not only 2: two copies of a band are exactly a DUS seam
    # (dus drop m+n = band n:d-m ×2), so the family's own ground is the thinner, repeated bands
    settings = []
    for times in [fixed["times"]] if "times" in fixed else range(2, depth - d + 2):
        width = _band_width(d, depth, times)
        if width is not None:
            settings += [{"start": a, "times": times} for a in range(d - width + 1)]
    if not settings:
        return []
    # canonical: the centred band, twice (or as few times as fit)
    centre = (d - _width(d, depth, settings[0]["times"])) // 2
    return _centered_first(settings, "start", centre)


def _band(d: int, depth: int, start: int, times: int) -> list[int]:
    width = _width(d, depth, times)
    band = list(range(start, start + width))
    return [*range(start), *band * times, *range(start + width, d)]


def _midas_settings(d: int, depth: int, fixed: dict) -> list[dict]:
    return [{"times": r} for r in range(2, depth - d + 2) if _band_width(d, depth, r) is not None]


def _midas_start(d: int, depth: int, times: int) -> int:
    return (d - (depth - d) // (times - 1)) // 2  # the band's start that centres it


def _midas(d: int, depth: int, times: int) -> list[int]:
    return _band(d, depth, _midas_start(d, depth, times), times)


def _every_kth_settings(d: int, depth: int, fixed: dict) -> list[dict]:
    extra = depth - d  # one repeat per chosen layer
    if not 1 <= extra <= d:
        return []
    stride = fixed.get("stride", d // extra)  # the widest stride whose repeats all fit
    if stride < 1:
        return []
    last_phase = d - 1 - (extra - 1) * stride
    settings = [{"stride": stride, "phase": p} for p in range(last_phase + 1)]
    return _centered_first(settings, "phase", last_phase // 2)


def _every_kth(d: int, depth: int, stride: int, phase: int) -> list[int]:
    repeated = set(range(phase, phase + (depth - d) * stride, stride))
    return [layer for j in range(d) for layer in ([j, j] if j in repeated else [j])]


def _span(d: int, depth: int, start: int, times: int) -> str:
    """A repeated band for a label: layers start..stop-1 as `start:stop ×times`."""
    return f"{start}:{start + _width(d, depth, times)} ×{times}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


FAMILIES: tuple[Family, ...] = (
    Family("stretch", "first and last `ends` layers kept in place, the interior stretched evenly to D",
           (Param("ends", "source layers kept once at each end (1: map_layers' keep_ends)"),),
           "d ≥ 3 and D ≥ 3", _stretch_settings, _stretch, lambda d, D, s: f"stretch ends {s['ends']}"),
    Family("dus", "SOLAR depth up-scaling: two copies, the first without its last drop_end layers, "
                  "the second without its first 2d − D − drop_end",
           (Param("drop_end", "layers dropped from the end of the first copy (SOLAR: half of 2d − D)"),),
           "d < D ≤ 2d", _dus_settings, _dus,
           lambda d, D, s: f"dus drop {s['drop_end']}+{2 * d - D - s['drop_end']}"),
    Family("midas", "MIDAS-style middle copies: the middle band repeated `times` times, the rest once",
           (Param("times", "copies of the middle band; its width is (D − d) / (times − 1)"),),
           "D > d, (D − d) divisible by times − 1", _midas_settings, _midas,
           lambda d, D, s: f"midas {_span(d, D, _midas_start(d, D, s['times']), s['times'])}"),
    Family("band", "repeat the band [start, start + w): layers before it, the band `times` times, the rest",
           (Param("start", "first layer of the band"),
            Param("times", "copies of the band (default: each that fits); its width w is (D − d) / (times − 1)")),
           "D > d, w = (D − d) / (times − 1) a whole number ≤ d", _band_settings, _band,
           lambda d, D, s: f"band {_span(d, D, s['start'], s['times'])}"),
    Family("every_kth", "repeat every stride-th layer from `phase`: D − d layers run twice, spread over the stack",
           (Param("stride", "layers between two repeated ones (default: d // (D − d), the widest)"),
            Param("phase", "the first repeated layer")),
           "d < D ≤ 2d", _every_kth_settings, _every_kth,
           lambda d, D, s: f"every {_ordinal(s['stride'])} from {s['phase']}"),
)
FAMILIES_BY_NAME = {f.name: f for f in FAMILIES}
FAMILY_NAMES = tuple(FAMILIES_BY_NAME)


# ---------------------------------------------------------------------------------------------
# specs, candidates, the handful a sweep scores


def parse_spec(text: str, where: str = "--family") -> FamilySpec:
    """``name`` or ``name:param=value,...`` as a FamilySpec; FamilyError (naming `where`) if the
    name or a parameter is unknown or a value is not a whole number (no `where`: no prefix, for
    pydantic, which names the field itself)."""
    at = f"{where}: " if where else ""
    if not isinstance(text, str) or not text.strip():
        raise FamilyError(f"{at}give a family name — one of {', '.join(FAMILY_NAMES)}")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in FAMILIES_BY_NAME:
        close = difflib.get_close_matches(name, FAMILY_NAMES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise FamilyError(f"{at}no mapping family '{name}' — {hint}families: {', '.join(FAMILY_NAMES)}")
    family = FAMILIES_BY_NAME[name]
    fixed: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = (s.strip() for s in part.partition("="))
        if key not in family.param_names:
            raise FamilyError(f"{at}{name} has no parameter '{key}' — its parameters: "
                              f"{', '.join(family.param_names)}")
        try:
            number = int(value) if eq else None
        except ValueError:
            number = None
        if number is None or number < 0:
            raise FamilyError(f"{at}{name}:{key} needs a whole number ≥ 0, e.g. {name}:{key}=2")
        fixed[key] = number
    return FamilySpec(name, tuple(sorted(fixed.items())))


def as_spec(spec: FamilySpec | str, where: str = "--family") -> FamilySpec:
    return spec if isinstance(spec, FamilySpec) else parse_spec(spec, where)


def spread_order(count: int) -> list[int]:
    """Indices 0..count-1, ordered so that every prefix is spread evenly over the range (ends,
    middle, quarters, ...): a sweep that keeps the first k sees the whole range coarsely."""
    order, seen = [], set()
    picks = 2
    while len(order) < count:
        for i in range(picks):
            index = round(i * (count - 1) / max(picks - 1, 1))
            if index not in seen:
                seen.add(index)
                order.append(index)
        picks = 2 * picks - 1
    return order


def family_candidates(spec: FamilySpec | str, d: int, depth: int) -> list[Candidate]:
    """Every mapping of `spec`'s family that fits (d, depth): its canonical setting first, then
    the rest in an evenly spread order (see ``spread_order``); duplicates dropped."""
    spec = as_spec(spec)
    family, fixed = spec.family, dict(spec.fixed)
    settings = [s for s in family.settings(d, depth, fixed) if all(s.get(k) == v for k, v in fixed.items())]
    if not settings:
        return []
    ordered = [settings[0]] + [settings[1:][i] for i in spread_order(len(settings) - 1)]
    out, seen = [], set()
    for setting in ordered:
        mapping = tuple(family.mapping(d, depth, **setting))
        if mapping not in seen:
            seen.add(mapping)
            out.append(Candidate(mapping, family.name, family.label(d, depth, setting),
                                 tuple(sorted(setting.items()))))
    return out


def select_candidates(specs: Iterable[FamilySpec | str], d: int, depth: int, per_family: int | None = HANDFUL,
                      limit: int | None = None) -> list[Candidate]:
    """A handful of each family's mappings (at most `per_family` each, `limit` in all), taken
    round-robin so every family is represented even under a small limit; a mapping two families
    share (symmetric DUS = MIDAS ×2) is kept once, under the family whose turn reaches it first.
    Grouped by family, each group sorted (the prefix walk's order)."""
    pools = [family_candidates(spec, d, depth) for spec in specs]
    taken: list[list[Candidate]] = [[] for _ in pools]
    positions = [0] * len(pools)
    seen: set[tuple[int, ...]] = set()
    total = 0
    while limit is None or total < limit:
        progressed = False
        for i, pool in enumerate(pools):
            if limit is not None and total >= limit:
                break
            if per_family is not None and len(taken[i]) >= per_family:
                continue
            while positions[i] < len(pool) and pool[positions[i]].mapping in seen:
                positions[i] += 1
            if positions[i] < len(pool):
                candidate = pool[positions[i]]
                seen.add(candidate.mapping)
                taken[i].append(candidate)
                positions[i] += 1
                total += 1
                progressed = True
        if not progressed:
            break
    return [c for group in taken for c in sorted(group)]


def families_markdown() -> str:
    """The registry as a Markdown table (the README's is this text)."""
    lines = ["| family | parameters | fits | what it builds |", "|---|---|---|---|"]
    for f in FAMILIES:
        params = "; ".join(f"`{p.name}`: {p.help}" for p in f.params)
        lines.append(f"| `{f.name}` | {params} | {f.fits} | {f.description} |")
    return "\n".join(lines)
