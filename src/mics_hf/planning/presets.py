"""Named model shapes: the paper's experiment models and CPU-sized ones, turned into Hugging Face configs.

The shapes of the paper's BERT / GPT-2 / RoBERTa models come from the authors' public experiment configs
(the MiCS authors' experiment configs); the 100B and 175B models are proprietary, so their presets are GPT-3-style shapes
and their ``note`` says so. "tiny" and "small" are ours, sized for CPU tests and laptop runs.

Two families map onto two Hugging Face architectures:

- "gpt": ``GPT2LMHeadModel`` (decoder, pre-LayerNorm, tied LM head).
- "bert": ``RobertaPreLayerNormForMaskedLM``, a pre-LayerNorm BERT as in the paper (post-LN BERT does not train
  stably at these depths); RoBERTa's code path because it has a pre-LN variant in transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    RobertaPreLayerNormConfig,
    RobertaPreLayerNormForMaskedLM,
)

__all__ = ["PRESETS", "ModelPreset", "build_config", "count_parameters", "get_preset", "model_class", "unit_class_name"]

FAMILIES: tuple[str, ...] = ("bert", "gpt")

_INT_FIELDS: tuple[str, ...] = ("hidden", "layers", "heads", "ffn", "vocab", "seq", "micro_batch")

# RoBERTa's special-token ids (<s>=0, <pad>=1, </s>=2): the bert family's vocabulary must contain them.
_ROBERTA_BOS, _ROBERTA_PAD, _ROBERTA_EOS = 0, 1, 2
# GPT-2's <|endoftext|>; smaller vocabularies use their last id instead so the id stays in range.
_GPT2_EOS = 50256


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """One model shape and its per-GPU micro-batch; validated on construction, so overrides are too.

    hidden: model width h; layers: transformer blocks l; heads: attention heads (must divide hidden);
    ffn: feed-forward inner width; vocab: vocabulary size V; seq: sequence length s (tokens per sample);
    micro_batch: samples per rank per micro-step. ``note`` says where a value comes from, or where it is
    assumed, so logged runs carry their provenance.
    """

    name: str
    family: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    micro_batch: int
    note: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"preset {self.name!r}: family={self.family!r}; use one of {list(FAMILIES)}")
        for field in _INT_FIELDS:
            value = getattr(self, field)
            # bool is an int subclass: reject it explicitly, heads=True is a typo, not one head.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"preset {self.name!r}: {field}={value!r}; must be a positive integer")
        if self.hidden % self.heads != 0:
            raise ValueError(
                f"preset {self.name!r}: hidden={self.hidden} is not divisible by heads={self.heads}, so the "
                f"heads cannot split the width evenly; use heads from {_small_divisors(self.hidden)} or change "
                "hidden to a multiple of heads"
            )
        if self.family == "bert" and self.vocab <= _ROBERTA_EOS:
            raise ValueError(
                f"preset {self.name!r}: vocab={self.vocab} is too small for the bert family, whose special "
                f"tokens use ids 0..{_ROBERTA_EOS}; use vocab >= {_ROBERTA_EOS + 1}"
            )


def _small_divisors(n: int, limit: int = 128) -> list[int]:
    """Divisors of n up to ``limit``: the head counts worth suggesting in an error message."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


_PAPER_TABLE = "the MiCS authors' public experiment configs"
_GPT3_STYLE = "proprietary in the paper; GPT-3-style shape assumed, micro_batch assumed"

_PRESET_LIST: tuple[ModelPreset, ...] = (
    ModelPreset(name="tiny", family="gpt", hidden=64, layers=2, heads=4, ffn=256, vocab=512, seq=128,
                micro_batch=8, note="CPU test shape, not from the paper"),
    ModelPreset(name="tiny-bert", family="bert", hidden=64, layers=2, heads=4, ffn=256, vocab=512, seq=128,
                micro_batch=8, note="CPU test shape, not from the paper"),
    ModelPreset(name="small", family="gpt", hidden=256, layers=4, heads=4, ffn=1024, vocab=8192, seq=256,
                micro_batch=8, note="CPU demo shape, not from the paper"),
    ModelPreset(name="small-bert", family="bert", hidden=256, layers=4, heads=4, ffn=1024, vocab=8192, seq=256,
                micro_batch=8, note="CPU demo shape, not from the paper"),
    ModelPreset(name="bert-10b", family="bert", hidden=2560, layers=127, heads=40, ffn=10240, vocab=32003,
                seq=512, micro_batch=8, note=f"{_PAPER_TABLE}; pre-LN BERT, 10.1B"),
    ModelPreset(name="bert-15b", family="bert", hidden=2560, layers=190, heads=40, ffn=10240, vocab=32003,
                seq=512, micro_batch=8, note=f"{_PAPER_TABLE}; pre-LN BERT, 15.0B"),
    ModelPreset(name="bert-50b", family="bert", hidden=5120, layers=159, heads=40, ffn=20480, vocab=32003,
                seq=512, micro_batch=8, note=f"{_PAPER_TABLE}; pre-LN BERT, FFN 4h, ~50B"),
    ModelPreset(name="gpt2-10b", family="gpt", hidden=5120, layers=31, heads=40, ffn=20480, vocab=50265,
                seq=512, micro_batch=8, note=f"{_PAPER_TABLE}; 10.0B"),
    # The paper's RoBERTa is built here as pre-LN RoBERTa: same parameters up to one final LayerNorm.
    ModelPreset(name="roberta-10b", family="bert", hidden=5120, layers=30, heads=40, ffn=20480, vocab=50265,
                seq=512, micro_batch=8, note=f"{_PAPER_TABLE}; 9.7B; built as pre-LN RoBERTa"),
    ModelPreset(name="gpt-100b", family="gpt", hidden=10240, layers=80, heads=80, ffn=40960, vocab=50257,
                seq=2048, micro_batch=1, note=f"100B: {_GPT3_STYLE}"),
    ModelPreset(name="gpt-175b", family="gpt", hidden=12288, layers=96, heads=96, ffn=49152, vocab=50257,
                seq=2048, micro_batch=1, note=f"175B: {_GPT3_STYLE} (GPT-3 175B's shape)"),
)

