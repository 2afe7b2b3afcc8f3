"""Running cells: each stage is a subprocess of the existing CLI (``tools/pretrain.py``, ``tools/knn.py`` ...), with
its own thread count; the local pool runs N cells at once, and the same :func:`run_cell` runs one cell inside a
SLURM job.

What makes a sweep resumable:
- a cell's state lives in its folder: ``backbone.safetensors`` (pretraining done), ``<stage>_metrics.json`` with the
  stage hash recorded in ``cell.json`` (an evaluation done), checkpoints (pretraining partial: ``resume=auto``);
- a cell runs under an exclusive lock on ``<cell>/.lock`` that its subprocess inherits, so a runner killed while a
  cell's subprocess goes on cannot start that cell a second time: the next runner waits for the lock, then finds the
  cell done or continues it;
- a stage that exits with an error is recorded as failed with its error line and the pool goes on; a stage ended by
  a signal (Ctrl-C, SIGTERM, SIGKILL, preemption) is recorded as interrupted and continues on the next ``run``.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, List, Optional

from ..engine import checkpoint as ckpt
from ..files import write_json
from ..errors import UserError
from .plan import Cell, Plan, Resources, Stage

log = logging.getLogger(__name__)
# the ``ssl-bocb`` command each stage runs (``python -m ssl_bocb <command>``: the installed package's entry point)
COMMANDS = {"pretrain": "pretrain", "knn": "knn", "linprobe": "linprobe", "finetune": "finetune",
            "val_knn": "knn", "val_linprobe": "linprobe"}
# exit codes of a stage ended by a signal (negative: Popen's -signum; 128 + n: a shell's or Python's own report)
SIGNAL_CODES = {-signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL, 130, 137, 143}
POLL_S = 2.0


def record_path(cell: Cell) -> str:
    return os.path.join(cell.folder, "cell.json")


def read_record(cell: Cell) -> Dict:
    try:
        with open(record_path(cell)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_record(cell: Cell, rec: Dict) -> None:
    rec.update(name=cell.name, id=cell.id, hash=cell.hash, labels=cell.labels,
               updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json(record_path(cell), rec)


def result_file(cell: Cell, stage: str) -> str:
    if stage == "pretrain":
        return os.path.join(cell.folder, "backbone.safetensors")
    if stage == "finetune":
        return os.path.join(cell.folder, "finetune", "finetune_metrics.json")
    return os.path.join(cell.folder, f"{stage}_metrics.json")


def stage_hash(cell: Cell, stage: str) -> str:
    return cell.hash if stage == "pretrain" else next(s.hash for s in cell.stages if s.name == stage)


def stage_done(cell: Cell, stage: str, rec: Dict) -> bool:
    if not os.path.isfile(result_file(cell, stage)):
        return False
    if stage == "pretrain":
        return True
    return rec.get("stages", {}).get(stage, {}).get("hash") == stage_hash(cell, stage)


def pending_stages(cell: Cell, rec: Optional[Dict] = None) -> List[str]:
    rec = read_record(cell) if rec is None else rec
    return [s for s in ["pretrain"] + [st.name for st in cell.stages] if not stage_done(cell, s, rec)]


class CellLock:
    """An exclusive, non-blocking flock on ``<cell>/.lock``; its descriptor is passed to the cell's subprocesses,
    so the lock lasts while any of them lives, even if the runner that took it is killed."""

    def __init__(self, cell: Cell):
        os.makedirs(cell.folder, exist_ok=True)
        self.path = os.path.join(cell.folder, ".lock")
        self.fd = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:  # file systems without flock (some NFS mounts): the scheduler is the only guard
            pass
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock (a cell running now)."""
        if self.fd is not None:
            return False
        if not self.acquire():
            return True
        self.release()
        return False


def cell_status(cell: Cell) -> Dict:
    """done | running | failed | interrupted (partial) | pending, with what is left and the error line."""
    rec = read_record(cell)
    left = pending_stages(cell, rec)
    if left and cell.committed is not None:  # done on another machine: its row is in the committed results table
        return dict(state="done", left=[], error="", record=rec, committed=True)
    if not left:
        state = "done"
    elif os.path.isdir(cell.folder) and CellLock(cell).held_elsewhere():
        state = "running"
    elif rec.get("status") == "failed":
        state = "failed"
    elif rec or ckpt.latest_checkpoint(cell.folder):
        state = "interrupted"
    else:
        state = "pending"
    return dict(state=state, left=left, error=rec.get("error", ""), record=rec)


