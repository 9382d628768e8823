"""Dense layers and the two network shapes DeePMD-kit uses: embedding nets and fitting MLPs.

A :class:`Dense` layer owns its weights (and the resnet timestep ``idt`` when asked for), so that
the shared-layer manager can hand the very same layer to several heads. How a layer's output is
combined with its input (plain, residual, or width-doubling residual) belongs to the network that
uses it, so a shared layer may sit in a residual position in one head and not in another.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mtcore.errors import MtcoreError
from mtcore.model import tangent_embedding
from mtcore.model.fast_tanh import Tanh

PRECISIONS = {
    "default": torch.float64,
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ACTIVATIONS = ("tanh", "relu", "relu6", "softplus", "sigmoid", "gelu", "gelu_tf", "none", "None", "linear")

# skip modes of a layer inside a network
PLAIN, RESIDUAL, DOUBLING = 0, 1, 2


def dtype_of(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise MtcoreError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}") from None


def make_activation(name: str) -> nn.Module:
    table = {
        "tanh": Tanh,  # 2σ(2x) − 1 on the CPU: torch's tanh kernel is slow there (fast_tanh.py)
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "softplus": nn.Softplus,
        "sigmoid": nn.Sigmoid,
        "gelu": lambda: nn.GELU(approximate="tanh"),
        "gelu_tf": lambda: nn.GELU(approximate="tanh"),
        "none": nn.Identity,
        "None": nn.Identity,
        "linear": nn.Identity,
    }
    if name not in table:
        raise MtcoreError(f"activation_function '{name}' is not one of {', '.join(ACTIVATIONS)}")
    return table[name]()


def new_generator(seed: Optional[int]) -> torch.Generator:
    """A private RNG for one network's initialisation: reproducible for a given seed."""
    gen = torch.Generator()
    gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return gen


class Dense(nn.Module):
    """y = φ(x W + b); W ~ N(0, 1/sqrt(n_in + n_out)), b ~ N(bias_mean, 1) as in DeePMD-kit.

    Mixed precision (``training/mixed_precision``, :mod:`mtcore.model.precision`): when ``mixed``,
    x, W and b are cast to ``compute_dtype`` for the product and activation and y comes back in
    the weights' dtype, so master weights and everything outside the layer stay wide. Both are
    set in __init__ (a torch.dtype and a bool: TorchScript infers their types from these values;
    a class annotation would be a string here, which it cannot read), so frozen files keep them."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        activation: str,
        dtype: torch.dtype,
        generator: torch.Generator,
        bias_mean: float = 0.0,
    ):
        super().__init__()
        if int(n_out) < 1:
            raise ValueError(f"neuron: layer widths must be positive integers, got {n_out}")
        self.n_in, self.n_out = n_in, n_out
        std = 1.0 / (n_in + n_out) ** 0.5
        self.weight = nn.Parameter(torch.randn(n_in, n_out, generator=generator, dtype=torch.float64).mul_(std).to(dtype))
        self.bias = nn.Parameter(torch.randn(n_out, generator=generator, dtype=torch.float64).add_(bias_mean).to(dtype))
        self.activation = make_activation(activation)
        self.activation_name = activation
        self.register_parameter("idt", None)
        self.compute_dtype = dtype
        self.mixed = False

    def add_timestep(self, mean: float, generator: torch.Generator) -> None:
        """Give the layer a resnet timestep (idt ~ N(mean, 0.001)) if it has none yet."""
        if self.idt is None:
            idt = torch.randn(self.n_out, generator=generator, dtype=torch.float64).mul_(0.001).add_(mean)
            self.idt = nn.Parameter(idt.to(self.weight.dtype))

    def forward(self, x: torch.Tensor, narrow: bool = False) -> torch.Tensor:
        """``narrow``: a mixed layer inside a network returns compute_dtype (the network casts
        once at its input and output, as DeePMD-kit does, not at every layer)."""
        if self.mixed:
            c = self.compute_dtype
            # product then sum (no addmm): TorchScript's autodiff splits addmm into these two, and
            # a frozen file must round exactly as training did
            y = self.activation(x.to(c) @ self.weight.to(c) + self.bias.to(c))
            return y if narrow else y.to(self.weight.dtype)
        return self.activation(torch.addmm(self.bias, x, self.weight) if x.dim() == 2 else x @ self.weight + self.bias)


class Block(nn.Module):
    """One layer in a network: the (possibly shared) Dense plus this network's skip rule."""

    def __init__(self, dense: Dense, mode: int, use_timestep: bool):
        super().__init__()
        self.dense = dense
        self.mode = mode
        self.use_timestep = use_timestep

    def forward(self, x: torch.Tensor, narrow: bool = False) -> torch.Tensor:
        h = self.dense(x, narrow)
        idt = self.dense.idt
        if self.use_timestep and idt is not None:
            h = h * idt.to(h.dtype)
        if self.mode == 1:  # RESIDUAL (TorchScript cannot read module globals)
            return x + h
        if self.mode == 2:  # DOUBLING
            return torch.cat([x, x], dim=-1) + h
        return h


