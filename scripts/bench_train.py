"""Training-throughput benchmark of ``fit()`` against two baselines, per model.

- ``fit``: the harness's loop (uint8 tensors on the device, batched crop/flip on the device).
- ``reference``: the peers' style: a torchvision ``Dataset`` of PIL images with per-image
  transforms (RandomCrop with padding, RandomHorizontalFlip where allowed, ToTensor) and a
  ``DataLoader``; measured with 0 and 2 worker processes, the faster one is reported.
- ``bare``: forward/backward/step on preloaded float tensors, no augmentation: the ceiling.

All three train the same model on the same images with the same batch size and optimizer.

    python scripts/bench_train.py                      # mnist5k, small_cnn + preact_resnet18
    python scripts/bench_train.py --dataset cifar10 --device cuda --epoch-time

Writes ``results/bench/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from benchmark.io import atomic_write_json
from benchmark.train import Augment, fit, resolve_device
from benchmark.types import ImageSet

ROOT = Path(__file__).resolve().parents[1]


class PILDataset(torch.utils.data.Dataset):
    """Images as PIL objects, transformed one at a time (how the peers feed training)."""

    def __init__(self, data: ImageSet, transform: Callable) -> None:
        mode = "L" if data.x.shape[1] == 1 else "RGB"
        arrays = data.x.permute(0, 2, 3, 1).numpy()
        self.images = [Image.fromarray(a.squeeze(-1) if mode == "L" else a, mode) for a in arrays]
        self.labels = data.y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    return instantiate(cfg.train.optimizer)([p for p in model.parameters() if p.requires_grad])


def bench_fit(
    make: Callable[[], nn.Module],
    data: ImageSet,
    cfg: DictConfig,
    aug: Augment,
    device: torch.device,
    epochs: int,
) -> float:
    fit(
        make(),
        data.subset(torch.arange(min(len(data), 4 * cfg.train.batch_size))),
        cfg.train,
        device=device,
        augment=aug,
        epochs=1,
        progress=False,
    )  # warm-up
    model = make()
    _sync(device)
    t0 = time.perf_counter()
    fit(model, data, cfg.train, device=device, augment=aug, epochs=epochs, progress=False)
    _sync(device)
    return epochs * len(data) / (time.perf_counter() - t0)


def bench_reference(
    make: Callable[[], nn.Module],
    data: ImageSet,
    cfg: DictConfig,
    aug: Augment,
    device: torch.device,
    epochs: int,
    workers: int,
) -> float:
    steps = [transforms.RandomCrop(data.x.shape[-1], padding=aug.crop_padding)]
    if aug.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())
    loader = DataLoader(
        PILDataset(data, transforms.Compose(steps)),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    model = make().to(device)
    opt = _optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()

    def epoch(limit: int | None = None) -> None:
        model.train()
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch(limit=4)  # warm-up (and worker start-up)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    _sync(device)
    return epochs * len(data) / (time.perf_counter() - t0)


def bench_bare(
    make: Callable[[], nn.Module],
    data: ImageSet,
    cfg: DictConfig,
    device: torch.device,
    epochs: int,
) -> float:
    model = make().to(device)
    opt = _optimizer(model, cfg)
    x, y = data.x.to(device).float().div_(255), data.y.to(device)
    loss_fn = nn.CrossEntropyLoss()
    bs = cfg.train.batch_size

    def epoch(limit: int | None = None) -> None:
        model.train()
        for k, i in enumerate(range(0, len(x), bs)):
            if limit is not None and k >= limit:
                break
            loss = loss_fn(model(x[i : i + bs]), y[i : i + bs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch(limit=4)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    _sync(device)
    return epochs * len(x) / (time.perf_counter() - t0)


def compose_cfg(dataset: str, model: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"dataset={dataset}", f"model={model}", "logger=none", *overrides],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = "."
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    return cfg


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
    for model_name, n_images in zip(args.models, args.images, strict=False):
        cfg = compose_cfg(args.dataset, model_name, args.overrides)
        dataset = instantiate(cfg.dataset)
        train, _ = dataset.load()
        subset = train.subset(torch.arange(min(n_images, len(train))))
        c, h, w = dataset.image_shape

        def make(cfg: DictConfig = cfg, dataset=dataset, c=c, h=h, w=w) -> nn.Module:
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
        fit_ips = bench_fit(make, subset, cfg, aug, device, args.epochs)
        refs = {
            wk: bench_reference(make, subset, cfg, aug, device, args.epochs, wk)
            for wk in args.workers
        }
        best = max(refs, key=refs.get)
        bare_ips = bench_bare(make, subset, cfg, device, args.epochs)
        row = {
            "fit_images_per_s": round(fit_ips, 1),
            "reference_images_per_s": round(refs[best], 1),
            "bare_images_per_s": round(bare_ips, 1),
            "reference_workers": best,
            "reference_by_workers": {str(k): round(v, 1) for k, v in refs.items()},
            "fit_vs_reference": round(fit_ips / refs[best], 2),
            "fit_vs_bare": round(fit_ips / bare_ips, 3),
            "n_images": len(subset),
            "batch_size": int(cfg.train.batch_size),
            "epochs": args.epochs,
        }
        if args.epoch_time:
            t0 = time.perf_counter()
            fit(make(), train, cfg.train, device=device, augment=aug, epochs=1, progress=False)
            _sync(device)
            row["full_epoch_s"] = round(time.perf_counter() - t0, 2)
            row["full_epoch_images"] = len(train)
        results[model_name] = row
        print(model_name, json.dumps(row))
    results["meta"] = {
        "dataset": args.dataset,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
