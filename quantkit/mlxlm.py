"""What a quantization run takes from mlx-lm, reached without running ``mlx_lm/__init__.py``.

Importing any ``mlx_lm.*`` module first runs the package's ``__init__``, which imports its
converter, generator and ``mlx_lm.utils``, and through them ``transformers``: about 1 s and
44 MB of resident memory on the CI's CPU, 11 s on the GPU machine, where ``transformers``
finds PyTorch (``benchmarks/results/h100_startup.json``). A quantization run needs none of it:

- the model classes live in ``mlx_lm.models.<type>``, modules that import only MLX;
- the float model is built from them as mlx-lm builds it (config, ``ModelArgs.from_dict``,
  the model's ``sanitize``, ``load_weights``), lazily;
- the calibration text is encoded by the ``tokenizers`` library from ``tokenizer.json``, the
  same library and file ``transformers`` encodes with;
- writing ``config.json`` and counting parameters are a few lines.

:func:`defer_package_init` (called by the ``quantkit`` program only) puts ``mlx_lm`` in
``sys.modules`` without running its ``__init__``; the first attribute asked of the package
(``mlx_lm.load``, ``from mlx_lm import generate``) runs it then, so everything else keeps
working. Whatever the light path does not cover — quantized or custom-code models, tokenizers
whose Python class changes how text is encoded, chat templates — goes through mlx-lm's own
loaders, exactly as before.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from .text_split import split_rule, split_text

#: ``tokenizer_config.json`` classes whose encoding is ``tokenizer.json``'s as it stands
#: (``transformers`` adds nothing in Python; tested equal on the shared models' tokenizers).
PLAIN_TOKENIZER_CLASSES = frozenset({"PreTrainedTokenizerFast"})

#: config keys that need mlx-lm's full loader (quantized or custom-code models).
_FULL_LOADER_KEYS = ("quantization", "quantization_config", "model_file", "quantize_activations")
_FLOAT_TAG = "__float__"  # how mlx-lm writes a non-finite float into a config


def defer_package_init() -> bool:
    """Register ``mlx_lm`` as a package whose ``__init__`` runs on first attribute access.

    Submodules (``mlx_lm.models.llama``) import without it. Does nothing (returns False) when
    ``mlx_lm`` is already imported or cannot be found."""
    if "mlx_lm" in sys.modules:
        return False
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return False
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def finish(name: str) -> Any:
        # The real __init__, once, into this same module object; then the attribute.
        package.__dict__.pop("__getattr__", None)
        loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = finish  # type: ignore[method-assign]
    sys.modules["mlx_lm"] = package
    return True


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("mlx_lm")  # the top level: never runs its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.cache
def _remapping() -> tuple[dict[str, str], dict[tuple[str, str], str]] | None:
    """mlx-lm's model-type remapping tables, read as data from ``mlx_lm/utils.py`` (its
    module-level dict literals) without importing it; None when they cannot be read."""
    utils = sys.modules.get("mlx_lm.utils")
    if utils is not None:
        return dict(utils.MODEL_REMAPPING), dict(getattr(utils, "MODEL_ARCHITECTURE_REMAPPING", {}))
    root = _package_dir()
    if root is None:
        return None
    try:
        tree = ast.parse((root / "utils.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    tables: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("MODEL_REMAPPING", "MODEL_ARCHITECTURE_REMAPPING"):
                try:
                    tables[name] = ast.literal_eval(node.value)
                except ValueError:
                    return None
    if "MODEL_REMAPPING" not in tables:
        return None
    return tables["MODEL_REMAPPING"], tables.get("MODEL_ARCHITECTURE_REMAPPING", {})


def model_module_name(config: dict[str, Any]) -> str | None:
    """The ``mlx_lm.models`` module mlx-lm builds ``config``'s model from (its remapping by
    architecture, then by type); None when mlx-lm's tables cannot be read."""
    tables = _remapping()
    if tables is None:
        return None
    by_type, by_arch = tables
    model_type = config["model_type"]
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    for arch in architectures:
        if (model_type, arch) in by_arch:
            return by_arch[(model_type, arch)]
    return by_type.get(model_type, model_type)


