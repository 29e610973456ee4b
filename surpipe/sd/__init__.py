"""Stable Diffusion's stage-one side: what encode-latents loads from a diffusers checkpoint and how it
encodes (SD 1.x/2.x and SDXL; the UNet is never loaded here).

Modules: :mod:`~surpipe.sd.checkpoint` (a checkpoint's folders, its family from ``model_index.json``,
load errors), :mod:`~surpipe.sd.hashes` (identity hashes recorded with the stored values),
:mod:`~surpipe.sd.text` (tokenizer + CLIP text encoder, pipeline-exact prompt embeddings),
:mod:`~surpipe.sd.xl` (SDXL's two text encoders and micro-conditioning), :mod:`~surpipe.sd.image`
(resize, center crop, normalise), :mod:`~surpipe.sd.vae` (VAE encoder, latent distribution) and
:mod:`~surpipe.sd.encode` (encode-latents' work: the ``clip/<name>`` and ``vae/<name>`` groups).
The component functions are re-exported here: callers use ``surpipe.sd.<name>``. Heavy libraries
(torch, transformers, diffusers) are imported inside the functions that need them.
"""

# Re-exported names (no __all__: one of them would spell a stored array's name outside surpipe/features).
from surpipe.hub import model_basename, sanitize_name
from surpipe.sd.checkpoint import (FAMILIES, SUPPORTED_PIPELINE, check_pipeline_class, is_local, validate_folder,
                                   vae_subfolder)
from surpipe.sd.hashes import config_hash, tokenizer_hash, weights_hash
from surpipe.sd.image import center_crop_box, preprocess, preprocess_pil, resized_size, to_tensor
from surpipe.sd.text import TextEncoder, encode_prompts, load_clip_component, load_text_encoder, token_counts
from surpipe.sd.vae import VaeEncoder, default_resolution, encode_latent_dist, load_vae_encoder
from surpipe.sd.xl import (TEXT_COMPONENTS, TextEncodersXL, encode_prompts_xl, load_text_encoders_xl,
                           micro_conditioning, micro_conditioning_rows)

