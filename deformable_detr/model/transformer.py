"""Deformable transformer: encoder over the multi-scale feature maps, decoder over the object queries,
optional iterative box refinement and two-stage proposals (Zhu et al. 2020, sec. 4 and appendix A.4)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deformable_detr.device import upload
from deformable_detr.model.ms_deform_attn import MSDeformAttn
from deformable_detr.ops import level_start_index_of


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)) with x clamped to [eps, 1 - eps] so that boxes at the border stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _activation(name: str) -> nn.Module:
    activations = {"relu": nn.ReLU, "gelu": nn.GELU}
    if name not in activations:
        raise ValueError(f"activation must be one of {sorted(activations)}, got {name!r}")
    return activations[name]()


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a feed-forward block; post-norm."""

    def __init__(self, d_model: int = 256, dim_feedforward: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", num_levels: int = 4, num_heads: int = 8, num_points: int = 4,
                 msda_backend: str = "auto") -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, num_levels, num_heads, num_points, backend=msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]],
                level_start_index: Tensor, padding_mask: Tensor | None) -> Tensor:
        """src, pos: (batch, S, d_model); reference_points: (batch, S, num_levels, 2) -> (batch, S, d_model)."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        feed_forward = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(feed_forward))


class DeformableTransformerEncoder(nn.Module):
    """Stack of encoder layers. ``checkpoint_layers``: in training with gradients on, each layer's activations are
    recomputed in the backward instead of kept (same dropout masks: the random state is restored)."""

    def __init__(self, layers: list[DeformableTransformerEncoderLayer], checkpoint_layers: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.checkpoint_layers = checkpoint_layers

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """The centre of every pixel of every level, normalised by the valid (unpadded) extent of its level and
        then mapped onto every level.

        valid_ratios: (batch, num_levels, 2) (w, h) -> (batch, S, num_levels, 2) (x, y).
        """
        device = valid_ratios.device
        per_level = []
        for level, (height, width) in enumerate(spatial_shapes):
            # arange, not linspace: the same values (k + 0.5, exact in float32), and it follows a symbolic size.
            ref_y, ref_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=device) + 0.5,
                torch.arange(width, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            per_level.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(per_level, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, spatial_shapes: list[tuple[int, int]], level_start_index: Tensor,
                valid_ratios: Tensor, pos: Tensor, padding_mask: Tensor | None) -> Tensor:
        """src, pos: (batch, S, d_model); valid_ratios: (batch, num_levels, 2) -> memory (batch, S, d_model)."""
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        output = src
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            arguments = (output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
            output = checkpoint(layer, *arguments, use_reentrant=False) if recompute else layer(*arguments)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention among the queries, deformable cross-attention into the memory, feed-forward; post-norm."""

    def __init__(self, d_model: int = 256, dim_feedforward: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", num_levels: int = 4, num_heads: int = 8, num_points: int = 4,
                 msda_backend: str = "auto") -> None:
        super().__init__()
        # Registration order is the official one, so that state_dict keys come in the same order.
        self.cross_attn = MSDeformAttn(d_model, num_levels, num_heads, num_points, backend=msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, src: Tensor,
                src_spatial_shapes: list[tuple[int, int]], level_start_index: Tensor,
                src_padding_mask: Tensor | None) -> Tensor:
        """tgt, query_pos: (batch, Q, d_model); reference_points: (batch, Q, num_levels, 2 or 4);
        src: (batch, S, d_model) -> (batch, Q, d_model)."""
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(tgt + query_pos, reference_points, src, src_spatial_shapes, level_start_index,
                                   src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        feed_forward = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(feed_forward))


