"""The contract every registered method keeps with the loop and with export, checked on a tiny run of each:

- each phase's loss is finite, and its backward reaches that phase's parameters and no others;
- the export reloads in a fresh process and gives the trained student's own samples (same noise, same labels);
- a run stopped by a signal and resumed ends with exactly the weights of the run that was never stopped.

A new method is checked by registering it; ``tests/contract_helpers.py`` takes an entry only when the method's
defaults cannot run on the tiny teacher.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from contract_helpers import MAX_STEPS, STOP_AT, StopAt, contract_run
from stepdistill.runs import export_run
from stepdistill.trainers import build_trainer, discover

METHODS = sorted(discover())


@pytest.fixture(params=METHODS)
def method(request):
    return request.param


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    """Every module the loop trains or checkpoints, by qualified parameter/buffer name."""
    objective = trainer.objective
    names = [n for phase in trainer.phases for n in phase.modules] + list(objective.state_modules)
    return {f"{n}.{k}": v.detach().clone() for n in names for k, v in getattr(objective, n).state_dict().items()}


def test_each_phase_loss_is_finite_and_its_backward_reaches_only_its_parameters(method, tmp_path, teacher_folder):
    trainer = build_trainer(contract_run(method, tmp_path, teacher_folder))
    objective = trainer.objective
    batch = trainer._next_batch()
    for phase in trainer.phases:
        trainer._enter_phase(phase.name)
        loss, terms = objective.loss(phase.name, batch, 0)
        assert loss.ndim == 0 and torch.isfinite(loss), f"{method}: phase {phase.name!r} loss {loss}"
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in terms.values()), (method, phase.name, terms)
        loss.backward()
        mine = {id(p) for n in phase.modules for p in getattr(objective, n).parameters() if p.requires_grad}
        assert mine, f"{method}: phase {phase.name!r} trains no parameter"
        reached = [p for p in objective.parameters() if p.grad is not None]  # zero at the start of DMD: still reached
        assert reached, f"{method}: phase {phase.name!r}'s loss does not depend on its parameters"
        assert all(id(p) in mine for p in reached), f"{method}: phase {phase.name!r} leaks gradients"
        objective.zero_grad(set_to_none=True)
        trainer._restore_modules()


def test_stop_and_resume_equals_the_uninterrupted_run(method, tmp_path, teacher_folder):
    straight = build_trainer(contract_run(method, tmp_path / "straight", teacher_folder, checkpoint_every=STOP_AT))
    straight.train(resume=None)
    run = contract_run(method, tmp_path / "stopped", teacher_folder, checkpoint_every=STOP_AT)
    stopped = build_trainer(run, [StopAt(STOP_AT)])
    stopped.train(resume=None)
    assert stopped.step == STOP_AT
    resumed = build_trainer(run)
    resumed.train(resume="latest")
    assert resumed.step == MAX_STEPS
    a, b = trained_weights(straight), trained_weights(resumed)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], method


_REPLAY = """
import json, sys
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

for line in sys.stdin:
    folder, inputs, out = json.loads(line)
    info = json.load(open(f"{folder}/stepdistill.json"))["export"]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=info["trust_remote_code"])
    if (info.get("lora") or {}).get("format") in ("diffusers", "both"):
        pipe.load_lora_weights(folder)
    if info.get("guidance_adapters"):  # AGD: the documented call that puts the adapters on the base
        from stepdistill.pipelines import load_guidance_adapters
        load_guidance_adapters(pipe, folder)
    pipe.set_progress_bar_config(disable=True)
    given = load_file(inputs)
    kwargs = dict(info["call"]["kwargs"], batch_size=int(given["batch_size"]))
    if "class_labels" in given:
        kwargs["class_labels"] = given["class_labels"]
    images = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    save_file({"images": torch.as_tensor(images).contiguous()}, out)
    print(out, flush=True)
"""


@pytest.fixture(scope="module")
def fresh_process():
    """A Python process that has loaded nothing of the runs: it loads each export folder it is given and
    generates with the call its stepdistill.json names (one process for all methods: Diffusers imports once)."""
    worker = subprocess.Popen([sys.executable, "-c", _REPLAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)

    def replay(folder, inputs, out):
        worker.stdin.write(json.dumps([str(folder), str(inputs), str(out)]) + "\n")
        worker.stdin.flush()
        answer = worker.stdout.readline().strip()
        assert answer == str(out), f"the fresh process failed on {folder} (its traceback is above)"
        return load_file(out)["images"]

    yield replay
    worker.stdin.close()
    worker.wait(timeout=60)


def test_the_export_reloads_in_a_fresh_process_and_gives_the_students_samples(method, tmp_path, teacher_folder,
                                                                             fresh_process):
    run = contract_run(method, tmp_path, teacher_folder)
    trainer = build_trainer(run)
    trainer.train(resume=None)
    try:
        trainer.objective.export_spec()
    except NotImplementedError as exc:  # a stage that trains a part of another method's run
        pytest.skip(f"{method} does not export: {exc}")
    folder = export_run(trainer.output_dir, tmp_path / "export")
    info = json.loads((folder / "stepdistill.json").read_text())["export"]
    assert str(tmp_path) not in (folder / "README.md").read_text(), "the model card names a path of this machine"
    if info["call"]["input"] == "image":
        pytest.skip(f"{method}'s student samples from source images: tests/test_acd.py checks its export")
    n = 3
    expected = trainer.ema_weights() if trainer.ema is not None else torch.no_grad()
    with expected:
        samples = trainer.objective.sample({"batch_size": n}, generator=torch.Generator().manual_seed(0))
    given = {"batch_size": torch.tensor(n)}  # the pipeline's noise is the first draw of the same generator
    if info["call"]["input"] == "class_labels":
        given["class_labels"] = torch.arange(n) % 10
    save_file(given, tmp_path / "inputs.safetensors")
    images = fresh_process(folder, tmp_path / "inputs.safetensors", tmp_path / "images.safetensors")
    torch.testing.assert_close(images, (samples / 2 + 0.5).clamp(0, 1), atol=2e-5, rtol=2e-5)


def test_every_registered_method_is_checked():
    assert {"dmd2", "lcm", "ict", "teacher"} <= set(METHODS) and len(METHODS) >= 16
