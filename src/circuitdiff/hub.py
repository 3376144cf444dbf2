"""Models by Hugging Face Hub id, read from the local cache only, and the paper's model pairs.

circuitdiff never downloads. A Hub id (``"deepseek-ai/deepseek-math-7b-rl"``, or
``"org/name@revision"``) is resolved to its snapshot folder in the Hugging Face cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), as
``huggingface_hub.snapshot_download(..., local_files_only=True)`` finds it: offline
whatever ``HF_HUB_OFFLINE`` says. A model that is not cached is an error that says how
to fetch it. A local directory always wins over a Hub id of the same spelling.

:data:`PAIRS` holds the paper's four model pairs (method.md, section 6) with the prompt
template and answer length each family needs; ``circuitdiff compare --pair NAME`` uses them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from circuitdiff.errors import MissingPathError, UnknownNameError

__all__ = ["resolve_checkpoint", "cached_snapshot", "is_hub_id", "ModelPair", "PAIRS", "get_pair", "hub_cache_dir"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")


def is_hub_id(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` is spelled like a Hub id (``org/name`` or ``org/name@revision``) and is no local path."""
    text = os.fspath(source)
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder (models and datasets), read from the environment at call time:
    ``HF_HUB_CACHE`` (or its old name ``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, revision: str | None = None, repo_type: str = "model") -> Path:
    """The folder of ``repo_id``'s snapshot in :func:`hub_cache_dir`, never downloaded.

    Raises:
        MissingPathError: not cached, or ``repo_id`` is not a valid Hub id (the message says how to fetch it).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    fetch = (f"fetch it first on a machine with network: `hf download {repo_id}{kind}"
             f"{f' --revision {revision}' if revision else ''}` (it lands in that cache; set HF_HOME or "
             "HF_HUB_CACHE to use another)")
    try:
        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, cache_dir=cache,
                                      local_files_only=True))
    except HFValidationError as exc:
        raise MissingPathError(f"{repo_id!r} is neither a local path nor a valid Hub id ({exc}).") from None
    except LocalEntryNotFoundError:
        raise MissingPathError(f"{repo_id!r} is not in the Hugging Face cache {str(cache)!r} (nothing is "
                               f"downloaded); {fetch}.") from None


def resolve_checkpoint(source: str | os.PathLike[str]) -> Path:
    """The local checkpoint folder of ``source``: a directory as is, a Hub id as its cached snapshot.

    Raises:
        MissingPathError: ``source`` is neither an existing directory nor a cached Hub
            model, or the cached snapshot has no ``config.json`` or no weights.
    """
    path = Path(source)
    if path.is_dir() or not is_hub_id(source):
        return path
    repo_id, _, revision = os.fspath(source).partition("@")
    snapshot = cached_snapshot(repo_id, revision or None)
    again = f"the download was partial; fetch it again (`hf download {repo_id}`)"
    if not (snapshot / "config.json").is_file():
        raise MissingPathError(f"the cached snapshot of {repo_id!r} ({snapshot}) has no config.json: {again}.")
    if not any(snapshot.glob("*.safetensors")) and not any(snapshot.glob("pytorch_model*.bin")):
        raise MissingPathError(f"the cached snapshot of {repo_id!r} ({snapshot}) has no model weights "
                               f"(*.safetensors or pytorch_model*.bin): {again}.")
    return snapshot


@dataclass(frozen=True)
class ModelPair:
    """A model before and after post-training, with how to prompt it.

    Attributes:
        name: the registry name (``--pair NAME``).
        base: Hub id of the model before post-training.
        tuned: Hub id of the model after it.
        algorithm: the post-training between them (``"GRPO"``, ``"PPO"``, ``"DPO"``).
        template: the prompt template both are asked with (:mod:`circuitdiff.data.templates`).
        max_new_tokens: the answer length limit the family needs (long chain-of-thought
            models write thousands of tokens).
        dataset: the dataset and ``alpha`` of the paper's headline result for the pair.
        note: where the pair comes from.
    """

    name: str
    base: str
    tuned: str
    algorithm: str
    template: str
    max_new_tokens: int
    dataset: str
    note: str


#: The paper's four pairs (method.md, section 6: its headline table).
PAIRS: dict[str, ModelPair] = {pair.name: pair for pair in (
    ModelPair("deepseek-math-grpo", "deepseek-ai/deepseek-math-7b-instruct", "deepseek-ai/deepseek-math-7b-rl", "GRPO",
              "deepseek-math", 1024, "MATH, alpha 0.1", "DeepSeekMath (Shao et al. 2024): instruct -> RL."),
    ModelPair("math-shepherd-ppo", "peiyi9979/mistral-7b-sft", "peiyi9979/math-shepherd-mistral-7b-rl", "PPO",
              "mistral-math-shepherd", 1024, "MATH, alpha 0.3",
              "Math-Shepherd (Wang et al. 2024): Mistral-7B SFT -> PPO with a process reward model."),
    ModelPair("qwen2.5-dpo", "RLHFlow/Qwen2.5-7B-SFT", "RLHFlow/Qwen2.5-7B-DPO", "DPO", "qwen2.5-math", 4096,
              "College Math, alpha 0.3",
              "RLHFlow Online-DPO-R1: the warm-up SFT -> iterative DPO (the paper names 'Qwen2.5-7B SFT -> DPO'; "
              "these are the public checkpoints of that name)."),
    ModelPair("r1-distill-acereason", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "nvidia/AceReason-Nemotron-7B",
              "GRPO", "r1-distill", 32768, "GSM8K, alpha 0.1",
              "AceReason-Nemotron (NVIDIA 2025): R1-Distill-Qwen-7B -> math- then code-only RL."),
)}


def get_pair(name: str) -> ModelPair:
    """The pair registered as ``name``.

    Raises:
        UnknownNameError: no such pair (the message lists them).
    """
    if name not in PAIRS:
        raise UnknownNameError(f"unknown model pair {name!r}; available: {', '.join(PAIRS)}.")
    return PAIRS[name]
