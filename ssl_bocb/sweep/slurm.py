"""SLURM through submitit: one job array per sweep, one task per cell that is not done, ``resources.parallel``
tasks at a time. A task runs :func:`~ssl_bocb.sweep.runner.run_cell`; when SLURM preempts it or its time limit
comes, submitit calls :meth:`CellJob.checkpoint`, which asks the running stage to stop (SIGINT: pretraining writes
a checkpoint) and requeues the task, which then continues the cell with ``resume=auto``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Dict, List, Optional

import submitit

from ..files import write_json
from ..errors import UserError
from .plan import Plan, plan as make_plan
from .runner import cell_status, run_cell

REQUEUE_MARGIN_S = 15  # of the grace time, left for submitit to write the requeued job and call scontrol requeue


def exited(pid: int, seconds: float) -> bool:
    """Whether child ``pid`` has exited within ``seconds``, without reaping it (its Popen still does)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # reaped already
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def stop_wait(signal_delay_s: int, stop_wait_s: int = 0) -> int:
    """Seconds a stopping stage gets to write its checkpoint: ``stop_wait_s`` (0: all it can), never more than the
    grace time less the requeue's margin (at least 1)."""
    most = max(1, signal_delay_s - REQUEUE_MARGIN_S)
    return most if stop_wait_s <= 0 else min(stop_wait_s, most)


class CellJob(submitit.helpers.Checkpointable):
    """What a SLURM array task runs: the named cell of the sweep file (planned again inside the job, from the same
    file and overrides, so the job and the submitter agree on every cell's name and hash)."""

    def __init__(self, sweep_path: str, extra: List[str], seeds: Optional[List[int]] = None, wait_s: int = 60):
        self.sweep_path = sweep_path
        self.extra = list(extra)
        self.seeds = None if seeds is None else list(seeds)
        self.wait_s = wait_s
        self._proc: Optional[subprocess.Popen] = None

    def __call__(self, cell_id: str) -> str:
        p = make_plan(self.sweep_path, self.extra, self.seeds)
        cell = p.find(cell_id)
        res = p.resources
        env_cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0"))
        threads = res.threads or max(1, (env_cpus or os.cpu_count() or 1) // res.processes)
        return run_cell(p, cell, res, threads, on_proc=self._track)

    def _track(self, proc):
        self._proc = proc

    def checkpoint(self, cell_id: str):
        """submitit calls this in its signal handler, possibly while the runner's own poll of the stage holds the
        Popen's lock: so the stage's exit is watched with waitid, never with the Popen's wait or poll."""
        proc = self._proc
        if proc is not None and proc.returncode is None and not exited(proc.pid, 0):
            proc.send_signal(signal.SIGINT)  # pretraining saves a checkpoint on Ctrl-C
            if not exited(proc.pid, self.wait_s):
                proc.kill()
                exited(proc.pid, 10)
        return submitit.helpers.DelayedSubmission(CellJob(self.sweep_path, self.extra, self.seeds, self.wait_s),
                                                  cell_id)

    def __getstate__(self):
        return {"sweep_path": self.sweep_path, "extra": self.extra, "seeds": self.seeds, "wait_s": self.wait_s}

    def __setstate__(self, state):
        self.__init__(state["sweep_path"], state["extra"], state.get("seeds"), state.get("wait_s", 60))


def executor_for(p: Plan, cluster: Optional[str]) -> submitit.AutoExecutor:
    res = p.resources
    folder = os.path.join(p.output_dir, "slurm", "%j")
    s = res.slurm
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=s.max_requeues,
                               local_max_num_timeout=s.max_requeues)
    params = dict(timeout_min=res.time_limit_min, nodes=1, tasks_per_node=1, slurm_signal_delay_s=s.signal_delay_s,
                  cpus_per_task=max(1, (res.threads or 1) * res.processes), gpus_per_node=res.gpus or None,
                  name=f"sweep-{p.name}", slurm_array_parallelism=res.parallel)
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    if s.additional:
        params["slurm_additional_parameters"] = dict(s.additional)
    if ex.cluster != "slurm":  # the local and debug executors take the generic keys only
        params = {k: v for k, v in params.items() if not k.startswith("slurm_") and v is not None}
    ex.update_parameters(**params)
    return ex


def submit(p: Plan, cluster: Optional[str] = None, retry_failed: bool = False, wait: bool = False) -> Dict:
    """Submit one array of the cells left to run; returns {cell id: job id} (and, with ``wait``, their states)."""
    todo = []
    for cell in p.cells:
        st = cell_status(cell)["state"]
        if st == "running":
            raise UserError(f"cell {cell.id} is running on this machine now; wait for it or stop its runner first")
        if st == "done" or (st == "failed" and not retry_failed):
            continue
        todo.append(cell.id)
    if not todo:
        return {"jobs": {}, "states": {}}
    ex = executor_for(p, cluster)
    s = p.resources.slurm
    job = CellJob(p.path, p.extra, p.seeds, stop_wait(s.signal_delay_s, s.stop_wait_s))
    try:
        jobs = ex.map_array(job, todo)
    except Exception as e:  # sbatch missing, rejected parameters ...
        raise UserError(f"submitting {len(todo)} cells failed ({str(e).splitlines()[0][:300]}); check "
                        f"resources.slurm in the sweep file") from None
    ids = {c: j.job_id for c, j in zip(todo, jobs)}
    record = os.path.join(p.output_dir, "slurm", "submitted.json")
    old = []
    if os.path.isfile(record):
        with open(record) as f:
            old = json.load(f)
    old.append(dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), cluster=ex.cluster, jobs=ids))
    write_json(record, old)
    states = {}
    if wait:
        for c, j in zip(todo, jobs):
            try:
                states[c] = j.result()
            except Exception as e:  # the job itself crashed (not a cell failure, which run_cell records)
                states[c] = f"job failed: {str(e).strip().splitlines()[-1][:300]}"
    return {"jobs": ids, "states": states}
