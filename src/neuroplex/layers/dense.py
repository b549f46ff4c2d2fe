"""Dense (fully connected) blocks: the baseline every sparse or gated stage is measured against.

Shape legend: ``b`` batch, ``d`` input features, ``h`` width.
"""

from __future__ import annotations

from torch import Tensor, nn


class DenseBlock(nn.Module):
    """Linear -> norm -> activation -> dropout.

    Args:
        d_in: input features.
        d_out: output features.
        norm_layer: class built as ``norm_layer(d_out)``; ``None`` for no norm.
        act_layer: activation class, e.g. ``nn.GELU``.
        dropout: dropout probability after the activation.

    Shapes: ``[b, d_in] -> [b, d_out]``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        norm_layer: type[nn.Module] | None = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.linear = nn.Linear(d_in, d_out, **factory)
        self.norm = norm_layer(d_out, **factory) if norm_layer is not None else nn.Identity()
        self.act = act_layer()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``[b, d_in] -> [b, d_out]``."""
        return self.drop(self.act(self.norm(self.linear(x))))


class DenseStage(nn.Sequential):
    """``layers`` DenseBlocks of one ``width``. Shapes: ``[b, d_in] -> [b, width]``."""

    def __init__(
        self,
        d_in: int,
        width: int,
        layers: int = 1,
        *,
        norm_layer: type[nn.Module] | None = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        dims = [d_in] + [width] * layers
        super().__init__(
            *(
                DenseBlock(
                    a,
                    b,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    dropout=dropout,
                    device=device,
                    dtype=dtype,
                )
                for a, b in zip(dims[:-1], dims[1:], strict=True)
            )
        )
        self.d_in, self.d_out = d_in, width
