"""Sweeps: plan expansion, names and hashes, skip-finished, kill and restart, failures, submitit, collect."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from ssl_bocb.errors import UserError
from ssl_bocb.sweep import cell_status, plan
from ssl_bocb.sweep.runner import read_record

SWEEP = os.path.join(REPO, "tools", "sweep.py")
# Tiny cells on the synthetic dataset: a 2-block ViT with 8x8 patches at 32 px, 64 images, batch 16.
BASE = ["data.name=fake", "data.fake_per_class=16", "data.fake_classes=4", "data.num_workers=0",
        "model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs.img_size=32",
        "model.backbone_kwargs.patch_size=8", "model.backbone_kwargs.depth=2", "model.hidden_dim=32",
        "model.out_dim=16", "train.batch_size=16", "train.epochs=2", "train.warmup_epochs=0", "monitor.knn_every=0",
        "train.log_every=1"]


def write_sweep(tmp_path, name="s", **fields):
    doc = dict(name=name, output_dir=str(tmp_path / "out" / name), overrides=list(BASE),
               axes={"optimizer": {"key": "optim.name", "values": ["sgd", "adamw"]}},
               stages={"knn": {"overrides": ["test_subset=4", "knn.ks=[5]", "knn.k=5"]}},
               resources={"parallel": 1, "threads": 1})
    doc.update(fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def sweep_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, SWEEP, *args], capture_output=True, text=True, env=env, timeout=timeout)


def attempts(cell, stage="pretrain"):
    return [a for a in read_record(cell).get("attempts", []) if a["stage"] == stage]


# --- plan ------------------------------------------------------------------------------------------------------------

def test_plan_expands_axes_exclude_grid_and_seeds(tmp_path):
    abl = os.path.join(REPO, "configs", "ablations")
    path = write_sweep(tmp_path, axes={
        "backbone": {"vit": ["model.backbone=vit_tiny_patch16_224"],
                     "resnet18": ["model.backbone=resnet18", "model.backbone_kwargs={}"]},
        "optimizer": {"key": "optim.name", "values": ["sgd", "lars", "adamw"]},
        "frozen-patch": {"off": os.path.join(abl, "patch_trained.yaml"), "on": os.path.join(abl, "patch_frozen.yaml")}},
        exclude=[{"backbone": "resnet18", "frozen-patch": "on"}],
        grid={"adamw": {"base_lr": [1e-4, 3e-4]}}, seeds=[0, 1])
    p = plan(path)
    # (vit: 3 optimizers x 2 patch) + (resnet: 3 x 1) = 9 combinations; adamw ones x 2 lr; x 2 seeds
    assert len(p.cells) == (6 + 3 + 3) * 2
    names = [c.name for c in p.cells]
    assert len(set(names)) == len(names) and len({c.hash for c in p.cells}) == len(names)
    assert "vit__lars__frozen-patch=on__s1" in names and "resnet18__adamw__frozen-patch=off__lr=0.0003__s0" in names
    assert not any(n.startswith("resnet18") and "frozen-patch=on" in n for n in names)
    cell = p.find("vit__adamw__frozen-patch=on__lr=0.0001__s1")
    assert cell.labels == {"backbone": "vit", "optimizer": "adamw", "frozen-patch": "on", "lr": "0.0001", "seed": "1"}
    assert cell.overrides[-2:] == ["optim.base_lr=0.0001", "seed=1"] and cell.files[-1].endswith("patch_frozen.yaml")
    assert os.path.basename(cell.folder) == f"{cell.name}-{cell.hash}" and len(cell.hash) == 8
    assert [s.name for s in cell.stages] == ["knn"]
    # the stage inherits the cell's data and seed
    assert "data.name=\"fake\"" in cell.stages[0].overrides and cell.stages[0].overrides[-1] == "seed=1"


def test_names_and_hashes_are_stable_and_follow_resolved_values(tmp_path, monkeypatch):
    path = write_sweep(tmp_path)
    first = {c.name: c.hash for c in plan(path, ["data.root=/somewhere"]).cells}
    monkeypatch.chdir(tmp_path)  # another folder, another data root, more workers: the same cells
    again = {c.name: c.hash for c in plan(path, ["data.root=/elsewhere", "data.num_workers=3"]).cells}
    assert first == again and list(first) == ["sgd__s0", "adamw__s0"]
    # a value that changes the result changes the hash, the name stays
    changed = {c.name: c.hash for c in plan(path, ["optim.base_lr=0.5"]).cells}
    assert changed.keys() == first.keys() and all(changed[n] != first[n] for n in first)
    # setting a key to its default value is the same resolved config
    same = {c.name: c.hash for c in plan(path, ["train.mixed_precision=auto"]).cells}
    assert same == first
    # more seeds from the command line: the seed-0 cells are the same cells, the new ones are new
    more = plan(path, ["data.root=/somewhere"], seeds=[0, 1])
    assert [c.name for c in more.cells] == ["sgd__s0", "sgd__s1", "adamw__s0", "adamw__s1"]
    assert {c.name: c.hash for c in more.cells if c.name.endswith("s0")} == first
    with pytest.raises(UserError, match="distinct seeds"):
        plan(path, seeds=[1, 1])


@pytest.mark.parametrize("fields,message", [
    (dict(axes={"optimizer": {"key": "optim.name", "values": ["sgd", "sgd"]}}), "same pretraining config"),
    (dict(axes={"x": {"a": "missing.yaml"}}), "does not exist"),
    (dict(axes={"x": {"a": "optim.nme=sgd"}}), "did you mean 'optim.name'"),
    (dict(axes={"x": {"a": "bare"}}), "neither a .yaml file nor a key=value"),
    (dict(exclude=[{"nope": "a"}]), "must map axis names"),
    (dict(exclude=[{"optimizer": "SGD"}]), "has no value 'SGD'"),
    (dict(grid={"lars": {"base_lr": [0.1]}}), "grid.lars matches no cell's optimizer"),
    (dict(stages={"probe": {}}), "unknown stage 'probe'"),
    (dict(resourcez={}), "unknown config key 'resourcez'"),
])
def test_bad_sweep_files_fail_with_one_line(tmp_path, fields, message):
    with pytest.raises(UserError, match=message):
        plan(write_sweep(tmp_path, **fields))


# --- running ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A two-cell sweep run to the end once: the later tests read it."""
    tmp = tmp_path_factory.mktemp("finished")
    path = write_sweep(tmp)
    proc = sweep_cli("run", path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path, proc


@pytest.mark.slow
def test_run_finishes_every_cell_and_collects(finished):
    path, proc = finished
    p = plan(path)
    for cell in p.cells:
        assert cell_status(cell)["state"] == "done"
        assert [a["rc"] for a in read_record(cell)["attempts"]] == [0, 0]  # pretrain, knn: once each
        assert os.path.isfile(os.path.join(cell.folder, "knn_metrics.json"))
    with open(os.path.join(p.output_dir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["sgd", "adamw"] and all(r["state"] == "done" for r in rows)
    assert all(0 <= float(r["knn_top1"]) <= 100 and float(r["final_loss"]) > 0 for r in rows)
    assert all(float(r["images_per_s"]) > 0 and float(r["peak_mem_mb"]) > 0 for r in rows)
    for r, cell in zip(rows, p.cells):  # instability counts come from each run's summary.json
        events = json.load(open(os.path.join(cell.folder, "summary.json")))["events"]
        assert r["nonfinite_steps"] == str(events["nonfinite_steps"]) and r["grad_spikes"] != ""
    md = open(os.path.join(p.output_dir, "results.md")).read()
    assert md.startswith("| optimizer | seed | state | base lr | precision | knn top1") and md.count("\n") == 4
    assert "| adamw | 0 | done | 0.00015 | fp32 |" in md
    assert "| grad spikes | kNN dips | NaN steps | rollbacks |" in md
    assert "| sgd |" in proc.stdout  # the table is printed at the end of `run`
    assert os.path.getsize(os.path.join(p.output_dir, "results.png")) > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for cell in p.cells:
        ea = EventAccumulator(os.path.join(p.output_dir, "tb_hparams", cell.id))
        ea.Reload()
        assert "hparam/knn_top1" in ea.Tags()["scalars"] and ea.PluginTagToContent("hparams")


@pytest.mark.slow
def test_finished_cells_are_never_run_again(finished):
    path, _ = finished
    before = {c.id: read_record(c)["attempts"] for c in plan(path).cells}
    proc = sweep_cli("run", path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 done, 0 to run" in proc.stdout + proc.stderr
    assert {c.id: read_record(c)["attempts"] for c in plan(path).cells} == before
    status = sweep_cli("status", path)
    assert status.returncode == 0 and "2 cells: 2 done" in status.stdout


@pytest.mark.slow
def test_a_changed_stage_config_reruns_only_that_stage(finished, tmp_path):
    path, _ = finished
    doc = yaml.safe_load(open(path))
    doc["stages"]["knn"]["overrides"] = ["test_subset=4", "knn.ks=[3]", "knn.k=3"]
    other = tmp_path / "changed.yaml"
    other.write_text(yaml.safe_dump(doc, sort_keys=False))
    p = plan(str(other))
    assert [c.id for c in p.cells] == [c.id for c in plan(path).cells]  # same pretraining cells
    assert all(cell_status(c)["left"] == ["knn"] for c in p.cells)
    proc = sweep_cli("run", str(other), "--cells", "sgd__s0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cell = p.find("sgd__s0")
    assert len(attempts(cell, "pretrain")) == 1 and len(attempts(cell, "knn")) == 2
    assert json.load(open(os.path.join(cell.folder, "knn_metrics.json")))["protocol"]["k"] == 3
    assert any(f.startswith("knn_metrics.json.old-") for f in os.listdir(cell.folder))  # the old result kept


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path):
    # 2 images per class with batch 16 fails at run time (fewer images than one batch), not at plan time
    path = write_sweep(tmp_path, axes={"data": {"tiny": ["data.fake_per_class=2"], "ok": []}}, stages={})
    proc = sweep_cli("run", path)
    assert proc.returncode == 1 and "1 cell(s) failed" in proc.stderr
    p = plan(path)
    bad, good = p.find("tiny__s0"), p.find("ok__s0")
    st = cell_status(bad)
    assert st["state"] == "failed" and "fewer than one batch" in st["error"] and st["error"].startswith("pretrain:")
    assert cell_status(good)["state"] == "done"
    assert "fewer than one batch" in sweep_cli("status", path).stdout
    # a later run skips it, --retry-failed runs it again
    proc = sweep_cli("run", path)
    assert proc.returncode == 1 and len(attempts(bad)) == 1
    proc = sweep_cli("run", path, "--retry-failed")
    assert proc.returncode == 1 and len(attempts(bad)) == 2 and len(attempts(good)) == 1


def _wait_for(pred, timeout=300):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


def _steps(cell):
    with open(os.path.join(cell.folder, "steps.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.mark.slow
def test_killed_runner_and_killed_cell_finish_with_each_cell_run_once(tmp_path):
    # 3 cells, 24 steps each with a checkpoint every step: long enough to be caught mid-run
    path = write_sweep(tmp_path, overrides=BASE + ["train.epochs=6", "train.save_every_steps=1"],
                       axes={"optimizer": {"key": "optim.name", "values": ["sgd", "adamw", "lamb"]}})
    p = plan(path)
    first, second, third = p.cells
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    runner = subprocess.Popen([sys.executable, SWEEP, "run", path], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    # 1. kill the runner alone (SIGKILL: no clean-up) while the second cell's pretraining is past a checkpoint;
    #    its subprocess goes on as an orphan that holds the cell's lock
    _wait_for(lambda: cell_status(first)["state"] == "done" and os.path.isdir(os.path.join(second.folder,
                                                                                           "checkpoints"))
              and len(os.listdir(os.path.join(second.folder, "checkpoints"))) > 0)
    runner.kill()
    runner.wait()
    restarted = subprocess.Popen([sys.executable, SWEEP, "run", path], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=env, text=True)
    # 2. kill the third cell's pretraining subprocess (as the OOM killer would) after its second checkpoint
    ckpts = os.path.join(third.folder, "checkpoints")
    _wait_for(lambda: os.path.isdir(ckpts) and len([d for d in os.listdir(ckpts) if not d.endswith(".tmp")]) >= 2)
    record = read_record(third)
    lock_owner = open(os.path.join(third.folder, ".lock")).read().split()
    assert int(lock_owner[1]) == restarted.pid and record["stages"]["pretrain"]["status"] == "running"
    child = subprocess.run(["pgrep", "-f", f"output_dir={os.path.abspath(third.folder)}"], capture_output=True,
                           text=True).stdout.split()
    assert child, "the third cell's pretraining subprocess is not running"
    for pid in child:
        os.kill(int(pid), signal.SIGKILL)
    out, _ = restarted.communicate(timeout=600)
    assert restarted.returncode == 1 and "1 interrupted" in out, out[-2000:]
    assert cell_status(third)["state"] == "interrupted"
    # 3. run again: the interrupted cell continues from its checkpoint
    final = sweep_cli("run", path)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    for cell in p.cells:
        assert cell_status(cell)["state"] == "done"
        fresh = [a for a in attempts(cell) if a["from_step"] == 0]
        assert len(fresh) == 1, (cell.id, attempts(cell))  # trained from scratch exactly once
        assert len(attempts(cell, "knn")) == 1
        assert _steps(cell) == list(range(1, 25))  # every step logged once: nothing trained twice
    assert len(attempts(first)) == 1
    assert len(attempts(second)) == 1  # the killed runner's orphan finished it; nobody started it again
    resumed = attempts(third)
    assert len(resumed) == 2 and resumed[1]["from_step"] >= 2 and resumed[0]["rc"] == -signal.SIGKILL


# --- SLURM through submitit ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_submit_with_submitits_local_executor(tmp_path):
    path = write_sweep(tmp_path, axes={"optimizer": {"key": "optim.name", "values": ["sgd"]}})
    proc = sweep_cli("submit", path, "--cluster", "local", "--wait")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sgd__s0" in proc.stdout and proc.stdout.strip().endswith("done")
    p = plan(path)
    assert cell_status(p.cells[0])["state"] == "done"
    submitted = json.load(open(os.path.join(p.output_dir, "slurm", "submitted.json")))
    assert submitted[0]["cluster"] == "local" and list(submitted[0]["jobs"]) == [p.cells[0].id]
    again = sweep_cli("submit", path, "--cluster", "local")
    assert again.returncode == 0 and "nothing to submit" in again.stdout


def test_cell_job_checkpoint_stops_the_stage_and_requeues_the_same_cell(tmp_path):
    import submitit
    from ssl_bocb.sweep.slurm import CellJob
    job = CellJob(write_sweep(tmp_path), [])
    # a stand-in for a stage, started with SIGINT ignored (as a shell script's background job) and listening as the
    # tools do; it says when it listens, so that the stop request cannot come before
    code = ("import signal, sys, time; from ssl_bocb.errors import listen_to_interrupts; listen_to_interrupts(); "
            "print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout.readline().strip() == "ready"
    job._track(proc)
    delayed = job.checkpoint("sgd__s0")
    assert proc.poll() is not None and proc.returncode != -signal.SIGKILL  # stopped by SIGINT, not killed
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.args == ("sgd__s0",)
    assert isinstance(delayed.function, CellJob) and delayed.function.sweep_path == job.sweep_path
    assert delayed.function.wait_s == job.wait_s == 60


def test_the_stop_wait_is_bounded_by_the_grace_time():
    from ssl_bocb.sweep.slurm import stop_wait
    assert [stop_wait(120), stop_wait(120, 30), stop_wait(120, 500), stop_wait(10)] == [105, 30, 105, 1]


def test_the_executor_gets_the_requeue_limit_and_the_grace_time(tmp_path, monkeypatch):
    import submitit.slurm.slurm as submitit_slurm
    from ssl_bocb.sweep.slurm import executor_for
    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # no srun here
    path = write_sweep(tmp_path, resources={"parallel": 1, "threads": 1, "time_limit_min": 30,
                                            "slurm": {"max_requeues": 7, "signal_delay_s": 200}})
    p = plan(path)
    assert executor_for(p, "local")._executor.max_num_timeout == 7
    ex = executor_for(p, "slurm")
    assert ex._executor.max_num_timeout == 7 and ex._executor.parameters["signal_delay_s"] == 200
    sbatch = executor_for(p, "slurm")._executor._make_submission_file_text("cmd", "uid")
    assert "#SBATCH --signal=USR2@200" in sbatch and "#SBATCH --time=30" in sbatch
    assert plan(write_sweep(tmp_path)).resources.slurm.max_requeues == 1000  # the default: keep going
    bad = write_sweep(tmp_path, name="bad", resources={"time_limit_min": 2, "slurm": {"signal_delay_s": 120}})
    with pytest.raises(UserError, match="signal_delay_s must be >= 1 and below the time limit \\(120 s\\)"):
        plan(bad)


@pytest.mark.slow
def test_a_timed_out_job_saves_requeues_and_finishes_its_cell_with_the_local_executor(tmp_path):
    """submitit's local executor, a simulated time-limit signal (USR2, as sbatch --signal sends it) once the stage
    has a checkpoint: the stage writes one on SIGINT, the job is requeued and the cell continues from it to the end."""
    import glob as globmod
    from ssl_bocb.sweep.slurm import CellJob, executor_for
    path = write_sweep(tmp_path, axes={"optimizer": {"key": "optim.name", "values": ["sgd"]}},
                       overrides=list(BASE) + ["train.epochs=30", "train.save_every_steps=4"],
                       resources={"parallel": 1, "threads": 1, "time_limit_min": 10})
    p = plan(path)
    cell = p.cells[0]
    ex = executor_for(p, "local")
    (job,) = ex.map_array(CellJob(p.path, p.extra, p.seeds, wait_s=60), [cell.id])
    deadline = time.time() + 300
    while not globmod.glob(os.path.join(cell.folder, "checkpoints", "step-*", "meta.json")):
        assert time.time() < deadline and not job.done(), "no checkpoint before the deadline"
        time.sleep(0.5)
    # SLURM's USR2 before the time limit, to the task (the local executor's controller forwards only SIGTERM)
    controller = job._process.pid
    (task,) = [int(c) for c in open(f"/proc/{controller}/task/{controller}/children").read().split()]
    os.kill(task, signal.SIGUSR2)
    job.result()
    assert cell_status(cell)["state"] == "done"
    tries = attempts(cell)
    assert len(tries) == 2 and tries[1]["from_step"] > 0 and tries[1]["rc"] == 0  # stopped once, then continued
    log = open(os.path.join(cell.folder, "train.log")).read()  # the run's own log, both parts
    assert "interrupted at step" in log and "resum" in log.split("interrupted at step")[1]


@pytest.mark.slow
def test_collect_and_report_read_the_fine_tunes_stability(tmp_path):
    """A cell with a fine-tune stage: its summary.json (the same training loop as pretraining) gives the finetune_*
    event columns of results.csv and the report's fine-tuning stability table."""
    path = write_sweep(tmp_path, name="ft", axes={"optimizer": {"key": "optim.name", "values": ["adamw"]}},
                       stages={"finetune": {"overrides": ["test_subset=4", "finetune.epochs=2",
                                                          "finetune.batch_size=16", "finetune.mixup_prob=0",
                                                          "finetune.randaugment=", "finetune.log_every=1"]}})
    proc = sweep_cli("run", path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (cell,) = plan(path).cells
    ft = os.path.join(cell.folder, "finetune")
    summary = json.load(open(os.path.join(ft, "summary.json")))
    assert summary["status"] == "finished" and "top1_dips" in summary["events"]
    steps = [json.loads(line) for line in open(os.path.join(ft, "steps.jsonl"))]
    assert len(steps) == 8 and {"first_layer", "block0", "block1", "head"} <= set(steps[0]["layer_grad_norm"])
    with open(os.path.join(plan(path).output_dir, "results.csv")) as f:
        (row,) = list(csv.DictReader(f))
    for key in ("grad_spikes", "top1_dips", "nonfinite_steps", "rollbacks"):
        assert row[f"finetune_{key}"] == str(summary["events"][key])
    from ssl_bocb.analysis.report import analyze
    paths = analyze(plan(path).output_dir, str(tmp_path / "report"), progress=False)
    md = open(paths["md"]).read()
    assert "### Fine-tuning" in md and "top-1 dips" in md
    assert cell.name in json.load(open(paths["json"]))["finetune_stability"]


@pytest.mark.slow
def test_plan_resolves_recipe_paths_from_another_folder(tmp_path):
    """configs/quickstart.yaml in a sweep file is found in the repository when the sweep runs from elsewhere."""
    proc = subprocess.run([sys.executable, SWEEP, "plan", os.path.join(REPO, "configs", "sweeps", "cpu_mini.yaml")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "12 cells" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(REPO, "configs", "sweeps"))
                                  if f.endswith(".yaml")))
@pytest.mark.slow
def test_shipped_sweeps_plan_and_their_committed_rows_stay_done(name):
    """Every sweep file in configs/sweeps plans, and every row of its committed results table is still one of its
    cells with the same stage hashes: an edit to a recipe or a sweep file that would make a new checkout rerun a
    committed study fails here."""
    p = plan(os.path.join(REPO, "configs", "sweeps", name), ["data.root=" + os.path.join(REPO, "..", "shared", "data")])
    assert p.cells
    if not p.results or not os.path.isfile(p.results):
        return
    with open(p.results) as f:
        rows = [r for r in csv.DictReader(f) if r["state"] == "done"]
    ids = {c.id: c for c in p.cells}
    assert rows and all(f"{r['cell']}-{r['hash']}" in ids for r in rows)
    assert all(ids[f"{r['cell']}-{r['hash']}"].committed is not None for r in rows)
    assert all(cell_status(ids[f"{r['cell']}-{r['hash']}"])["state"] == "done" for r in rows)


@pytest.mark.slow
def test_a_committed_results_table_counts_as_done_on_a_new_machine(tmp_path, monkeypatch):
    """With `results:` (relative to the folder the sweep runs from), run writes each finished cell's row to a table
    kept in the repository; a fresh checkout (no cell folders) plans those cells as done and does not run them
    again, and collect keeps their rows."""
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    path = write_sweep(tmp_path, name="c", results="studies/c/results.csv",
                       axes={"optimizer": {"key": "optim.name", "values": ["sgd"]}})
    table = tmp_path / "repo" / "studies" / "c" / "results.csv"
    p = plan(path)
    from ssl_bocb.sweep import collect, run_local
    out = run_local(p, progress=False, on_done=lambda cell: collect(p))
    assert out["done"] == [p.cells[0].id] and table.is_file()
    (row,) = list(csv.DictReader(open(table)))
    assert row["state"] == "done" and row["stage_hashes"] == p.cells[0].stage_hashes and float(row["knn_top1"]) >= 0
    import shutil
    shutil.rmtree(p.output_dir)  # a new machine: the table is there, the cell folders are not
    again = plan(path)
    assert again.cells[0].committed is not None and cell_status(again.cells[0])["state"] == "done"
    assert run_local(again, progress=False)["done"] == [again.cells[0].id]
    assert not os.path.exists(again.cells[0].folder)  # nothing ran
    collect(again)
    (kept,) = list(csv.DictReader(open(table)))
    assert kept["knn_top1"] == row["knn_top1"] and kept["hash"] == row["hash"]
    from ssl_bocb.analysis.report import analyze  # the committed table alone is a source for the report
    report = json.load(open(analyze(str(table), str(tmp_path / "report"), progress=False)["json"]))
    assert report["kind"] == "sweep" and report["study"]["cells"][0]["mean"] == pytest.approx(float(row["knn_top1"]))
    # its stability counts come from the table, the run folder being gone
    events = report["stability"][row["cell"]]
    assert events["source"] == "results.csv" and events["grad_spikes"] == int(row["grad_spikes"])
    assert events["nonfinite_steps"] == int(row["nonfinite_steps"])
    # a changed stage config is not the committed result: that cell runs again
    changed = write_sweep(tmp_path, name="c", results="studies/c/results.csv",
                          axes={"optimizer": {"key": "optim.name", "values": ["sgd"]}},
                          stages={"knn": {"overrides": ["test_subset=4", "knn.ks=[3]", "knn.k=3"]}})
    assert plan(changed).cells[0].committed is None


@pytest.mark.slow
def test_baselines_read_each_backbone_variant_at_random_init_as_the_knn_stage(tmp_path):
    path = write_sweep(tmp_path, name="b", axes={"optimizer": {"key": "optim.name", "values": ["sgd", "adamw"]},
                                                 "frozen-patch": {"off": ["model.frozen_patch_embed=false"],
                                                                  "on": ["model.frozen_patch_embed=true"]}},
                       seeds=[0, 1])
    proc = sweep_cli("baselines", path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.load(open(tmp_path / "out" / "b" / "random_init.json"))
    # one reading per variant (the report's backbone names), not per optimizer or seed
    assert sorted(out) == ["vit_tiny_patch16_224 frozen-patch=off", "vit_tiny_patch16_224 frozen-patch=on"]
    assert proc.stdout.count("random init of") == 2 and all(0 <= v <= 100 for v in out.values())
    knn = json.load(open(tmp_path / "out" / "b" / "random_init" / "vit_tiny_patch16_224_frozen-patch-off" /
                         "knn_metrics.json"))
    assert knn["init"] == "random" and knn["top1"] == out["vit_tiny_patch16_224 frozen-patch=off"]
    assert knn["protocol"]["test_subset"] == 4  # the sweep's knn stage settings


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_cell_with_two_processes_runs_the_package_under_accelerate_launch(tmp_path):
    """resources.processes=2: each stage is `accelerate launch --num_processes 2 -m ssl_bocb <command>` (gloo on the
    CPU), and the cell's pretraining ran as one run of two processes."""
    from ssl_bocb.sweep.runner import stage_command
    path = write_sweep(tmp_path, axes={"optimizer": {"key": "optim.name", "values": ["sgd"]}},
                       resources={"parallel": 1, "threads": 1, "processes": 2})
    p = plan(path)
    cmd = stage_command(p, p.cells[0], "pretrain", p.resources, False, 29517)
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("-m", 3):][:3] == ["-m", "ssl_bocb",
                                                                                           "pretrain"]
    proc = sweep_cli("run", path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cell = p.cells[0]
    assert cell_status(cell)["state"] == "done"
    derived = yaml.safe_load(open(os.path.join(cell.folder, "config.yaml")))["derived"]
    assert derived["world_size"] == 2
