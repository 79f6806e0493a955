"""The light path to mlx-lm (quantkit.mlxlm): the same models, tokens, configs and counts as
mlx-lm's own loaders, without importing transformers in the ``quantkit`` program."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import REPO, shared_path
from mlx.utils import tree_flatten

from quantkit import mlxlm


def _same_parameters(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
        assert mx.array_equal(pa[k], pb[k]).item(), k


@pytest.mark.parametrize("name", ["stories260K", "stories260K-pad192", "stories260K-moe4"])
def test_float_model_is_mlx_lms(name):
    """Same class, same parameters (the MoE fixture is in Hugging Face layout: its per-expert
    tensors are stacked by the model's sanitize on both paths), lazily."""
    from mlx_lm.utils import load_model

    path = shared_path("models", name)
    ours = mlxlm.load_float_model(path, lazy=True)
    assert ours is not None
    model, config = ours
    theirs, their_config = load_model(path, lazy=True)
    assert type(model) is type(theirs) and config == their_config
    _same_parameters(model, theirs)


def test_model_type_remapping_follows_mlx_lm():
    """mlx-lm's remapping tables are read as data: a ``mistral`` config builds mlx-lm's llama
    classes, as ``mlx_lm.utils`` picks them; an unknown type is mlx-lm's ValueError."""
    from mlx_lm.utils import MODEL_REMAPPING, _get_classes

    assert mlxlm.model_module_name({"model_type": "mistral"}) == MODEL_REMAPPING["mistral"]
    for config in ({"model_type": "mistral"}, {"model_type": "qwen3_moe"}, {"model_type": "llama"}):
        assert mlxlm.model_classes(config) == _get_classes(config)
    with pytest.raises(ValueError, match="not supported"):
        mlxlm.model_classes({"model_type": "no_such_model"})


def test_quantized_or_custom_models_take_mlx_lms_loader(tmp_path):
    src = shared_path("models", "stories260K")
    for extra in ({"quantization": {"group_size": 64, "bits": 4}}, {"model_file": "x.py"}):
        d = tmp_path / next(iter(extra))
        shutil.copytree(src, d)
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **extra}))
        assert mlxlm.load_float_model(d, lazy=True) is None


def test_plain_tokenizer_encodes_as_mlx_lms():
    from mlx_lm.utils import load_tokenizer

    path = shared_path("models", "stories260K")
    ours, theirs = mlxlm.plain_tokenizer(path), load_tokenizer(path)
    assert ours is not None
    for text in ("tinystories_sample.txt", "tinyshakespeare.txt", "jane_austen.txt"):
        sample = shared_path("text", text).read_text()[:50_000]
        assert ours.encode(sample) == list(theirs.encode(sample))
        assert ours.encode(sample, add_special_tokens=False) == list(theirs.encode(sample, add_special_tokens=False))
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.get_vocab() == dict(theirs.get_vocab())
    assert ours.vocab_size == theirs.vocab_size


TEXTS = ("tinystories_sample.txt", "tinyshakespeare.txt", "jane_austen.txt", "wikitext2_test.raw")


def test_long_texts_cut_and_encoded_in_parallel_give_mlx_lms_tokens():
    """A long text is cut where no token can span the cut (stories260K: SentencePiece-style,
    before a space) and its pieces encoded in parallel: the same ids as mlx-lm's tokenizer on
    the whole text."""
    from mlx_lm.utils import load_tokenizer

    from quantkit.text_split import split_text

    path = shared_path("models", "stories260K")
    ours, theirs = mlxlm.plain_tokenizer(path), load_tokenizer(path)
    assert ours is not None and ours.split == "space"
    text = shared_path("text", "wikitext2_test.raw").read_text()
    assert len(split_text(text, ours.split, 8)) == 8  # the cut path is what runs
    assert ours.encode(text) == list(theirs.encode(text))
    assert ours.encode(text, add_special_tokens=False) == list(theirs.encode(text, add_special_tokens=False))


