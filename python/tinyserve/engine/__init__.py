"""A small continuous-batching engine over tinyserve: the scheduler, request state and sampling.
The model comes through a runner (``tinyserve.integrations.transformers.TransformersRunner``
for transformers models); see docs/engine.md."""

from .engine import Engine, EngineStats, ModelRunner
from .kv import ENGINE_PAGE_SUMMARY, AttentionBatch, PagedKVCache, build_attention_batch
from .request import RequestOutput, SamplingParams
from .scheduler import Scheduler

__all__ = [
    "ENGINE_PAGE_SUMMARY",
    "AttentionBatch",
    "Engine",
    "EngineStats",
    "ModelRunner",
    "PagedKVCache",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "build_attention_batch",
]
