"""Train a ViT-DToP on a segmentation data set (ADE20K or folder layout,
:mod:`dtop_kernels.data`).

    python -m dtop_kernels.train --data DIR --out RUN [--arch base --iters 40000 ...]
    torchrun --nproc-per-node 8 -m dtop_kernels.train --data DIR --out RUN ...

The published recipe's shape: AdamW (weight decay 0.01), heads at 10x the backbone's learning
rate, linear warm-up then poly decay (power 0.9) per iteration, the DToP loss on every head
(:func:`dtop_loss`). ``--dense-iters N``: the first N iterations train without pruning (the
published recipe trains the dense SegViT first, then fine-tunes with pruning active; here both
phases can run in one go), the rest with the exit rule at ``--threshold``.

- Mixed precision on CUDA (``--amp bf16 | fp16 | off``; fp16 with a gradient scaler).
- ``torchrun``: one process per GPU (NCCL), or CPU processes (gloo); each rank takes its own
  slice of every global batch of ``--batch-size`` x world size images.
- Checkpoints ``RUN/iter_N.pth`` every ``--ckpt-interval`` iterations and ``RUN/final.pth``,
  written atomically (a killed run leaves the previous file whole); ``--resume RUN/iter_N.pth``
  (or ``--resume auto``: the newest intact one in RUN, passing over damaged ones with a note)
  continues exactly: weights, optimizer, scaler, iteration, random generators; the data order
  and augmentations are functions of (seed, iteration), so a resumed run sees the batches an
  uninterrupted one would.
- Files are read weights-only; ``--trust-checkpoint`` loads ones holding pickled objects.
  Unreadable or invalid data stops the run with the file and item named, or with
  ``--skip-bad-samples`` is skipped and counted. A process whose peers stop or do not answer
  within ``--dist-timeout`` seconds ends with an error instead of hanging.
- Progress: a tqdm bar when tqdm is installed, else a line every ``--log-interval``
  iterations; ``RUN/log.jsonl`` gets one JSON line per logged iteration and evaluation.
- Start from timm ViT weights (``--timm-model NAME``: ``timm.create_model(NAME,
  pretrained=True)``; or ``--init FILE`` with a timm state dict), an mmseg checkpoint
  (``--init FILE``, official DToP / SegViT naming) or a checkpoint of this trainer (``--init
  RUN/final.pth``: weights only, a new schedule, e.g. the pruning fine-tune after a dense run);
  the kind is recognized from its keys.
- Bring your own ViT: ``--init FILE`` with a checkpoint of a model built by
  ``ViTDToP.from_timm`` / ``from_transformers`` (``save_checkpoint(FILE, model,
  backbone_config(model), 0)``) trains that model: the file sets the backbone, the heads and
  their settings (no ``--arch``); ``--threshold`` replaces its threshold when given, and
  ``--resume`` continues such a run as any other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dtop_kernels.data import (
    CheckedItems,
    DataError,
    EvalTransform,
    TrainTransform,
    collate_checked,
    default_split,
    open_dataset,
    read_meta,
    require_pillow,
)
from dtop_kernels.evaluate import evaluate
from dtop_kernels.models.checkpoint import (
    ARCHS,
    BACKBONE_ARCH,
    CheckpointError,
    DamagedCheckpointError,
    build_model,
    load_file,
    load_weights,
    model_config,
    read_checkpoint,
    save_checkpoint,
)
from dtop_kernels.models.loading import load_mmseg_checkpoint, load_timm_backbone
from dtop_kernels.models.losses import dtop_loss


# ---------------------------------------------------------------------- schedule and data order
def lr_factor(it: int, iters: int, warmup: int, warmup_ratio: float = 1e-6,
              power: float = 0.9, min_ratio: float = 0.0) -> float:
    """mmseg's poly schedule with linear warm-up, as a factor of the base learning rate at
    iteration ``it`` (0-based): ``(1 - min_ratio) * (1 - it / iters) ** power + min_ratio``,
    times ``1 - (1 - it / warmup) * (1 - warmup_ratio)`` during the first ``warmup``."""
    f = (1 - min_ratio) * (1 - it / iters) ** power + min_ratio
    if it < warmup:
        f *= 1 - (1 - it / warmup) * (1 - warmup_ratio)
    return f


class IterationBatches(torch.utils.data.Sampler):
    """Batches of ``(index, seed)`` for iterations ``start .. iters - 1``: global position
    ``p = it * batch * world + rank * batch + j`` takes item ``perm_e[p % n]`` of epoch
    ``e = p // n`` (a permutation seeded by (seed, e)) with augmentation seed (seed, p).
    A pure function of (seed, iteration), so resuming and the number of loader workers change
    nothing."""

    def __init__(self, n: int, batch: int, iters: int, *, seed: int = 0, start: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch, self.iters, self.seed = n, batch, iters, seed
        self.start, self.rank, self.world = start, rank, world

    def __len__(self) -> int:
        return self.iters - self.start

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached = (-1, None)
        for it in range(self.start, self.iters):
            out = []
            for j in range(self.batch):
                p = (it * self.world + self.rank) * self.batch + j
                e = p // self.n
                if cached[0] != e:
                    cached = (e, self._perm(e))
                out.append((int(cached[1][p % self.n]), int(
                    np.random.SeedSequence([self.seed, 1, p]).generate_state(1)[0])))
            yield out


# ---------------------------------------------------------------------- setup
def _init_distributed(timeout_s: float) -> tuple[int, int, torch.device]:
    """(rank, world size, device); a collective that waits ``timeout_s`` for another process
    fails instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s))
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), world, dev


def latest_intact_checkpoint(out: Path, *, trust_checkpoint: bool = False
                             ) -> tuple[Path | None, dict | None, list[str]]:
    """``--resume auto``: the newest ``iter_N.pth`` in ``out`` that reads whole, its checkpoint,
    and why each newer one was passed over (damaged). (None, None, []) when there is none;
    CheckpointError when every one is damaged."""
    found = sorted(((int(p.stem.split("_")[1]), p) for p in out.glob("iter_*.pth")
                    if p.stem.split("_")[1].isdigit()), reverse=True)
    damaged = []
    for _, path in found:
        try:
            return path, read_checkpoint(path, trust_checkpoint=trust_checkpoint), damaged
        except DamagedCheckpointError as e:
            damaged.append(str(e))
    if damaged:
        raise CheckpointError(f"--resume auto: no intact checkpoint in {out}: "
                              + "; ".join(damaged) + " (remove them to start afresh)")
    return None, None, []


def load_init(model, path: str, *, trust_checkpoint: bool = False) -> str:
    """Load ``path`` into model: a checkpoint of this trainer (weights only: e.g. the dense phase
    before the pruning fine-tune), a plain state dict of this model, an mmseg checkpoint or a
    timm state dict (recognized by its keys); returns what was loaded, as text. Read
    weights-only unless ``trust_checkpoint`` (:func:`load_file`)."""
    return _load_init_state(model, load_file(path, trust_checkpoint=trust_checkpoint), path)


def _load_init_state(model, sd: object, path: str) -> str:
    if isinstance(sd, dict) and {"model", "config"} <= sd.keys():
        load_weights(model, sd["model"], path)
        return f"weights of {path} (iteration {sd.get('iteration')}, {sd['config']})"
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict (or {{'state_dict': ...}}); got "
                              f"{type(sd).__name__}")
    keys = [k.removeprefix("module.") for k in sd]
    if any(k.startswith("heads.") for k in keys):  # a plain state dict of this model
        load_weights(model, dict(zip(keys, sd.values())), path)
        return f"weights of {path} (a state dict of this model)"
    mmseg = any(k.startswith(("backbone.", "decode_head.", "layers.")) for k in keys)
    report = load_mmseg_checkpoint(model, sd) if mmseg else load_timm_backbone(model, sd)
    return f"{'mmseg' if mmseg else 'timm'} weights from {path}: {report}"


class OptionError(ValueError):
    """Command-line options that do not fit the model or each other."""


def _backbone_source(sd: object) -> dict | None:
    """The config of a checkpoint of a model around its own backbone (arch ``"backbone"``),
    else None."""
    cfg = sd.get("config") if isinstance(sd, dict) else None
    if isinstance(cfg, dict) and cfg.get("arch") == BACKBONE_ARCH:
        return cfg
    return None


def _model_config(args: argparse.Namespace, num_classes: int, ckpt: dict | None,
                  resume: str | None, init: object) -> dict:
    """The configuration of the model to train: the built-in ``--arch`` (default base), or
    the model around its own backbone that the ``--resume`` / ``--init`` file describes."""
    source, name = (_backbone_source(ckpt), f"--resume {resume}") if ckpt is not None else \
        (_backbone_source(init), f"--init {args.init}")
    if source is None:
        overrides = {"threshold": 0.9 if args.threshold is None else args.threshold}
        if args.pos_grid:
            overrides["pos_grid"] = args.pos_grid
        return model_config(args.arch or "base", num_classes, **overrides)
    given = [f"--{o} {getattr(args, o.replace('-', '_'))}"
             for o in ("arch", "pos-grid", "timm-model") if getattr(args, o.replace("-", "_"))]
    if given:
        raise OptionError(f"{name} holds a model around its own backbone (from_timm / "
                          f"from_transformers), which sets the model: drop "
                          f"{' and '.join(given)}")
    if source.get("num_classes") != num_classes:
        raise CheckpointError(f"{name} has {source.get('num_classes')} classes, the data set "
                              f"{num_classes}: build the model with num_classes={num_classes} "
                              f"(or pass --num-classes {source.get('num_classes')})")
    overrides = dict(source.get("overrides") or {})
    if args.threshold is not None:
        overrides["threshold"] = args.threshold
    return {**model_config(BACKBONE_ARCH, num_classes, **overrides),
            "backbone": source.get("backbone")}


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop the records after ``iteration`` (and a line cut short by a crash) from a run's log,
    so that a resumed run logs each iteration once."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def param_groups(model, lr: float, head_mult: float, weight_decay: float) -> list[dict]:
    """Backbone at ``lr``, heads (``heads.*``) at ``lr * head_mult``."""
    heads = [p for n, p in model.named_parameters() if n.startswith("heads.")]
    backbone = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    return [{"params": backbone, "lr": lr, "base_lr": lr, "weight_decay": weight_decay},
            {"params": heads, "lr": lr * head_mult, "base_lr": lr * head_mult,
             "weight_decay": weight_decay}]


class _Progress:
    """A tqdm bar when installed (rank 0) and the log lines below it, else the lines alone."""

    def __init__(self, total: int, initial: int, enabled: bool, bar: bool = True) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled and bar:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="it", file=sys.stderr,
                                dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, postfix: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _amp(args, dev: torch.device):
    if dev.type != "cuda" or args.amp == "off":
        return nullcontext, None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


# ---------------------------------------------------------------------- training
def train(args: argparse.Namespace) -> dict:
    """Run the training described by ``args`` (see :func:`parse_args`); returns the last
    log record."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, dev = _init_distributed(args.dist_timeout)
    main_proc = rank == 0
    out = Path(args.out)
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
    meta = read_meta(args.data)
    num_classes = args.num_classes or meta.get("num_classes")
    split = args.split or default_split(args.data, train=True)
    tf = TrainTransform(crop=args.crop, scale=tuple(args.scale),
                        cat_max_ratio=args.cat_max_ratio, photometric=not args.no_photometric)
    ds = open_dataset(args.data, split, num_classes=num_classes, transform=tf)
    num_classes = ds.num_classes
    resume, ckpt, init = args.resume, None, None
    if resume == "auto":
        resume, ckpt, damaged = latest_intact_checkpoint(
            out, trust_checkpoint=args.trust_checkpoint)
        if damaged and main_proc:
            print(f"--resume auto: resuming from {resume}, the newest intact checkpoint "
                  f"(passed over: {'; '.join(damaged)})", flush=True)
    elif resume:
        ckpt = read_checkpoint(resume, trust_checkpoint=args.trust_checkpoint)
    if args.init:
        init = load_file(args.init, trust_checkpoint=args.trust_checkpoint)
    config = _model_config(args, num_classes, ckpt, resume, init)
    torch.manual_seed(args.seed)
    try:
        model = build_model(config["arch"], num_classes, backbone=config.get("backbone"),
                            **config["overrides"])
    except (ImportError, TypeError, ValueError) as e:
        if config["arch"] != BACKBONE_ARCH:
            raise
        source = resume if ckpt is not None else args.init
        raise CheckpointError(f"{source}: cannot build the model it describes: {e}") from e
    if args.crop % model.patch_size:
        raise OptionError(f"--crop {args.crop} is not a multiple of the model's patch size "
                          f"{model.patch_size}: pick a crop that is")
    start = 0
    if ckpt is not None:
        if ckpt["config"] != config:
            raise CheckpointError(f"--resume {resume}: its model {ckpt['config']} differs from "
                                  f"the one asked for {config}")
        lacking = sorted({"iteration", "optimizer", "rng"} - ckpt.keys())
        if lacking:
            raise CheckpointError(f"--resume {resume}: it has no {', '.join(lacking)} to "
                                  f"continue from; start from its weights with --init {resume}")
        load_weights(model, ckpt["model"], resume)
        start = int(ckpt["iteration"])
    elif args.init or args.timm_model:
        msgs = []
        if args.timm_model:
            import timm  # optional: only for --timm-model

            msgs.append(f"timm {args.timm_model}: " + str(load_timm_backbone(
                model, timm.create_model(args.timm_model, pretrained=True))))
        if args.init:
            msgs.append(_load_init_state(model, init, args.init))
        if main_proc:
            print("\n".join(msgs), flush=True)
    model.to(dev).train()
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.head_lr_mult, args.weight_decay),
                            lr=args.lr, weight_decay=args.weight_decay)
    autocast, scaler = _amp(args, dev)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"][rank % len(rng["torch"])])
        if dev.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][rank % len(rng["cuda"])], dev)
    else:
        torch.manual_seed(args.seed + 1000 * rank)  # dropout differs per rank

    sampler = IterationBatches(len(ds), args.batch_size, args.iters, seed=args.seed,
                               start=start, rank=rank, world=world)
    # its own generator: creating the iterator must not draw from the global one (dropout's)
    loader = torch.utils.data.DataLoader(
        CheckedItems(ds, skip=args.skip_bad_samples), batch_sampler=sampler,
        collate_fn=collate_checked, num_workers=args.workers, pin_memory=dev.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed))
    progress = _Progress(args.iters, start, main_proc, bar=not args.quiet)
    log_path = out / "log.jsonl"
    if main_proc and start:
        _truncate_log(log_path, start)
    record: dict = {}
    skipped = 0
    t_last, it_last = time.perf_counter(), start
    for it, (batch, errors) in enumerate(loader, start=start):
        if batch is None:
            raise DataError(errors[0] + ("; no item of the data set could be read"
                                         if args.skip_bad_samples else
                                         " (--skip-bad-samples trains on without it)"))
        for e in errors:
            skipped += 1
            progress.write(f"skipped {e} ({skipped} skipped so far)")
        img, target = batch
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(it, args.iters, args.warmup_iters)
        img, target = img.to(dev, non_blocking=True), target.to(dev, non_blocking=True)
        pruning = it >= args.dense_iters
        with autocast():
            output = ddp(img, mode="packed" if pruning else "dense", backend=args.backend)
            losses = dtop_loss(output, target)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            scaler.step(opt)
            scaler.update()
        else:
            losses["loss"].backward()
            opt.step()
        done = it + 1
        loss = float(losses["loss"].detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"iteration {done}: loss is {loss}; lower --lr or use "
                                     "--amp bf16 / off")
        tokens = output.active_counts.double().mean(1).tolist()
        progress.update(f"loss {loss:.3f} tokens {'/'.join(f'{t:.0f}' for t in tokens)}")
        if done % args.log_interval == 0 or done == args.iters:
            now = time.perf_counter()
            sec = (now - t_last) / max(done - it_last, 1)
            t_last, it_last = now, done
            record = {"iteration": done, "lr": opt.param_groups[0]["lr"], "loss": loss,
                      "pruning": pruning, "tokens_per_stage": tokens, "sec_per_iter": sec,
                      "skipped_samples": skipped,
                      **{k: float(v.detach()) for k, v in losses.items() if k != "loss"}}
            if main_proc:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            progress.write(f"iter {done}/{args.iters} lr {record['lr']:.2e} loss {loss:.4f} "
                           f"tokens/stage {'/'.join(f'{t:.0f}' for t in tokens)} "
                           f"{sec:.2f} s/it eta {sec * (args.iters - done) / 60:.1f} min")
        if done % args.ckpt_interval == 0 or done == args.iters:
            _save(out / f"iter_{done}.pth", model, config, done, opt, scaler, args, dev, world,
                  main_proc)
        if args.eval_interval and (done % args.eval_interval == 0 or done == args.iters) \
                and main_proc:
            record = _evaluate(model, args, num_classes, done, progress)
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
    progress.close()
    if main_proc:
        final = out / "final.pth"
        _save(final, model, config, args.iters, opt, scaler, args, dev, 1, True)
        progress.write(f"wrote {final}")
    if world > 1:
        dist.destroy_process_group()
    return record


def _save(path, model, config, done, opt, scaler, args, dev, world, main_proc) -> None:
    """Checkpoint with every rank's torch (and CUDA) generator state, written by rank 0."""
    states = [torch.get_rng_state()]
    cuda = [torch.cuda.get_rng_state(dev)] if dev.type == "cuda" else []
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (states[0], cuda[0] if cuda else None))
        states = [g[0] for g in gathered]
        cuda = [g[1] for g in gathered] if cuda else []
    if main_proc:
        save_checkpoint(path, model, config, done, optimizer=opt.state_dict(),
                        scaler=scaler.state_dict() if scaler is not None else None,
                        rng={"torch": states, "cuda": cuda}, args=vars(args))