def model_classes(config: dict[str, Any]) -> tuple[Any, Any]:
    """``(Model, ModelArgs)`` for ``config``, as mlx-lm picks them; ``ValueError`` for a model
    type the installed mlx-lm does not have."""
    name = model_module_name(config)
    if name is None:
        from mlx_lm.utils import _get_classes

        return _get_classes(config)
    try:
        module = importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError as exc:
        raise ValueError(f"Model type {name} not supported.") from exc
    return module.Model, module.ModelArgs


def read_config(path: Path) -> dict[str, Any] | None:
    """``config.json`` as mlx-lm reads it for loading (``generation_config.json``'s
    ``eos_token_id`` wins); None when the light loader must not handle the model."""
    text = (path / "config.json").read_text()
    if _FLOAT_TAG in text:
        return None
    config = json.loads(text)
    text_config = config.get("text_config") or {}
    if any(k in config for k in _FULL_LOADER_KEYS) or "quantization_config" in text_config:
        return None
    if (path / "hf_quant_config.json").exists():
        return None
    generation = path / "generation_config.json"
    if generation.exists():
        try:
            eos = json.loads(generation.read_text()).get("eos_token_id", False)
        except (json.JSONDecodeError, AttributeError):
            eos = False
        if eos:
            config["eos_token_id"] = eos
    return config


def load_float_model(path: Path, *, lazy: bool) -> tuple[Any, dict[str, Any]] | None:
    """``(model, config)`` of an unquantized model directory, built the way
    ``mlx_lm.utils.load_model`` builds it; None when the directory needs mlx-lm's full loader
    (a quantized or custom-code model, unreadable remapping tables)."""
    import mlx.core as mx

    config = read_config(path)
    if config is None or model_module_name(config) is None:
        return None
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors found in {path}")
    model_class, args_class = model_classes(config)
    weights: dict[str, Any] = {}
    for f in files:
        weights.update(cast(dict[str, Any], mx.load(str(f))))
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    return model, config