class DeformableTransformerDecoder(nn.Module):
    """Stack of decoder layers returning every layer's output (for the auxiliary losses).

    With ``bbox_embed`` (one box head per layer, iterative box refinement), each layer's box prediction becomes
    the next layer's reference, detached. ``class_embed`` is given in the two-stage variant only, where its
    extra last head scores the encoder proposals; the decoder itself does not call it. ``checkpoint_layers``: as
    for the encoder.
    """

    def __init__(self, layers: list[DeformableTransformerDecoderLayer], bbox_embed: nn.ModuleList | None = None,
                 class_embed: nn.ModuleList | None = None, checkpoint_layers: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.checkpoint_layers = checkpoint_layers
        if bbox_embed is not None and len(bbox_embed) < self.num_layers:
            raise ValueError(f"bbox_embed has {len(bbox_embed)} heads, need one per decoder layer ({self.num_layers})")
        # Assigned after the layers, as in the official code, which keeps the state_dict order of its checkpoints.
        self.bbox_embed = bbox_embed
        self.class_embed = class_embed

    def forward(self, tgt: Tensor, reference_points: Tensor, src: Tensor, src_spatial_shapes: list[tuple[int, int]],
                src_level_start_index: Tensor, src_valid_ratios: Tensor, query_pos: Tensor,
                src_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """
        Args:
            tgt, query_pos: (batch, Q, d_model) query content and position.
            reference_points: (batch, Q, 2) points or (batch, Q, 4) boxes, sigmoid space, relative to the valid
                part of the image.
            src: (batch, S, d_model) encoder memory; src_valid_ratios: (batch, num_levels, 2).

        Returns:
            hs: (num_layers, batch, Q, d_model), references: (num_layers, batch, Q, 2 or 4), the reference
            each layer hands on (the refined one with box refinement, else the input one).
        """
        output = tgt
        intermediate, intermediate_reference_points = [], []
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        for layer_index, layer in enumerate(self.layers):
            # Map the (valid-part) reference onto each level's padded extent.
            if reference_points.shape[-1] == 4:
                scale = torch.cat([src_valid_ratios, src_valid_ratios], -1)
            else:
                scale = src_valid_ratios
            # (batch, Q, num_levels, 2 or 4)
            reference_points_input = reference_points[:, :, None] * scale[:, None]
            arguments = (output, query_pos, reference_points_input, src, src_spatial_shapes, src_level_start_index,
                         src_padding_mask)
            output = checkpoint(layer, *arguments, use_reentrant=False) if recompute else layer(*arguments)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[layer_index](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_reference_points = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1
                    ).sigmoid()
                # The paper stops the gradient through the refined references (appendix A.4).
                reference_points = new_reference_points.detach()
            intermediate.append(output)
            intermediate_reference_points.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)


@dataclass
class TransformerOutput:
    """hs: (num_decoder_layers, batch, Q, d_model); init_reference: (batch, Q, 2 or 4);
    inter_references: (num_decoder_layers, batch, Q, 2 or 4), all sigmoid space. Two-stage only:
    enc_outputs_class (batch, S, num_classes), enc_outputs_coord_unact (batch, S, 4) before the sigmoid."""

    hs: Tensor
    init_reference: Tensor
    inter_references: Tensor
    enc_outputs_class: Tensor | None = None
    enc_outputs_coord_unact: Tensor | None = None


class DeformableTransformer(nn.Module):
    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", num_feature_levels: int = 4, dec_n_points: int = 4,
                 enc_n_points: int = 4, two_stage: bool = False, two_stage_num_proposals: int = 300,
                 decoder_bbox_embed: nn.ModuleList | None = None, decoder_class_embed: nn.ModuleList | None = None,
                 msda_backend: str = "auto", checkpoint_encoder: bool = False,
                 checkpoint_decoder: bool = False) -> None:
        super().__init__()
        if two_stage and (decoder_bbox_embed is None or decoder_class_embed is None):
            raise ValueError("two_stage needs decoder_bbox_embed and decoder_class_embed "
                             "(num_decoder_layers + 1 heads each)")
        for heads_name, heads in (("decoder_bbox_embed", decoder_bbox_embed),
                                  ("decoder_class_embed", decoder_class_embed)):
            if two_stage and len(heads) != num_decoder_layers + 1:
                raise ValueError(f"two_stage needs {num_decoder_layers + 1} {heads_name} heads, got {len(heads)}")
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = DeformableTransformerEncoder([
            DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation, num_feature_levels,
                                              nhead, enc_n_points, msda_backend)
            for _ in range(num_encoder_layers)
        ], checkpoint_layers=checkpoint_encoder)
        self.decoder = DeformableTransformerDecoder([
            DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, activation, num_feature_levels,
                                              nhead, dec_n_points, msda_backend)
            for _ in range(num_decoder_layers)
        ], bbox_embed=decoder_bbox_embed, class_embed=decoder_class_embed, checkpoint_layers=checkpoint_decoder)
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier for every matrix of the transformer proper; the prediction heads handed to the decoder belong
        # to the detector, which initialises them itself.
        heads = {id(p) for module in (self.decoder.bbox_embed, self.decoder.class_embed) if module is not None
                 for p in module.parameters()}
        for parameter in self.parameters():
            if parameter.dim() > 1 and id(parameter) not in heads:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratio(mask: Tensor) -> Tensor:
        """mask: (batch, H, W) True on padding -> (batch, 2) (w, h): the unpadded fraction of the map."""
        _, height, width = mask.shape
        valid_height = torch.sum(~mask[:, :, 0], 1)
        valid_width = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_width.float() / width, valid_height.float() / height], -1)

    def proposal_pos_embed(self, proposals: Tensor) -> Tensor:
        """Sine embedding of unactivated boxes: (batch, K, 4) -> (batch, K, 2 * d_model).

        The official code fixes 128 features per coordinate, which is d_model / 2 at its d_model of 256.
        """
        num_pos_feats, temperature, scale = self.d_model // 2, 10000, 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        # (batch, K, 4, num_pos_feats)
        pos = proposals.sigmoid()[:, :, :, None] * scale / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def encoder_output_proposals(self, memory: Tensor, memory_padding_mask: Tensor,
                                 spatial_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """One proposal per memory position: a box centred on the pixel, of side 0.05 * 2^level (appendix A.4).

        Returns output_memory (batch, S, d_model), the normalised memory that the two-stage heads read (zero at
        padding and unusable positions), and output_proposals (batch, S, 4), the unactivated (inverse-sigmoid)
        boxes, +inf at padding and where a coordinate is outside (0.01, 0.99).
        """
        batch = memory.shape[0]
        proposals, start = [], 0
        for level, (height, width) in enumerate(spatial_shapes):
            mask_level = memory_padding_mask[:, start:start + height * width].view(batch, height, width)
            valid_height = torch.sum(~mask_level[:, :, 0], 1)
            valid_width = torch.sum(~mask_level[:, 0, :], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=memory.device),
                torch.arange(width, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            # (H, W, 2) (x, y) pixel centres, normalised by the valid extent of each image
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            valid_scale = torch.cat([valid_width.unsqueeze(-1), valid_height.unsqueeze(-1)], 1).view(batch, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / valid_scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**level)
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += height * width
        output_proposals = torch.cat(proposals, 1)
        proposals_valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~proposals_valid, float("inf"))
        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~proposals_valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Tensor | None = None) -> TransformerOutput:
        """
        Args:
            srcs, pos_embeds: per level (batch, d_model, H_l, W_l); masks: per level (batch, H_l, W_l), True on
                padding.
            query_embed: (Q, 2 * d_model) learnt query position and content; None in the two-stage variant,
                where the queries come from the top-scoring encoder proposals.
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed (num_queries, 2 * d_model) is required unless two_stage")
        # Python ints in eager mode: the ops read them on the host, no device value is read back. Not int()-ed: under
        # torch.export with a dynamic image size they are symbolic, and the exported graph computes them from H x W.
        spatial_shapes = [(src.shape[2], src.shape[3]) for src in srcs]
        # (batch, S, d_model), levels concatenated
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        lvl_pos_embed_flatten = torch.cat([
            pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
            for level, pos in enumerate(pos_embeds)
        ], 1)
        level_start_index = upload(level_start_index_of(spatial_shapes), src_flatten.device)
        # (batch, num_levels, 2)
        valid_ratios = torch.stack([self.valid_ratio(mask) for mask in masks], 1)

        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios, lvl_pos_embed_flatten,
                              mask_flatten)

        batch, _, channels = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = self.encoder_output_proposals(memory, mask_flatten, spatial_shapes)
            heads = self.decoder.num_layers  # the heads after the decoder layers' ones score the proposals
            enc_outputs_class = self.decoder.class_embed[heads](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[heads](output_memory) + output_proposals
            # Top proposals by their first-class ("object") logit, trained class-agnostically.
            topk_proposals = torch.topk(enc_outputs_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4))
            topk_coords_unact = topk_coords_unact.detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = torch.split(pos_trans_out, channels, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, channels, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        if torch.compiler.is_exporting():
            # torch.export fixes the batch size at nn.MultiheadAttention's projections of these strided views (a guard
            # on their strides in matmul's decomposition); contiguous copies keep it symbolic.
            query_pos, tgt = query_pos.contiguous(), tgt.contiguous()
        init_reference = reference_points

        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                            valid_ratios, query_pos, mask_flatten)
        return TransformerOutput(hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact)
