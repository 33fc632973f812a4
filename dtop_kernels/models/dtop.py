"""ViT-DToP: a plain ViT split into stages by SegViT heads, with DToP token exits between them.

Three execution modes on the same weights, chosen per call:

- ``"dense"``: no pruning (SegViT); batched dense attention (SDPA) on every token.
- ``"loop"``: the official semantics and speed: one image at a time, boolean-mask indexing.
- ``"packed"``: all images at once on their own ragged token sets (:class:`TokenSet`) through the
  package ops (``pruned_stage``, ``varlen_attention(return_logits=True)`` in the heads,
  ``dtop_select``, ``scatter_tokens`` for the canvas), with a ``backend`` passed through.

They agree within dtype tolerance (``"dense"`` with ``"packed"`` at threshold 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dtop_kernels.layers import call_layer, read_layer
from dtop_kernels.models.backbones import Backbone, timm_backbone, transformers_backbone
from dtop_kernels.models.head import SegHead
from dtop_kernels.models.vit import Block, PatchEmbed, init_backbone_, resize_pos_embed
from dtop_kernels.ops.block import pruned_stage
from dtop_kernels.ops.gather import scatter_tokens
from dtop_kernels.ops.select import dtop_select
from dtop_kernels.tokens import TokenSet

MODES = ("dense", "loop", "packed")


class DToPOutput(NamedTuple):
    """What :meth:`ViTDToP.forward` returns (S heads, K classes, token grid Hg x Wg)."""

    pred: torch.Tensor  # [B, K, H, W] (upsample=False: [B, K, Hg, Wg]): softmax(final class
    # logits)[present] * sigmoid(canvas)
    # Per head that ran (all S unless aux_heads=False):
    class_logits: tuple[torch.Tensor, ...]  # [B, K, 2]: [present, no object]
    mask_logits: tuple[torch.Tensor, ...]  # [B, K, Hg, Wg]: the canvas after that head wrote
    active_counts: torch.Tensor  # int64 [S, B]: tokens each stage's blocks and head ran on
    exit_stage: torch.Tensor  # int64 [B, Hg, Wg]: head at which each token exited (else S - 1)


class ViTDToP(nn.Module):
    """SegViT with Dynamic Token Pruning (DToP): ViT backbone, one head after each stage.

    Backbone: ``patch_embed.proj`` (conv, stride = patch), ``pos_embed`` [1, 1 + gh*gw, C] with a
    class-token slot (learned on a ``pos_grid`` = (gh, gw) grid, 24 x 24 for 384-pixel training;
    resized bicubically to the input grid, the slot is dropped: no class token in the blocks),
    ``blocks.{i}`` pre-norm timm-named blocks, no final norm. Head ``heads[s]`` runs after block
    ``stage_ends[s]`` (1-based); the last head is the decode head. At every head but the last,
    the DToP rule (``threshold``, ``top_k``) removes confident tokens from all later layers.
    ``threshold >= 1`` never prunes (dense SegViT).

    ``tighten``: after each selection in packed mode, read the token counts back (one host
    sync) and shrink the next stage's capacity: True to the exact count, an int ``m`` to the
    count rounded up to a multiple of ``m`` (a bucket: few distinct shapes), False never (the
    forward stays free of host syncs: what a CUDA graph needs; the kernel backends skip the
    padding rows on the device, but cuBLAS GEMMs of the torch backend run over them). None:
    exact on the CPU, buckets of ``CUDA_BUCKET`` rows on other devices; inside ``torch.compile``
    False (the whole forward one graph), while an explicit True or ``m`` there reads the counts
    back with one graph break per auxiliary head (the stages compile as separate graphs).

    ``backbone``: run a given :class:`~dtop_kernels.models.backbones.Backbone` (stem and layers,
    e.g. from :meth:`from_timm` / :meth:`from_transformers`) instead of building the plain ViT;
    ``embed_dim``, ``depth``, ``num_heads``, ``patch_size``, ``in_chans``, ``mlp_ratio`` and
    ``pos_grid`` then come from it. Its prefix tokens (class, registers) run in every block of
    every image and never exit; the heads and the canvas see the patch tokens only.
    """

    CUDA_BUCKET = 64  # rows: a multiple of the GEMM tile heights

    def __init__(
        self,
        num_classes: int = 150,
        *,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        stage_ends: Sequence[int] = (6, 8, 12),
        head_width: int = 384,
        head_heads: int = 6,
        head_layers: int = 3,
        threshold: float = 0.9,
        top_k: int = 5,
        patch_size: int = 16,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        pos_grid: int | tuple[int, int] = 24,
        head_attn_drop: float = 0.1,
        tighten: bool | None = None,
        backbone: Backbone | None = None,
    ) -> None:
        super().__init__()
        if backbone is not None:
            stem, layers = backbone
            embed_dim = stem.proj.out_channels
            depth, patch_size, in_chans = len(layers), stem.proj.kernel_size[0], \
                stem.proj.in_channels
            for i, layer in enumerate(layers):  # fail here, not at the first forward
                try:
                    read_layer(layer, embed_dim)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"backbone layer {i}: {e}") from None
        stage_ends = tuple(int(e) for e in stage_ends)
        if not stage_ends or any(b <= a for a, b in zip((0,) + stage_ends, stage_ends)) \
                or stage_ends[-1] != depth:
            raise ValueError(f"stage_ends must increase strictly from >= 1 and end at depth = "
                             f"{depth}; got {stage_ends}")
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be a non-negative int; got {top_k!r}")
        _check_tighten(tighten)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.stage_ends = stage_ends
        self.threshold = float(threshold)
        self.top_k = top_k
        self.tighten = tighten
        self.heads = nn.ModuleList(
            SegHead(embed_dim, head_width, head_heads, num_classes, head_layers, head_attn_drop)
            for _ in stage_ends)
        self.build_overrides: dict | None = None  # from_backbone's settings (checkpoints)
        if backbone is not None:  # the given modules, shared: "patch_embed" is the stem
            self.pos_grid = self.pos_embed = None
            self.num_prefix_tokens = backbone.stem.num_prefix_tokens
            self.patch_embed = backbone.stem
            self.blocks = nn.ModuleList(backbone.layers)
            w = backbone.stem.proj.weight
            self.heads.to(device=w.device, dtype=w.dtype)
            return
        self.pos_grid = (pos_grid, pos_grid) if isinstance(pos_grid, int) else tuple(pos_grid)
        self.num_prefix_tokens = 0
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        gh, gw = self.pos_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + gh * gw, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_backbone_(self.blocks)

    @classmethod
    def from_timm(cls, model: nn.Module, num_classes: int, **kw) -> ViTDToP:
        """A ViT-DToP around a timm ``VisionTransformer``: its patch embedding, class / register
        tokens, position embedding, ``norm_pre`` and blocks, shared (not copied: training the
        ViT-DToP trains ``model``); its final norm and classifier are not used. Create the
        model with ``dynamic_img_size=True`` to run on other image sizes than its own.
        ``kw``: see :meth:`from_backbone`."""
        return cls.from_backbone(timm_backbone(model), num_classes, **kw)

    @classmethod
    def from_transformers(cls, model: nn.Module, num_classes: int, **kw) -> ViTDToP:
        """A ViT-DToP around a transformers ViT, DeiT, DINOv2 (with registers) or DINOv3 ViT
        model (or a task model around one): its embeddings (position embeddings interpolated
        to the image size), rotary embeddings (DINOv3) and layers, shared (not copied); its
        final layernorm, pooler and classifier are not used. ``kw``: see
        :meth:`from_backbone`."""
        return cls.from_backbone(transformers_backbone(model), num_classes, **kw)

    @classmethod
    def from_backbone(cls, backbone: Backbone, num_classes: int, *,
                      threshold: float | None = None, stage_ends: Sequence[int] | None = None,
                      head_width: int | None = None, head_heads: int | None = None, **kw
                      ) -> ViTDToP:
        """A ViT-DToP around ``backbone``, with the paper's settings scaled to it unless given:
        heads after the paper's exit depths scaled to the depth (:func:`paper_stage_ends`)
        with that configuration's threshold (0.9 for ViT-B's pattern, 0.95 for ViT-L's), head
        width C / 2 with 64-wide attention heads. ``kw``: the other :class:`ViTDToP` arguments
        (``top_k``, ``head_layers``, ``head_attn_drop``, ``tighten``)."""
        depth = len(backbone.layers)
        width = backbone.stem.proj.out_channels // 2 if head_width is None else head_width
        cfg = {"threshold": (0.95 if depth >= LARGE_DEPTH else 0.9) if threshold is None
               else threshold,
               "stage_ends": paper_stage_ends(depth) if stage_ends is None else
               tuple(stage_ends),
               "head_width": width,
               "head_heads": max(1, width // 64) if head_heads is None else head_heads, **kw}
        model = cls(num_classes, backbone=backbone, **cfg)
        model.build_overrides = cfg
        return model

    @property
    def num_stages(self) -> int:
        return len(self.stage_ends)

    def stage_blocks(self, s: int) -> nn.ModuleList:
        """The blocks of stage ``s`` (those before head ``s``)."""
        lo = self.stage_ends[s - 1] if s else 0
        return self.blocks[lo:self.stage_ends[s]]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        img: torch.Tensor,
        mode: str = "packed",
        *,
        backend: str = "auto",
        threshold: float | None = None,
        aux_heads: bool = True,
        exit_logits: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        tighten: bool | int | None = None,
        upsample: bool = True,
    ) -> DToPOutput:
        """img: [B, in_chans, H, W], H and W multiples of the patch size, the model's dtype.

        ``mode``: "dense" | "loop" | "packed" (module docstring); ``backend`` goes to the ops
        in packed mode; ``threshold`` overrides the model's for this call ("dense" ignores it).
        ``aux_heads=False`` skips the auxiliary heads when nothing is pruned ("dense" mode or
        threshold >= 1), where they cannot change the prediction (the SegViT baseline at
        inference); the output then holds the final head's logits only (under
        DistributedDataParallel that leaves parameters unused: ``find_unused_parameters=True``;
        otherwise every parameter is used and the default works).

        ``exit_logits``: one ``(class_logits [B, K, 2], mask_logits [B, K, Hg*Wg])`` per auxiliary
        head that the exit rule sees instead of the head's own outputs (the heads still run and
        still write the canvas). For benchmarks and studies without trained weights: the real
        rule then prunes a chosen pattern, identically in "loop" and "packed" modes.

        ``tighten`` overrides the model's setting for this call (class docstring).
        ``upsample=False`` returns ``pred`` at the token grid, [B, K, Hg, Wg], before the
        bilinear upsampling to the image size (which no FLOP count includes).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        grid = self._check_input(img)
        _check_tighten(tighten)
        thr = self.threshold if threshold is None else float(threshold)
        prunes = mode != "dense" and thr < 1.0
        if prunes and not aux_heads:
            raise ValueError(f"aux_heads=False needs a run without pruning (mode 'dense' or "
                             f"threshold >= 1); got mode {mode!r}, threshold {thr}")
        x, rope = self.embed(img), self._rope(img)
        if x.shape[1] != self.num_prefix_tokens + grid[0] * grid[1]:
            raise ValueError(f"the stem made {x.shape[1]} tokens of a {grid[0]} x {grid[1]} "
                             f"grid; expected {self.num_prefix_tokens} prefix tokens, then one "
                             "per patch")
        if exit_logits is not None:
            self._check_exit_logits(exit_logits, x.shape[0], grid[0] * grid[1])
        if mode == "dense":
            cls, canvases, counts, exit_stage = self._run_dense(x, aux_heads, rope)
        elif mode == "loop":
            cls, canvases, counts, exit_stage = self._run_loop(x, thr, aux_heads, exit_logits,
                                                               rope)
        else:
            cls, canvases, counts, exit_stage = self._run_packed(
                x, thr, backend, aux_heads, exit_logits, self.tighten if tighten is None
                else tighten, rope)
        b = img.shape[0]
        masks = tuple(c.reshape(b, self.num_classes, *grid) for c in canvases)
        present = cls[-1].softmax(dim=-1)[..., 0]  # [B, K]
        prob = present[..., None, None] * masks[-1].sigmoid()
        pred = F.interpolate(prob, size=img.shape[-2:], mode="bilinear", align_corners=False) \
            if upsample else prob
        return DToPOutput(pred, tuple(cls), masks, counts, exit_stage.view(b, *grid))

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus position embedding: img [B, 3, H, W] -> x [B, N, C]; with a given
        backbone its stem: [B, P + N, C], the P prefix tokens first."""
        if self.pos_embed is None:
            return self.patch_embed(img)
        grid = (img.shape[-2] // self.patch_size, img.shape[-1] // self.patch_size)
        return self.patch_embed(img) + resize_pos_embed(self.pos_embed, self.pos_grid, grid)

    def _rope(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) [N, D] of a given backbone's rotary embeddings; None without."""
        return None if self.pos_embed is not None else \
            self.patch_embed.position_embeddings(img)

    def forward_backbone(self, img: torch.Tensor) -> torch.Tensor:
        """Dense features after the last block (no pruning, no heads, no final norm):
        [B, P + N, C], the P prefix tokens of a given backbone first."""
        self._check_input(img)
        x, rope = self.embed(img), self._rope(img)
        for blk in self.blocks:
            x = call_layer(blk, x, rope)
        return x

    def _check_exit_logits(self, exit_logits, b: int, n: int) -> None:
        k = self.num_classes
        if len(exit_logits) != self.num_stages - 1:
            raise ValueError(f"exit_logits needs one (class_logits, mask_logits) pair per "
                             f"auxiliary head ({self.num_stages - 1}); got {len(exit_logits)}")
        for s, (c, m) in enumerate(exit_logits):
            if tuple(c.shape) != (b, k, 2) or tuple(m.shape) != (b, k, n):
                raise ValueError(f"exit_logits[{s}] must be ([B, K, 2], [B, K, N]) = "
                                 f"({(b, k, 2)}, {(b, k, n)}); got ({tuple(c.shape)}, "
                                 f"{tuple(m.shape)})")

    def _check_input(self, img: torch.Tensor) -> tuple[int, int]:
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"img must be a torch.Tensor [B, {self.in_chans}, H, W]; got "
                            f"{type(img).__name__}")
        if not img.is_floating_point():
            raise TypeError(f"img must be a floating-point tensor (normalized pixels); got "
                            f"{img.dtype}: convert with img.float() and normalize")
        if img.dim() != 4 or img.shape[1] != self.in_chans:
            raise ValueError(f"img must be [B, {self.in_chans}, H, W]; got shape "
                             f"{tuple(img.shape)}")
        h, w = img.shape[-2:]
        p = self.patch_size
        if h == 0 or w == 0 or h % p or w % p:
            raise ValueError(f"image height and width must be positive multiples of the patch "
                             f"size {p}; got {h} x {w} (pad or resize the input)")
        weight = self.patch_embed.proj.weight
        if img.device != weight.device:
            raise ValueError(f"img is on {img.device} but the model is on {weight.device}")
        if img.dtype != weight.dtype and not torch.is_autocast_enabled(img.device.type):
            raise TypeError(f"img is {img.dtype} but the model is {weight.dtype}: cast one to "
                            "the other (or run under torch.autocast)")
        return h // p, w // p

    # ------------------------------------------------------------------ execution modes
    def _runs_head(self, s: int, aux_heads: bool) -> bool:
        return aux_heads or s == self.num_stages - 1

    def _run_dense(self, x: torch.Tensor, aux_heads: bool, rope=None):
        p = self.num_prefix_tokens
        b, n = x.shape[0], x.shape[1] - p
        cls, canvases = [], []
        for s, head in enumerate(self.heads):
            for blk in self.stage_blocks(s):
                x = call_layer(blk, x, rope)
            if not self._runs_head(s, aux_heads):
                continue
            c, m = head(x[:, p:])
            cls.append(c)
            canvases.append(m)  # every token is active: the head writes the whole canvas
        counts = torch.full((self.num_stages, b), n, dtype=torch.long, device=x.device)
        exit_stage = torch.full((b, n), self.num_stages - 1, dtype=torch.long, device=x.device)
        return cls, canvases, counts, exit_stage

    def _run_loop(self, x: torch.Tensor, threshold: float, aux_heads: bool, exit_logits=None,
                  rope=None):
        """One image at a time with boolean masks, as the official code (exited tokens' features
        are zeroed there and here; nothing reads them). Prefix tokens always run; a rotary
        layer sees the positions of the image's kept patches."""
        p = self.num_prefix_tokens
        b, nt, c = x.shape
        n = nt - p
        last = self.num_stages - 1
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device)
        exit_stage = torch.full((b, n), last, dtype=torch.long, device=x.device)
        cls, canvases, counts = [], [], []
        canvas = None
        for s, head in enumerate(self.heads):
            counts.append(keep.sum(dim=1))
            rows = []
            full = torch.cat([keep.new_ones(b, p), keep], dim=1)
            for i in range(b):
                xi = x[i, full[i]].unsqueeze(0)
                rope_i = None if rope is None else (rope[0][keep[i]], rope[1][keep[i]])
                for blk in self.stage_blocks(s):
                    xi = call_layer(blk, xi, rope_i)
                rows.append(x.new_zeros(nt, c).index_put((full[i],), xi[0]))
            x = torch.stack(rows)
            if not self._runs_head(s, aux_heads):
                continue
            outs = [head(x[i, p:][keep[i]].unsqueeze(0)) for i in range(b)]  # ([1,K,2], [1,K,n_i])
            canvas = outs[0][1].new_zeros(b, self.num_classes, n) if canvas is None \
                else canvas.clone()
            for i, (_, m) in enumerate(outs):
                canvas[i][:, keep[i]] = m[0]
            c_s = torch.cat([o[0] for o in outs])
            cls.append(c_s)
            canvases.append(canvas)
            if s < last and threshold < 1.0:
                with torch.no_grad():
                    keep = keep.clone()  # autograd saved the old masks for the index ops
                    for i, (_, m) in enumerate(outs):
                        c_i, m_i = c_s[i], m[0]
                        if exit_logits is not None:
                            c_i, m_i = exit_logits[s][0][i], exit_logits[s][1][i][:, keep[i]]
                        gone = keep[i].nonzero().squeeze(1)[
                            _official_exits(c_i, m_i, threshold, self.top_k)]
                        keep[i, gone] = False
                        exit_stage[i, gone] = s
        return cls, canvases, torch.stack(counts), exit_stage

    def _run_packed(self, x: torch.Tensor, threshold: float, backend: str, aux_heads: bool,
                    exit_logits=None, tighten: bool | int | None = None, rope=None):
        """``tokens``: the active patch tokens (what the heads, the canvas and the exit rule
        see); ``blocks_tokens``: those plus the prefix tokens, first in every image (what the
        blocks run on), with ``patch_slots`` locating the patch rows in its packed rows."""
        p = self.num_prefix_tokens
        b, nt, c = x.shape
        n = nt - p
        last = self.num_stages - 1
        if tighten not in (None, False) and torch.compiler.is_exporting():
            raise ValueError(f"tighten={tighten!r} cannot be exported: it reads the token counts "
                             "back to the host and shrinks the buffers; export at fixed "
                             "capacity (tighten=False), as dtop_kernels.export does")
        if tighten is None:  # under torch.compile: fixed capacity (a read-back breaks a graph)
            tighten = False if torch.compiler.is_compiling() else \
                True if x.device.type == "cpu" else self.CUDA_BUCKET
        tokens = TokenSet.all_active(b, n, device=x.device)
        blocks_tokens, patch_slots = tokens.with_prefix(p)
        packed = x.reshape(b * nt, c)  # all active: the packed layout is the dense one
        exit_stage = torch.full((b, n), last, dtype=torch.long, device=x.device)
        cls, canvases, counts = [], [], []
        canvas = None
        for s, head in enumerate(self.heads):
            counts.append(tokens.seqlens.long())
            packed = pruned_stage(packed, blocks_tokens, self.stage_blocks(s),
                                  position_embeddings=rope, backend=backend)
            if not self._runs_head(s, aux_heads):
                continue
            rows = packed.index_select(0, patch_slots) if p else packed
            c_s, m = head(rows, tokens, backend)  # [B, K, 2], [K, capacity]
            base = m.new_zeros(b, n, self.num_classes) if canvas is None else canvas.clone()
            canvas = scatter_tokens(m.t(), tokens, base, backend=backend)  # [B, N, K]
            cls.append(c_s)
            canvases.append(canvas.transpose(1, 2))
            if s < last and threshold < 1.0:
                c_sel, m_sel = c_s.detach(), m.detach()
                if exit_logits is not None:  # dense [B, K, N] -> packed columns [K, capacity]
                    c_sel = exit_logits[s][0]
                    flat = exit_logits[s][1].transpose(0, 1).reshape(self.num_classes, b * n)
                    m_sel = flat[:, torch.where(tokens.valid_slots(), tokens.indices, 0).long()]
                sel = dtop_select(c_sel, m_sel, tokens, threshold, self.top_k, backend=backend)
                exit_stage = torch.where(sel.exited, s, exit_stage)
                new = sel.tokens
                if tighten is not False:
                    new = new.tighten(1 if tighten is True else tighten)
                new_blocks_tokens, patch_slots = new.with_prefix(p)
                packed = blocks_tokens.repack(packed, new_blocks_tokens)
                tokens, blocks_tokens = new, new_blocks_tokens
        return cls, canvases, torch.stack(counts), exit_stage