PRESETS: Mapping[str, ModelPreset] = types.MappingProxyType({p.name: p for p in _PRESET_LIST})
"""Every named preset, read-only; use ``get_preset`` to get one with overrides."""


def get_preset(name: str, *, family: str | None = None, **overrides: Any) -> ModelPreset:
    """The preset called ``name``, optionally with its family or any field replaced (and re-validated).

    ``get_preset("small", family="bert")`` is the bert variant of the same shape; ``get_preset("gpt2-10b",
    layers=4)`` a shallow copy of a paper model for a quick run. Overrides are recorded in ``note``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    fields = [f.name for f in dataclasses.fields(ModelPreset)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown preset field(s) {unknown} for preset {name!r}; valid fields: {fields}")
    if family is not None:
        overrides["family"] = family
    preset = PRESETS[name]
    if not overrides:
        return preset
    if "note" not in overrides:
        changed = ", ".join(f"{key}={value!r}" for key, value in sorted(overrides.items()))
        overrides["note"] = f"{preset.note}; overridden: {changed}"
    return dataclasses.replace(preset, **overrides)


def build_config(preset: ModelPreset) -> PretrainedConfig:
    """The Hugging Face config for ``preset``. HF defaults are kept otherwise (dropout 0.1, GELU, init 0.02)."""
    if preset.family == "gpt":
        eos = min(_GPT2_EOS, preset.vocab - 1)
        return GPT2Config(
            vocab_size=preset.vocab,
            n_positions=preset.seq,
            n_embd=preset.hidden,
            n_layer=preset.layers,
            n_head=preset.heads,
            n_inner=preset.ffn,
            bos_token_id=eos,
            eos_token_id=eos,
            # Pretraining presets: a KV cache is wasted memory and conflicts with activation checkpointing.
            use_cache=False,
        )
    return RobertaPreLayerNormConfig(
        vocab_size=preset.vocab,
        hidden_size=preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        intermediate_size=preset.ffn,
        # RoBERTa numbers positions from padding_idx + 1, so seq tokens need seq + 2 position embeddings.
        max_position_embeddings=preset.seq + _ROBERTA_PAD + 1,
        # One segment: the paper pretrains with masked LM only, no next-sentence pairs.
        type_vocab_size=1,
        pad_token_id=_ROBERTA_PAD,
        bos_token_id=_ROBERTA_BOS,
        eos_token_id=_ROBERTA_EOS,
    )


def model_class(preset: ModelPreset) -> type[PreTrainedModel]:
    """The Hugging Face model class for ``preset``'s family (a causal LM or a masked LM with its head)."""
    return GPT2LMHeadModel if preset.family == "gpt" else RobertaPreLayerNormForMaskedLM


@functools.lru_cache(maxsize=None)
def count_parameters(preset: ModelPreset) -> int:
    """Number of parameters of ``preset``'s model, tied embeddings counted once.

    The model is built on the meta device, so a 175B model is counted in about a second without allocating
    its weights; counting the real module (rather than a closed formula) keeps the number right for whatever
    biases, LayerNorms and position tables the HF class has.
    """
    with torch.device("meta"):
        model = model_class(preset)(build_config(preset))
    # parameters() yields a shared (tied) Parameter once.
    return sum(param.numel() for param in model.parameters())


# The transformer layer of each family: the module MiCS gathers as one unit. RobertaPreLayerNorm's
# _no_split_modules names its attention and embedding modules, not the layer, so relying on it would leave
# every FFN weight in the root unit (gathered for the whole step).
_UNIT_CLASS = {"gpt": "GPT2Block", "bert": "RobertaPreLayerNormLayer"}


def unit_class_name(preset: ModelPreset) -> str:
    """Class name of ``preset``'s transformer layer, for ``MiCSConfig(units=...)`` and FSDP2's fully_shard."""
    return _UNIT_CLASS[preset.family]
