"""The same network and SGD step in PyTorch, the yardstick of `alexnet_jax.bench`.

PyTorch is optional (not in requirements.txt): `pip install torch==2.13.0`. The module mirrors
`alexnet_jax.model.AlexNet` field by field (grouped convolutions, LRN with the same alpha
convention and place, dropout placement, the torchvision preset's 6x6 pool), so that a speed
ratio compares the same mathematics; `load_params` copies JAX parameters in, and
tests/test_model_speedforms.py checks that both give the same logits.

`MODES` are PyTorch at its best on a CPU, as a researcher would run it: eager float32,
`torch.compile` (Inductor), eager under bf16 autocast and compiled under bf16 autocast (oneDNN
reaches the AMX-BF16 tiles of recent Xeons there). Autocast keeps float32 parameters and
optimiser state, like `model.dtype=bfloat16` on the JAX side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from alexnet_jax.model import AlexNet


class TorchAlexNet(nn.Module):
    """AlexNet in NCHW, built from the fields of a (Flax) `AlexNet` module."""

    def __init__(self, m: AlexNet, in_channels: int = 3):
        super().__init__()
        c1, c2, c3, c4, c5 = m.conv_features
        g = m.groups
        self.m = m
        self.conv1 = nn.Conv2d(in_channels, c1, 11, 4, m.conv1_padding)
        self.conv2 = nn.Conv2d(c1, c2, 5, 1, 2, groups=g)
        self.conv3 = nn.Conv2d(c2, c3, 3, 1, 1)  # conv3 connects across the columns
        self.conv4 = nn.Conv2d(c3, c4, 3, 1, 1, groups=g)
        self.conv5 = nn.Conv2d(c4, c5, 3, 1, 1, groups=g)
        # torch's LRN always divides alpha by the size; undo that for the paper's convention.
        alpha = m.lrn_alpha if m.lrn_scale_alpha_by_size else m.lrn_alpha * m.lrn_size
        self.lrn = nn.LocalResponseNorm(m.lrn_size, alpha=alpha, beta=m.lrn_beta, k=m.lrn_k)
        self.pool = nn.MaxPool2d(3, 2)
        self.drop = nn.Dropout(m.dropout_rate)
        flat = c5 * 6 * 6
        self.fc6 = nn.Linear(flat, m.dense_features)
        self.fc7 = nn.Linear(m.dense_features, m.dense_features)
        self.fc8 = nn.Linear(m.dense_features, m.num_classes)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if not self.m.use_lrn:
            return x
        if self.m.lrn_per_column and self.m.groups > 1:  # each column's channels on their own
            return torch.cat([self.lrn(c) for c in x.chunk(self.m.groups, dim=1)], dim=1)
        return self.lrn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = torch.relu
        x = self.conv1(x)
        x = relu(self._norm(x)) if self.m.lrn_before_relu else self._norm(relu(x))
        x = self.pool(x)
        x = self.pool(self._norm(relu(self.conv2(x))))
        x = relu(self.conv3(x))
        x = relu(self.conv4(x))
        x = self.pool(relu(self.conv5(x)))
        if self.m.pool_to_6x6:
            x = nn.functional.adaptive_avg_pool2d(x, 6)
        x = torch.flatten(x, 1)
        for fc in (self.fc6, self.fc7):
            if self.m.dropout_before_dense:
                x = self.drop(x)
            x = relu(fc(x))
            if not self.m.dropout_before_dense:
                x = self.drop(x)
        return self.fc8(x)


MODES = ("eager", "compile", "bf16", "compile_bf16")


def make_step(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "eager",
) -> Callable[[], float]:
    """One training step of `net` on a fixed batch in one of `MODES`; each call returns the loss.

    `torch.compile` compiles the network (forward and, through AOTAutograd, its backward); the
    loss, the backward call and the SGD update stay eager, as in the usual research loop.
    """
    if mode not in MODES:
        raise ValueError(f"unknown PyTorch mode {mode!r}; one of {', '.join(MODES)}")
    model: Callable[[torch.Tensor], torch.Tensor] = net
    if mode.startswith("compile"):
        model = torch.compile(net)
    autocast = mode.endswith("bf16")
    return lambda: train_step(net, opt, images, labels, model=model, autocast=autocast)


def make_sgd(
    net: nn.Module,
    *,
    learning_rate: float,
    momentum: float,
    weight_decay: float,
    decay_biases: bool,
) -> torch.optim.SGD:
    """SGD with momentum and weight decay on the kernels (and the biases if asked)."""
    kernels = [p for p in net.parameters() if p.ndim > 1]
    biases = [p for p in net.parameters() if p.ndim <= 1]
    groups = [
        {"params": kernels, "weight_decay": weight_decay},
        {"params": biases, "weight_decay": weight_decay if decay_biases else 0.0},
    ]
    return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum)


def train_step(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    model: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: bool = False,
) -> float:
    """One forward, backward and SGD update; returns the loss.

    `model` runs the forward pass (`net` itself, or `torch.compile(net)`); with `autocast` the
    forward pass and the loss run under CPU bf16 autocast (the backward follows the forward's
    dtypes by itself, as PyTorch's AMP recipe has it).
    """
    net.train()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        forward = net if model is None else model  # `or` would ask a compiled module its len()
        loss = nn.functional.cross_entropy(forward(images), labels)
    loss.backward()
    opt.step()
    return loss.item()


def load_params(net: TorchAlexNet, params: Any) -> None:
    """Copies JAX parameters (HWIO kernels, NHWC flattening) into the NCHW torch network."""
    with torch.no_grad():
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            layer = getattr(net, name)
            kernel = np.asarray(params[name]["kernel"])  # (kh, kw, in/groups, out)
            layer.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
        for name in ("fc6", "fc7", "fc8"):
            layer = getattr(net, name)
            kernel = np.asarray(params[name]["kernel"])  # (in, out)
            if name == "fc6":  # JAX flattens (h, w, c), torch (c, h, w)
                c = net.conv5.out_channels
                hw = kernel.shape[0] // c
                side = round(hw**0.5)
                kernel = kernel.reshape(side, side, c, -1).transpose(2, 0, 1, 3).reshape(c * hw, -1)
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
            layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
