"""CUDA graphs of the ViT-DToP forward in one call: :func:`capture_forward`.

The packed forward at fixed capacity (``tighten=False``) makes no host synchronization: token
counts, the DToP exit rule and the compaction to the next token set all stay on the device, and
every shape is known on the host in advance. Such a forward can be captured once in a CUDA
graph for a given batch size, resolution and dtype, and replayed for new images at the cost of
one launch: the ~300 kernel launches of an eager forward disappear, and the exit rule runs
inside the graph, so each replay prunes its own images differently.

Fixed capacity means every stage's buffers hold all ``B * N`` token rows. The kernel backends
skip the rows past the true count on the device (no FLOPs); the torch backend's cuBLAS GEMMs run
over them (PyTorch's varlen attention does not). Measure (``benchmarks/latency.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dtop_kernels.models.dtop import DToPOutput, ViTDToP

CAPTURABLE_MODES = ("packed", "dense")  # "loop" indexes with boolean masks: host syncs


class CapturedForward:
    """A ViT-DToP forward for one input shape, dtype and device, replayed from a CUDA graph.

    ``fwd(img)`` (and ``fwd(img, exit_logits)`` when captured with ``exit_logits=True``):
    img must have exactly the captured shape, dtype and device; it is copied into the graph's
    input buffer and the graph replays. Returns a :class:`DToPOutput` whose tensors are the
    graph's own output buffers: **the next call overwrites them** (``.clone()`` what you keep).
    The call does not wait for the GPU (results are ready in stream order, as for any CUDA
    op). Inference only: no autograd through the graph.

    ``graphed`` is False where CUDA graphs cannot run (``reason`` says why, e.g. CPU tensors);
    the call then runs the eager forward with the same arguments (fresh outputs each call).
    """

    def __init__(self, model: ViTDToP, img_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, kwargs: dict, exit_shapes: list | None,
                 reason: str | None) -> None:
        self.model, self.img_shape, self.dtype, self.device = model, img_shape, dtype, device
        self.kwargs, self.exit_shapes, self.reason = kwargs, exit_shapes, reason
        self.graph: torch.cuda.CUDAGraph | None = None
        self._img: torch.Tensor | None = None
        self._exit: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._out: DToPOutput | None = None

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def _check(self, img: object, exit_logits) -> None:
        if not isinstance(img, torch.Tensor) or tuple(img.shape) != self.img_shape or \
                img.dtype != self.dtype or img.device != self.device:
            got = (f"shape {tuple(img.shape)}, {img.dtype}, {img.device}"
                   if isinstance(img, torch.Tensor) else type(img).__name__)
            raise ValueError(f"img must be shape {self.img_shape}, {self.dtype}, {self.device} "
                             f"as captured; got {got} (capture another forward for it)")
        if (exit_logits is None) != (self.exit_shapes is None):
            raise ValueError("exit_logits must be given exactly when the forward was captured "
                             "with exit_logits=True")
        if exit_logits is not None:
            if len(exit_logits) != len(self.exit_shapes):
                raise ValueError(f"exit_logits needs {len(self.exit_shapes)} (class_logits, "
                                 f"mask_logits) pairs; got {len(exit_logits)}")
            for s, (pair, shapes) in enumerate(zip(exit_logits, self.exit_shapes)):
                if tuple(tuple(t.shape) for t in pair) != shapes:
                    raise ValueError(f"exit_logits[{s}] must have shapes {shapes}; got "
                                     f"{tuple(tuple(t.shape) for t in pair)}")

    def __call__(self, img: torch.Tensor,
                 exit_logits: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> DToPOutput:
        self._check(img, exit_logits)
        if self.graph is None:
            with torch.no_grad():
                return self.model(img, exit_logits=exit_logits, **self.kwargs)
        with torch.no_grad():
            self._img.copy_(img)
            if exit_logits is not None:
                for (c, m), (sc, sm) in zip(exit_logits, self._exit):
                    sc.copy_(c)
                    sm.copy_(m)
        self.graph.replay()
        return self._out

    def _capture(self, warmup: int, pool) -> None:
        """Static input buffers, warm-up forwards on a side stream (compiles kernels, fills
        caches), then the capture."""
        kwargs = {**self.kwargs, "tighten": False}
        with torch.inference_mode(False), torch.no_grad():
            # Plain (not inference) tensors: copy_ into them works in and out of inference mode.
            self._img = torch.zeros(self.img_shape, dtype=self.dtype, device=self.device)
            if self.exit_shapes is not None:
                self._exit = [(torch.zeros(c, device=self.device, dtype=torch.float32),
                               torch.zeros(m, device=self.device, dtype=torch.float32))
                              for c, m in self.exit_shapes]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                self.model(self._img, exit_logits=self._exit, **kwargs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
                self._out = self.model(self._img, exit_logits=self._exit, **kwargs)
        except RuntimeError as e:
            raise RuntimeError(
                f"capturing the {kwargs['mode']} forward in a CUDA graph failed; something in "
                f"it synchronizes with the host or allocates outside the graph "
                f"(backend={kwargs['backend']!r}): {e}") from e
        self.graph = graph


def graph_reason(device: torch.device) -> str | None:
    """Why CUDA graphs cannot run on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; the model is on {device}"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def capture_forward(
    model: ViTDToP,
    batch_size: int,
    resolution: int | tuple[int, int],
    *,
    dtype: torch.dtype | None = None,
    mode: str = "packed",
    backend: str = "auto",
    threshold: float | None = None,
    aux_heads: bool = True,
    upsample: bool = True,
    exit_logits: bool = False,
    warmup: int = 2,
    pool=None,
    fallback: bool = True,
) -> CapturedForward:
    """Capture ``model``'s forward for ``batch_size`` images of ``resolution`` (int or
    (H, W), multiples of the patch size) in a CUDA graph; returns a :class:`CapturedForward`
    that replays it for new images.

    ``mode``: "packed" (at fixed capacity: ``tighten=False``; the DToP selection runs inside
    the graph) or "dense"; ``backend``, ``threshold``, ``aux_heads``, ``upsample``: as in
    :meth:`ViTDToP.forward`, fixed at capture. ``exit_logits=True``: the call takes
    synthesized exit logits too (float32, one ``([B, K, 2], [B, K, N])`` pair per auxiliary
    head; for benchmarks). ``dtype``: the model's by default (the images' dtype). ``warmup``:
    eager forwards before the capture (kernel compilation happens there). ``pool``: a
    ``torch.cuda.graph_pool_handle()`` to share memory between graphs that never run at the
    same time. The model must be in eval mode, and its weights must stay where they are (the
    graph reads them in place; updating them in place is fine).

    ``fallback``: on a device without CUDA graphs, return an eager stand-in (``graphed``
    False) instead of raising. A forward that cannot be captured on a CUDA device always
    raises.
    """
    if not isinstance(model, ViTDToP):
        raise TypeError(f"model must be a ViTDToP; got {type(model).__name__}")
    if mode not in CAPTURABLE_MODES:
        raise ValueError(f"mode must be one of {CAPTURABLE_MODES} (the per-image loop reads "
                         f"counts on the host, which a CUDA graph cannot); got {mode!r}")
    if model.training:
        raise ValueError("model is in training mode: a captured forward is inference only; "
                         "call model.eval() first")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    p = model.patch_size
    if not all(isinstance(s, int) and s > 0 and s % p == 0 for s in (h, w)):
        raise ValueError(f"resolution must be positive multiples of the patch size {p}; got "
                         f"{resolution!r}")
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (kernels compile there); got {warmup!r}")
    weight = model.patch_embed.proj.weight
    dtype = weight.dtype if dtype is None else dtype
    device = weight.device
    img_shape = (batch_size, model.in_chans, h, w)
    exit_shapes = None
    if exit_logits:
        k, n = model.num_classes, (h // p) * (w // p)
        exit_shapes = [((batch_size, k, 2), (batch_size, k, n))] * (model.num_stages - 1)
    kwargs = {"mode": mode, "backend": backend, "threshold": threshold, "aux_heads": aux_heads,
              "upsample": upsample}
    reason = graph_reason(device)
    fwd = CapturedForward(model, img_shape, dtype, device, kwargs, exit_shapes, reason)
    if reason is not None:
        if not fallback:
            raise RuntimeError(f"cannot capture a CUDA graph: {reason}")
        return fwd
    fwd._capture(warmup, pool)
    return fwd
