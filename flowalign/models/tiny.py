"""Tiny random pipelines of the real architectures (SD3, FLUX, Wan), built from config, offline.

Tokenizers are made in code: a small byte-level BPE vocabulary for CLIP (``CLIPTokenizer``) and a
word-level ``tokenizers`` model wrapped as a T5 tokenizer. These pipelines exercise the real loading,
encoding, sampling and saving code in tests and in users' smoke tests (``flowalign sample --model tiny-sd3``).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from functools import cache

import torch

#: words that get whole-word tokens; anything else falls back to characters
WORDS = (
    "a an the one two three four five of and to on in with left right above below next is are "
    "red green blue yellow purple orange white black gray pink cyan brown "
    "circle circles square squares triangle triangles star stars shape shapes cat dog photo picture "
    "small big large tiny "
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _learn_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges learned on ``words`` (greedy BPE training), so each word ends as one token."""
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seg in segs:
            for pair in zip(seg, seg[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=lambda p: (counts[p], p))  # ties broken deterministically
        merges.append(best)
        for i, seg in enumerate(segs):
            out, j = [], 0
            while j < len(seg):
                if j + 1 < len(seg) and (seg[j], seg[j + 1]) == best:
                    out.append(seg[j] + seg[j + 1])
                    j += 2
                else:
                    out.append(seg[j])
                    j += 1
            segs[i] = out


@cache
def clip_tokenizer_files(words: tuple[str, ...] = tuple(WORDS)) -> str:
    """Write a CLIP BPE vocab.json/merges.txt to a temp dir (removed when the process exits) and return the dir.

    The vocabulary is every byte symbol (with and without the ``</w>`` end-of-word marker) plus the merges
    learned on ``words``, so every listed word is a single token.
    """
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = _learn_merges(words)
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    d = tempfile.mkdtemp(prefix="flowalign-clip-tok-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)  # read when a tokenizer is built; gone at exit
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab_list)}, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return d


def clip_tokenizer(model_max_length: int = 77):
    """A ``CLIPTokenizer`` made locally (no hub)."""
    from transformers import CLIPTokenizer

    d = clip_tokenizer_files()
    return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                         model_max_length=model_max_length, pad_token="<|endoftext|>")


def clip_vocab_size() -> int:
    with open(os.path.join(clip_tokenizer_files(), "vocab.json")) as f:
        return len(json.load(f))


def t5_vocab(words=WORDS) -> list[tuple[str, float]]:
    """T5's layout (pad=0, eos=1, unk=2, then pieces): whole words, with single letters as a fallback."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return vocab


def t5_tokenizer(words=WORDS, model_max_length: int = 512):
    """A T5 tokenizer over a word-level unigram vocabulary made locally (no hub, no sentencepiece file)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(words), extra_ids=0, model_max_length=model_max_length)


def _clip_text_config(hidden: int = 32, layers: int = 2, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=clip_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, projection_dim=projection,
                          max_position_embeddings=77, bos_token_id=clip_vocab_size() - 2,
                          eos_token_id=clip_vocab_size() - 1, pad_token_id=clip_vocab_size() - 1, hidden_act="gelu")


def _t5_config(d_model: int = 32, cls_name: str = "T5Config"):
    import transformers

    cfg_cls = getattr(transformers, cls_name)
    return cfg_cls(vocab_size=len(t5_vocab()), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def tiny_sd3(seed: int = 0, with_t5: bool = True):
    """Random ``StableDiffusion3Pipeline``: 2-layer transformer (patch 2), 2-level VAE (factor 2)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32)
    te1 = CLIPTextModelWithProjection(_clip_text_config())
    te2 = CLIPTextModelWithProjection(_clip_text_config())
    te3 = T5EncoderModel(_t5_config(64)) if with_t5 else None
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035, sample_size=32)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=clip_tokenizer(), text_encoder_2=te2, tokenizer_2=clip_tokenizer(),
        text_encoder_3=te3, tokenizer_3=t5_tokenizer() if with_t5 else None,
    )


def tiny_flux(seed: int = 0):
    """Random ``FluxPipeline`` (guidance-distilled: guidance embedding on), VAE factor 2, packed 2x2 latents."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=None, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                                         axes_dims_rope=(4, 4, 8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611, sample_size=32)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256,
                                            base_shift=0.5, max_shift=1.15)
    return FluxPipeline(transformer=transformer, scheduler=sched, vae=vae,
                        text_encoder=CLIPTextModel(_clip_text_config(projection=32)), tokenizer=clip_tokenizer(),
                        text_encoder_2=T5EncoderModel(_t5_config(32)), tokenizer_2=t5_tokenizer())


def tiny_wan(seed: int = 0):
    """Random ``WanPipeline`` (Wan 2.1 T2V layout) with a FlowMatch Euler scheduler (shift 3)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    return WanPipeline(tokenizer=t5_tokenizer(), text_encoder=UMT5EncoderModel(_t5_config(32, "UMT5Config")), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)


TINY = {"tiny-sd3": tiny_sd3, "tiny-flux": tiny_flux, "tiny-wan": tiny_wan}

#: native sampling sizes of the tiny pipelines (height, width, num_frames)
TINY_SIZES = {"tiny-sd3": (32, 32, None), "tiny-flux": (32, 32, None), "tiny-wan": (16, 16, 5)}


def build(name: str, seed: int = 0):
    """Build a tiny pipeline by name (``tiny-sd3``, ``tiny-flux``, ``tiny-wan``), all modules in eval mode."""
    if name not in TINY:
        raise ValueError(f"Unknown tiny pipeline {name!r}; choose one of {sorted(TINY)}.")
    pipe = TINY[name](seed=seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe
