"""genai_config.json: what onnxruntime-genai needs to run a faspx ONNX export as it is.

The export's graph already has the decoder-with-past layout onnxruntime-genai reads (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.%d.key/value`` in, ``logits`` and
``present.%d.key/value`` out, KV as batch x kv_heads x length x head_dim); the config names them, the
model family and the generation defaults. The KV cache of the graph grows by concatenation, so
``past_present_share_buffer`` is off. onnxruntime-genai has no OPT model type: an OPT export gets no
config, and the summary says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from faspx.adapters import attention_shape

# transformers model_type -> onnxruntime-genai model type (its decoder-only types that share this layout)
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
GENAI_CONFIG = "genai_config.json"


def genai_unsupported(config) -> str | None:
    """Why onnxruntime-genai cannot run an export of ``config``'s model, None where it can."""
    if config.model_type not in GENAI_TYPES:
        return (f"onnxruntime-genai has no {config.model_type!r} model type (it runs {', '.join(GENAI_TYPES)} "
                "exports here): this export runs in onnxruntime (faspx generate, eval, bench)")
    return None


def genai_config(config, generation_config=None, context_length: int | None = None,
                 kv_layers: int | None = None) -> dict:
    """The genai_config.json of an export of ``config`` (a transformers config, its FFN width as pruned).

    ``kv_layers``: how many layers have a KV cache (fewer than the layers when 2SSP removed some
    attention): genai counts the graph's past/present tensors by ``num_hidden_layers``, nothing else.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
        >>> genai_config(cfg)["model"]["decoder"]["head_size"]
        16
    """
    heads, kv_heads, head_dim = attention_shape(config)
    gen = generation_config
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = config.eos_token_id if eos is None else eos
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    pad = pad if pad is not None else config.pad_token_id if config.pad_token_id is not None else \
        (eos[0] if isinstance(eos, list) else eos)
    length = context_length or config.max_position_embeddings
    # onnxruntime-genai rejects a null id (a config without bos_token_id, say): such a key is left out
    ids = {k: v for k, v in (("bos_token_id", config.bos_token_id), ("eos_token_id", eos), ("pad_token_id", pad))
           if v is not None}
    return {
        "model": {
            "type": GENAI_TYPES[config.model_type],
            **ids,
            "vocab_size": config.vocab_size,
            "context_length": length,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": config.num_hidden_layers if kv_layers is None else kv_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": length, "min_length": 0,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0, "num_return_sequences": 1, "early_stopping": True,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def write_genai_config(model, out_dir: Path) -> str | None:
    """Write OUT/onnx/genai_config.json where onnxruntime-genai runs the model; else return why not."""
    reason = genai_unsupported(model.config)
    if reason is None:
        from faspx.exporters.onnx import kv_layers

        data = genai_config(model.config, getattr(model, "generation_config", None),
                            kv_layers=len(kv_layers(model)))
        (Path(out_dir) / GENAI_CONFIG).write_text(json.dumps(data, indent=2) + "\n")
    return reason


def genai_generate(onnx_dir: Path, prompt_ids: list[list[int]], new_tokens: int, stop_at_eos: bool = False
                   ) -> list[list[int]]:
    """Greedy continuations of each prompt (token ids) by onnxruntime-genai's own loop on the export.

    One generator per prompt (batch 1: no padding for the runtime to place). ``stop_at_eos=False``
    generates exactly ``new_tokens`` tokens (for comparisons); ``True`` stops at the end-of-text token as
    a deployment does.

    Example:
        >>> genai_generate(Path("out/onnx"), [[1, 17, 200]], 4)  # doctest: +SKIP
        [[417, 22, 9, 301]]
    """
    import onnxruntime_genai as og

    from faspx.errors import UsageError

    if not (Path(onnx_dir) / GENAI_CONFIG).exists():
        raise UsageError(f"{onnx_dir} has no {GENAI_CONFIG}: onnxruntime-genai cannot run it (an OPT export has "
                         "none; an export older than faspx's genai support: export it again)")
    model = og.Model(str(onnx_dir))
    continuations = []
    for ids in prompt_ids:
        params = og.GeneratorParams(model)
        length = len(ids) + new_tokens
        params.set_search_options(do_sample=False, max_length=length, min_length=0 if stop_at_eos else length)
        generator = og.Generator(model, params)
        generator.append_tokens([ids])
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        continuations.append(new)
    return continuations


def genai_generate_text(onnx_dir: Path, prompts: list[str], new_tokens: int) -> list[str]:
    """``faspx generate --runtime genai``: the export's tokenizer (as the other runtimes use it, so only
    the generation loop differs), onnxruntime-genai's loop, stopping at end of text; the new text only."""
    from transformers import AutoTokenizer

    from faspx.exporters.ort_runtime import check_prompt_tokens

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    for prompt, ids in zip(prompts, prompt_ids, strict=True):
        check_prompt_tokens([prompt], len(ids))
    return [tokenizer.decode(new, skip_special_tokens=True)
            for new in genai_generate(onnx_dir, prompt_ids, new_tokens, stop_at_eos=True)]