def _evaluate(model, args, num_classes: int, done: int, progress: _Progress) -> dict:
    val = open_dataset(args.data, default_split(args.data, train=False),
                       num_classes=num_classes, transform=EvalTransform(scale=tuple(args.scale)))
    rng_state = torch.get_rng_state()
    threshold = model.threshold
    rep = evaluate(model, val, thresholds=[threshold], crop=args.crop,
                   stride=args.crop * 2 // 3, backend=args.backend,
                   max_images=args.eval_images)
    torch.set_rng_state(rng_state)  # evaluation must not change the training's random stream
    dense, dtop = rep["rows"]
    progress.write(f"eval @ {done}: mIoU dense {100 * dense['mIoU']:.2f}, DToP@"
                   f"{threshold:g} {100 * dtop['mIoU']:.2f} (FLOP saving "
                   f"{100 * dtop['flop_saving']:.1f}%) on {rep['images']} images")
    return {"iteration": done, "eval": {r["setting"]: {k: r[k] for k in
                                                       ("mIoU", "aAcc", "flop_saving")}
                                        for r in rep["rows"]}}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    first, _, rest = __doc__.partition("\n")
    ap = argparse.ArgumentParser(prog="python -m dtop_kernels.train", description=first,
                                 epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="data set root (ADE20K or folder layout)")
    ap.add_argument("--out", required=True, help="run folder: checkpoints and log.jsonl")
    ap.add_argument("--split", default=None, help="training split (default training / train)")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="default: dataset.json's, else 150 (ADE20K layout)")
    ap.add_argument("--arch", choices=sorted(ARCHS), default=None,
                    help="model size: base / large are the paper's ViT-B/16 and ViT-L/16 "
                         "(default base; a --init file of a from_timm / from_transformers "
                         "model sets the model instead)")
    ap.add_argument("--pos-grid", type=int, default=None,
                    help="position-embedding grid (default: the arch's)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="DToP exit threshold p0 while pruning, saved with the model (default "
                         "0.9; for a --init model around its own backbone, the file's)")
    ap.add_argument("--iters", type=int, default=40000, help="training iterations")
    ap.add_argument("--dense-iters", type=int, default=0,
                    help="first iterations without pruning (the dense SegViT phase)")
    ap.add_argument("--batch-size", type=int, default=2, help="images per process and step")
    ap.add_argument("--lr", type=float, default=2e-5, help="backbone learning rate")
    ap.add_argument("--head-lr-mult", type=float, default=10.0, help="heads' learning rate factor")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    ap.add_argument("--warmup-iters", type=int, default=1500,
                    help="linear warm-up iterations from 1e-6 x the learning rate")
    ap.add_argument("--crop", type=int, default=512, help="training crop (pixels)")
    ap.add_argument("--scale", type=int, nargs=2, default=(2048, 512), metavar=("LONG", "SHORT"),
                    help="resize scale before the random ratio 0.5-2 (also the test scale)")
    ap.add_argument("--cat-max-ratio", type=float, default=0.75,
                    help="crops are redrawn (up to 10 times) while one class covers more")
    ap.add_argument("--no-photometric", action="store_true", help="no photometric distortion")
    ap.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16",
                    help="mixed precision on CUDA (ignored on CPU)")
    ap.add_argument("--backend", default="auto", help="kernel backend of the packed ops")
    ap.add_argument("--workers", type=int, default=2, help="data loader processes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of the training process (default: torch's)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the weights, the data order and the augmentations")
    ap.add_argument("--init", default=None,
                    help="weights to start from: an mmseg checkpoint, a timm state dict, a "
                         "checkpoint of this trainer, or one of a from_timm / "
                         "from_transformers model (which also sets the model)")
    ap.add_argument("--timm-model", default=None,
                    help="timm model name whose pretrained weights start the backbone")
    ap.add_argument("--resume", default=None,
                    help="checkpoint to continue, or 'auto': the newest intact RUN/iter_N.pth")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="load --resume / --init files that hold pickled Python objects (runs "
                         "code from the file: only for files from a trusted source)")
    ap.add_argument("--skip-bad-samples", action="store_true",
                    help="train on past unreadable or invalid images and labels (each is "
                         "replaced by the next readable item, reported and counted) instead "
                         "of stopping")
    ap.add_argument("--dist-timeout", type=float, default=600.0,
                    help="seconds a process waits for the others in a collective before the "
                         "run stops with an error (torchrun)")
    ap.add_argument("--log-interval", type=int, default=50,
                    help="iterations between log lines and log.jsonl records")
    ap.add_argument("--ckpt-interval", type=int, default=4000,
                    help="iterations between checkpoints RUN/iter_N.pth")
    ap.add_argument("--eval-interval", type=int, default=0,
                    help="evaluate dense and DToP mIoU every N iterations (0: never)")
    ap.add_argument("--eval-images", type=int, default=None, help="validation images per eval")
    ap.add_argument("--quiet", action="store_true", help="no progress bar (log lines only)")
    args = ap.parse_args(argv)
    if args.crop < 1:
        ap.error(f"--crop must be positive; got {args.crop}")
    for name in ("iters", "batch_size", "log_interval", "ckpt_interval"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.resume and (args.init or args.timm_model):
        ap.error("--resume continues a run: it cannot be combined with --init / --timm-model")
    try:
        require_pillow("python -m dtop_kernels.train")
    except ImportError as e:
        ap.exit(2, f"error: {e}\n")
    return args


def _lost_peer(e: RuntimeError) -> bool:
    """Whether ``e`` is a collective failing because another process stopped or timed out."""
    return dist.is_available() and dist.is_initialized() and (
        isinstance(e, dist.DistError) or any(w in str(e).lower() for w in ("gloo", "nccl")))


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: errors in the data, checkpoints or between processes end it with a
    one-line message and exit status 1."""
    args = parse_args(argv)
    try:
        train(args)
    except (DataError, CheckpointError, OptionError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:
        if not _lost_peer(e):
            raise
        first = str(e).strip().splitlines()[0][:300]
        sys.exit(f"error: process {dist.get_rank()} of {dist.get_world_size()} lost the others "
                 f"(one stopped, or did not answer within --dist-timeout {args.dist_timeout:g} "
                 f"s): {first}. The log of the process that stopped says why; continue with "
                 "--resume auto")


if __name__ == "__main__":
    main()
