"""Soak: long LTS runs on the digits data, SIGKILLed at random moments and resumed until they finish.

    python -m benchmarks.soak --minutes 12 --output benchmarks/results/soak.json
    python -m benchmarks.soak --minutes 12 --processes 2  # 2 processes under torchrun (gloo)

One uninterrupted reference run (``--steps`` optimizer steps, a checkpoint every ``--save-steps``) gives the
final digest and a digest of every checkpoint. Then, until ``--minutes`` are spent, trial runs of the same
training are started with ``resume_from_checkpoint=True`` and SIGKILLed (the whole process group, launcher included,
as a preempted job is) after a random delay — mid-step, mid-checkpoint-save, mid-export, wherever the delay lands — and started again, until
one attempt exits 0. Counted: trials, kills, resumes, partial checkpoints skipped, **partial loads** (a resume
from a checkpoint whose weights or optimizer state differ from the reference's checkpoint of the same step)
and **mismatches** (a finished trial whose weights and LTS state differ from the reference, bit for bit).

The data are deterministic (no random crops), so a resume in the middle of an epoch is exact as well
(transformers draws the first batch after a mid-epoch resume before it restores the RNG,
huggingface/transformers#39215, which only random transforms would notice).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .common import free_port, tiny_resnet

REPO = Path(__file__).resolve().parents[1]


def worker(a: argparse.Namespace) -> None:
    """A user's script: LTSTrainer on digits, ``resume_from_checkpoint=True`` when a complete checkpoint exists."""
    import torch

    from hf_lts import LTSConfig, LTSTrainer, LTSTrainingArguments
    from hf_lts.data import load_image_dataset, prepare_dataset
    from hf_lts.resilience import last_complete_checkpoint

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    digits = load_image_dataset("digits")
    train = prepare_dataset(digits["train"], 16, train=False)
    torch.manual_seed(0)
    model = tiny_resnet(num_labels=10)
    args = LTSTrainingArguments(
        a.out,
        max_steps=a.steps,
        per_device_train_batch_size=32 // a.nproc,
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=1e-4,
        save_strategy="steps",
        save_steps=a.save_steps,
        save_total_limit=a.save_total_limit or None,
        logging_steps=50,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=0,
        ddp_timeout=60,
    )
    config = LTSConfig(weight_bits=2, activation_bits=4, distance_momentum=0.9, freeze_warmup_ratio=0.1)
    trainer = LTSTrainer(model=model, args=args, lts_config=config, train_dataset=train)
    resume = last_complete_checkpoint(a.out)
    if rank == 0:  # what resume_from_checkpoint=True is about to load and skip, for the soak to check
        step = int(resume.rsplit("-", 1)[1]) if resume else -1
        skipped = [p for p in Path(a.out).glob("checkpoint-*") if int(p.name.split("-")[1]) > step]
        print(f"SOAK_SKIPPED {len(skipped)}", flush=True)
        if resume:
            print(f"SOAK_RESUME {Path(resume).name} {checkpoint_digest(Path(resume))}", flush=True)
    trainer.train(resume_from_checkpoint=resume is not None or None)
    trainer.save_model()
    if rank == 0:
        Path(a.out, "final.json").write_text(json.dumps({"digest": model_digest(model)}))


def model_digest(model) -> str:
    import torch

    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_digest(folder: Path) -> str:
    """Weights (full training state) and optimizer state of a checkpoint: the bytes a resume loads."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "optimizer.pt"):
        path = folder / name
        h.update(path.read_bytes() if path.exists() else b"<missing>")
    return h.hexdigest()


def command(a: argparse.Namespace, out: Path, *extra: str) -> list[str]:
    script = ["-m", "benchmarks.soak", "worker", "--out", str(out), "--steps", str(a.steps)]
    script += ["--save-steps", str(a.save_steps), "--save-total-limit", str(a.save_total_limit or 0)]
    script += ["--processes", str(a.nproc), *extra]
    if a.nproc == 1:
        return [sys.executable, *script]
    flags = ["--nproc_per_node", str(a.nproc), "--master_addr", "127.0.0.1", "--master_port", free_port()]
    return [sys.executable, "-m", "torch.distributed.run", *flags, *script]


def run_attempt(cmd: list[str], out: Path, kill_after: float | None, log) -> tuple[int, bool, str]:
    """(exit status, whether it was killed, stdout). A kill takes the whole process tree (torchrun starts its
    workers in sessions of their own), so nothing of an attempt outlives it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    killed = False
    try:
        stdout = proc.communicate(timeout=kill_after if kill_after is not None else 3600)[0]
    except subprocess.TimeoutExpired:
        tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:  # the whole job, launcher included, as a preemption kills it
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
        killed = True
        stdout = proc.communicate()[0]
    return proc.returncode, killed, stdout


