"""The fast track's accuracy/time frontier on a real dataset: clean accuracy against wall time.

Per point ``<w1>,<w2>,<w3>:<epochs>`` (fastnet's block widths and train=fast's epochs), one
clean ``fit()`` (no attack) on the training split, then the clean accuracy on the test split:
the wall time of the whitening + training, of the evaluation, and the accuracy. The issue's
CPU target is >= 90% on the full CIFAR-10 folder in <= 30 minutes on 2 cores; airbench94's
own width is ``64,256,256:10``.

    python scripts/bench_frontier.py --root /tmp/cifar10 --points 32,128,128:10 16,64,64:10
    python scripts/bench_frontier.py --root /tmp/cifar10 --max-train 10000 --points 32,128,128:10

Each point is added to ``results/bench/fast_frontier.json`` (``--out``), keyed by device,
widths, epochs and the number of training images, so runs on other days or machines add rows
instead of replacing the file. Timing is honest only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict

from benchmark.callbacks import register_resolvers
from benchmark.io import atomic_write_json
from benchmark.predict import predict
from benchmark.recipe import use_amp
from benchmark.results import device_name
from benchmark.seeding import seed_everything
from benchmark.train import Augment, fit, resolve_device

ROOT = Path(__file__).resolve().parents[1]


def parse_point(text: str) -> tuple[list[int], int]:
    """``"32,128,128:10"`` -> ``([32, 128, 128], 10)``."""
    widths, _, epochs = text.partition(":")
    try:
        parsed = [int(w) for w in widths.split(",")]
        if len(parsed) != 3 or not epochs or int(epochs) < 1 or min(parsed) < 1:
            raise ValueError
    except ValueError:
        msg = f"--points: {text!r} is not <w1>,<w2>,<w3>:<epochs>, e.g. 32,128,128:10"
        raise SystemExit(msg) from None
    return parsed, int(epochs)


def run_point(args: argparse.Namespace, widths: list[int], epochs: int) -> dict:
    register_resolvers()
    overrides = [
        "dataset=imagefolder", f"dataset.root={args.root}", "model=fastnet", "train=fast",
        f"model.widths=[{','.join(map(str, widths))}]", f"train.epochs={epochs}", "logger=none",
        *([f"dataset.max_train={args.max_train}"] if args.max_train else []),
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = "."
    dataset = instantiate(cfg.dataset)
    train, test = dataset.load()
    device = resolve_device(args.device)
    seed_everything(args.seed)
    c, h, w = train.x.shape[1:]
    model = instantiate(
        cfg.model, num_classes=train.num_classes, in_chans=c, image_size=(h, w),
        mean=list(dataset.mean), std=list(dataset.std),
    )  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fit(model, train, cfg.train, device=device, seed=args.seed, progress=True,
        augment=Augment(dataset.crop_padding, dataset.hflip))  # fmt: skip
    sync()
    t1 = time.perf_counter()
    acc = float((predict(model, test.x, device=device) == test.y).float().mean())
    t2 = time.perf_counter()
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amp_bf16": use_amp(cfg.train, device),  # train.amp: auto = bf16 wherever it is native
        "threads": torch.get_num_threads(),
        "widths": widths,
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": epochs,
        "train_images": len(train),
        "test_images": len(test),
        "train_s": round(t1 - t0, 1),
        "eval_s": round(t2 - t1, 1),
        "total_s": round(t2 - t0, 1),
        "clean_acc": round(acc, 4),
        "seed": args.seed,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="image folder with train/ and test/")
    parser.add_argument("--points", nargs="+", default=["32,128,128:10"])
    parser.add_argument("--max-train", type=int, default=None, help="default: every image")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "results/bench/fast_frontier.json"))
    args = parser.parse_args()
    points = [parse_point(p) for p in args.points]  # every point checked before any training
    out = Path(args.out)
    rows = json.loads(out.read_text())["points"] if out.exists() else []
    for widths, epochs in points:
        row = run_point(args, widths, epochs)
        print(json.dumps(row), flush=True)
        key = ("device_name", "threads", "widths", "epochs", "train_images", "seed")
        rows = [r for r in rows if any(r.get(k) != row[k] for k in key)] + [row]
        atomic_write_json(out, {"points": rows, "note": __doc__.split("\n")[0]})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
