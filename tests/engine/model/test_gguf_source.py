"""A GGUF model source's refusals, each one line on its plan field, before any weight is read (the
real file's loading is in test_real_model.py)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from engine.errors import ModelLoadError
from engine.model.sources import load_config
from engine.plan import ModelSpec
from engine.plan.load import validate_file
from engine.train.data import load_tokenizer


def _plan(tmp_path, model: str) -> list:
    path = tmp_path / "plan.toml"
    path.write_text(textwrap.dedent(f"""
        name = "gguf"
        [model]
        {model}
        [tasks.prose]
        source = "builtin:pydoc"
        [[stages]]
        task = "prose"
        steps = 1
    """))
    return [(p.path, p.message) for p in validate_file(path)[1]]


def _write_gguf(path, architecture: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_missing_gguf_is_named_on_its_field(tmp_path):
    problems = _plan(tmp_path, f'source = "{tmp_path}/nope.gguf"')
    assert len(problems) == 1 and problems[0][0] == "model.source"
    assert "no such GGUF file" in problems[0][1]


def test_a_file_that_is_no_gguf_is_one_line(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    problems = _plan(tmp_path, f'source = "{tmp_path}/fake.gguf"')
    assert [p for p, _ in problems] == ["model.source"]
    assert "GGUF" in problems[0][1] and "\n" not in problems[0][1]


def test_an_architecture_transformers_cannot_read_is_named(tmp_path):
    _write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(ModelLoadError, match="GGUF architecture 'rwkv6' is not one transformers reads") as error:
        load_config(ModelSpec(source=str(tmp_path / "rwkv.gguf")))
    assert error.value.field == "source" and "\n" not in str(error.value)


def test_tokenizer_gguf_needs_a_gguf_model(tmp_path):
    problems = _plan(tmp_path, 'source = "builtin:tiny-neo"\ntokenizer = "gguf"')
    assert [p for p, _ in problems] == ["model.tokenizer"]
    with pytest.raises(ModelLoadError, match="model.source is not a GGUF"):
        load_tokenizer("gguf", ModelSpec())


@pytest.mark.parametrize("name", ["model.bin", "../up.gguf", "sub/model.gguf", ".hidden.gguf"])
def test_gguf_file_is_a_file_name_in_the_source(tmp_path, name):
    problems = _plan(tmp_path, f'source = "{tmp_path}"\ngguf_file = "{name}"')
    assert [p for p, _ in problems] == ["model.gguf_file"]
