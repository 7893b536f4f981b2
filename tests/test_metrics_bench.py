"""`stepdistill eval` and `stepdistill bench` end to end on a tiny class-conditional teacher and student."""
import json

import pytest
import torch
from PIL import Image

from stepdistill.cli import main
from tiny import TINY_SCHEDULER, TINY_UNET

RESULT_KEYS = {"nfe", "fid", "kid_mean", "kid_std", "seconds_per_image", "n", "diversity", "diversity_real"}
FAST = ["--n", "40", "--batch-size", "20", "--kid-subsets", "5", "--floor-splits", "2", "--no-progress"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny teacher folder (save_model) and an exported-style student pipeline folder (2 DDIM steps)."""
    from diffusers import DDIMScheduler

    from stepdistill.config import ModelConfig
    from stepdistill.models import build_model, save_model
    from stepdistill.pipelines import ClassConditionalPipeline

    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    loaded = build_model(ModelConfig(source="", backbone="UNet2DModel", backbone_config=dict(TINY_UNET),
                                     scheduler="DDPMScheduler", scheduler_config=dict(TINY_SCHEDULER)))
    save_model(loaded.denoiser, loaded.scheduler, root / "teacher", {"num_classes": 10, "resolution": 8, "channels": 1})
    pipe = ClassConditionalPipeline(unet=loaded.denoiser.backbone,
                                    scheduler=DDIMScheduler.from_config(loaded.scheduler.config),
                                    num_inference_steps=2, null_class=10)
    pipe.save_pretrained(root / "student")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fid-cache"))


def check_schema(results, names_kinds, nfes):
    assert set(results) == {"protocol", "models"}
    assert [(m["name"], m["kind"]) for m in results["models"]] == names_kinds
    for model, expected in zip(results["models"], nfes):
        assert set(model) == {"name", "kind", "results"}
        assert [r["nfe"] for r in model["results"]] == expected
        for r in model["results"]:
            assert set(r) == RESULT_KEYS
            assert r["n"] == 40 and r["seconds_per_image"] > 0 and r["fid"] > 0 and r["kid_std"] >= 0
    p = results["protocol"]
    for key in ("computed", "feature_extractor", "n_generated", "reference", "resolution", "seed", "guidance",
                "class_labels", "noise", "latency", "real_vs_real", "models", "kid_subset_size"):
        assert p[key] is not None, key
    assert p["feature_extractor"]["weights_sha256"] and p["reference"]["size"] == 1797
    assert p["n_generated"] == 40 and p["resolution"] == 8 and p["seed"] == 0


def test_bench_teacher_and_student(folders, cache, tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--teacher", str(folders / "teacher"), "--teacher-nfe", "1,2",
                 "--student", str(folders / "student"), "--out-dir", str(out), "--cache-dir", cache, *FAST])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    check_schema(results, [("teacher", "teacher"), ("student", "student")], [[1, 2], [2]])
    teacher, student = results["models"]
    # same labels, same noise, same network and sampler at NFE 2: the same images, so the same numbers
    assert student["results"][0]["fid"] == pytest.approx(teacher["results"][1]["fid"], rel=1e-6)
    assert student["results"][0]["kid_mean"] == pytest.approx(teacher["results"][1]["kid_mean"], rel=1e-6)
    p = results["protocol"]
    assert p["guidance"] == 1.0 and p["models"]["teacher"]["sampler"].startswith("DDIM")
    assert p["models"]["student"]["nfe"] == [2] and p["class_labels"].startswith("sample i has class i % 10")
    details = json.loads((out / "details.json").read_text())
    assert {"precision", "recall", "isc_mean"} <= set(details["models"][0]["results"][0])
    with Image.open(out / "nfe_vs_fid.png") as img:
        assert img.width > 300
    grids = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert grids == ["student_nfe2.png", "teacher_nfe1.png", "teacher_nfe2.png"]


def test_eval_one_model_same_schema(folders, cache, tmp_path, capsys):
    out = tmp_path / "scores" / "student.json"
    code = main(["eval", str(folders / "student"), "--out", str(out), "--cache-dir", cache,
                 "--metrics", "fid,kid", *FAST])
    assert code == 0
    results = json.loads(out.read_text())
    check_schema(results, [("student", "student")], [[2]])  # the student's own saved steps
    assert (out.parent / "samples" / "student_nfe2.png").is_file()
    printed = capsys.readouterr().out
    floor = results["protocol"]["real_vs_real"]["fid_floor"]
    assert "FID" in printed and f"real vs real at this N (the floor no model can beat): FID {floor:.4g}" in printed
    # a teacher folder at explicit NFE, sampled with DDIM, guidance recorded
    out2 = tmp_path / "teacher.json"
    assert main(["eval", str(folders / "teacher"), "--nfe", "1", "--guidance", "2", "--out", str(out2),
                 "--cache-dir", cache, "--metrics", "fid,kid", *FAST]) == 0
    results = json.loads(out2.read_text())
    check_schema(results, [("teacher", "teacher")], [[1]])
    assert results["protocol"]["guidance"] == 2.0


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere"), *FAST]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["bench", "--teacher", "none", *FAST]) == 2
    assert "nothing to benchmark" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--nfe", "0", *FAST]) == 2
    assert main(["bench", "--teacher", str(tmp_path), "--features", f"inception:{tmp_path / 'x.pth'}", *FAST]) == 2


def test_eval_reads_the_steps_an_export_recorded(folders, cache, tmp_path):
    """A student written by export_pipeline is evaluated at the steps in its stepdistill.json; with the same
    network and DDIM-trailing timesteps it reproduces the teacher's numbers at that NFE."""
    export = pytest.importorskip("stepdistill.pipelines.export")
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_model

    loaded = load_model(ModelConfig(source=str(folders / "teacher")))
    folder = export.export_pipeline(loaded.denoiser, "ddim_trailing", tmp_path / "exported", steps=2,
                                    base_scheduler=loaded.scheduler, num_classes=10)
    out = tmp_path / "exported.json"
    assert main(["eval", str(folder), "--out", str(out), "--cache-dir", cache, "--metrics", "fid,kid", *FAST]) == 0
    student = json.loads(out.read_text())["models"][0]
    assert student["kind"] == "student" and [r["nfe"] for r in student["results"]] == [2]
    out2 = tmp_path / "teacher.json"
    assert main(["eval", str(folders / "teacher"), "--nfe", "2", "--out", str(out2), "--cache-dir", cache,
                 "--metrics", "fid,kid", *FAST]) == 0
    teacher = json.loads(out2.read_text())["models"][0]
    assert student["results"][0]["fid"] == pytest.approx(teacher["results"][0]["fid"], rel=1e-5)


def test_bench_reuses_a_measurement_only_under_the_same_protocol(folders, cache, tmp_path):
    first = tmp_path / "first"
    args = ["bench", "--teacher", str(folders / "teacher"), "--teacher-nfe", "1,2", "--cache-dir", cache]
    assert main([*args, "--out-dir", str(first), *FAST]) == 0
    old = json.loads((first / "results.json").read_text())
    (first / "results.json").write_text(json.dumps(old).replace(str(folders), "/elsewhere"))  # paths may differ

    again = tmp_path / "again"
    assert main([*args, "--teacher-nfe", "1,2,4", "--out-dir", str(again), "--reuse", str(first / "results.json"),
                 *FAST]) == 0
    rows = json.loads((again / "results.json").read_text())["models"][0]["results"]
    assert [r.get("reused", False) for r in rows] == [True, True, False]
    assert [r["fid"] for r in rows[:2]] == [r["fid"] for r in old["models"][0]["results"]]
    assert sorted(p.name for p in (again / "samples").glob("*.png")) == ["teacher_nfe4.png"]

    other_seed = tmp_path / "seed1"
    assert main([*args, "--out-dir", str(other_seed), "--reuse", str(first / "results.json"), *FAST,
                 "--seed", "1"]) == 0
    rows = json.loads((other_seed / "results.json").read_text())["models"][0]["results"]
    assert not any(r.get("reused") for r in rows)
    assert main([*args, "--out-dir", str(tmp_path / "x"), "--reuse", str(tmp_path / "none.json"), *FAST]) == 2


def test_a_lora_export_is_evaluated_with_its_lora(folders, cache, tmp_path):
    """Its folder holds the base weights and a LoRA file; eval must load the LoRA as the model card does, so the
    numbers equal those of the same student exported fused."""
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_model
    from stepdistill.pipelines.export import export_pipeline

    student = load_model(ModelConfig(source=str(folders / "teacher"))).denoiser
    student.with_lora(4)
    torch.manual_seed(0)
    for name, p in student.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a LoRA that changes the outputs
    loaded = load_model(ModelConfig(source=str(folders / "teacher")))
    results = {}
    for fmt in ("diffusers", "fused"):
        folder = export_pipeline(student, "ddim_trailing", tmp_path / fmt, steps=2, base_scheduler=loaded.scheduler,
                                 num_classes=10, lora_format=fmt)
        assert ((folder / "pytorch_lora_weights.safetensors").is_file()) == (fmt == "diffusers")
        out = tmp_path / f"{fmt}.json"
        assert main(["eval", str(folder), "--out", str(out), "--cache-dir", cache, "--metrics", "fid,kid", *FAST]) == 0
        results[fmt] = json.loads(out.read_text())["models"][0]["results"][0]["fid"]
    base = tmp_path / "base.json"
    assert main(["eval", str(folders / "teacher"), "--nfe", "2", "--out", str(base), "--cache-dir", cache,
                 "--metrics", "fid,kid", *FAST]) == 0
    assert results["diffusers"] == pytest.approx(results["fused"], rel=1e-4)
    assert results["diffusers"] != pytest.approx(json.loads(base.read_text())["models"][0]["results"][0]["fid"], rel=1e-3)


def test_eval_at_custom_timesteps(folders, cache, tmp_path, capsys):
    """--timesteps samples the len(timesteps)-step point at those timesteps: LCMScheduler's own 2 steps give the
    default's numbers, other timesteps other images; the protocol records them."""
    from diffusers import LCMScheduler

    from stepdistill.pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(folders / "student")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "lcm")
    args = ["eval", str(tmp_path / "lcm"), "--cache-dir", cache, "--metrics", "fid,kid", *FAST]
    runs = {}
    for name, extra in (("default", ["--nfe", "2"]), ("same", ["--timesteps", "999,499"]),
                        ("other", ["--timesteps", "999,259"])):
        assert main([*args, *extra, "--out", str(tmp_path / f"{name}.json")]) == 0
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    fid = {k: r["models"][0]["results"][0]["fid"] for k, r in runs.items()}
    assert [r["nfe"] for r in runs["other"]["models"][0]["results"]] == [2]
    assert fid["same"] == pytest.approx(fid["default"], rel=1e-6)
    assert fid["other"] != pytest.approx(fid["default"])
    assert runs["other"]["protocol"]["models"]["lcm"]["timesteps"] == [999, 259]
    assert main([*args, "--timesteps", "499,999"]) == 2
    assert "decreasing" in capsys.readouterr().err
    assert main(["eval", str(folders / "teacher"), "--timesteps", "999,499", *FAST]) == 2
    assert "needs a student pipeline" in capsys.readouterr().err