class EmbeddingNet(nn.Module):
    """DeePMD-kit's embedding net: a residual (or width-doubling residual) where widths allow."""

    def __init__(
        self,
        n_in: int,
        neuron: list[int],
        activation: str = "tanh",
        resnet_dt: bool = False,
        dtype: torch.dtype = torch.float64,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        gen = generator if generator is not None else new_generator(None)
        blocks = []
        width = n_in
        for n_out in neuron:
            dense = Dense(width, n_out, activation, dtype, gen)
            mode = RESIDUAL if n_out == width else DOUBLING if n_out == 2 * width else PLAIN
            if mode != PLAIN and resnet_dt:
                dense.add_timestep(1.0, gen)
            blocks.append(Block(dense, mode, mode != PLAIN and resnet_dt))
            width = n_out
        self.blocks = nn.ModuleList(blocks)
        self.n_out = width
        self.wide_dtype = dtype  # weights' and output's dtype
        self.compute_dtype = dtype  # set by mtcore.model.precision (mixed precision)
        self.mixed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fused = self._with_tangent(x)
            if fused is not None:
                return fused
        if self.mixed:  # training/mixed_precision: one cast in, the whole net narrow, one cast out
            h = x.to(self.compute_dtype)
            for block in self.blocks:
                h = block(h, True)
            return h.to(self.wide_dtype)
        for block in self.blocks:
            x = block(x)
        return x

    @torch.jit.unused
    def _with_tangent(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """In force training, the net with its input derivative fused (tangent_embedding.py)."""
        return tangent_embedding.embed(self, x)


class FittingMLP(nn.Module):
    """DeePMD-kit's fitting MLP: hidden layers (residual where widths repeat), linear output.

    ``dense_factory(index, n_in, n_out, activation)`` supplies each layer, index 0..len(neuron)
    (the last one is the output layer). ``activation`` is None for a hidden layer (the factory
    supplies the head's activation_function) and ``"none"`` for the linear output layer. Heads
    do not call this directly: :class:`mtcore.model.fitting_net.TypeFittingNet` builds these nets
    with a factory that hands out shared layers by ``layer_name``. Layers are drawn from
    ``generator`` in order (weight, bias, then the timestep of a residual layer).
    """

    def __init__(
        self,
        n_in: int,
        neuron: list[int],
        n_out: int,
        resnet_dt: bool,
        generator: torch.Generator,
        dense_factory,
    ):
        super().__init__()
        blocks = []
        width = n_in
        for index, n_hidden in enumerate(neuron):
            dense = dense_factory(index, width, n_hidden, None)
            residual = index >= 1 and n_hidden == neuron[index - 1]
            if residual and resnet_dt:
                dense.add_timestep(0.1, generator)
            blocks.append(Block(dense, RESIDUAL if residual else PLAIN, residual and resnet_dt))
            width = n_hidden
        blocks.append(Block(dense_factory(len(neuron), width, n_out, "none"), PLAIN, False))
        self.blocks = nn.ModuleList(blocks)
        self.wide_dtype = blocks[0].dense.weight.dtype  # weights' and output's dtype
        self.compute_dtype = self.wide_dtype  # set by mtcore.model.precision (mixed precision)
        self.mixed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixed:  # training/mixed_precision: one cast in, the whole net narrow, one cast out
            h = x.to(self.compute_dtype)
            for block in self.blocks:
                h = block(h, True)
            return h.to(self.wide_dtype)
        for block in self.blocks:
            x = block(x)
        return x
