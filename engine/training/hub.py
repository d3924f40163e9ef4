"""Where a model comes from: a local folder, or a Hugging Face id fetched with visible progress.

mlx-lm's loader downloads a missing model silently (progress bars go to a stderr nobody sees
when the engine runs detached). :func:`fetch` downloads it first, with the files mlx-lm would
fetch, and reports progress as one line every few seconds (bytes, rate, percent), which the
engine turns into ``log`` events for the TUI. :func:`explain` turns the Hub's exceptions into
one paragraph that names the model id and says what to do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

Report = Callable[[str], None]
REPORT_EVERY = 5.0  # seconds between progress lines


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def _cached_bytes(repo_id: str) -> int:
    """Bytes of this repo in the Hugging Face cache, partial downloads included."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = Path(HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "blobs"
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _expected_bytes(repo_id: str, revision: str | None, patterns: list[str]) -> int:
    """Total size of the files to fetch (0 when the Hub will not say)."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception:  # the download itself reports what went wrong
        return 0
    return sum(
        s.size or 0 for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in patterns)
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def fetch(repo_id: str, revision: str | None, report: Report) -> Path:
    """The local snapshot of ``repo_id``, downloaded first if needed, with progress lines."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    patterns = list(DEFAULT_ALLOW_PATTERNS)
    try:  # already complete in the cache: no network, no messages
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    total = _expected_bytes(repo_id, revision, patterns)
    start_bytes = _cached_bytes(repo_id)
    done = threading.Event()

    def watch() -> None:
        started = time.monotonic()
        while not done.wait(REPORT_EVERY):
            now = _cached_bytes(repo_id)
            rate = (now - start_bytes) / max(time.monotonic() - started, 1e-9)
            share = f" of {_size(total)} ({100 * now / total:.0f}%)" if total else ""
            report(f"downloading {repo_id}: {_size(now)}{share} at {_size(rate)}/s")

    report(f"downloading {repo_id} from the Hugging Face Hub" + (f" ({_size(total)})" if total else ""))
    watcher = threading.Thread(target=watch, name="download-progress", daemon=True)
    watcher.start()
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    finally:
        done.set()
        watcher.join()
    report(f"downloaded {repo_id} to {path}")
    return path


def explain(model: str, where: str, error: BaseException) -> str:
    """One paragraph for a model that cannot be loaded: which, why, and what to do."""
    name = type(error).__name__
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else name
    local = model.startswith((".", "/", "~")) or is_local(model)
    if local:
        return (f"cannot load model '{model}' ({where}): {name}: {first_line}. A local model is a folder with "
                "config.json, the tokenizer files and *.safetensors, as mlx_lm.convert writes it.")
    if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return (f"model '{model}' ({where}) was not found on the Hugging Face Hub, or it is gated ({name}). "
                "Check the id's spelling (owner/name), the revision, and for gated models run "
                "`huggingface-cli login` after accepting its licence on the model's page.")
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "connect" in str(error).lower():
        return (f"model '{model}' ({where}) is not in the Hugging Face cache and the Hub cannot be reached "
                f"({first_line}). Connect once to download it (it is cached for later), copy the cache "
                "(~/.cache/huggingface/hub) from a machine that has it, or set model.path to a local folder.")
    if "/" not in model:
        return (f"model '{model}' ({where}) is neither a local folder nor a Hugging Face id (owner/name). "
                "Fix the path, or give an id such as mlx-community/Llama-3.2-1B-Instruct-4bit.")
    return (f"cannot load model '{model}' ({where}): {name}: {first_line}. A Hugging Face id needs the network "
            "or a copy in the Hugging Face cache; a local path must be a folder with config.json and *.safetensors.")
