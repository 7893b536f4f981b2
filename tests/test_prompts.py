"""Prompt files, prompt encoding with a pipeline's own (tiny, offline) text encoders, and prompt caches."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.conditioning import Cond
from stepdistill.prompts import PromptEncoder, prompt_family
from stepdistill.data import DataError, PromptDataset, PromptRecord, ResumableBatches, read_prompts

from tiny import MAX_LEN, clip_model, clip_tokenizer, t5_model, t5_tokenizer


# ---- tiny offline text stacks -----------------------------------------------------------------------------------
def sd_encoder(**options):
    return PromptEncoder("sd", tokenizer=clip_tokenizer(), text_encoder=clip_model(), **options)


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


PROMPTS = ["a cat", "a dog", "zebra"]


# ---- prompt files -----------------------------------------------------------------------------------------------
def test_read_prompts_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog on a mat  \n\n", encoding="utf-8")
    records = read_prompts(path)
    assert [r.prompt for r in records] == ["a cat", "a dog on a mat"]
    assert [r.line for r in records] == [1, 3] and records[0].image is None


def test_read_prompts_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "image": "img/a.png"}) + "\n\n"
                    + json.dumps({"prompt": "", "other": 1}) + "\n")
    records = read_prompts(path)
    assert records == [PromptRecord("a cat", (tmp_path / "img" / "a.png").resolve()), PromptRecord("")]
    assert records[1].line == 3


@pytest.mark.parametrize("content, message", [
    ("", "has no prompts"),
    ("\n  \n", "has no prompts"),
    ('{"prompt": "a"}\n{"text": "b"}\n', r"line 2: no \"prompt\" field"),
    ('{"prompt": "a"}\n\nnot json\n', "line 3: not valid JSON"),
    ('{"prompt": 3}\n', "line 1: \"prompt\" must be a string"),
    ('{"prompt": "a", "image": "missing.png"}\n', r"line 1: image .*missing\.png does not exist"),
])
def test_read_prompts_errors(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_read_prompts_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


# ---- SD: one CLIP ----------------------------------------------------------------------------------------------
def test_sd_encoder_matches_text_encoder():
    enc = sd_encoder()
    cond = enc.encode(PROMPTS)
    assert isinstance(cond, Cond) and cond.encoder_hidden_states.shape == (3, MAX_LEN, 32)
    assert cond.pooled is None and cond.time_ids is None and not cond.encoder_hidden_states.requires_grad
    ids = enc.pipeline.tokenizer(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True,
                                 return_tensors="pt").input_ids
    with torch.no_grad():
        expected = enc.pipeline.text_encoder(ids)[0]
    torch.testing.assert_close(cond.encoder_hidden_states, expected)
    assert not torch.allclose(cond.encoder_hidden_states[0], cond.encoder_hidden_states[1])
    torch.testing.assert_close(enc.encode("a dog").encoder_hidden_states, cond.encoder_hidden_states[1:2])
    null = enc.null()
    assert null.batch_size == 1
    torch.testing.assert_close(null.encoder_hidden_states, enc.encode("").encoder_hidden_states)
    # Batching inside encode does not change the result.
    small = sd_encoder(batch_size=2)
    torch.testing.assert_close(small.encode(PROMPTS).encoder_hidden_states, cond.encoder_hidden_states)


def test_sd_null_works_with_null_like():
    enc = sd_encoder()
    cond = enc.encode(PROMPTS)
    uncond = cond.null_like(enc.null())
    assert uncond.encoder_hidden_states.shape == cond.encoder_hidden_states.shape
    torch.testing.assert_close(uncond.encoder_hidden_states[2], enc.null().encoder_hidden_states[0])


def test_encode_cached_reuses_file_and_keys_on_weights(tmp_path):
    enc = sd_encoder()
    calls = count_calls(enc.pipeline.text_encoder)
    first = enc.encode_cached(PROMPTS, tmp_path)
    assert len(calls) == 1
    files = list(tmp_path.glob("prompts-sd-*.safetensors"))
    assert len(files) == 1
    second = enc.encode_cached(PROMPTS, tmp_path)
    assert len(calls) == 1  # read back, no text-encoder call
    torch.testing.assert_close(second.encoder_hidden_states, first.encoder_hidden_states)
    torch.testing.assert_close(first.encoder_hidden_states, enc.encode(PROMPTS).encoder_hidden_states)
    # Another encoder with identical weights finds the same file.
    other = sd_encoder()
    other_calls = count_calls(other.pipeline.text_encoder)
    other.encode_cached(PROMPTS, tmp_path)
    assert not other_calls
    # Other prompts: another key.
    enc.encode_cached(PROMPTS[:2], tmp_path)
    assert len(list(tmp_path.glob("prompts-*.safetensors"))) == 2
    # Changed weights: another key, and the new embeddings.
    key = enc.fingerprint()
    with torch.no_grad():
        enc.pipeline.text_encoder.get_input_embeddings().weight.add_(0.5)
    assert enc.fingerprint() != key
    changed = enc.encode_cached(PROMPTS, tmp_path)
    assert len(list(tmp_path.glob("prompts-*.safetensors"))) == 3
    assert not torch.allclose(changed.encoder_hidden_states, first.encoder_hidden_states)
    # The null condition is cached too.
    null = enc.null(cache_dir=tmp_path)
    n_calls = len(calls)
    torch.testing.assert_close(enc.null(cache_dir=tmp_path).encoder_hidden_states, null.encoder_hidden_states)
    assert len(calls) == n_calls and len(list(tmp_path.glob("null-sd-*.safetensors"))) == 1


def test_fingerprint_sees_tokenizer_and_options():
    base = sd_encoder().fingerprint()
    assert sd_encoder().fingerprint() == base
    assert sd_encoder(clip_skip=1).fingerprint() != base
    tok = clip_tokenizer()
    tok.add_tokens(["<new-token>"])
    assert PromptEncoder("sd", tokenizer=tok, text_encoder=clip_model()).fingerprint() != base
    assert PromptEncoder("sd", tokenizer=clip_tokenizer(), text_encoder=clip_model(seed=1)).fingerprint() != base


def test_from_pipeline_and_lazy_from_pretrained(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=None, text_encoder=clip_model(), tokenizer=clip_tokenizer(), unet=None,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    enc = PromptEncoder.from_pipeline(pipe)
    assert enc.family == "sd"
    expected = enc.encode(PROMPTS).encoder_hidden_states
    pipe.save_pretrained(tmp_path / "pipe")
    lazy = PromptEncoder.from_pretrained(tmp_path / "pipe")
    assert lazy.family == "sd" and not lazy.loaded
    first = lazy.encode_cached(PROMPTS, tmp_path / "cache")
    assert lazy.loaded
    torch.testing.assert_close(first.encoder_hidden_states, expected)
    again = PromptEncoder.from_pretrained(tmp_path / "pipe")
    second = again.encode_cached(PROMPTS, tmp_path / "cache")
    assert not again.loaded  # found in the cache without loading the text encoder
    torch.testing.assert_close(second.encoder_hidden_states, expected)
    assert (tmp_path / "cache" / "file-digests.json").is_file()


def test_encoder_errors():
    with pytest.raises(ValueError, match="unknown prompt family"):
        PromptEncoder("dalle", tokenizer=clip_tokenizer(), text_encoder=clip_model())
    with pytest.raises(ValueError, match="needs text_encoder"):
        PromptEncoder("sd", tokenizer=clip_tokenizer())
    with pytest.raises(ValueError, match="max_sequence_length"):
        sd_encoder(max_sequence_length=8)
    with pytest.raises(ValueError, match="no prompts"):
        sd_encoder().encode([])
    assert prompt_family("StableDiffusionXLImg2ImgPipeline") == "sdxl"
    assert prompt_family("StableDiffusion3Pipeline") == "sd3"
    assert prompt_family("PixArtSigmaPipeline") == "pixart_sigma"


# ---- PromptDataset ---------------------------------------------------------------------------------------------
def test_prompt_dataset_jsonl_with_images(tmp_path):
    lines = []
    for i, prompt in enumerate(["a cat", "a dog", "zebra", "a cat on a mat"]):
        Image.fromarray(np.full((10, 12, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"prompt": prompt, "image": f"{i}.png"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    enc = sd_encoder()
    ds = PromptDataset(tmp_path / "data.jsonl", enc, cache_dir=tmp_path / "cache", resolution=8)
    assert len(ds) == 4
    item = ds[2]
    assert item["prompt"] == "zebra" and item["encoder_hidden_states"].shape == (MAX_LEN, 32)
    assert item["image"].shape == (3, 8, 8)
    torch.testing.assert_close(item["image"], torch.full((3, 8, 8), 120 / 255 * 2 - 1))
    batch = next(iter(ResumableBatches(ds, batch_size=2)))
    cond = Cond.from_batch(batch)
    assert cond.encoder_hidden_states.shape == (2, MAX_LEN, 32)
    assert cond.image is None  # the batch's image is the sample, not a conditioning image
    torch.testing.assert_close(cond.encoder_hidden_states, enc.encode(batch["prompt"]).encoder_hidden_states)
    torch.testing.assert_close(ds.null.encoder_hidden_states, enc.null().encoder_hidden_states)
    # Cached: a second data set does not run the text encoder.
    calls = count_calls(enc.pipeline.text_encoder)
    PromptDataset(tmp_path / "data.jsonl", enc, cache_dir=tmp_path / "cache", resolution=8).null
    assert not calls
    with pytest.raises(DataError, match="resolution"):
        PromptDataset(tmp_path / "data.jsonl", enc)
    latents = torch.zeros(4, 4, 2, 2)
    ds.set_images(latents)
    assert ds[0]["image"].shape == (4, 2, 2)


def test_prompt_dataset_from_list_and_mixed_images(tmp_path):
    ds = PromptDataset(PROMPTS, sd_encoder())
    assert "image" not in ds[0] and set(ds[0]) == {"prompt", "encoder_hidden_states"}
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "a", "image": "a.png"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match="prompt 2 .* has no image"):
        PromptDataset(tmp_path / "mixed.jsonl", sd_encoder(), resolution=4)


# ---- SDXL: two CLIPs, pooled, time_ids ---------------------------------------------------------------------------
def sdxl_encoder(**options):
    return PromptEncoder("sdxl", tokenizer=clip_tokenizer(), text_encoder=clip_model(),
                         tokenizer_2=clip_tokenizer(), text_encoder_2=clip_model(1, hidden=48, projection=True),
                         **options)


def test_sdxl_encoder():
    enc = sdxl_encoder(size=(64, 96), crops_coords_top_left=(4, 8))
    cond = enc.encode(PROMPTS)
    assert cond.encoder_hidden_states.shape == (3, MAX_LEN, 32 + 48)  # penultimate states, concatenated
    assert cond.pooled.shape == (3, 48)
    assert cond.time_ids.tolist() == [[64, 96, 4, 8, 64, 96]] * 3
    with torch.no_grad():
        ids = enc.pipeline.tokenizer_2(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True,
                                       return_tensors="pt").input_ids
        torch.testing.assert_close(cond.pooled, enc.pipeline.text_encoder_2(ids).text_embeds)
    null = enc.null()  # SDXL base: force_zeros_for_empty_prompt
    assert null.batch_size == 1 and not null.encoder_hidden_states.any() and not null.pooled.any()
    assert null.time_ids.shape == (1, 6)
    plain = sdxl_encoder(force_zeros_for_empty_prompt=False)
    torch.testing.assert_close(plain.null().pooled, plain.encode("").pooled)
    assert sdxl_encoder().encode("a").time_ids.tolist() == [[1024, 1024, 0, 0, 1024, 1024]]
    assert plain.fingerprint() != sdxl_encoder().fingerprint()


# ---- T5 families: SD3, Flux, PixArt ----------------------------------------------------------------------------
def test_sd3_encoder():
    enc = PromptEncoder("sd3", tokenizer=clip_tokenizer(), text_encoder=clip_model(projection=True),
                        tokenizer_2=clip_tokenizer(), text_encoder_2=clip_model(1, projection=True),
                        tokenizer_3=t5_tokenizer(), text_encoder_3=t5_model(), max_sequence_length=8)
    cond = enc.encode(PROMPTS)
    # Joint: the CLIP states (32 + 32 wide, zero-padded to T5's 32) then T5's 8 tokens along the sequence.
    assert cond.encoder_hidden_states.shape == (3, MAX_LEN + 8, 32)
    assert cond.pooled.shape == (3, 64)
    torch.testing.assert_close(enc.null().encoder_hidden_states, enc.encode("").encoder_hidden_states)


def test_flux_encoder():
    enc = PromptEncoder("flux", tokenizer=clip_tokenizer(), text_encoder=clip_model(), tokenizer_2=t5_tokenizer(),
                        text_encoder_2=t5_model(), max_sequence_length=8)
    cond = enc.encode(PROMPTS)
    assert cond.encoder_hidden_states.shape == (3, 8, 32) and cond.pooled.shape == (3, 32)
    assert not torch.allclose(cond.encoder_hidden_states[0], cond.encoder_hidden_states[1])
    torch.testing.assert_close(enc.null().pooled, enc.encode("").pooled)
    assert PromptEncoder(tokenizer=clip_tokenizer(), text_encoder=clip_model(), tokenizer_2=t5_tokenizer(),
                         text_encoder_2=t5_model()).family == "flux"  # told apart by the components


@pytest.mark.parametrize("family, length", [("pixart", 120), ("pixart_sigma", 300)])
def test_pixart_encoder_default_length(family, length):
    enc = PromptEncoder(family, tokenizer=t5_tokenizer(), text_encoder=t5_model())
    assert enc.options["max_sequence_length"] == length


def test_pixart_encoder(tmp_path):
    enc = PromptEncoder("pixart", tokenizer=t5_tokenizer(), text_encoder=t5_model(), max_sequence_length=8)
    cond = enc.encode(PROMPTS)
    assert cond.encoder_hidden_states.shape == (3, 8, 32)
    assert cond.encoder_attention_mask.shape == (3, 8)
    assert cond.encoder_attention_mask.sum(1).tolist() == [5, 5, 6]  # tokens + </s>; the rest is padding
    null = enc.null()
    assert null.encoder_attention_mask.sum().item() == 1
    cached = enc.encode_cached(PROMPTS, tmp_path)
    torch.testing.assert_close(cached.encoder_attention_mask, cond.encoder_attention_mask)
    ds = PromptDataset(PROMPTS, enc, cache_dir=tmp_path)
    assert set(ds[0]) == {"prompt", "encoder_hidden_states", "encoder_attention_mask"}
