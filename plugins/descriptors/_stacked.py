"""Several embedding nets of one shape, evaluated as one batched net.

A two-body descriptor has one net per (centre type, neighbour type) group. Running them one
by one costs a handful of tensor operations per layer and per group; stacking the groups'
weights ([G, n_in, n_out]) and their inputs ([G, rows, n_in], each group zero-padded to the
largest) runs every group with the same few batched operations (``baddbmm``), which is what
matters on a small CPU where each large operation also pays a thread fork/join. The layer rule
is :class:`mtcore.model.mlp.EmbeddingNet`'s (plain, residual or width-doubling residual, with
the optional timestep); each net keeps its own parameters, so state dicts name them as usual.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from mtcore.model.mlp import EmbeddingNet, make_activation


class StackedEmbeddingNets(nn.Module):
    """``forward(x [G, R, n_in])`` → ``[G, R, n_out]``: net g applied to the rows x[g]."""

    def __init__(self, nets: List[EmbeddingNet], activation: str):
        super().__init__()
        if len(nets) == 0:
            raise ValueError("StackedEmbeddingNets needs at least one net")
        self.nets = nn.ModuleList(nets)
        self.activation = make_activation(activation)
        self.modes: List[int] = [int(block.mode) for block in nets[0].blocks]
        self.n_out = nets[0].n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights: List[List[torch.Tensor]] = []
        biases: List[List[torch.Tensor]] = []
        steps: List[List[torch.Tensor]] = []
        for _ in self.modes:
            weights.append([])
            biases.append([])
            steps.append([])
        for net in self.nets:
            layer = 0
            for block in net.blocks:
                weights[layer].append(block.dense.weight)
                biases[layer].append(block.dense.bias)
                idt = block.dense.idt
                if block.use_timestep and idt is not None:
                    steps[layer].append(idt)
                layer += 1
        for layer, mode in enumerate(self.modes):
            h = torch.baddbmm(torch.stack(biases[layer]).unsqueeze(1), x, torch.stack(weights[layer]))
            h = self.activation(h)
            if len(steps[layer]) > 0:
                h = h * torch.stack(steps[layer]).unsqueeze(1)
            if mode == 1:  # residual (TorchScript cannot read module globals)
                x = x + h
            elif mode == 2:  # width-doubling residual
                x = torch.cat([x, x], dim=-1) + h
            else:
                x = h
        return x