class PlainTokenizer:
    """Encodes text with the ``tokenizers`` library from ``tokenizer.json``: the part of a
    tokenizer a quantization run uses (``encode``, ``eos_token_id``, ``vocab_size``). Chat
    templates are rendered by mlx-lm's tokenizer, loaded the first time one is asked for."""

    def __init__(self, path: Path, backend: Any, eos_token_id: int | None,
                 split: str | None = None) -> None:
        self._path = path
        self._backend = backend
        self.eos_token_id = eos_token_id
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=False)
        #: Where a long text may be cut to be encoded in parallel (:mod:`quantkit.text_split`).
        self.split = split

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``: a long text cut where :attr:`split` allows and its pieces
        encoded in parallel, the same ids as one call on the whole text."""
        ends = self._special_ends if add_special_tokens else ([], [])
        pieces = [text]
        if self.split is not None and ends is not None:
            pieces = split_text(text, self.split, 4 * (os.cpu_count() or 1))
        if len(pieces) == 1 or ends is None:
            return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        encodings = self._backend.encode_batch(pieces, add_special_tokens=False)
        ids = [*ends[0], *(i for e in encodings for i in e.ids), *ends[1]]
        del encodings
        _return_free_memory()  # what the encoding threads freed stays in their arenas otherwise
        return ids

    @functools.cached_property
    def _special_ends(self) -> tuple[list[int], list[int]] | None:
        """The ids the post-processor puts before and after a text's own (e.g. BOS); None if
        it does more than that (the text is then encoded whole)."""
        bare = self._backend.encode("a", add_special_tokens=False).ids
        full = self._backend.encode("a", add_special_tokens=True).ids
        for k in range(len(full) - len(bare) + 1):
            if full[k:k + len(bare)] == bare:
                return full[:k], full[k + len(bare):]
        return None

    def get_vocab(self) -> dict[str, int]:
        """Token → id, added tokens included (as ``transformers``' ``get_vocab``)."""
        return dict(self._backend.get_vocab(with_added_tokens=True))

    @functools.cached_property
    def _full(self) -> Any:
        from mlx_lm.utils import load_tokenizer

        return load_tokenizer(self._path)

    @property
    def chat_template(self) -> Any:
        return getattr(self._full, "chat_template", None)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self._full.apply_chat_template(*args, **kwargs)


def _return_free_memory() -> None:
    """Hand memory freed in every malloc arena back to the system (glibc's ``malloc_trim``;
    nothing elsewhere). The tokenizer's worker threads free ~10 MB of encodings into arenas of
    their own, which glibc keeps: resident memory a whole run long, measured on a 200 KB text."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def plain_tokenizer(path: Path) -> PlainTokenizer | None:
    """A :class:`PlainTokenizer` for ``path`` when its encoding is exactly ``tokenizer.json``'s
    (a plain fast tokenizer class, no custom code, the configured BOS/EOS insertion the file
    already does); None otherwise (mlx-lm's tokenizer is then used)."""
    try:
        from tokenizers import Tokenizer

        config = json.loads((path / "tokenizer_config.json").read_text())
        backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception:  # no library, no files, a file it cannot read: mlx-lm's tokenizer
        return None
    if not isinstance(config, dict) or config.get("tokenizer_class") not in PLAIN_TOKENIZER_CLASSES:
        return None
    if "auto_map" in config:
        return None
    eos = _token_text(config.get("eos_token"))
    eos_id = backend.token_to_id(eos) if eos is not None else None
    if eos is not None and eos_id is None:
        return None
    probe = backend.encode("a").ids
    bos_id = backend.token_to_id(_token_text(config.get("bos_token")) or "")
    for key, token_id, index in (("add_bos_token", bos_id, 0), ("add_eos_token", eos_id, -1)):
        if key in config:
            present = token_id is not None and bool(probe) and probe[index] == token_id
            if bool(config[key]) != present:
                return None
    try:
        split = split_rule(json.loads((path / "tokenizer.json").read_text()))
    except (OSError, ValueError):
        split = None
    return PlainTokenizer(path, backend, eos_id, split)


def write_config(config: dict[str, Any], path: Path) -> None:
    """``config.json`` as mlx-lm's ``save_config`` writes it (``quantization_config`` a copy of
    ``quantization``, keys sorted, 4-space indent)."""
    if _has_non_finite(config.values()):
        from mlx_lm.utils import save_config

        save_config(dict(config), config_path=path)
        return
    config = dict(config)
    config.pop("_name_or_path", None)
    config.pop("vision_config", None)
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    with open(path, "w") as f:
        json.dump(dict(sorted(config.items())), f, indent=4)


def _has_non_finite(values: Iterable[Any]) -> bool:
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            return True
        if isinstance(v, dict) and _has_non_finite(v.values()):
            return True
        if isinstance(v, (list, tuple)) and _has_non_finite(v):
            return True
    return False


def total_parameters(model: Any) -> int:
    """Parameters of the unquantized model ``model`` stands for: a quantized layer counts its
    weight's ``32 / bits`` elements per stored 32-bit word (plus its bias), other layers every
    parameter (the count mlx-lm's bits-per-weight divides by)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    total = 0
    leaves = cast(list[tuple[str, Any]], tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module)))
    for _, m in leaves:
        if hasattr(m, "bits"):
            total += (m.bias.size if hasattr(m, "bias") else 0) + m.weight.size * 32 // m.bits
        else:
            total += sum(v.size for _, v in cast(list[tuple[str, Any]], tree_flatten(m.parameters())))
    return total


def bits_per_weight(model: Any) -> float:
    """Stored bits (every array the model holds) per parameter of the unquantized model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    leaves = cast(list[tuple[str, Any]], tree_flatten(model))
    stored = sum(v.nbytes for _, v in leaves if isinstance(v, mx.array))
    return stored * 8 / total_parameters(model)


__all__ = [
    "PLAIN_TOKENIZER_CLASSES", "PlainTokenizer", "bits_per_weight", "defer_package_init",
    "load_float_model", "model_classes", "model_module_name", "plain_tokenizer", "read_config",
    "total_parameters", "write_config",
]
