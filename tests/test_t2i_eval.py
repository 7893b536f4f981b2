"""`stepdistill eval` / `bench` on text-to-image pipelines: CLIP score, prompt accuracy, diversity, their protocols,
the prompt checks made before any sampling, and --reuse; on tiny random SD 1.5-layout pipelines built offline."""
import itertools
import json

import pytest
import torch

from stepdistill.cli import main
from stepdistill.data import DataError, captioned_digits, read_prompts
from stepdistill.metrics import diversity as div
from stepdistill.metrics.samplers import EvalModel
from stepdistill.metrics.text_alignment import (DigitsJudge, check_clip_prompts, grade, load_eval_prompts, parse_all,
                                                summarize_grades)

TINY_CLIP = "tests/assets/tiny_clip.json"
FAST = ["--n", "8", "--batch-size", "8", "--kid-subsets", "2", "--floor-splits", "0", "--metrics", "fid,kid",
        "--no-progress"]
PROMPTS = ["a 7", "a thin 3", "zero", "an 8"]  # in the captions' vocabulary, short enough for a 16-token tokenizer


def tiny_clip(seed=0):
    from stepdistill.metrics.clip_score import load_clip

    torch.manual_seed(seed)
    return load_clip(TINY_CLIP, allow_random=True)


def clip_folder(path, seed=0):
    """A random tiny open_clip saved as a local-dir: folder (open_clip_config.json + open_clip_model.safetensors)."""
    from safetensors.torch import save_file

    path.mkdir()
    clip = tiny_clip(seed)
    config = json.loads(open(TINY_CLIP).read())
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    weights = {k: v.contiguous() for k, v in clip.model.state_dict().items()}
    save_file(weights, str(path / "open_clip_model.safetensors"))
    return path


def sd77_folder(path):
    """Tiny SD 1.5 layout (tests/text_teachers.py) whose tokenizer and text encoder take 77 tokens, so that the
    character-level tokenizer fits the captions' prompts (up to 54 tokens)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from text_teachers import SCALED, UNET
    from tiny import clip_tokenizer, tiny_vae

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = 77
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                           eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(cross_attention_dim=32, **UNET)
    sched = PNDMScheduler(**SCALED, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    StableDiffusionPipeline(vae=tiny_vae(), text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from text_teachers import sd_folder

    root = tmp_path_factory.mktemp("t2i")
    sd_folder(root / "sd")  # tokenizer model_max_length 16
    sd77_folder(root / "sd77")
    clip_folder(root / "clip")
    clip_folder(root / "clip1", seed=1)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "other.txt").write_text("a 1\na 2\n")
    (root / "cache").mkdir()
    return root


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if anything is sampled (errors must come before any sampling work)."""
    def sample(*args, **kwargs):
        raise AssertionError("sampled before the error")

    monkeypatch.setattr(EvalModel, "sample", sample)


