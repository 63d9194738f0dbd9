"""Mapping families (engine.ops.mapping_families) and what a sweep draws from them
(engine.grow.sweep_mappings): well-formed mappings for any shape, the registry as the docs' table,
specs and their one-line errors, every depth of a 30-block model, and prefix sharing. No torch,
no model: all of it is integer arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.grow.sweep_mappings import (
    SweepError,
    block_forwards,
    default_mappings,
    non_decreasing_mappings,
    one_depth,
    sharing_ratio,
    stretched_mapping,
    sweep_candidates,
)
from engine.ops.mapping_families import (
    FAMILIES,
    FAMILY_NAMES,
    HANDFUL,
    FamilyError,
    families_markdown,
    family_candidates,
    parse_spec,
    select_candidates,
)
from engine.ops.params import DepthUpScaling, KeepEnds, MapLayersParams

ROOT = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------------------------------------
# the registry


def test_the_registry_describes_each_family_once_and_the_readme_shows_it():
    assert len(set(FAMILY_NAMES)) == len(FAMILIES) == 5
    for family in FAMILIES:
        assert family.description and "\n" not in family.description and family.params and family.fits
        assert all(p.help and "\n" not in p.help for p in family.params)
    table = families_markdown()
    assert len(table.splitlines()) == 2 + len(FAMILIES)
    assert table in (ROOT / "docs" / "mapping-sweep.md").read_text(), "the docs' table: paste families_markdown()"


@settings(max_examples=300, deadline=None)
@given(d=st.integers(1, 48), data=st.data())
def test_every_familys_mappings_are_well_formed(d, data):
    """Any family, any shape: exactly `depth` target layers, each a source layer; when growing,
    the first and last source layers at the ends and no source layer left out."""
    depth = data.draw(st.integers(1, 2 * d + 8), label="depth")
    for family in FAMILIES:
        candidates = family_candidates(family.name, d, depth)
        assert len({c.mapping for c in candidates}) == len(candidates)
        for c in candidates:
            assert len(c.mapping) == depth, (family.name, c.label)
            assert all(0 <= x < d for x in c.mapping), (family.name, c.label)
            assert c.family == family.name and c.label
            if depth > d:
                assert c.mapping[0] == 0 and c.mapping[-1] == d - 1, (family.name, c.label)
                assert set(c.mapping) == set(range(d)), (family.name, c.label)


@pytest.mark.parametrize("d,depth", [(4, 6), (4, 8), (30, 31), (30, 36), (30, 60), (32, 48)])
def test_families_agree_with_map_layers_helpers_and_mean_what_they_say(d, depth):
    # stretch ends 1 is map_layers' keep_ends; SOLAR's symmetric dus is map_layers' dus
    assert family_candidates("stretch", d, depth)[0].mapping == tuple(stretched_mapping(d, depth))
    assert list(family_candidates("stretch", d, depth)[0].mapping) == \
        MapLayersParams(keep_ends=KeepEnds(depth=depth)).resolve(d)
    if (2 * d - depth) % 2 == 0:
        solar = MapLayersParams(dus=DepthUpScaling(drop=(2 * d - depth) // 2)).resolve(d)
        assert list(family_candidates("dus", d, depth)[0].mapping) == solar


def test_examples_of_each_family():
    assert family_candidates("dus", 32, 48)[0].mapping == (*range(24), *range(8, 32))  # SOLAR 10.7B's shape
    assert family_candidates("dus", 32, 48)[0].label == "dus drop 8+8"
    band = {c.label: c.mapping for c in family_candidates("band:times=2", 4, 6)}
    assert band == {"band 1:3 ×2": (0, 1, 2, 1, 2, 3), "band 0:2 ×2": (0, 1, 0, 1, 2, 3),
                    "band 2:4 ×2": (0, 1, 2, 3, 2, 3)}
    assert family_candidates("band:times=3", 4, 6)[0].mapping in {(0, 1, 1, 1, 2, 3), (0, 1, 2, 2, 2, 3)}
    assert {c.label.split()[-1] for c in family_candidates("band", 4, 6)} == {"×2", "×3"}  # each number of copies
    midas = {c.label: c.mapping for c in family_candidates("midas", 6, 8)}
    assert midas == {"midas 2:4 ×2": (0, 1, 2, 3, 2, 3, 4, 5), "midas 2:3 ×3": (0, 1, 2, 2, 2, 3, 4, 5)}
    every = family_candidates("every_kth", 6, 8)  # stride 3: two repeats, phases 0..2, centred first
    assert every[0].mapping == (0, 1, 1, 2, 3, 4, 4, 5) and every[0].label == "every 3rd from 1"
    assert {c.mapping for c in every} == {(0, 0, 1, 2, 3, 3, 4, 5), (0, 1, 1, 2, 3, 4, 4, 5),
                                          (0, 1, 2, 2, 3, 4, 5, 5)}
    assert [c.label for c in family_candidates("stretch", 8, 10)] == ["stretch ends 1", "stretch ends 2",
                                                                      "stretch ends 3"]


def test_shapes_a_family_does_not_fit_give_no_mapping():
    assert family_candidates("dus", 30, 61) == [] and family_candidates("dus", 30, 30) == []
    assert family_candidates("every_kth", 30, 61) == []
    assert family_candidates("band:times=5", 30, 36) == []  # 6 extra layers are not 4 copies of a band
    assert family_candidates("stretch", 2, 5) == []
    assert [c.label for c in family_candidates("band:times=3,start=4", 30, 36)] == ["band 4:7 ×3"]


# ---------------------------------------------------------------------------------------------
# specs


@pytest.mark.parametrize("text,expected", [
    ("bands", "no mapping family 'bands' — did you mean 'band'?"),
    ("band:width=3", "band has no parameter 'width' — its parameters: start, times"),
    ("band:times=x", "band:times needs a whole number ≥ 0, e.g. band:times=2"),
    ("band:times", "band:times needs a whole number"),
    ("", "give a family name"),
])
def test_bad_specs_are_one_line_naming_the_field(text, expected):
    with pytest.raises(FamilyError) as info:
        parse_spec(text, where="--family")
    message = str(info.value)
    assert message.startswith("--family: ") and expected in message and "\n" not in message


def test_specs_round_trip():
    spec = parse_spec(" band : times = 3 , start=4 ")
    assert spec.name == "band" and dict(spec.fixed) == {"times": 3, "start": 4} and str(spec) == "band:start=4,times=3"
    assert parse_spec(str(spec)) == spec


# ---------------------------------------------------------------------------------------------
# what a sweep scores


def test_small_models_keep_every_non_decreasing_mapping():
    assert default_mappings(4, 8) == non_decreasing_mappings(4, 8)
    assert all(c.family == "" for c in sweep_candidates(4, 8))


def test_large_spaces_draw_a_handful_of_each_family_instead_of_degenerate_spread_picks():
    candidates = sweep_candidates(30, 36)
    families = [c.family for c in candidates]
    assert set(families) == set(FAMILY_NAMES) and all(families.count(f) <= HANDFUL for f in FAMILY_NAMES)
    assert families == sorted(families, key=FAMILY_NAMES.index)  # grouped by family ...
    for name in FAMILY_NAMES:  # ... each group sorted, the prefix walk's order
        group = [c.mapping for c in candidates if c.family == name]
        assert group == sorted(group)
    assert len({c.mapping for c in candidates}) == len(candidates)
    assert tuple(stretched_mapping(30, 36)) in {c.mapping for c in candidates}
    # the old picks, evenly spread over 2·10^17 non-decreasing mappings, repeat layer 0 for most of the stack
    spread_picks = non_decreasing_mappings(30, 36, limit=len(candidates))
    assert max(m.count(0) for m in spread_picks) > 20
    assert max(c.mapping.count(0) for c in candidates) <= 2


def test_limit_and_per_family_and_named_families():
    limited = sweep_candidates(30, 36, limit=5)
    assert [c.family for c in limited] == list(FAMILY_NAMES)  # one of each: canonical settings first
    assert [c.label for c in limited][:2] == ["stretch ends 1", "dus drop 12+12"]
    assert len(sweep_candidates(30, 36, per_family=2)) == 2 * len(FAMILY_NAMES)
    band = sweep_candidates(30, 36, families=["band:times=3"], per_family=100)
    assert len(band) == 28 and {c.label.split()[-1] for c in band} == {"×3"}
    assert sweep_candidates(4, 6, families=["all"], per_family=1)[0].family == "stretch"  # families on a small model
    with pytest.raises(SweepError, match=r"^--family: band:times=5 gives no mapping of 36 layers over 30 — band fits"):
        sweep_candidates(30, 36, families=["dus", "band:times=5"])
    with pytest.raises(SweepError, match="no mapping family 'dusk'"):
        sweep_candidates(30, 36, families=["dusk"])


def test_select_takes_families_in_turn_and_keeps_a_shared_mapping_once():
    chosen = select_candidates(["dus", "midas", "band"], 30, 36, per_family=None, limit=None)
    mappings = [c.mapping for c in chosen]
    assert len(mappings) == len(set(mappings))
    # symmetric DUS = the middle band twice = MIDAS ×2: kept once, under the first family
    solar = family_candidates("dus", 30, 36)[0].mapping
    assert [c.family for c in chosen if c.mapping == solar] == ["dus"]


@pytest.mark.parametrize("depth", range(31, 61))
def test_every_depth_from_d_plus_1_to_2d_of_a_30_block_model(depth):
    """SmolLM2-135M's 30 blocks grown to 31..60. Some of 31..34 failed with 'mappings of
    different depths': picks spread over the ~10^16..10^17 ranks of the non-decreasing set were
    computed in floats, rounded past the last rank and unranked to a shorter mapping. The ranks
    are exact now, and families stand in for that set; every source of mappings, and the check
    that raised the error, get mappings of exactly `depth` layers."""
    sources = {"auto": sweep_candidates(30, depth), "limited": sweep_candidates(30, depth, limit=20)}
    sources |= {name: sweep_candidates(30, depth, families=[name]) for name in FAMILY_NAMES
                if family_candidates(name, 30, depth)}
    for where, candidates in sources.items():
        mappings = [c.mapping for c in candidates]
        assert mappings and one_depth(mappings) == depth, where
        assert all(0 <= x < 30 for m in mappings for x in m), where
    limited = [c.mapping for c in sources["limited"]]
    assert len(limited) <= 20 and tuple(stretched_mapping(30, depth)) in limited
    for limit in (2, 5, 7, 20):  # the generic generator, asked directly: exact ranks
        assert one_depth(non_decreasing_mappings(30, depth, limit=limit)) == depth


def test_one_depth_names_the_first_mapping_of_another_depth():
    assert one_depth([]) is None and one_depth([[0, 1], [1, 0]]) == 2
    with pytest.raises(SweepError) as info:
        one_depth([[0, 1, 2], [0, 1, 1], [0, 1]])
    assert str(info.value) == ("mappings of different depths [2, 3]: mapping 2 has 2 layers, mapping 0 has 3 "
                               "— sweep one depth at a time")


# ---------------------------------------------------------------------------------------------
# prefix sharing


def test_prefix_sharing_counts():
    calls = block_forwards([[0, 1, 2], [0, 1, 1], [0, 2, 2], [0, 1, 2]])  # a duplicate is scored once
    assert calls == {"naive": 9, "shared": 6}  # 0 | 0,1 0,2 | 0,1,2 0,1,1 0,2,2
    assert sharing_ratio([[0, 1, 2], [0, 1, 1], [0, 2, 2]]) == 1.5
    assert sharing_ratio([]) is None


@pytest.mark.parametrize("family", ["dus", "band", "midas"])
def test_prefix_sharing_pays_on_structured_families_of_a_30_block_model(family):
    for per_family in (HANDFUL, None):  # the default handful, and the family's whole range
        mappings = [c.mapping for c in select_candidates([family], 30, 36, per_family=per_family)]
        calls = block_forwards(mappings)
        assert calls["shared"] < calls["naive"], family
        assert sharing_ratio(mappings) > 1.2
    # the sweep's default set shares far more than the evenly spread picks it replaces (~1.0×)
    families = [c.mapping for c in sweep_candidates(30, 36)]
    spread_picks = non_decreasing_mappings(30, 36, limit=len(families))
    assert sharing_ratio(families) > 1.4 > 1.1 > sharing_ratio(spread_picks)


def test_listing_the_families_and_a_shapes_sharing_ratio_needs_no_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom widen_tui.cli import app\n"
            "out = CliRunner().invoke(app, ['sweep', 'families', '--layers', '30', '--depth', '36'])\n"
            "assert out.exit_code == 0, out.output\nprint(out.output)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    assert "dus drop 12+12" in proc.stdout and "stretch ends 1" in proc.stdout
    assert "prefix sharing: 644 block forwards per batch instead of 936 from layer 0 — ratio 1.45×" in \
        " ".join(proc.stdout.split())
