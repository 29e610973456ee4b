"""Causal-LM features for SUR-adapter: load any Hugging Face decoder-only LM (optionally quantized
with bitsandbytes, truncated after the deepest requested layer) and pool its decoder layers' raw
outputs over each prompt's tokens.

The stored value for layer L (0-based) is the raw output of decoder layer L: the residual stream
*before* the model's final norm, for every L including the last (``output_hidden_states`` would give
the normed state for the last entry). It is taken with forward hooks on the decoder layers, found
generically (the ``nn.ModuleList`` of ``num_hidden_layers`` blocks), never from model-name strings.
Pooling is over the tokens the tokenizer produces by default (BOS included where it adds one),
padding excluded by selection (padded positions may hold NaN under SDPA), with explicit
``position_ids`` so that left padding does not shift RoPE positions. Prompts are batched by length
(sorted buckets); what a prompt's vector is computed from does not depend on its batch, its padding
or the padding side, only its rounding does (docs/store-format.md states the bound).

Heavy libraries (torch, transformers, bitsandbytes) are imported inside the functions.

Modules: :mod:`~surpipe.llm.identity` (group names, hashes recorded in settings),
:mod:`~surpipe.llm.checks` (config checks, layer indices, truncation), :mod:`~surpipe.llm.load`
(dtype, quantization, loading) and :mod:`~surpipe.llm.extract` (tokens, batches, hooks, pooling).
Everything is re-exported here: callers use ``surpipe.llm.<name>``.
"""

from surpipe.llm.checks import (check_causal_lm, num_layers_of, quiet_libraries, read_config,
                                resolve_layers, truncated_config)
from surpipe.llm.extract import (PADDING_SIDES, POOLINGS, Extracted, extract, layer_states, length_buckets,
                                 pad_batch, padding_stats, pool, tokenize)
from surpipe.llm.identity import (config_hash, is_local, model_basename, sanitize_name, tokenizer_hash,
                                  tokenizer_settings, weights_fingerprint)
from surpipe.llm.load import (DTYPES, QUANTS, LoadedLLM, check_cpu_nf4_shapes, default_max_tokens,
                              find_decoder_layers, load_llm, load_tokenizer)

__all__ = [
    "DTYPES", "PADDING_SIDES", "POOLINGS", "QUANTS", "Extracted", "LoadedLLM", "check_causal_lm",
    "check_cpu_nf4_shapes", "config_hash", "default_max_tokens", "extract", "find_decoder_layers", "is_local",
    "layer_states", "length_buckets", "load_llm", "load_tokenizer", "model_basename", "num_layers_of", "pad_batch",
    "padding_stats", "pool", "quiet_libraries", "read_config", "resolve_layers", "sanitize_name",
    "tokenize", "tokenizer_hash", "tokenizer_settings", "truncated_config", "weights_fingerprint",
]
