"""DETR's transformer (Carion et al. 2020, facebookresearch/detr ``models/transformer.py``, post-norm): a standard
encoder-decoder whose attention adds the position encodings to the queries and keys at every layer.

Everything is sequence-first, as ``nn.MultiheadAttention`` (batch_first False) and the official code: the
flattened feature map is (H*W, batch, d_model), the queries (Q, batch, d_model). Parameter names and registration
order are the official ones, so official checkpoints load strictly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _with_pos(tensor: Tensor, pos: Tensor | None) -> Tensor:
    return tensor if pos is None else tensor + pos


class DETREncoderLayer(nn.Module):
    """Self-attention (q = k = src + pos, v = src), add & norm, FFN (ReLU), add & norm."""

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        # Registration order = the official state_dict order.
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        """src, pos: (S, batch, d_model); key_padding_mask: (batch, S) True on padding -> (S, batch, d_model)."""
        q = k = _with_pos(src, pos)
        # need_weights as in the official call: it selects the same attention kernel (and rounding).
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask)[0]))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class DETRDecoderLayer(nn.Module):
    """Self-attention of the queries (q = k = tgt + query_pos), cross-attention to the memory (query = tgt +
    query_pos, key = memory + pos, value = memory), FFN; each followed by add & norm."""

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor, pos: Tensor, query_pos: Tensor
                ) -> Tensor:
        """tgt, query_pos: (Q, batch, d_model); memory, pos: (S, batch, d_model); memory_key_padding_mask:
        (batch, S) -> (Q, batch, d_model)."""
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt)[0]))
        attended = self.multihead_attn(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos), value=memory,
                                       key_padding_mask=memory_key_padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class DETREncoder(nn.Module):
    """``num_layers`` encoder layers, no final norm (post-norm)."""

    def __init__(self, layer: DETREncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        """(S, batch, d_model) -> (S, batch, d_model)."""
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src


class DETRDecoder(nn.Module):
    """``num_layers`` decoder layers; returns every layer's output through the ONE shared final ``norm`` (each
    layer receives the previous layer's output un-normalised)."""

    def __init__(self, layer: DETRDecoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor, pos: Tensor, query_pos: Tensor
                ) -> Tensor:
        """Returns (num_layers, Q, batch, d_model): ``norm`` of each layer's output."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


@dataclass
class DETRTransformerOutput:
    """hs: (num_decoder_layers, batch, Q, d_model) normalised decoder outputs; memory: (batch, d_model, H, W)."""

    hs: Tensor
    memory: Tensor


class DETRTransformer(nn.Module):
    """The post-norm encoder-decoder of DETR: 6 + 6 layers, d_model 256, 8 heads, FFN 2048, dropout 0.1 by default.

    The decoder input starts at zero; the learnt queries enter as ``query_pos`` at every layer.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("nhead", nhead), ("num_decoder_layers", num_decoder_layers),
                            ("dim_feedforward", dim_feedforward)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_encoder_layers < 0:
            raise ValueError(f"num_encoder_layers must be >= 0, got {num_encoder_layers}")
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.encoder = DETREncoder(DETREncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers)
        self.decoder = DETRDecoder(DETRDecoderLayer(d_model, nhead, dim_feedforward, dropout), num_decoder_layers,
                                   d_model)
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor) -> DETRTransformerOutput:
        """
        Args:
            src: (batch, d_model, H, W) projected feature map.
            mask: (batch, H, W) bool, True on padding.
            query_embed: (Q, d_model) learnt query positions.
            pos_embed: (batch, d_model, H, W) position encoding of the feature map.
        """
        batch, channels, height, width = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # (H*W, batch, d_model)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)  # (H*W, batch, d_model)
        query_pos = query_embed.unsqueeze(1).repeat(1, batch, 1)  # (Q, batch, d_model)
        mask = mask.flatten(1)  # (batch, H*W)
        tgt = torch.zeros_like(query_pos)
        memory = self.encoder(src, mask, pos_embed)
        hs = self.decoder(tgt, memory, mask, pos_embed, query_pos)  # (L, Q, batch, d_model)
        return DETRTransformerOutput(hs.transpose(1, 2), memory.permute(1, 2, 0).view(batch, channels, height, width))