def _byte_level_tokenizer(path, text: str):
    """A byte-level BPE (GPT-2's regex after single-digit splits, as SmolLM2's) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "add_bos_token": True}))
    return tok


@pytest.mark.parametrize("text_name", TEXTS)
def test_byte_level_texts_cut_before_a_word_encode_as_a_whole(text_name, tmp_path):
    """Byte-level BPE: cut before a space that starts a word, the pieces give the whole text's
    ids (BOS included once, at the start)."""
    from quantkit.text_split import split_text

    whole = _byte_level_tokenizer(tmp_path / "tok", shared_path("text", "tinystories_sample.txt").read_text())
    ours = mlxlm.plain_tokenizer(tmp_path / "tok")
    assert ours is not None and ours.split == "byte-level"
    text = shared_path("text", text_name).read_text()
    pieces = split_text(text, ours.split, 8)
    assert "".join(pieces) == text and (len(pieces) > 1) == (len(text) >= 64 * 1024)
    assert ours.encode(text) == whole.encode(text).ids
    assert ours.encode(text, add_special_tokens=False) == whole.encode(text, add_special_tokens=False).ids


def test_tokenizers_whose_pieces_could_differ_are_not_cut():
    """Layouts where a cut could change the tokens are encoded whole: another pre-tokenizer
    pattern (Llama-3's), a prefix space, a SentencePiece vocabulary with ``▁`` inside a token,
    an added token holding a space."""
    from quantkit.text_split import split_rule

    path = shared_path("models", "stories260K")
    spec = json.loads((path / "tokenizer.json").read_text())
    assert split_rule(spec) == "space"
    inner = json.loads(json.dumps(spec))
    inner["model"]["vocab"]["a\u2581b"] = len(inner["model"]["vocab"])
    assert split_rule(inner) is None
    spaced = dict(spec, added_tokens=[*spec["added_tokens"], {"content": "<a b>"}])
    assert split_rule(spaced) is None
    byte_level = {"model": {"type": "BPE", "vocab": {}}, "normalizer": None,
                  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    assert split_rule(byte_level) == "byte-level"
    assert split_rule({**byte_level, "pre_tokenizer": {**byte_level["pre_tokenizer"], "add_prefix_space": True}}) is None
    llama3 = {**byte_level, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}
    assert split_rule(llama3) is None


def test_tokenizers_that_may_encode_differently_take_mlx_lms(tmp_path):
    """A tokenizer class that may change the encoding in Python, or a BOS/EOS setting that
    ``tokenizer.json`` does not carry out, is left to mlx-lm's tokenizer."""
    src = shared_path("models", "stories260K")
    config = json.loads((src / "tokenizer_config.json").read_text())
    for name, change in (("llama", {"tokenizer_class": "LlamaTokenizerFast"}),
                         ("eos", {"add_eos_token": True}), ("nobos", {"add_bos_token": False}),
                         ("remote", {"auto_map": {"AutoTokenizer": "x.Tok"}})):
        d = tmp_path / name
        shutil.copytree(src, d)
        (d / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        assert mlxlm.plain_tokenizer(d) is None, name


def test_config_and_counts_are_mlx_lms(tmp_path):
    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters, save_config

    path = shared_path("models", "stories260K-moe4")
    model, config = mlxlm.load_float_model(path, lazy=False)
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % 32 == 0)
    config = {**config, "_name_or_path": "x", "quantization": {"group_size": 32, "bits": 4, "mode": "affine"}}
    mlxlm.write_config(config, tmp_path / "ours.json")
    save_config(dict(config), config_path=tmp_path / "theirs.json")
    assert (tmp_path / "ours.json").read_bytes() == (tmp_path / "theirs.json").read_bytes()
    assert mlxlm.total_parameters(model) == get_total_parameters(model)
    assert mlxlm.bits_per_weight(model) == compute_bits_per_weight(model)


def test_the_quantize_program_never_imports_transformers(tmp_path):
    """``quantkit quantize`` on a float model imports neither transformers nor mlx_lm.utils
    (the modules loaded are listed as the program exits); mlx-lm's package still works when
    asked for."""
    src = shared_path("models", "stories260K")
    argv = ["quantkit", "quantize", str(src), "-o", str(tmp_path / "out"), "--fast",
            "--num-samples", "4", "--seq-len", "32"]
    program = (f"import atexit, sys; sys.argv = {argv!r}; atexit.register(lambda: print('MODULES', "
               "' '.join(m for m in sys.modules if m.startswith(('transformers', 'mlx_lm'))), "
               "file=sys.stderr)); from quantkit.cli import main; main()")
    run = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "config.json").exists()
    modules = run.stderr.split("MODULES", 1)[1].split()
    assert "mlx_lm.models.llama" in modules
    assert not any(m.startswith("transformers") for m in modules) and "mlx_lm.utils" not in modules
    probe = ("from quantkit import mlxlm; assert mlxlm.defer_package_init(); import sys; "
             "import mlx_lm.models.llama; assert 'transformers' not in sys.modules; "
             "from mlx_lm import load; import mlx_lm; print(mlx_lm.__version__, callable(load))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("True"), out.stderr[-2000:]