def test_eval_with_eta(folders, cache, tmp_path, capsys):
    """--eta is the call's eta (a TCD student's gamma): the pipeline's saved eta is the default, another gamma gives
    other images, and the protocol records it; out of [0, 1], or for a teacher, it is a clear error."""
    from diffusers import TCDScheduler

    from stepdistill.pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(folders / "student")
    pipe = ClassConditionalPipeline(unet=pipe.unet, scheduler=TCDScheduler.from_config(pipe.scheduler.config),
                                    num_inference_steps=2, null_class=10, eta=0.3)
    pipe.save_pretrained(tmp_path / "tcd")
    args = ["eval", str(tmp_path / "tcd"), "--cache-dir", cache, "--metrics", "fid,kid", *FAST]
    runs = {}
    for name, extra in (("default", []), ("same", ["--eta", "0.3"]), ("other", ["--eta", "1.0"])):
        assert main([*args, *extra, "--out", str(tmp_path / f"{name}.json")]) == 0
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    fid = {k: r["models"][0]["results"][0]["fid"] for k, r in runs.items()}
    assert fid["same"] == pytest.approx(fid["default"], rel=1e-6)
    assert fid["other"] != pytest.approx(fid["default"])
    assert runs["other"]["protocol"]["models"]["tcd"]["eta"] == 1.0
    assert main([*args, "--eta", "1.5"]) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err
    assert main(["eval", str(folders / "teacher"), "--eta", "0.5", *FAST]) == 2
    assert "needs a student pipeline" in capsys.readouterr().err


