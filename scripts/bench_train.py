"""Training-throughput benchmark of ``fit()`` against two baselines, per model.

- ``fit``: the harness's loop (uint8 tensors on the device, batched crop/flip on the device).
- ``reference``: the peers' style: a torchvision-like ``Dataset`` that makes a PIL image per
  access and applies per-image transforms (RandomCrop with padding, RandomHorizontalFlip where
  allowed, ToTensor, Normalize), batched by a ``DataLoader``; measured with 0 and 2 worker
  processes, the faster one is reported.
- ``bare``: forward/backward/step on preloaded float tensors with the same memory layout and
  precision as ``fit`` uses (channels_last, bf16 autocast where native), no augmentation: the
  ceiling for the loop. The reference runs as the peers do: fp32, NCHW.

All three train the same model on the same images with the same batch size and optimizer.
Each is measured ``--rounds`` times, interleaved, and the median is reported (these shared
machines are noisy).

    python scripts/bench_train.py                      # mnist5k, small_cnn + preact_resnet18
    python scripts/bench_train.py --dataset cifar10 --device cuda --epoch-time

Writes ``results/bench/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from benchmark.callbacks import register_resolvers
from benchmark.io import atomic_write_json
from benchmark.results import device_name
from benchmark.train import Augment, autocast, fit, resolve_device, use_amp, use_channels_last
from benchmark.types import ImageSet

ROOT = Path(__file__).resolve().parents[1]
Make = Callable[[], nn.Module]


class PeerStyleDataset(torch.utils.data.Dataset):
    """As torchvision's MNIST/CIFAR10 do: uint8 arrays in memory, a PIL image made per access,
    then the per-image transforms."""

    def __init__(self, data: ImageSet, transform: Callable) -> None:
        self.gray = data.x.shape[1] == 1
        self.arrays = data.x.permute(0, 2, 3, 1).numpy()
        self.labels = data.y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        a = self.arrays[i]
        img = Image.fromarray(a[..., 0], "L") if self.gray else Image.fromarray(a, "RGB")
        return self.transform(img), self.labels[i]


def peer_loader(
    data: ImageSet, batch_size: int, aug: Augment, device: torch.device, workers: int
) -> DataLoader:
    """DataLoader + per-image PIL transforms (crop, flip where allowed, ToTensor, Normalize)."""
    steps: list = [transforms.RandomCrop(data.x.shape[-1], padding=aug.crop_padding)]
    if aug.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    c = data.x.shape[1]
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * c, [0.5] * c)]
    return DataLoader(
        PeerStyleDataset(data, transforms.Compose(steps)),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(epochs: int, n: int, device: torch.device, run_epoch: Callable[[], None]) -> float:
    """Images per second of ``epochs`` calls of ``run_epoch``."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        run_epoch()
    _sync(device)
    return epochs * n / (time.perf_counter() - t0)


def _train_batches(
    model: nn.Module, cfg: DictConfig, batches, amp: bool = False
) -> Callable[[int | None], None]:
    """An epoch function stepping ``model`` over ``batches()`` with the recipe's optimizer."""
    opt = instantiate(cfg.train.optimizer)([p for p in model.parameters() if p.requires_grad])
    loss_fn = nn.CrossEntropyLoss()

    def epoch(limit: int | None = None) -> None:
        model.train()
        for k, (x, y) in enumerate(batches()):
            if limit is not None and k >= limit:
                break
            with autocast(x.device, amp):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def bench_fit(
    make: Make, data: ImageSet, cfg: DictConfig, aug: Augment, device: torch.device, epochs: int
) -> float:
    warm = data.subset(torch.arange(min(len(data), 4 * cfg.train.batch_size)))
    fit(make(), warm, cfg.train, device=device, augment=aug, epochs=1, progress=False)
    model = make()
    return _timed(
        1,
        epochs * len(data),
        device,
        lambda: fit(
            model, data, cfg.train, device=device, augment=aug, epochs=epochs, progress=False
        ),
    )


def bench_reference(
    make: Make,
    data: ImageSet,
    cfg: DictConfig,
    aug: Augment,
    device: torch.device,
    epochs: int,
    workers: int,
) -> float:
    loader = peer_loader(data, cfg.train.batch_size, aug, device, workers)
    model = make().to(device)

    def batches():
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    epoch = _train_batches(model, cfg, batches)
    epoch(4)  # warm-up (and worker start-up)
    return _timed(epochs, len(data), device, epoch)


