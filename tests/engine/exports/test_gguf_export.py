"""`widen export --format gguf`: grown models as one GGUF file that transformers' GGUF loader (and
llama.cpp) reads back as the same model, with the same tokenizer ids."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engine.errors import WidenError
from engine.exports.gguf import (
    GgufExportError,
    export_gguf,
    gguf_path,
    load_gguf,
    parity_tolerance,
)
from engine.exports.hf_directory import export_model
from engine.train.data import ByteTokenizer, HFTokenizer
from tests.conftest import widen
from tests.engine.exports.test_export import write_plan

# model_type -> the sizes of a tiny random model, and the settings each GGUF layout assumes
# (engine.exports.gguf.FAMILIES): qwen3's head_dim 128, Gemma's 256 with queries scaled by 1/sqrt(256)
TINY = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128),
    "gemma2": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=4),
    # six layers: llama.cpp's Gemma 3 pattern makes the sixth a full-attention layer
    "gemma3_text": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4, num_hidden_layers=6),
}
TEXT = "def f(x):\n    return x * 2 + 3  # The capital of France is Paris. héllo wörld!"


def tiny_model(model_type: str, vocab: int, seed: int = 0, **overrides):
    """Hidden 32, FFN 64: every row a multiple of 32, so q8_0 quantizes every matrix."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    config = AutoConfig.for_model(model_type, **{**fields, **TINY.get(model_type, {}), **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A real byte-level BPE tokenizer (GPT-2 / SmolLM / Qwen style), trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([TEXT, "The capital of France is Paris. Hello world!"] * 40, trainer)
    directory = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(directory)
    return HFTokenizer(str(directory))