def _check_tighten(tighten: object) -> None:
    if tighten is None or isinstance(tighten, bool):
        return
    if not isinstance(tighten, int) or tighten < 1:
        raise ValueError(f"tighten must be None, True, False or a positive int (a bucket of "
                         f"rows); got {tighten!r}")


def _official_exits(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, threshold: float, top_k: int
) -> torch.Tensor:
    """The exit rule for one image, written as the official per-class loop.

    class_logits [K, 2], mask_logits [K, n] of the active tokens -> bool [n]: tokens that exit.
    """
    score = class_logits.float().softmax(dim=-1)[:, :1] * mask_logits.float().sigmoid()
    conf, label = score.max(dim=0)
    exits = conf > threshold
    for c in label[exits].unique():
        members = (exits & (label == c)).nonzero().squeeze(1)
        # the top_k most confident stay; equal confidence: lower position first (stable sort)
        stay = torch.argsort(-conf[members], stable=True)[:top_k]
        exits[members[stay]] = False
    return exits


# ---------------------------------------------------------------------- configurations
LARGE_DEPTH = 18  # from this depth on, a backbone gets ViT-L's exit pattern, else ViT-B's


def paper_stage_ends(depth: int) -> tuple[int, ...]:
    """The paper's exit depths scaled to ``depth`` layers: ViT-B's 6 / 8 / 12 of 12 (halfway,
    two thirds, the end) below ``LARGE_DEPTH`` layers, ViT-L's 8 / 16 / 24 of 24 (thirds) from
    it on; rounded, at least 1, repeats dropped (depth 2: (1, 2))."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int; got {depth!r}")
    fractions = (1 / 3, 2 / 3) if depth >= LARGE_DEPTH else (1 / 2, 2 / 3)
    return tuple(sorted({max(1, round(depth * f)) for f in fractions} | {depth}))


def vit_dtop_base(num_classes: int = 150, threshold: float = 0.9, **kw) -> ViTDToP:
    """ViT-B/16 + DToP: 12 layers, 768 wide, 12 heads; heads after layers 6, 8, 12 (384 wide,
    6 heads); p0 0.9, top-k 5. ``threshold=1.0`` is the dense SegViT."""
    cfg = {"embed_dim": 768, "depth": 12, "num_heads": 12, "stage_ends": (6, 8, 12),
           "head_width": 384, "head_heads": 6, "top_k": 5}
    return ViTDToP(num_classes, threshold=threshold, **{**cfg, **kw})


def vit_dtop_large(num_classes: int = 150, threshold: float = 0.95, **kw) -> ViTDToP:
    """ViT-L/16 + DToP: 24 layers, 1024 wide, 16 heads; heads after layers 8, 16, 24 (512 wide,
    8 heads); p0 0.95, top-k 5."""
    cfg = {"embed_dim": 1024, "depth": 24, "num_heads": 16, "stage_ends": (8, 16, 24),
           "head_width": 512, "head_heads": 8, "top_k": 5}
    return ViTDToP(num_classes, threshold=threshold, **{**cfg, **kw})


def vit_dtop_tiny(num_classes: int = 5, threshold: float = 0.9, **kw) -> ViTDToP:
    """A tiny configuration for tests and examples: 4 layers, 64 wide, 2 heads; heads after
    layers 2, 3, 4 (32 wide, 2 heads, head dim 16); 6 x 6 position grid."""
    cfg = {"embed_dim": 64, "depth": 4, "num_heads": 2, "stage_ends": (2, 3, 4),
           "head_width": 32, "head_heads": 2, "top_k": 5, "pos_grid": 6}
    return ViTDToP(num_classes, threshold=threshold, **{**cfg, **kw})