def test_code_in_an_evaluated_folder_runs_only_when_the_user_trusts_it(folders, tmp_path, capsys):
    """A downloaded folder cannot grant itself trust: its stepdistill.json saying trust_remote_code is ignored; the
    package's own one-line shims still load as they are."""
    from stepdistill.config import ModelConfig
    from stepdistill.metrics.samplers import load_eval_model
    from stepdistill.models import ModelLoadError, load_model
    from stepdistill.pipelines.export import export_pipeline

    loaded = load_model(ModelConfig(source=str(folders / "teacher")))
    folder = export_pipeline(loaded.denoiser, "ddim_trailing", tmp_path / "export", steps=2,
                             base_scheduler=loaded.scheduler, num_classes=10)
    assert load_eval_model(str(folder)).pipe is not None  # only stepdistill's shim: loads without a flag
    marker = tmp_path / "ran.txt"
    (folder / "pipeline.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                        "from stepdistill.pipelines import ClassConditionalPipeline\n\n\n"
                                        "class Evil(ClassConditionalPipeline):\n    pass\n")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": ["pipeline", "Evil"]}))
    meta = json.loads((folder / "stepdistill.json").read_text())
    meta["export"]["trust_remote_code"] = True  # what the folder says counts for nothing
    (folder / "stepdistill.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_eval_model(str(folder))
    assert main(["eval", str(folder), "--n", "4"]) == 2
    assert "pipeline.py" in capsys.readouterr().err and not marker.exists()
    assert main(["bench", "--teacher", "none", "--student", str(folder), "--out-dir", str(tmp_path / "b")]) == 2
    assert not marker.exists()
    assert type(load_eval_model(str(folder), trust_remote_code=True).pipe).__name__ == "Evil"  # the user's word
    assert marker.exists()
