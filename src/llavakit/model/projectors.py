"""Projectors: vision features [N_img, T, D_vis] -> LLM embeddings [N_img, T', D_llm].

A plain dict registry looked up by exact name; an unknown name is answered with the valid ones.
`mlp{N}x_gelu` follows LLaVA-1.5's naming (N linear layers with GELU between). The token-reducing
projectors trade image tokens for speed: `avgpool2x2_*` averages each 2x2 patch block (4x fewer
tokens), `pixelshuffle2x2_*` stacks each 2x2 block on the channel axis before the MLP.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """`depth` linear layers (named linear_1..linear_N, as llava-hf does) with GELU between."""

    def __init__(self, in_dim: int, out_dim: int, depth: int):
        super().__init__()
        self.depth = depth
        self.linear_1 = nn.Linear(in_dim, out_dim)
        for i in range(2, depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(out_dim, out_dim))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x


class IdentityProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if in_dim != out_dim:
            raise ValueError(
                f"projector 'identity' needs the vision feature size ({in_dim}) to equal the LLM hidden size "
                f"({out_dim}); pick 'linear' or 'mlp2x_gelu' instead"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Pool2x2Projector(nn.Module):
    """2x2 spatial reduction of the patch grid, then an MLP. Needs an even, square patch grid."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, mode: str):
        super().__init__()
        self.mode = mode
        self.mlp = MLPProjector(in_dim * 4 if mode == "pixelshuffle" else in_dim, out_dim, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, g*g, D]
        n, t, d = x.shape
        g = int(round(t**0.5))
        x = x.reshape(n, g // 2, 2, g // 2, 2, d)
        if self.mode == "avgpool":
            x = x.mean(dim=(2, 4))  # [N, g/2, g/2, D]
        else:
            x = x.permute(0, 1, 3, 2, 4, 5).reshape(n, g // 2, g // 2, 4 * d)  # [N, g/2, g/2, 4D]
        return self.mlp(x.reshape(n, (g // 2) ** 2, -1))


def _mlp(depth):
    return lambda i, o: MLPProjector(i, o, depth)


def _pool(depth, mode):
    return lambda i, o: Pool2x2Projector(i, o, depth, mode)


# name -> (factory(in_dim, out_dim), spatial reduction per side)
PROJECTORS: dict[str, tuple] = {
    "identity": (lambda i, o: IdentityProjector(i, o), 1),
    "linear": (_mlp(1), 1),
    **{f"mlp{n}x_gelu": (_mlp(n), 1) for n in range(2, 7)},
    "avgpool2x2_mlp2x_gelu": (_pool(2, "avgpool"), 2),
    "pixelshuffle2x2_mlp2x_gelu": (_pool(2, "pixelshuffle"), 2),
}


def _lookup(name: str):
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; valid projectors: {', '.join(PROJECTORS)}")
    return PROJECTORS[name]


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    return _lookup(name)[0](in_dim, out_dim)


def projector_output_tokens(name: str, vision_tokens: int, patch_grid: int, select: str, prefix: int) -> int:
    """How many features one image yields after projector `name` (what `<image>` expands to)."""
    reduce = _lookup(name)[1]
    if reduce == 1:
        return vision_tokens
    if select != "patch" and prefix:
        raise ValueError(
            f"projector {name!r} pools the patch grid, so it needs vision_feature_select='patch' "
            f"(the tower adds {prefix} prefix token(s) that are not part of the grid)"
        )
    if patch_grid % reduce:
        raise ValueError(f"projector {name!r} needs a patch grid divisible by {reduce}; this tower has {patch_grid}")
    return (patch_grid // reduce) ** 2
