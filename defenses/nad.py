"""``defense=nad``: Neural Attention Distillation.

Li, Lyu, Koren, Lyu, Li, Ma. "Neural Attention Distillation: Erasing Backdoor Triggers from Deep
Neural Networks." ICLR 2021, arXiv:2101.05930. Official code: bboylyg/NAD @ f17b713 (``main.py``,
``at.py``, ``config.py``, ``utils/util.py``); BackdoorBench f02e353 ``defense/nad.py``.
Post-training: the model and the clean reserve only.

1. **Teacher**: the backdoored model fine-tuned on the reserve, exactly ``defense=ft`` with
   BackdoorBench's teacher recipe (``te_epochs`` 10, SGD 0.01 / 0.9 / 5e-4, cosine T_max 100,
   batch 256, augmentation; ``nad.py:810-833``; the official README says 5-10 epochs and ships
   no teacher code). Then frozen, in eval mode.
2. **Student**: the backdoored model again, trained in train mode on the reserve (with the
   dataset's augmentation) on ``CE(s(x), y) + sum_k beta_k AT(a_k^s, a_k^t)``, where
   ``AT = mse(A(f_s), A(f_t))`` and ``A(f) = sum_c |f_c|^p / (||sum_c |f_c|^p||_2,HW + 1e-6)``
   (``at.py:22-33``). The teacher sees the same augmented batch. The last epoch is kept.

Student defaults are the official code's (``config.py:15-25``, ``main.py:143-147``,
``util.py:68-79``): 20 epochs, batch 64, SGD nesterov momentum 0.9, wd 1e-4, lr 0.1 dropped to
0.01 after 2 epochs (``MultiStepLR([2], 0.1)``); p = 2. BackdoorBench instead trains 10 epochs
at a constant 0.01 with batch 256, wd 5e-4, no nesterov (``nad.py:77-88,775,845``): set
``epochs=10 batch_size=256 lr=0.01 lr_milestones=[] weight_decay=5e-4 nesterov=false``.

**Attention layers.** The official WRN-16 hooks its three group outputs with beta 500 / 1000 /
1000. BackdoorBench's PreAct-ResNet18 hooks ``layer3`` (500), ``layer4`` (1000) and the 1x1
``avgpool`` output (1000); on a 1x1 map ``A(f)`` is ``am / (am + 1e-6)`` ~ 1 for any net, so that
term is inert. Here ``betas`` apply to the last ``len(betas)`` *stage outputs* of the model,
found from its structure by one traced forward (``stage_sites``): at each spatial resolution,
the tensor that the first (outermost) resolution-changing module reads, named by its outermost
producer, plus the last spatial (H*W > 1) map before pooling. On PreAct-ResNet18 these are
``layer1..layer4``, so the default ``[500, 1000]`` is BackdoorBench's layer3 / layer4 with the
inert term dropped. Deviations: the official checkpoint choice uses test accuracy and ASR
(``main.py:182-195``): the last epoch is kept; the official training loader adds Cutout(1, 3)
to crop + flip (``data_loader.py``), here the dataset's augmentation only (as BackdoorBench);
the harness's bf16 autocast where native (BackdoorBench's NAD loop has no AMP).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from benchmark.checks import Checks
from benchmark.models.trace import completion_order, trace
from benchmark.seeding import derive_seed
from defenses.base import DefenseContext, DefenseResult
from defenses.ft import FT
from defenses.linf_scores import accuracy

log = logging.getLogger(__name__)
checks = Checks("defense")


def attention(f: Tensor, p: float = 2.0, eps: float = 1e-6) -> Tensor:
    """``A(f)``: ``sum_c |f_c|^p`` over channels, divided by its L2 norm over (H, W) + eps;
    ``(N, C, H, W) -> (N, 1, H, W)``."""
    am = f.abs().pow(p).sum(1, keepdim=True)
    return am / (torch.linalg.vector_norm(am, dim=(2, 3), keepdim=True) + eps)


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """The attention-transfer loss: mean squared difference of the two attention maps."""
    return F.mse_loss(attention(f_s, p), attention(f_t, p))


@dataclass(frozen=True)
class StageSite:
    """A stage output: the module producing it (hooked on its output) and its (C, H, W)."""

    name: str
    shape: tuple[int, int, int]


def stage_sites(model: nn.Module) -> list[StageSite]:
    """The model's stage outputs in forward order (see the module docstring)."""
    calls = trace(model, [m for m in model.modules() if m is not model])
    producer: dict[int, Any] = {}
    for c in completion_order(calls):  # the outermost producer of a tensor ends last
        if c.output is not None:
            producer[id(c.output)] = c
    chosen: dict[tuple[int, int], Any] = {}
    for c in calls:  # start order: a container before what it calls
        x, out = c.input, c.output
        if x is None or x.dim() != 4 or x.shape[-2:].numel() <= 1 or id(x) not in producer:
            continue
        if out is not None and out.dim() == 4 and out.shape[-2:] == x.shape[-2:]:
            continue  # keeps the resolution: inside a stage
        chosen.setdefault(tuple(x.shape[-2:]), producer[id(x)])
    spatial = [c for c in completion_order(calls) if c.output is not None and c.output.dim() == 4]
    spatial = [c for c in spatial if c.output.shape[-2:].numel() > 1]
    if spatial:
        last = producer[id(spatial[-1].output)]
        chosen.setdefault(tuple(last.output.shape[-2:]), last)
    sites = sorted(chosen.values(), key=lambda c: c.end)
    return [StageSite(c.name, tuple(c.output.shape[1:])) for c in sites]