# ---- diversity --------------------------------------------------------------------------------------------------
def test_diversity_is_the_mean_over_groups_of_the_mean_pairwise_distance(monkeypatch):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(23, 5, generator=g, dtype=torch.float64)
    keys = [i % 4 for i in range(22)] + [9]  # groups of 6, 6, 5, 5 and one of 1 (skipped)
    direct = []
    for key in range(4):
        idx = [i for i, k in enumerate(keys) if k == key]
        pairs = list(itertools.combinations(idx, 2))
        direct.append(sum(float((features[a] - features[b]).norm()) for a, b in pairs) / len(pairs))
    result = div.group_diversity(features, keys)
    assert result["diversity"] == pytest.approx(sum(direct) / 4, rel=1e-9)
    assert result["groups"] == 4 and result["group_sizes"] == [5, 6]
    monkeypatch.setattr(div, "CHUNK", 2)  # the chunked sum is the same
    assert div.group_diversity(features, keys)["diversity"] == pytest.approx(sum(direct) / 4, rel=1e-9)
    # identical samples within each group (mode collapse) give 0; groups of one give no value
    same = features[torch.tensor(keys) % 4]
    assert div.group_diversity(same, keys)["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert div.group_diversity(features[:3], [0, 1, 2])["diversity"] is None


def test_real_reference_is_the_expected_diversity_of_a_random_group():
    """R(c) = the mean over every m-subset of class c of D(subset), for each m >= 2 (all pairs equally likely)."""
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(11, 4, generator=g, dtype=torch.float64), torch.tensor([0] * 6 + [1] * 5)
    real = div.class_distances(features, labels)
    for m in (2, 3, 5):
        subsets = list(itertools.combinations(range(6), m))
        expected = sum(div.mean_pairwise_distance(features[list(s)]) for s in subsets) / len(subsets)
        assert real[0] == pytest.approx(expected, rel=1e-9)
    keys = [0, 0, 1, 1, 2, 2, 3]  # groups 0-2 have 2 samples; group 3 has one
    assert div.reference_diversity(keys, lambda k: k % 2, real) == pytest.approx((2 * real[0] + real[1]) / 3)
    assert div.reference_diversity(keys, lambda k: None, real) is None


# ---- prompt accuracy --------------------------------------------------------------------------------------------
def test_prompt_accuracy_of_real_digits_is_high_with_their_captions_and_low_with_others():
    records = captioned_digits("eval")[:120]
    images = (torch.stack([r.image for r in records]) + 1) / 2  # 32x32 in [0, 1]
    _, predicted = DigitsJudge()(images)
    own = summarize_grades(grade(images, [(r.label, r.asked) for r in records], predicted))
    assert own["digit_accuracy"] >= 0.95 and own["prompt_accuracy"] >= 0.9
    assert set(own["attribute_accuracy"]) == {"thickness", "slant", "width"}
    assert min(own["attribute_accuracy"].values()) >= 0.9
    shuffled = [(r.label, r.asked) for r in records[7:] + records[:7]]
    other = summarize_grades(grade(images, shuffled, predicted))
    assert other["digit_accuracy"] < 0.3 and other["prompt_accuracy"] < 0.15


def test_named_prompt_set_and_empty_prompts(tmp_path):
    prompts = load_eval_prompts("digits-captions:eval")
    assert 359 <= len(prompts.prompts) <= 360 and prompts.path is None
    assert prompts.identity()["spec"] == "digits-captions:eval" and len(prompts.sha256) == 64
    parsed, note = parse_all(prompts)
    assert note is None and len(parsed) == len(prompts.prompts)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a 7"}\n{"prompt": "   "}\n')
    assert [r.prompt for r in read_prompts(path)] == ["a 7", "   "]  # training data may hold the empty prompt
    with pytest.raises(DataError, match=r"p\.jsonl, line 2: the prompt is empty"):
        load_eval_prompts(str(path))
    unparsed = tmp_path / "cats.txt"
    unparsed.write_text("a 7\na cat\n")
    parsed, note = parse_all(load_eval_prompts(str(unparsed)))
    assert parsed is None and "line 2" in note and "not computed" in note


def test_clip_context_check():
    prompts = load_eval_prompts("digits-captions:eval")
    check_clip_prompts(tiny_clip(), prompts)  # the captions fit the tiny CLIP's 16 tokens
    from stepdistill.metrics.text_alignment import as_eval_prompts

    with pytest.raises(DataError, match=r"\(16 tokens.*prompt 2: 'a very .*' is 25 tokens"):
        check_clip_prompts(tiny_clip(), as_eval_prompts(["a 7", "a " + "very " * 20 + "thin 7"]))


# ---- eval and bench end to end ----------------------------------------------------------------------------------
def test_eval_text_pipeline_reports_clip_prompt_accuracy_and_diversity(root, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", str(root / "sd"), "--kind", "teacher", "--nfe", "1,2", "--prompts", str(root / "prompts.txt"),
                 "--clip", f"local-dir:{root / 'clip'}", "--cache-dir", str(root / "cache"), "--out", str(out),
                 *FAST]) == 0
    results = json.loads(out.read_text())
    rows = results["models"][0]["results"]
    assert [r["nfe"] for r in rows] == [1, 2]
    for r in rows:
        assert {"fid", "clip_score", "clip_score_std", "prompt_accuracy", "digit_accuracy", "attribute_accuracy",
                "diversity", "diversity_real"} <= set(r)
        assert 0 <= r["prompt_accuracy"] <= r["digit_accuracy"] <= 1
        assert set(r["attribute_accuracy"]) == {"thickness"}  # only "a thin 3" names an attribute
        assert r["diversity"] > 0 and r["diversity_real"] > 0
    p = results["protocol"]
    assert p["prompts"]["count"] == 4 and p["prompts"]["samples_per_prompt"] == [2, 2]
    assert p["prompts"]["path"] == str((root / "prompts.txt").resolve()) and len(p["prompts"]["file_sha256"]) == 64
    assert p["clip_score"]["weights_sha256"] and p["clip_score"]["scale"] == 100.0
    assert p["clip_score"]["cfg_scale"] == {"sd": 7.5}  # the stock pipeline's default guidance
    assert p["prompt_accuracy"]["computed"] and p["prompt_accuracy"]["classifier"]["weights_sha256"]
    assert "||f_i - f_j||" in p["diversity"]["definition"]
    printed = capsys.readouterr().out
    assert "CLIP" in printed and "prompt acc" in printed and "diversity" in printed
    from PIL import Image

    with Image.open(out.parent / "nfe_vs_fid.png") as img:  # FID, KID, CLIP | prompt accuracy, diversity
        assert img.size == (1800, 960)


