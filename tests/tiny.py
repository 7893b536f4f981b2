"""Tiny models and run configs shared by the tests."""
import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_LEN = 16
TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "num_class_embeds": 11,
}
TINY_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "v_prediction",
                  "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False}


def tiny_teacher_raw(output_dir, **train):
    """A raw run config that trains a tiny class-conditional teacher on 8x8 digits in well under a second a step."""
    return {
        "method": "teacher",
        "output_dir": str(output_dir),
        "model": {"source": "", "backbone": "UNet2DModel", "backbone_config": dict(TINY_UNET),
                  "scheduler": "DDPMScheduler", "scheduler_config": dict(TINY_SCHEDULER)},
        "data": {"dataset": "digits", "resolution": 8},
        "train": {"max_steps": 4, "batch_size": 16, "checkpoint_every": 0, "log_every": 1, "progress": False,
                  **train},
        "optim": {"model": {"lr": 1e-3, "warmup_steps": 0, "lr_schedule": "constant"}},
        "objective": {"sample_steps": 2},
    }


# ---- tiny text stacks built offline (transformers 5: tokenizers from vocab/merges in memory) ----
def clip_tokenizer():
    """A character-level CLIP BPE tokenizer built in memory (transformers 5: vocab dict + merges list)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>")]
    vocab["ca"], vocab["cat</w>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LEN)


def clip_model(seed=0, hidden=32, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=MAX_LEN, projection_dim=hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_tokenizer():
    """A unigram T5 tokenizer built in memory from (piece, score) pairs: no sentencepiece file needed."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in LETTERS] + [("\u2581" + c, -2.5) for c in LETTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def t5_model(seed=0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def tiny_vae(shift_factor=None):
    """A tiny AutoencoderKL (3 -> 4 latent channels, downsampling 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.7,
                         shift_factor=shift_factor).eval()


def tiny_dmd_raw(output_dir, teacher_folder, method="dmd2", **objective):
    """A raw run config distilling the tiny teacher folder with a DMD-family method (GAN on, generator every 2)."""
    raw = tiny_teacher_raw(output_dir, max_steps=4)
    raw["method"] = method
    raw["model"] = {"source": str(teacher_folder)}
    raw["optim"] = {"generator": {"lr": 1e-3, "every": 2}, "critic": {"lr": 1e-3}}
    raw["objective"] = {"gan_weight_gen": 1e-2, "gan_weight_disc": 1e-2, **objective}
    return raw
