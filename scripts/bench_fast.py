"""Speed of the fast track: ``model=fastnet`` + ``train=fast`` through the harness's ``fit()``.

Per device, one ``fit()`` of ``--epochs`` epochs on ``--images`` images: the time of the
whitening initialisation, of the first epoch (cuDNN/oneDNN set-up, and compilation with
``train.compile=true``) and of each later epoch, and images per second over the later epochs
(the steady state; CUDA is synchronised at each epoch end). The data are synthetic CIFAR-10-shaped
images (3x32x32 uint8, 10 classes: speed does not depend on the pixels) or a real dataset
(``--dataset mnist5k``, ``cifar10``). Nothing is learned or evaluated here: accuracy is the
validation study's business.

    python scripts/bench_fast.py                                  # CPU (+ CUDA when present)
    python scripts/bench_fast.py --devices cuda --images 50000 --epochs 10
    python scripts/bench_fast.py --devices cuda train.compile=true

Writes ``results/bench/fast_track.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from benchmark.callbacks import register_resolvers
from benchmark.io import atomic_write_json
from benchmark.recipe import use_amp, use_channels_last, use_compile
from benchmark.results import device_name
from benchmark.train import Augment, fit, resolve_device
from benchmark.types import ImageSet

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(dataset: str, overrides: list[str]) -> DictConfig:
    register_resolvers()  # the configs' ${bench_*:...} resolvers (train=fast: bench_batch_lr)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                f"dataset={'mnist5k' if dataset == 'synthetic' else dataset}",
                "model=fastnet",
                "train=fast",
                "logger=none",
                *overrides,
            ],
        )
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = "."
    return cfg


def load(cfg: DictConfig, name: str, n: int) -> tuple[ImageSet, dict]:
    """``n`` training images and what the model needs to know about them."""
    if name == "synthetic":
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        data = ImageSet(x, torch.arange(n) % 10, tuple(str(i) for i in range(10)))
        cifar = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        return data, {"mean": cifar[0], "std": cifar[1], "aug": Augment(4, True)}
    dataset = instantiate(cfg.dataset)
    train, _ = dataset.load()
    aug = Augment(dataset.crop_padding, dataset.hflip)
    data = train.subset(torch.arange(min(n, len(train))))
    return data, {"mean": dataset.mean, "std": dataset.std, "aug": aug}


def bench(cfg: DictConfig, data: ImageSet, info: dict, device: torch.device, epochs: int) -> dict:
    c, h, w = data.x.shape[1:]
    torch.manual_seed(0)
    model = instantiate(
        cfg.model,
        num_classes=data.num_classes,
        in_chans=c,
        image_size=(h, w),
        mean=list(info["mean"]),
        std=list(info["std"]),
    )
    marks: list[float] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_epoch_end(epoch: int, stats: dict) -> bool:
        sync()
        marks.append(time.perf_counter())
        return False

    # The whitening alone, on a copy (fit does it again on the model it trains).
    probe = instantiate(
        cfg.model,
        num_classes=data.num_classes,
        in_chans=c,
        image_size=(h, w),
        mean=list(info["mean"]),
        std=list(info["std"]),
    ).to(device)
    on_device = data.to(device)
    sync()
    t = time.perf_counter()
    probe.init_from_data(on_device.x, torch.Generator().manual_seed(0))
    sync()
    whiten_s = time.perf_counter() - t
    del probe, on_device

    sync()
    t0 = time.perf_counter()
    fit(
        model,
        data,
        cfg.train,
        device=device,
        augment=info["aug"],
        epochs=epochs,
        progress=False,
        on_epoch_end=on_epoch_end,
    )
    edges = [t0, *marks]
    per_epoch = [b - a for a, b in itertools.pairwise(edges)]
    steady = per_epoch[1:] or per_epoch
    return {
        "images": len(data),
        "image_shape": [c, h, w],
        "epochs": epochs,
        "batch_size": int(cfg.train.batch_size),
        "whiten_init_s": round(whiten_s, 3),
        "first_epoch_s": round(per_epoch[0], 2),
        "epoch_s": [round(s, 2) for s in per_epoch],
        "steady_epoch_s": round(statistics.median(steady), 2),
        "steady_images_per_s": round(len(data) / statistics.median(steady), 1),
        "bf16_autocast": use_amp(cfg.train, device),
        "channels_last": use_channels_last(cfg.train, device),
        "compile": use_compile(cfg.train, device),
        "device_name": device_name(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="synthetic", help="synthetic, mnist5k, cifar10, ...")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3, help="the first one is warm-up")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, + cuda")
    parser.add_argument("--out", default=str(ROOT / "results/bench/fast_track.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=512")
    args = parser.parse_args()
    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    cfg = compose_cfg(args.dataset, args.overrides)
    data, info = load(cfg, args.dataset, args.images)
    results: dict = {}
    for name in devices:
        device = resolve_device(name)
        results[str(device)] = bench(cfg, data, info, device, args.epochs)
        print(device, json.dumps(results[str(device)]))
    results["meta"] = {
        "dataset": args.dataset,
        "overrides": args.overrides,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "note": "fit(), model=fastnet train=fast; steady = median of the epochs after the first",
    }
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
