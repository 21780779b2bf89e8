# SPDX-License-Identifier: Apache-2.0
"""LoRA adapters for the dense towers: ``W + (alpha / r) * B @ A`` with the base ``W`` frozen.

A ``LoRALinear`` is an ``nn.Linear`` (so ``models.run_mlp`` and every stack walker still see a
Linear) whose product runs with the adapted weight ``merged_weight()``; the model's dense path
(``run_mlp`` -> ``functional.linear``) passes that weight to the one linear op, so autograd
reaches ``lora_A`` and ``lora_B`` through the op's weight gradient and nothing else changes.

Checkpoints never hold adapters: :func:`merged_state_dict` folds every adapter into its base
weight, so a saved model is a plain model of the same config (eval, predict and the Scorer load
it as any other).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def check_rank(rank) -> int:
    """The one validation of a LoRA rank: an integer >= 1 (a bool or a float is refused)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        if isinstance(rank, str) and rank.strip().lstrip("+").isdigit():
            rank = int(rank)
        else:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank}")
    return rank


class LoRALinear(nn.Linear):
    """``y = x @ (W + s * B @ A).T + b``: W [out, in] and b frozen, A [r, in] drawn small
    (Kaiming-uniform, as in the LoRA paper), B [out, r] zero, so at creation the layer computes
    exactly the base layer; ``s = alpha / r``. Made from an existing Linear with
    :meth:`from_linear` (it takes over that layer's weight and bias tensors)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None,
                 bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        rank = check_rank(rank)
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.scaling = self.alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, rank: int, alpha: float | None = None) -> LoRALinear:
        out = cls(lin.in_features, lin.out_features, rank, alpha, bias=lin.bias is not None)
        out.to(lin.weight.device)
        with torch.no_grad():
            out.weight.copy_(lin.weight)
            if lin.bias is not None:
                out.bias.copy_(lin.bias)
        return out

    def merged_weight(self) -> Tensor:
        """[out, in] the adapted weight ``W + s * B @ A`` (differentiable in A and B)."""
        return torch.addmm(self.weight, self.lora_B, self.lora_A, alpha=self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.merged_weight(), self.bias)

    def num_adapter_parameters(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, alpha={self.alpha}"


def add_lora(module: nn.Module, rank: int, alpha: float | None = None) -> list[str]:
    """Replace every ``nn.Linear`` inside an ``nn.Sequential`` of ``module`` (the MLP towers,
    ``models.mlp``) with a ``LoRALinear`` of rank ``rank``; returns the replaced layers' paths.
    Linear layers outside a Sequential (heads, DeepFM's dense first-order weights) stay as
    they are."""
    rank = check_rank(rank)
    done = []
    for path, seq in list(module.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        for i, m in enumerate(seq):
            if type(m) is nn.Linear:
                seq[i] = LoRALinear.from_linear(m, rank, alpha)
                done.append(f"{path}.{i}" if path else str(i))
    return done


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in module.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merged_state_dict(module: nn.Module, state: dict | None = None) -> dict:
    """``module.state_dict()`` (or ``state``, one of its state dicts) with every adapter folded
    into its base weight (``<layer>.weight = W + s * B @ A``) and the ``lora_A``/``lora_B``
    entries dropped: the state dict of the plain model."""
    sd = dict(module.state_dict() if state is None else state)
    for path, m in lora_layers(module).items():
        pre = f"{path}." if path else ""
        sd[pre + "weight"] = m.merged_weight().detach().clone()
        sd.pop(pre + "lora_A", None)
        sd.pop(pre + "lora_B", None)
    return sd


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every adapter of ``module`` into its base layer, in place (each ``LoRALinear``
    becomes a plain ``nn.Linear`` holding ``W + s * B @ A``, trainable again); returns the
    number of layers merged."""
    n = 0
    for _, seq in list(module.named_modules()):
        for name, m in list(seq.named_children()):
            if isinstance(m, LoRALinear):
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                lin.to(m.weight.device)
                lin.weight.copy_(m.merged_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
                setattr(seq, name, lin)
                n += 1
    return n