class Features:
    """Forward hooks keeping the outputs of the named modules of ``model`` (last call)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.out: dict[str, Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.out[name] = output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Distiller:
    """``CE + sum beta_k AT(student_k, teacher_k)`` as ``fit``'s ``loss_fn``: the student's
    input batch is caught by a pre-hook, the teacher runs on it under no_grad."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, names: list[str], betas: list[float], p: float
    ) -> None:
        self.teacher, self.names, self.betas, self.p = teacher, names, betas, p
        self.fs, self.ft = Features(student, names), Features(teacher, names)
        self.x: Tensor | None = None
        self.handle = student.register_forward_pre_hook(self._catch)
        self.last: list[float] = [0.0] * len(names)

    def _catch(self, module: nn.Module, args: tuple) -> None:
        self.x = args[0]

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            self.teacher(self.x)
        loss = F.cross_entropy(logits, y)
        for k, (name, beta) in enumerate(zip(self.names, self.betas, strict=True)):
            term = beta * at_loss(self.fs.out[name].float(), self.ft.out[name].float(), self.p)
            self.last[k] = float(term.detach())
            loss = loss + term
        return loss

    def remove(self) -> None:
        self.fs.remove()
        self.ft.remove()
        self.handle.remove()


class NAD(FT):
    """Neural Attention Distillation (see the module docstring). ``epochs`` .. ``weight_decay``
    are the student's; ``teacher_*`` the fine-tuned teacher's (``FT``'s recipe).

    Args:
        epochs: student epochs. batch_size: student batch. lr: the student's initial lr.
        lr_milestones, lr_gamma: the lr is multiplied by ``lr_gamma`` at these epochs.
        momentum, weight_decay, nesterov: the student's SGD.
        betas: the AT weights of the last ``len(betas)`` stage outputs, in forward order.
        p: the attention map's power.
        teacher_epochs, teacher_batch_size, teacher_lr, teacher_momentum,
        teacher_weight_decay, teacher_cosine_t_max: the teacher's fine-tuning (``FT``).
        augment: train both with the dataset's augmentation.
    """

    name: ClassVar[str] = "nad"

    def __init__(
        self,
        epochs: int = 20,
        batch_size: int = 64,
        lr: float = 0.1,
        lr_milestones: list[int] | tuple[int, ...] = (2,),
        lr_gamma: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = True,
        betas: list[float] | tuple[float, ...] = (500.0, 1000.0),
        p: float = 2.0,
        teacher_epochs: int = 10,
        teacher_batch_size: int = 256,
        teacher_lr: float = 0.01,
        teacher_momentum: float = 0.9,
        teacher_weight_decay: float = 5e-4,
        teacher_cosine_t_max: int | None = 100,
        augment: bool = True,
    ) -> None:
        # FT's attributes (epochs, batch_size, lr, ...) are the teacher's; the student's are
        # in ``self.student``.
        super().__init__(
            teacher_epochs, teacher_batch_size, teacher_lr, teacher_momentum,
            teacher_weight_decay, teacher_cosine_t_max, augment,
        )  # fmt: skip
        checks.integer(epochs, "epochs", 0)
        checks.integer(batch_size, "batch_size")
        checks.number(lr, "lr", 0.0, low_open=True)
        milestones = list(lr_milestones)
        checks.require(
            all(checks.is_int(m) and m >= 0 for m in milestones), "lr_milestones",
            "a list of epochs >= 0", lr_milestones,
        )  # fmt: skip
        checks.number(lr_gamma, "lr_gamma", 0.0, low_open=True)
        checks.number(momentum, "momentum", 0.0, 1.0, high_open=True)
        checks.number(weight_decay, "weight_decay", 0.0)
        checks.boolean(nesterov, "nesterov")
        beta_list = [float(b) for b in betas]
        checks.require(
            len(beta_list) >= 1 and all(b >= 0 for b in beta_list), "betas",
            "a non-empty list of weights >= 0", betas,
        )  # fmt: skip
        checks.number(p, "p", 0.0, low_open=True)
        self.student = {
            "epochs": epochs, "batch_size": batch_size, "lr": float(lr),
            "lr_milestones": milestones, "lr_gamma": float(lr_gamma),
            "momentum": float(momentum), "weight_decay": float(weight_decay), "nesterov": nesterov,
        }  # fmt: skip
        self.betas, self.p = beta_list, float(p)

    def student_recipe(self, base: DictConfig) -> DictConfig:
        """The student's recipe for ``fit`` (built fresh, as ``FT.recipe``)."""
        s = self.student
        return OmegaConf.create(
            {
                "epochs": s["epochs"], "batch_size": s["batch_size"], "lr": s["lr"],
                "optimizer": {
                    "_target_": "torch.optim.SGD", "_partial_": True, "lr": s["lr"],
                    "momentum": s["momentum"], "weight_decay": s["weight_decay"],
                    "nesterov": s["nesterov"],
                },
                "scheduler": {
                    "_target_": "torch.optim.lr_scheduler.MultiStepLR", "_partial_": True,
                    "milestones": s["lr_milestones"], "gamma": s["lr_gamma"],
                },
                "grad_clip": None, "augment": self.augment,
                "amp": base.get("amp", "auto"), "channels_last": base.get("channels_last", "auto"),
            }
        )  # fmt: skip

    def run(self, ctx: DefenseContext) -> DefenseResult:
        assert ctx.model is not None, "post-training defenses receive the trained model"
        data, bs = ctx.clean_set, self.batch_size
        sites = stage_sites(copy.deepcopy(ctx.model).cpu())[-len(self.betas) :]
        betas = self.betas[-len(sites) :]  # a model with fewer stages keeps the last weights
        teacher = copy.deepcopy(ctx.model).to(ctx.device).eval()
        acc0 = accuracy(teacher, data, ctx.device, bs)
        self.finetune(ctx, teacher, data, desc=f"{self.name} teacher")
        teacher.requires_grad_(False)
        teacher_acc = accuracy(teacher, data, ctx.device, bs)
        student = copy.deepcopy(ctx.model).to(ctx.device).requires_grad_(True)
        names = [s.name for s in sites]
        loss = Distiller(student, teacher, names, betas, self.p)
        fitted = None
        try:
            if self.student["epochs"] > 0:
                fitted = ctx.fit(
                    student, data, recipe=self.student_recipe(ctx.recipe), loss_fn=loss,
                    seed=derive_seed(ctx.seed, self.name, "student"), desc=f"{self.name} student",
                )  # fmt: skip
        finally:
            loss.remove()
        student.eval()
        acc1 = accuracy(student, data, ctx.device, bs)
        log.info(
            "%s: sites %s (betas %s); reserve accuracy %.4f, teacher %.4f, student %.4f",
            self.name, names, betas, acc0, teacher_acc, acc1,
        )  # fmt: skip
        last = fitted.history[-1] if fitted is not None and fitted.history else {}
        extras: dict[str, Any] = {
            "n_reserve": len(data),
            "n_sites": len(sites),
            "sites": ",".join(names),
            "reserve_acc_before": acc0,
            "reserve_acc_teacher": teacher_acc,
            "reserve_acc_after": acc1,
            "student_last_loss": last.get("loss"),
            **{f"at_loss_{n}": v for n, v in zip(names, loss.last, strict=True)},
        }
        return DefenseResult(model=student, extras=extras)
