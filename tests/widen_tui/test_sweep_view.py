"""The mapping sweep's views at real depth (30 source layers, 36-60 target layers): the terminal
table keeps every perplexity on screen at 80 and 100 columns (only the layer strip shrinks), and
`widen plot`'s figure draws every target layer with the family labels."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from engine.grow.sweep_mappings import sweep_candidates
from tests.widen_tui.views.test_plot import assert_png
from widen_tui.sweeps import heatmap, layer_strip, speedup_line
from widen_tui.views import plot


def fake_sweep(layers: int, depth: int) -> dict:
    """A sweep result as `widen sweep mapping --json` writes it, perplexities made up."""
    rows = [{"mapping": list(c.mapping), "ppl": 20.0 + i * 1.25, "loss": 3.0, "reference": False,
             "family": c.family, "label": c.label} for i, c in enumerate(sweep_candidates(layers, depth))]
    rows.insert(3, {"mapping": None, "ppl": 23.5, "loss": 2.9, "reference": True, "family": None, "label": None})
    return {"model": "HuggingFaceTB/SmolLM2-135M", "task": "builtin:pydoc", "depth": depth, "source_layers": layers,
            "rows": rows, "speedup": None, "cached_s": 1.0, "naive_s": None, "sharing_ratio": 1.46,
            "block_calls": {"cached": 639, "naive": 936}}


def rendered(renderable, width: int) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 100])
@pytest.mark.parametrize("depth", [36, 60])
def test_the_table_keeps_perplexity_and_labels_on_screen(width, depth):
    sweep = fake_sweep(30, depth)
    text = rendered(heatmap(sweep), width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    for row in sweep["rows"]:
        assert f"{row['ppl']:.3f}" in text, (width, depth, row)
    body = [line for line in lines if "│" in line]
    assert body[0].split("│")[1].strip() == "1" and "stretch ends" in text and "dus drop" in text
    assert "ref" in body[3] and "unexpanded" in body[3] and "1.000" in body[3]
    strips = [line.split("│")[5].strip() for line in body]
    assert strips[3].startswith("01234567890123456789")  # the reference: source layers in order
    if depth == 36:  # the strip fits: one character per target layer
        assert all(len(s) == depth for i, s in enumerate(strips) if i != 3)
    else:  # 60 layers: cut on its right, marked
        assert all(s.endswith("…") for i, s in enumerate(strips) if i != 3)


def test_the_strip_is_one_coloured_character_per_target_layer():
    strip = layer_strip([0, 1, 2, 2, 29], 30)
    assert strip.plain == "01229"
    styles = [span.style for span in strip.spans]
    assert len(styles) == 5 and styles[2] == styles[3] != styles[0] != styles[4]
    assert styles[0].bgcolor.triplet != styles[4].bgcolor.triplet  # dark for layer 0, light for the last
    assert str(styles[0].color.name) == "white" and str(styles[4].color.name) == "black"


def test_the_sharing_ratio_is_printed():
    assert "639 block calls, 1.46× fewer than from layer 0" in speedup_line(fake_sweep(30, 36))


def test_the_figure_draws_30_to_36_layers_with_family_labels(tmp_path):
    sweep = fake_sweep(30, 36)
    source = tmp_path / "smollm2-36.json"
    source.write_text(json.dumps(sweep))
    assert_png(plot.mapping_figure(json.loads(source.read_text()), tmp_path / "mapping.png", title="30 -> 36"),
               min_bytes=40_000)
    from widen_tui.views.plot import _row_label

    assert _row_label(sweep["rows"][0], 1) == "#1 stretch ends 1"
    assert _row_label(sweep["rows"][3], None) == "reference (unexpanded)"
