"""Tiny, randomly initialised flow-matching pipelines (Stable Diffusion 3 and Flux), built offline.

Nothing is downloaded: every component comes from a small config, and the tokenizers are built in
memory from handmade vocabularies (transformers 5's CLIPTokenizer and T5Tokenizer take a vocab
directly; with transformers 4 the same vocab goes through their files, see `_clip_tokenizer`).
The pipelines run on CPU in float32 and take the scheduler given, built from the config the real
model ships with (`scheduler_cls.from_config(...)`).

    pipe = tiny_sd3_pipeline(FlowMatchEulerDiscreteScheduler)
    image = pipe(**sd3_call_kwargs()).images          # (1, 16, 16, 3) numpy, guidance 5.0 (CFG)
    pipe = tiny_flux_pipeline()
    image = pipe(**flux_call_kwargs()).images         # (1, 8, 8, 3) numpy, guidance embedding 3.5
"""
from __future__ import annotations

import json
import os
import string
import tempfile

import torch

# The scheduler configs the real checkpoints ship with (scheduler/scheduler_config.json).
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3-medium
FLUX_SCHEDULER_CONFIG = dict(  # black-forest-labs/FLUX.1-dev: the shift comes from the image size (mu)
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
)

CLIP_MAX_LENGTH = 24   # tokens per CLIP prompt (the real models use 77)
T5_MAX_LENGTH = 24     # max_sequence_length passed to the pipelines (real: 256 / 512)
# the tokenizers have no merges (one token per character), so the prompts are short enough not to be truncated
PROMPT = "a red fox in snow"
NEGATIVE_PROMPT = "blurry"


# ----------------------------------------------------------------------------- tokenizers
def _clip_vocab():
    """Byte-level BPE vocab without merges: every byte char, alone and word-final (`</w>`)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    return {t: i for i, t in enumerate(tokens)}  # bos 0, eos/pad/unk 1; 514 tokens


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = _clip_vocab()
    kw = dict(model_max_length=CLIP_MAX_LENGTH)
    try:
        tok = CLIPTokenizer(vocab=vocab, merges=[], **kw)  # transformers >= 5
    except TypeError:  # transformers 4: the slow tokenizer reads vocab.json / merges.txt
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "vocab.json"), "w") as f:
                json.dump(vocab, f)
            with open(os.path.join(d, "merges.txt"), "w") as f:
                f.write("#version: 0.2\n")
            tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), **kw)
    return tok


def _t5_vocab():
    """Unigram vocab: T5's special tokens, then single characters with and without the `▁` prefix."""
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return vocab  # pad 0, eos 1, unk 2; 4 + 2 * 94 = 192 pieces


def _t5_tokenizer():
    from transformers import T5Tokenizer

    try:
        return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=512)  # transformers >= 5
    except TypeError:  # transformers 4: wrap a tokenizers.Tokenizer in the fast class
        from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import Unigram
        from transformers import T5TokenizerFast

        backend = Tokenizer(Unigram(_t5_vocab(), unk_id=2))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581")])
        backend.decoder = decoders.Metaspace(replacement="\u2581")
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                               special_tokens=[("</s>", 1)])
        return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                               extra_ids=0, model_max_length=512)


# ----------------------------------------------------------------------------- text encoders
def _clip_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=len(_clip_vocab()),
                          hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          max_position_embeddings=CLIP_MAX_LENGTH, layer_norm_eps=1e-5, hidden_act="gelu", **kw)


def _t5_encoder(d_model):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(_t5_vocab()), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _vae(latent_channels):
    from diffusers import AutoencoderKL

    # one block: vae_scale_factor 1, so the latent is as large as the image
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def _scheduler(scheduler, config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = FlowMatchEulerDiscreteScheduler(**config)
    if scheduler is None:
        return base
    if isinstance(scheduler, type):  # a class: built from the checkpoint's config, as users swap one in
        return scheduler.from_config(base.config)
    return scheduler  # an instance


# ----------------------------------------------------------------------------- pipelines
def tiny_sd3_pipeline(scheduler=None, seed=0):
    """StableDiffusion3Pipeline: SD3Transformer2DModel (patch 2, 1 layer), 2 CLIPs with projection, T5.

    `scheduler`: None (FlowMatchEulerDiscreteScheduler, SD3's config: shift 3.0), a scheduler class
    (built with `.from_config` of that config) or a scheduler instance.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # joint_attention_dim = T5 d_model = 64 = the two CLIP hidden states side by side (32 + 32);
    # pooled_projection_dim = the two CLIP projections side by side (32 + 32).
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16).eval()
    text_encoder = CLIPTextModelWithProjection(_clip_config(projection_dim=32)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(projection_dim=32)).eval()
    text_encoder_3 = _t5_encoder(64)
    vae = _vae(4)
    pipe = StableDiffusion3Pipeline(
        scheduler=_scheduler(scheduler, SD3_SCHEDULER_CONFIG), transformer=transformer, vae=vae,
        text_encoder=text_encoder, tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=_clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe  # built on CPU in float32 already


def tiny_flux_pipeline(scheduler=None, seed=0):
    """FluxPipeline: FluxTransformer2DModel (patch 1, 1 double + 1 single block, guidance embedding),
    a CLIPTextModel and a T5 encoder.

    `scheduler`: None (FlowMatchEulerDiscreteScheduler, FLUX.1-dev's config: use_dynamic_shifting,
    so the pipeline passes mu), a scheduler class (built with `.from_config` of that config) or an instance.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    # in_channels 4 = VAE latent channels (1) x the 2x2 packing; pooled_projection_dim = CLIP hidden size;
    # joint_attention_dim = T5 d_model; sum(axes_dims_rope) = attention_head_dim.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True,
                                         axes_dims_rope=[4, 4, 8]).eval()
    text_encoder = CLIPTextModel(_clip_config()).eval()
    text_encoder_2 = _t5_encoder(32)
    vae = _vae(1)
    pipe = FluxPipeline(
        scheduler=_scheduler(scheduler, FLUX_SCHEDULER_CONFIG), transformer=transformer, vae=vae,
        text_encoder=text_encoder, tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe  # built on CPU in float32 already


# ----------------------------------------------------------------------------- call kwargs
def sd3_call_kwargs(seed=0, num_inference_steps=4, guidance_scale=5.0, output_type="np", **kw):
    """A fast SD3 call: 16x16 images (8x8 latent patches of 2), CFG when guidance_scale > 1."""
    out = dict(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, height=16, width=16,
               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               max_sequence_length=T5_MAX_LENGTH, generator=torch.Generator("cpu").manual_seed(seed),
               output_type=output_type)
    out.update(kw)
    return out


def flux_call_kwargs(seed=0, num_inference_steps=4, guidance_scale=3.5, output_type="np", **kw):
    """A fast Flux call: 8x8 images (4x4 = 16 packed latent tokens); guidance_scale feeds the
    transformer's guidance embedding (FLUX.1-dev style distilled guidance, no batch doubling)."""
    out = dict(prompt=PROMPT, height=8, width=8, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, max_sequence_length=T5_MAX_LENGTH,
               generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type)
    out.update(kw)
    return out


def tiny_pipeline(kind, scheduler=None, seed=0):
    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[kind](scheduler, seed)


def call_kwargs(kind, **kw):
    return {"sd3": sd3_call_kwargs, "flux": flux_call_kwargs}[kind](**kw)