def max_delta(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("model_type", list(TINY))
def test_f32_reads_back_as_the_same_model_and_tokenizer(tmp_path, bpe, model_type):
    model = tiny_model(model_type, bpe.vocab_size)
    inputs = torch.tensor([bpe.encode(TEXT)[:24].tolist()])
    with torch.no_grad():
        reference = model(inputs).logits
        greedy = model.generate(inputs[:, :6], do_sample=False, max_new_tokens=8)
    export_model(copy.deepcopy(model), bpe, tmp_path / "hf")
    manifest = export_gguf(model, bpe, tmp_path / "out", "f32")

    assert manifest["path"] == str(tmp_path / "out" / "model.gguf")
    back = load_gguf(manifest["path"])
    hf_directory = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = back(inputs).logits
        assert max_delta(logits, reference) <= 1e-4
        assert max_delta(logits, hf_directory(inputs).logits) <= 1e-4
        assert back.generate(inputs[:, :6], do_sample=False, max_new_tokens=8).tolist() == greedy.tolist()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    assert tokenizer(TEXT, add_special_tokens=False)["input_ids"] == bpe.encode(TEXT).tolist()
    assert tokenizer.eos_token_id == bpe.hf.eos_token_id


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_lossy_dtypes_stay_within_their_tolerance(tmp_path, bpe, model_type, dtype):
    model = tiny_model(model_type, bpe.vocab_size)
    inputs = torch.tensor([bpe.encode(TEXT)[:24].tolist()])
    with torch.no_grad():
        reference = model(inputs).logits
    manifest = export_gguf(model, bpe, tmp_path / "m.gguf", dtype)
    with torch.no_grad():
        delta = max_delta(load_gguf(tmp_path / "m.gguf")(inputs).logits, reference)
    tolerance, _ = parity_tolerance(dtype, reference)
    assert 0 < delta <= tolerance
    # matrices in the dtype; norms (1-D) stay f32, as llama.cpp's converter stores them
    assert set(manifest["tensor_types"]) == {dtype.upper(), "F32"}


def test_q8_0_falls_back_to_f16_for_rows_that_are_not_blocks(tmp_path, bpe):
    model = tiny_model("llama", bpe.vocab_size, intermediate_size=48)  # down_proj rows of 48: not 32-blocks
    manifest = export_gguf(model, bpe, tmp_path / "m.gguf", "q8_0")
    assert manifest["tensor_types"] == {"Q8_0": 14, "F16": 2, "F32": 5}


def test_the_byte_tokenizer_keeps_its_ids(tmp_path):
    """widen's byte tokenizer as a byte-level vocabulary without merges: byte b is still id 3 + b."""
    tokenizer = ByteTokenizer()
    model = tiny_model("llama", 260)
    inputs = torch.tensor([tokenizer.encode(TEXT)[:24].tolist()])
    with torch.no_grad():
        reference = model(inputs).logits
    export_gguf(model, tokenizer, tmp_path / "bytes.gguf", "f32")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="bytes.gguf")
    ids = back(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode(TEXT).tolist() and back.decode(ids) == TEXT
    assert (back.pad_token_id, back.eos_token_id, back.unk_token_id) == (0, 1, 2)
    with torch.no_grad():
        assert max_delta(load_gguf(tmp_path / "bytes.gguf")(inputs).logits, reference) <= 1e-4


def test_a_sentencepiece_style_tokenizer_keeps_its_ids(tmp_path):
    """Llama-2-style BPE with byte fallback and "▁" for spaces is written as llama.cpp's "llama" model."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import LlamaTokenizer

    base = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    base.train_from_iterator([TEXT.replace(" ", "▁")] * 40, trainers.BpeTrainer(
        vocab_size=380, special_tokens=special, show_progress=False))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(base.to_str())["model"]["merges"]]
    LlamaTokenizer(vocab=base.get_vocab(), merges=merges).save_pretrained(tmp_path / "sp")
    tokenizer = HFTokenizer(str(tmp_path / "sp"))
    export_gguf(tiny_model("llama", tokenizer.vocab_size), tokenizer, tmp_path / "sp.gguf", "f32")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    for text in (TEXT, "  two leading spaces", "x"):
        assert back(text)["input_ids"] == tokenizer.hf(text)["input_ids"]


def test_what_a_gguf_cannot_hold_is_refused_in_one_line(tmp_path, bpe):
    def refusal(model) -> str:
        with pytest.raises(GgufExportError) as caught:
            export_gguf(model, bpe, tmp_path / "no.gguf", "f32")
        assert isinstance(caught.value, WidenError) and "\n" not in str(caught.value)
        assert not (tmp_path / "no.gguf").exists()
        return str(caught.value)

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=bpe.vocab_size, n_embd=32,
                                                                 n_layer=1, n_head=2))
    assert refusal(gpt2) == ("--format gguf: gpt2 models are not supported — GGUF export covers llama, mistral, "
                             "qwen2, qwen3, gemma2, gemma3_text (use --format hf for the rest)")
    assert "the built-in MLP models are not supported" in refusal(torch.nn.Sequential(torch.nn.Embedding(4, 4)))
    # settings a GGUF has no key for: the reader would build another model
    assert "head_dim is 8 but transformers' GGUF reader assumes 128" in refusal(
        tiny_model("qwen3", bpe.vocab_size, head_dim=8))
    assert "'linear' rope scaling" in refusal(tiny_model(
        "llama", bpe.vocab_size, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))

    # OUT: a .gguf file, or a directory that gets model.gguf
    assert gguf_path(tmp_path / "Model.GGUF") == tmp_path / "Model.GGUF"
    assert gguf_path(tmp_path / "new") == tmp_path / "new" / "model.gguf"
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "file").write_text("")
    for taken, problem in [("dir.gguf", "is a directory"), ("file", "exists and is not a directory")]:
        with pytest.raises(GgufExportError, match=problem):
            gguf_path(tmp_path / taken)


def save_llama_for_bytes(path):
    """A tiny llama saved like a downloaded one, its vocabulary the byte tokenizer's (259 ids, 260 rows)."""
    tiny_model("llama", 260).save_pretrained(path)
    return path


def test_cli_exports_a_grown_plan_as_gguf(tmp_path, widen_home, capsys):
    plan = write_plan(tmp_path, save_llama_for_bytes(tmp_path / 'src'), """
        [[stages.expand]]
        op = "widen_ffn"
        size = 32
        mode = "parallel"
        [[stages.expand]]
        op = "insert_identity"
        layers = [0]
        [[stages.expand]]
        op = "lora"
        modules = ["q", "v"]
        r = 2
    """, name="grow")
    out = tmp_path / "grown.gguf"
    # a real process: widened FFN, an inserted layer and a LoRA adapter, materialized into a plain llama
    done = widen("export", str(plan), str(out), "--format", "gguf", env_home=widen_home)
    assert done.returncode == 0, done.stderr[-800:]
    wrote, parity = done.stdout.strip().splitlines()
    assert wrote.startswith(f"wrote {out}: llama model as GGUF architecture 'llama', 3 layers, FFN 96")
    assert wrote.endswith("adapters merged; tensors 30 F32")
    assert parity.startswith("parity: max |Δlogits| ") and "(tolerance 1.00e-04 for f32: absolute)" in parity
    assert float(parity.split()[3]) <= 1e-4 and out.is_file()

    # arguments that do not go together: one line each, before anything is built
    for args, message in [(["--dtype", "f16"], "--dtype applies to --format gguf"),
                          (["--format", "onnx"], "--format onnx: give hf"),
                          (["--format", "gguf", "--dtype", "q4"], "--dtype q4: give one of f32, f16, bf16, q8_0"),
                          (["--format", "gguf", "--keep-adapters"], "--keep-adapters applies to --format hf")]:
        code, err = cli(capsys, "export", str(plan), str(tmp_path / "x"), *args)
        assert code == 1 and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err


def cli(capsys, *args: str) -> tuple[int, str]:
    """`widen ARGS` in this process, through the console script's main(): (exit code, stderr)."""
    from widen_tui import cli as widen_cli

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["widen", *args])
        try:
            widen_cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err
