"""What survives faults: complete-or-ignored checkpoints, clean multi-process exits, dead ranks, safe pushes.

- **Checkpoints.** transformers writes ``checkpoint-N/`` in place, file after file, on several ranks, so a
  kill leaves a folder that looks like a checkpoint. hf-lts writes a marker (`COMPLETE_MARKER`) last, after
  every rank has written its part, and removes it first when a folder is rewritten; resuming picks the
  newest *marked* checkpoint and logs every folder it skipped.
- **Exit.** A process that exits while its gloo/NCCL process group is alive can die in the group's C++
  destructor (``terminate called without an active exception``, SIGABRT) — typically the rank that
  finishes first while another still writes — and the launcher then reports the whole job as failed.
  `destroy_process_group_at_exit` destroys the group from an ``atexit`` handler, before interpreter teardown,
  after the trainer has let go of its DDP wrapper, and collects it, so that no gloo thread outlives the handler.
- **Dead ranks.** A collective whose peer died fails (gloo: at once; otherwise after ``ddp_timeout``);
  `dead_rank_error` turns that into one line that names the last complete checkpoint to resume from.
- **Pushes during training.** `background_push` uploads a snapshot of the packed export with its card and
  metrics files, never the checkpoint's ``training_args.bin`` (a pickle, possibly holding the Hub token),
  optimizer state or tokens; a failed upload is logged and training goes on.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)

#: Written into ``checkpoint-N/`` last, once every rank has saved its files; a folder without it is partial.
COMPLETE_MARKER = "lts_checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_exit_hook_registered = False
_exit_releases: list[weakref.WeakMethod] = []
_uploads: ThreadPoolExecutor | None = None


# -- checkpoints ---------------------------------------------------------------------------------------------
def unmark_checkpoint(folder: str | os.PathLike) -> None:
    """Remove the marker before a checkpoint folder is (re)written, so that a kill mid-save never leaves an
    old marker vouching for new, half-written files."""
    Path(folder, COMPLETE_MARKER).unlink(missing_ok=True)


def mark_checkpoint_complete(folder: str | os.PathLike, global_step: int) -> None:
    """Record ``folder`` as complete: the step and the size of every file, written atomically (temporary file,
    fsync, `os.replace`). Call once every rank has finished writing into it."""
    folder = Path(folder)
    files = {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != COMPLETE_MARKER
    }
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".marker-")
    with os.fdopen(fd, "w") as f:
        json.dump({"global_step": global_step, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / COMPLETE_MARKER)


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a complete hf-lts checkpoint, or None when it is."""
    folder = Path(folder)
    try:
        record = json.loads((folder / COMPLETE_MARKER).read_text())
        files = record["files"]
    except FileNotFoundError:
        return "no completion marker (the save was interrupted)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable completion marker ({e!r})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the marker recorded {size}"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (None if there is none), logging each newer
    folder it skipped and why."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := _CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        reason = incomplete_reason(folder)
        if reason is None:
            return folder
        logger.warning("Skipping incomplete checkpoint %s: %s.", folder, reason)
    return None


def resolve_resume(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from, never a partial one.

    ``True`` (or the strings ``"true"``/``"last"``, as a command line gives them) means the newest complete
    checkpoint in ``output_dir``; a folder is checked for completeness. Raises `ValueError` with what to do
    when there is nothing complete to resume from.
    """
    if isinstance(resume_from_checkpoint, str) and not os.path.exists(resume_from_checkpoint):
        if resume_from_checkpoint.lower() in ("true", "last"):
            resume_from_checkpoint = True
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(
                f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint-N folder: train "
                "without resume_from_checkpoint to start from scratch."
            )
        return found
    reason = incomplete_reason(resume_from_checkpoint)
    if reason is not None:
        raise ValueError(
            f"Cannot resume from {resume_from_checkpoint}: {reason}. Pass resume_from_checkpoint=True to "
            "use the newest complete checkpoint instead."
        )
    return str(resume_from_checkpoint)


# -- processes -----------------------------------------------------------------------------------------------
def destroy_process_group_at_exit(release: Callable[[], None] | None = None) -> None:
    """Destroy the default process group when the interpreter exits (registered once per process).

    Safe in users' scripts: it runs after their code, does nothing when the group is already gone (a script
    that calls ``destroy_process_group()`` itself), and destroying a group is local to the process — no
    collective, so it cannot hang on a rank that has died or is still working.

    Destroying the group only unregisters it: its C++ object, and with it the gloo threads, lives on while
    DDP's reducer holds it. ``release`` (a bound method, held weakly) is called first to drop its owner's
    references to the DDP wrapper, then everything unreachable is collected, so that the threads are joined
    while the interpreter is still whole, even when a script keeps its trainer in a global.
    """
    global _exit_hook_registered
    if release is not None:
        _exit_releases.append(weakref.WeakMethod(release))
    if not _exit_hook_registered:
        atexit.register(_destroy_process_group)
        _exit_hook_registered = True


def _destroy_process_group() -> None:
    for ref in _exit_releases:
        release = ref()
        if release is not None:
            try:
                release()
            except Exception:  # the exit goes on: the group is still destroyed below
                logger.warning("Releasing the process group's users at exit failed", exc_info=True)
    if dist.is_available() and dist.is_initialized():
        from accelerate import PartialState

        PartialState().destroy_process_group()
    gc.collect()


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed collective (a peer that died or timed out), not a bug of the run."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("gloo/", "Connection closed by peer", "Connection reset by peer")
    )


def dead_rank_error(error: BaseException, rank: int, output_dir: str, timeout_s: float) -> RuntimeError:
    """One line: which process lost whom, and what to resume from."""
    checkpoint = last_complete_checkpoint(output_dir)
    resume = (
        f"resume with resume_from_checkpoint=True (the newest complete checkpoint is {checkpoint})"
        if checkpoint
        else "no complete checkpoint was written yet; start again"
    )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RuntimeError(
        f"Rank {rank}: another process of the run stopped responding (it died, or a collective waited longer "
        f"than ddp_timeout={timeout_s:g} s): {first_line[:300]}. Training stopped; {resume}."
    )


# -- pushes during training ----------------------------------------------------------------------------------
def background_push(
    stage: Callable[[Path], None], upload: Callable[[Path], Any], staging_root: str | os.PathLike
) -> Future | None:
    """Write a snapshot with ``stage(folder)`` now (the weights as of this step), then run ``upload(folder)``
    on a background thread; the folder is deleted when the upload ends. Errors are logged, never raised: a
    failed push must not stop or change the run. Returns the upload's future (None if staging failed)."""
    global _uploads
    folder = Path(tempfile.mkdtemp(prefix="_lts-push-", dir=staging_root))
    try:
        stage(folder)
    except Exception as e:  # a full disk, say: log it and keep training
        logger.warning("Push to the Hub skipped: could not write the export to push (%s).", e)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    if _uploads is None:
        _uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lts-push")
    future = _uploads.submit(upload, folder)

    def done(f: Future) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        if f.exception() is not None:
            logger.warning("Push to the Hub during training failed; training goes on: %s", f.exception())

    future.add_done_callback(done)
    return future


def copy_metrics_files(output_dir: str | os.PathLike, folder: Path) -> None:
    """The ``*results.json`` files the Trainer's ``save_metrics`` wrote into ``output_dir``, if any."""
    for path in Path(output_dir).glob("*results.json"):
        shutil.copy2(path, folder / path.name)
