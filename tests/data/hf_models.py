"""Real architectures from Hugging Face ``transformers``, as user model files: ``hf_models.py:vit`` etc.

Each builder makes a SMALL config with random weights (nothing is downloaded: the
configs are written here, and HF_HUB_OFFLINE is set before transformers is imported)
and returns the model as transformers builds it (outputs are ``ModelOutput`` dicts)
with an example input of batch 1, in each of the three shapes a spec may give:
one tensor (images, GPT-style ids), a tuple (DistilBERT: ids, mask) or a dict of
keyword arguments (BERT, GPT-2: ``input_ids`` + ``attention_mask``; GPT-2's forward
takes ``past_key_values`` second, so its mask can only go by name).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

VOCAB = 96
SEQ = 12
IMAGE = 32
LABELS = 10


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(7))


def _mask() -> torch.Tensor:
    return torch.ones(1, SEQ, dtype=torch.int64)


def _image() -> torch.Tensor:
    return torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))


def _text_config(cls: type, **kw: object) -> object:
    return cls(vocab_size=VOCAB, max_position_embeddings=64, **kw)


def vit() -> tuple[nn.Module, torch.Tensor]:
    cfg = transformers.ViTConfig(
        image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=LABELS,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg), _image()


def bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    cfg = _text_config(
        transformers.BertConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg), {"input_ids": _ids(), "attention_mask": _mask()}


def distilbert() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    cfg = _text_config(transformers.DistilBertConfig, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3)
    return transformers.DistilBertForSequenceClassification(cfg), (_ids(), _mask())


def gpt2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg), {"input_ids": _ids(), "attention_mask": _mask()}


def llama() -> tuple[nn.Module, torch.Tensor]:
    cfg = _text_config(
        transformers.LlamaConfig, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg), _ids()


def resnet() -> tuple[nn.Module, torch.Tensor]:
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=LABELS)
    return transformers.ResNetForImageClassification(cfg), _image()


def convnext() -> tuple[nn.Module, torch.Tensor]:
    cfg = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=LABELS, image_size=IMAGE)
    return transformers.ConvNextForImageClassification(cfg), _image()


def swin() -> tuple[nn.Module, torch.Tensor]:
    cfg = transformers.SwinConfig(
        image_size=IMAGE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
        num_labels=LABELS,
    )  # fmt: skip
    return transformers.SwinForImageClassification(cfg), _image()


NAMES = ("vit", "bert", "distilbert", "gpt2", "llama", "resnet", "convnext", "swin")
