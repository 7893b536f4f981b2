"""`stepdistill quickstart` end to end on the shipped digits teacher, with every stage shrunk to seconds."""
import json

import pytest
import torch

from stepdistill import quickstart
from stepdistill.cli import main


@pytest.fixture
def tiny_stages(monkeypatch):
    monkeypatch.setattr(quickstart, "PAIRS", {"n": 64, "nfe": 2, "solver": "dpmpp_2m"})
    for stage in (quickstart.REGRESSION, quickstart.DMD2):
        monkeypatch.setitem(stage, "train", {"max_steps": 2})
    monkeypatch.setitem(quickstart.COMMON, "train", {**quickstart.COMMON["train"], "batch_size": 32})
    monkeypatch.setattr(quickstart, "TEACHER_NFE", (1, 2))


def test_quickstart_writes_pipeline_results_plot_and_samples(tiny_stages, tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--n", "40", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1-step student FID" in printed and str(out / "pipeline") in printed
    for path in ("pipeline/model_index.json", "pipeline/README.md", "results.json", "nfe_vs_fid.png",
                 "samples/quickstart-student_nfe1.png", "samples/digits-teacher_nfe2.png", "quickstart.json"):
        assert (out / path).is_file(), path
    results = json.loads((out / "results.json").read_text())
    assert [(m["name"], [r["nfe"] for r in m["results"]]) for m in results["models"]] == \
        [("digits-teacher", [1, 2]), ("quickstart-student", [1])]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["student_fid"] == results["models"][1]["results"][0]["fid"]
    assert set(summary["seconds"]) == {"pairs", "regression", "dmd2", "export", "benchmark", "total"}
    assert not summary["teacher_results_reused"]  # the shipped curve is at N = 2000, not 40
    # stage 2 started from stage 1's student, and the export is stage 2's generator
    import yaml

    dmd2 = yaml.safe_load((out / "dmd2" / "config.yaml").read_text())
    assert dmd2["objective"]["generator_init"] == str(out / "regression")
    from stepdistill.pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=torch.tensor([3]), output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 1, 16, 16)


def test_the_shipped_teacher_curve_is_reusable_for_the_shipped_teacher():
    """The quickstart reuses assets/digits-teacher/nfe_vs_fid.json only if it measured these exact weights under
    today's protocol (extractor weights, reference, N, seed, noise rule): it must not go stale."""
    from stepdistill.metrics.fid import METRICS, FidelityEvaluator
    from stepdistill.metrics.nfe import NOISE_RULE, reusable_rows
    from stepdistill.metrics.samplers import load_eval_model

    shipped = json.loads(quickstart.TEACHER_RESULTS.read_text())
    evaluator = FidelityEvaluator("digits", "digits", 16, 1, METRICS, None, "cpu", 250, 100, 1000, progress=False)
    protocol = evaluator.protocol(2000) | {"seed": 0, "noise": NOISE_RULE}
    rows = reusable_rows(shipped, load_eval_model("digits-teacher", "teacher"), protocol)
    assert sorted(rows) == list(quickstart.TEACHER_NFE)
    assert rows[64]["fid"] == min(r["fid"] for r in rows.values())


def test_quickstart_t2i_exports_a_stock_pipeline_scored_for_text_alignment(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(quickstart, "T2I_PAIRS", {**quickstart.T2I_PAIRS, "n": 32, "nfe": 2})
    monkeypatch.setitem(quickstart.T2I_REGRESSION, "train", {"max_steps": 2})
    monkeypatch.setitem(quickstart.T2I_COMMON, "train", {**quickstart.T2I_COMMON["train"], "batch_size": 16})
    monkeypatch.setattr(quickstart, "T2I_TEACHER_NFE", (2,))
    out = tmp_path / "qs"
    assert main(["quickstart", "--t2i", "--out", str(out), "--n", "40", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1-step student FID" in printed and "prompt accuracy" in printed
    results = json.loads((out / "results.json").read_text())
    assert [(m["name"], [r["nfe"] for r in m["results"]]) for m in results["models"]] == \
        [("digits-t2i", [2]), ("quickstart-t2i-student", [1])]
    row = results["models"][1]["results"][0]
    for key in ("fid", "clip_score", "prompt_accuracy", "digit_accuracy"):
        assert row.get(key) is not None, key  # (diversity needs 2 samples of a prompt: N >= 718 here)
    assert results["protocol"]["prompts"]["count"] == 359 and "digits-clip" in str(results["protocol"]["clip_score"])
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["student_prompt_accuracy"] == row["prompt_accuracy"]
    # a stock StableDiffusionPipeline whose scheduler runs the student's one step
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]
    images = pipe(["a thick 7"], num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 1, 32, 32)