def threads_per_process(res: Resources, parallel: int) -> int:
    return res.threads or max(1, (os.cpu_count() or 1) // (parallel * res.processes))


def stage_command(plan: Plan, cell: Cell, stage: str, res: Resources, stale: bool, port: int) -> List[str]:
    command = COMMANDS[stage]
    if res.processes > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(res.processes), "--num_machines", "1", "--main_process_port", str(port), "-m", "ssl_bocb",
                  command]
    else:
        launch = [sys.executable, "-m", "ssl_bocb", command]
    folder = os.path.abspath(cell.folder)
    workers = [f"data.num_workers={res.workers}"] if res.workers is not None else []
    if stage == "pretrain":
        return launch + [a for f in cell.files for a in ("--config", f)] + cell.overrides + workers + \
            [f"output_dir={folder}", "resume=auto"]
    spec: Stage = next(s for s in cell.stages if s.name == stage)
    args = launch + [a for f in spec.files for a in ("--config", f)] + spec.overrides + workers + \
        [f"checkpoint={folder}"]
    if stage == "finetune":
        return args + [f"output_dir={os.path.join(folder, 'finetune')}", "finetune.resume=auto"]
    return args + [f"output_dir={folder}"] + (["overwrite=true"] if stale else [])


def error_line(log_path: str) -> str:
    """The tool's one-line error ('error: ...'), else the last line of its output (a traceback's last line)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for chunk in text.split("\n") for ln in chunk.split("\r") if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    return (errors[-1][len("error: "):] if errors else (lines[-1] if lines else ""))[:500]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stopped(Exception):
    """The runner was asked to stop (Ctrl-C, SIGTERM, a SLURM time limit)."""


def _acquire(lock: "CellLock", cell: Cell, wait: bool, stop: threading.Event) -> bool:
    """Take the cell's lock, waiting while another runner (or an orphaned subprocess of a killed one) holds it;
    False when not waiting or stopped."""
    waited = False
    while not lock.acquire():
        if not wait or stop.is_set():
            return False
        if not waited:
            owner = open(lock.path).read().strip()
            log.info("cell %s is locked by %s (another runner, or a stage of a killed one still running); waiting",
                     cell.id, owner or "another process")
            waited = True
        time.sleep(POLL_S)
    return True


def _stage_env(threads: int, gpus: Optional[List[int]]) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), TQDM_MININTERVAL="10", PYTHONUNBUFFERED="1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    return env


def _run_stage(plan: Plan, cell: Cell, stage: str, rec: Dict, res: Resources, env: Dict, lock: "CellLock",
               stop: threading.Event, on_proc: Callable) -> Optional[str]:
    """One stage of a cell as a subprocess, recorded before it starts and after it ends; returns None when it is
    done, else the cell's final state (interrupted | failed)."""
    old = rec["stages"].get(stage, {})
    stale = stage != "pretrain" and old.get("hash") not in (None, stage_hash(cell, stage))
    if stale and stage == "finetune" and os.path.isdir(os.path.join(cell.folder, "finetune")):
        os.rename(os.path.join(cell.folder, "finetune"),
                  os.path.join(cell.folder, f"finetune.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    stale = stale or os.path.exists(result_file(cell, stage))
    latest = ckpt.latest_checkpoint(cell.folder) if stage == "pretrain" else None
    attempt = dict(stage=stage, started=time.strftime("%Y-%m-%dT%H:%M:%S"), host=socket.gethostname(),
                   from_step=ckpt.read_meta(latest)["step"] if latest else 0)
    rec["stages"][stage] = dict(old, status="running", hash=stage_hash(cell, stage))
    rec["attempts"].append(attempt)  # recorded before it starts: a runner killed now still counts it
    rec.update(status="running", error="")
    write_record(cell, rec)
    log_path = os.path.join(cell.folder, "logs", f"{stage}.log")
    cmd = stage_command(plan, cell, stage, res, stale, _free_port())
    t0 = time.time()
    with open(log_path, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                pass_fds=(lock.fd,) if lock.fd is not None else ())
        on_proc(proc)
        try:
            rc = proc.wait()
        finally:
            on_proc(None)
    seconds = time.time() - t0
    attempt.update(seconds=round(seconds, 2), rc=rc)
    srec = rec["stages"][stage]
    srec["seconds"] = round(srec.get("seconds", 0.0) + seconds, 2)
    if rc == 0 and os.path.isfile(result_file(cell, stage)):
        srec["status"] = "done"
        write_record(cell, rec)
        return None
    if rc in SIGNAL_CODES or stop.is_set():
        srec["status"] = "interrupted"
        rec.update(status="interrupted", error=f"{stage} stopped by a signal (exit code {rc})")
        write_record(cell, rec)
        return "interrupted"
    line = error_line(log_path) if rc else f"{stage} exited without writing {result_file(cell, stage)}"
    srec["status"] = "failed"
    rec.update(status="failed", error=f"{stage}: {line}", failed_stage=stage)
    write_record(cell, rec)
    return "failed"


def run_cell(plan: Plan, cell: Cell, res: Resources, threads: int, gpus: Optional[List[int]] = None,
             stop: Optional[threading.Event] = None, on_proc: Callable = lambda p: None,
             wait_for_lock: bool = True) -> str:
    """Run what is left of one cell; returns its final state: done | failed | interrupted."""
    stop = stop or threading.Event()
    lock = CellLock(cell)
    if not _acquire(lock, cell, wait_for_lock, stop):
        return "interrupted"
    try:
        rec = read_record(cell)
        rec.setdefault("stages", {})
        rec.setdefault("attempts", [])
        env = _stage_env(threads, gpus)
        os.makedirs(os.path.join(cell.folder, "logs"), exist_ok=True)
        left = pending_stages(cell, rec)
        for stage, srec in rec["stages"].items():  # finished by a runner that was killed before recording it
            if stage not in left and srec.get("status") != "done":
                srec["status"] = "done"
        for stage in left:
            if stop.is_set():
                raise Stopped()
            state = _run_stage(plan, cell, stage, rec, res, env, lock, stop, on_proc)
            if state is not None:
                return state
        rec.update(status="done", error="")
        write_record(cell, rec)
        return "done"
    except Stopped:
        rec.update(status="interrupted")
        write_record(cell, rec)
        return "interrupted"
    finally:
        lock.release()


def gpu_slots(res: Resources, parallel: int) -> List[Optional[List[int]]]:
    if res.gpus == 0:
        return [None] * parallel
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [int(x) for x in visible.split(",") if x.strip()]
    else:
        import torch
        ids = list(range(torch.cuda.device_count()))
    n = len(ids) // res.gpus
    if n == 0:
        raise UserError(f"resources.gpus={res.gpus} per cell, but this machine has {len(ids)} GPU(s); lower it or "
                        f"use `tools/sweep.py submit`")
    return [ids[i * res.gpus:(i + 1) * res.gpus] for i in range(min(n, parallel))]


def _todo(cells: List[Cell], retry_failed: bool):
    """({state: [cell ids]} of the cells not to run, [the cells to run])."""
    outcome: Dict[str, List[str]] = {"done": [], "failed": [], "interrupted": [], "skipped": []}
    todo = []
    for cell in cells:
        st = cell_status(cell)
        if st["state"] == "done":
            outcome["done"].append(cell.id)
        elif st["state"] == "failed" and not retry_failed:
            outcome["skipped"].append(cell.id)
        else:
            todo.append(cell)
    return outcome, todo


def run_local(plan: Plan, parallel: Optional[int] = None, retry_failed: bool = False,
              cells: Optional[List[Cell]] = None, progress: bool = True,
              on_done: Optional[Callable[[Cell], None]] = None) -> Dict[str, List[str]]:
    """Run every cell that is not done, ``parallel`` at a time; returns {state: [cell ids]}. ``on_done`` is called
    (in this thread) after each cell that finished, e.g. to update the results table as cells come in."""
    from tqdm.auto import tqdm
    res = plan.resources
    parallel = parallel or res.parallel
    cells = plan.cells if cells is None else cells
    slots = gpu_slots(res, parallel)
    parallel = len(slots)
    threads = threads_per_process(res, parallel)
    cores = os.cpu_count() or 1
    if parallel * res.processes * threads > cores and res.gpus == 0:
        log.warning("%d cells x %d processes x %d threads oversubscribe the %d cores; expect each cell to run "
                    "several times slower (lower resources.parallel or resources.threads)", parallel,
                    res.processes, threads, cores)
    outcome, todo = _todo(cells, retry_failed)
    log.info("sweep %s: %d cells, %d done, %d to run, %d failed before (skipped; --retry-failed runs them); "
             "%d at a time, %d thread(s) each", plan.name, len(cells), len(outcome["done"]), len(todo),
             len(outcome["skipped"]), parallel, threads)
    stop = threading.Event()
    procs: Dict[int, subprocess.Popen] = {}
    free = list(range(parallel))
    slot_lock = threading.Lock()

    def work(cell: Cell) -> str:
        with slot_lock:
            slot = free.pop()
        try:
            def track(p, key=slot):
                if p is None:
                    procs.pop(key, None)
                else:
                    procs[key] = p
            return run_cell(plan, cell, res, threads, slots[slot], stop, track)
        finally:
            with slot_lock:
                free.append(slot)

    def on_term(signum, frame):
        raise KeyboardInterrupt()
    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() \
        else None
    bar = tqdm(total=len(cells), initial=len(outcome["done"]), unit="cell", desc=f"sweep {plan.name}",
               disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        futures = {pool.submit(work, c): c for c in todo}
        for fut in as_completed(futures):
            cell = futures[fut]
            state = fut.result()
            outcome[state].append(cell.id)
            if state == "failed":
                log.warning("cell %s failed: %s", cell.id, read_record(cell).get("error", ""))
            elif state == "done" and on_done is not None:
                on_done(cell)
            bar.update(1)
            bar.set_postfix(failed=len(outcome["failed"]), refresh=False)
    except KeyboardInterrupt:
        stop.set()
        for p in list(procs.values()):  # Ctrl-C reached them already; SIGTERM to the runner did not
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return outcome