def bench_bare(
    make: Make,
    data: ImageSet,
    cfg: DictConfig,
    device: torch.device,
    epochs: int,
    channels_last: bool,
    amp: bool,
) -> float:
    model = make().to(device)
    x, y = data.x.to(device).float().div_(255), data.y.to(device)
    if channels_last:  # the same layout and precision as fit(), so only the loop differs
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    bs = cfg.train.batch_size
    epoch = _train_batches(
        model, cfg, lambda: ((x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)), amp
    )
    epoch(4)
    return _timed(epochs, len(x), device, epoch)


def bench_loader_only(
    data: ImageSet, cfg: DictConfig, aug: Augment, device: torch.device, epochs: int, workers: int
) -> float:
    """The reference's data pipeline alone, without training (its ceiling)."""
    loader = peer_loader(data, cfg.train.batch_size, aug, device, workers)
    return _timed(epochs, len(data), device, lambda: [None for _ in loader])


def compose_cfg(dataset: str, model: str, overrides: list[str]) -> DictConfig:
    register_resolvers()  # the configs' ${bench_*:...} resolvers (train=fast: bench_batch_lr)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"dataset={dataset}", f"model={model}", "logger=none", *overrides],
        )
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = "."
    return cfg


def bench_model(name: str, n_images: int, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = compose_cfg(args.dataset, name, args.overrides)
    dataset = instantiate(cfg.dataset)
    train, _ = dataset.load()
    subset = train.subset(torch.arange(min(n_images, len(train))))
    c, h, w = dataset.image_shape

    def make() -> nn.Module:
        torch.manual_seed(0)
        return instantiate(
            cfg.model,
            num_classes=dataset.num_classes,
            in_chans=c,
            image_size=(h, w),
            mean=list(dataset.mean),
            std=list(dataset.std),
        )

    aug = Augment(dataset.crop_padding, dataset.hflip)
    cl = use_channels_last(cfg.train, device)
    amp = use_amp(cfg.train, device)
    runs: dict[str, list[float]] = {"fit": [], "bare": [], "loader": []}
    runs.update({f"ref{w}": [] for w in args.workers})
    for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits all loops
        runs["fit"].append(bench_fit(make, subset, cfg, aug, device, args.epochs))
        for wk in args.workers:
            runs[f"ref{wk}"].append(
                bench_reference(make, subset, cfg, aug, device, args.epochs, wk)
            )
        runs["bare"].append(bench_bare(make, subset, cfg, device, args.epochs, cl, amp))
        runs["loader"].append(
            bench_loader_only(subset, cfg, aug, device, args.epochs, args.workers[0])
        )
    med = {k: statistics.median(v) for k, v in runs.items()}
    refs = {wk: med[f"ref{wk}"] for wk in args.workers}
    best = max(refs, key=refs.get)
    row = {
        "fit_images_per_s": round(med["fit"], 1),
        "reference_images_per_s": round(refs[best], 1),
        "bare_images_per_s": round(med["bare"], 1),
        "fit_vs_reference": round(med["fit"] / refs[best], 2),
        "fit_vs_bare": round(med["fit"] / med["bare"], 3),
        "reference_workers": best,
        "reference_by_workers": {str(k): round(v, 1) for k, v in refs.items()},
        "reference_loader_only_images_per_s": round(med["loader"], 1),
        "fit_channels_last": cl,
        "fit_bf16_autocast": amp,
        "reference_setup": "fp32, NCHW, per-image PIL transforms",
        "n_images": len(subset),
        "batch_size": int(cfg.train.batch_size),
        "epochs": args.epochs,
        "rounds": args.rounds,
        "all_runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
    }
    if args.epoch_time:
        row["full_epoch_images"] = len(train)
        row["full_epoch_s"] = round(len(train) / bench_fit(make, train, cfg, aug, device, 1), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--models", nargs="+", default=["small_cnn", "preact_resnet18"])
    parser.add_argument(
        "--images",
        nargs="+",
        type=int,
        default=[4000, 512],
        help="training images per model (same order as --models)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repeats; medians")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument(
        "--epoch-time",
        action="store_true",
        help="also time one full epoch of fit() on the whole training split",
    )
    parser.add_argument("--out", default=str(ROOT / "results/bench/train_throughput.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=256")
    args = parser.parse_args()
    device = resolve_device(args.device)
    results: dict = {}
    for name, n_images in zip(args.models, args.images, strict=False):
        results[name] = bench_model(name, n_images, args, device)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "all_runs"}))
    results["meta"] = {
        "dataset": args.dataset,
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