def test_text_pipeline_without_prompts_uses_the_held_out_captions(root, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", str(root / "sd77"), "--nfe", "1", "--clip", "none", "--cache-dir", str(root / "cache"),
                 "--out", str(out), *FAST]) == 0
    assert "no --prompts was given: evaluating it on digits-captions:eval" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["protocol"]["prompts"]["spec"] == "digits-captions:eval"
    assert "clip_score" not in results["protocol"]
    row = results["models"][0]["results"][0]
    assert "prompt_accuracy" in row and "clip_score" not in row
    assert "diversity" not in row  # 8 samples over 359 prompts: no prompt has two samples (said in the log)


def test_bad_prompts_fail_before_sampling(root, tmp_path, capsys, no_sampling, teacher_folder):
    args = ["--cache-dir", str(root / "cache"), "--out", str(tmp_path / "r.json"), *FAST]
    empty = tmp_path / "p.jsonl"
    empty.write_text('{"prompt": "a 7"}\n{"prompt": ""}\n')
    assert main(["eval", str(root / "sd"), "--prompts", str(empty), *args]) == 2
    assert "p.jsonl, line 2: the prompt is empty" in capsys.readouterr().err
    long = tmp_path / "long.txt"
    long.write_text("a 7\n\na handwritten 7, thin\n")
    assert main(["eval", str(root / "sd"), "--prompts", str(long), "--clip", "none", *args]) == 2
    err = capsys.readouterr().err
    assert "long.txt, line 3: 'a handwritten 7, thin' is 20 tokens" in err and "16 tokens" in err
    assert main(["eval", str(root / "sd"), "--clip", "none", *args]) == 2  # the default captions are too long here
    assert "digits-captions:eval, prompt 1" in capsys.readouterr().err
    # text arguments for a class-conditional pipeline, and the default class-conditional bench teacher
    assert main(["eval", str(teacher_folder), "--prompts", str(root / "prompts.txt"), *args]) == 2
    assert "is class-conditional: it takes no prompts" in capsys.readouterr().err
    assert main(["eval", str(teacher_folder), "--clip", f"local-dir:{root / 'clip'}", *args]) == 2
    assert "--clip scores text-to-image pipelines" in capsys.readouterr().err
    assert main(["bench", "--student", str(root / "sd"), "--prompts", str(root / "prompts.txt"),
                 "--out-dir", str(tmp_path / "b"), *args[:2], *FAST]) == 2
    assert "digits-teacher" in capsys.readouterr().err
    assert main(["eval", str(root / "sd"), "--prompts", str(root / "prompts.txt"), "--clip-weights", "w.pt",
                 *args]) == 2
    assert "--clip-weights FILE needs --clip ARCH" in capsys.readouterr().err


def test_bench_reuses_text_rows_only_with_the_same_prompts_and_clip(root, tmp_path):
    base = ["bench", "--teacher", str(root / "sd77"), "--teacher-nfe", "1", "--cache-dir", str(root / "cache"), *FAST]

    def bench(name, prompts="prompts.txt", clip="clip", reuse=None):
        out = tmp_path / name
        args = [*base, "--out-dir", str(out), "--prompts", str(root / prompts),
                "--clip", f"local-dir:{root / clip}" if clip != "none" else "none"]
        assert main(args + (["--reuse", str(tmp_path / reuse / "results.json")] if reuse else [])) == 0
        return json.loads((out / "results.json").read_text())["models"][0]["results"][0]

    first = bench("first")
    again = bench("again", reuse="first")
    assert again["reused"] and again["clip_score"] == first["clip_score"] and again["diversity"] == first["diversity"]
    assert not bench("prompts", prompts="other.txt", reuse="first").get("reused")
    assert not bench("clip", clip="clip1", reuse="first").get("reused")
    no_clip = bench("noclip", clip="none", reuse="first")
    assert no_clip["reused"] and "clip_score" not in no_clip and no_clip["prompt_accuracy"] == first["prompt_accuracy"]