def soak(a: argparse.Namespace) -> dict:
    random.seed(a.seed)
    work = Path(tempfile.mkdtemp(prefix="lts-soak-"))
    log = open(work / "stderr.log", "w")  # noqa: SIM115
    start = time.monotonic()
    reference = work / "reference"
    ref_args = argparse.Namespace(**{**vars(a), "save_total_limit": 0})
    rc, _, _ = run_attempt(command(ref_args, reference), reference, None, log)
    assert rc == 0, f"the reference run failed: see {work / 'stderr.log'}"
    reference_seconds = time.monotonic() - start
    ref_final = json.loads((reference / "final.json").read_text())["digest"]
    ref_checkpoints = {p.name: checkpoint_digest(p) for p in reference.glob("checkpoint-*")}
    totals = dict(trials=0, attempts=0, kills=0, resumes=0, partial_checkpoints_skipped=0, partial_loads=0)
    totals["mismatches"] = 0
    deadline = start + a.minutes * 60
    while time.monotonic() < deadline:
        out = work / f"trial{totals['trials']}"
        totals["trials"] += 1
        while True:
            totals["attempts"] += 1
            kill_after = random.uniform(a.min_kill_s, a.max_kill_s) if time.monotonic() < deadline else None
            rc, killed, stdout = run_attempt(command(a, out), out, kill_after, log)
            for line in stdout.splitlines():
                if line.startswith("SOAK_SKIPPED "):
                    totals["partial_checkpoints_skipped"] += int(line.split()[1])
                if line.startswith("SOAK_RESUME "):
                    _, name, digest = line.split()
                    totals["resumes"] += 1
                    totals["partial_loads"] += digest != ref_checkpoints.get(name)
            if rc == 0:
                break
            totals["kills"] += killed
            if not killed:
                raise RuntimeError(
                    f"attempt failed without a kill (exit status {rc}): see {work / 'stderr.log'}"
                )
        final = json.loads((out / "final.json").read_text())["digest"]
        totals["mismatches"] += final != ref_final
        print(json.dumps({"trial": totals["trials"], **totals}), flush=True)
    return {
        "command": " ".join([sys.executable, "-m", "benchmarks.soak", *sys.argv[1:]]),
        "steps": a.steps,
        "save_steps": a.save_steps,
        "save_total_limit": a.save_total_limit,
        "nproc": a.nproc,
        "kill_delay_s": [a.min_kill_s, a.max_kill_s],
        "reference_run_s": round(reference_seconds, 1),
        "wall_minutes": round((time.monotonic() - start) / 60, 1),
        **totals,
        "load_average_end": os.getloadavg(),
        "work_dir": str(work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", choices=["soak", "worker"], default="soak")
    parser.add_argument("--out", help="worker: output folder")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--save-total-limit", type=int, default=3, help="0: keep every checkpoint")
    parser.add_argument("--processes", dest="nproc", type=int, default=1, choices=[1, 2])
    parser.add_argument("--minutes", type=float, default=12)
    parser.add_argument("--min-kill-s", type=float, default=4)
    parser.add_argument("--max-kill-s", type=float, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the figures as JSON here")
    a = parser.parse_args()
    if a.mode == "worker":
        worker(a)
        return
    result = soak(a)
    print(json.dumps(result, indent=1))
    if a.output:
        Path(a.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
