"""Where the channel-pruning defenses measure and mask the last conv layer's channels
(``defense=linf_prune`` and any defense built on it).

The site's output is masked with ``defenses/masking.py`` (a persistent ``channel_mask`` buffer
and hook): a pruned channel is multiplied by 0 after the activation, whatever the conv, norm or
BatchNorm bias learn in fine-tuning.

Where the map is taken (found with the model tracer, ``benchmark/models/trace.py``; no per-model
code):

- The site is the first activation module called after the last conv's norm layer (or after
  the conv itself when it has no norm), provided it is called once per forward and its output
  has the norm's shape. Otherwise, the norm (or the conv) itself. A timm norm that owns its
  activation (``BatchNormAct2d``) is the site directly: its output is already activated.
- small_cnn: ``block3.0`` conv -> ``block3.1`` BN -> site ``block3.2`` (ReLU).
- vgg16_bn: ``features.40`` conv -> ``features.41`` BN -> site ``features.42`` (ReLU).
- nin: ``features.18`` conv (no norm) -> site ``features.19`` (ReLU).
- resnet18: ``layer4.1.conv2`` -> ``layer4.1.bn2`` -> residual add -> site ``layer4.1.relu2``,
  i.e. the block output (the notes' "ResNet-18 layer4 output"); masking it zeroes the whole
  channel of the final feature map, shortcut included.
- timm resnet18: the same, site ``net.layer4.1.act2``; timm efficientnet: site ``net.bn2``
  (BatchNormAct2d).
- preact_resnet18: ``layer4.1.conv2`` has no norm and no activation after it, and its output
  is added to the shortcut before the residual stream is pooled. Masking the conv output would
  leave the channel alive through the shortcut, so the site moves past the add: it is the
  output of the outermost enclosing block of the same shape (``layer4``, the stage, kind
  ``block``), i.e. the channel of the pooled feature map, as for ResNet-18 (the rule is
  generic: whenever the site's map is not what the network finally carries at that shape).
  The last conv of a ViT (the patch embedding) keeps the conv output as its site.
- A model without any ``nn.Conv2d`` fails with a ``ConfigError`` naming ``model``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from benchmark.errors import ConfigError
from benchmark.models.base import ImageClassifier
from benchmark.models.trace import activation_types, completion_order, trace


# -- where to measure and mask ----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PruneSite:
    """The module whose output holds the last conv layer's channel maps.

    Attributes:
        name: the module's name in the model (what is hooked and masked).
        module: the module.
        conv_name: the last conv layer's name.
        channels: its number of output channels.
        kind: ``activation``, ``norm`` (possibly owning its activation), ``conv``, or ``block``
            (the output of the block or stage that adds a shortcut to the conv's map).
    """

    name: str
    module: nn.Module
    conv_name: str
    channels: int
    kind: str


def find_site(model: nn.Module) -> PruneSite:
    """The site of ``model``'s last conv layer (see the module docstring for the rule)."""
    if not isinstance(model, ImageClassifier):
        raise TypeError(
            "channel pruning needs a harness ImageClassifier (conv_layers()), got "
            f"{type(model).__name__}"
        )
    convs = model.conv_layers()
    if not convs:
        raise ConfigError(
            "model",
            f"{type(model).__name__} has no nn.Conv2d layer: channel pruning masks the "
            "channels of the last convolution",
        )
    last = convs[-1]
    channels = int(last.conv.out_channels)
    names = {m: n for n, m in model.named_modules()}
    anchor = last.norm if last.norm is not None else last.conv
    anchor_kind = "norm" if last.norm is not None else "conv"
    kinds = activation_types()
    if last.norm is not None and any(isinstance(m, kinds) for m in last.norm.modules()):
        return PruneSite(names[last.norm], last.norm, last.name, channels, "norm")

    sites = {s.module: s for s in model.activation_sites()}
    calls = [
        (c.module, tuple(c.output.shape) if c.output is not None else None)
        for c in completion_order(trace(model, [anchor, *sites]))
    ]
    at = max(i for i, (m, _) in enumerate(calls) if m is anchor)
    anchor_shape = calls[at][1]
    nxt = next(((m, s) for m, s in calls[at + 1 :] if m in sites), None)
    if nxt is not None and sites[nxt[0]].calls == 1 and nxt[1] == anchor_shape:
        site = PruneSite(names[nxt[0]], nxt[0], last.name, channels, "activation")
    elif anchor_shape is None or len(anchor_shape) != 4 or anchor_shape[1] != channels:
        # e.g. a norm over a permuted layout: mask the conv output itself.
        return PruneSite(last.name, last.conv, last.name, channels, "conv")
    else:
        site = PruneSite(names[anchor], anchor, last.name, channels, anchor_kind)
    return _past_residual_add(model, site, names)


def _past_residual_add(
    model: ImageClassifier, site: PruneSite, names: dict[nn.Module, str]
) -> PruneSite:
    """Move ``site`` to the block output when a residual add follows it.

    When the site's map is added to a shortcut afterwards (PreAct-ResNet's last ``conv2``,
    which has no norm or activation after it), masking the site leaves the channel alive in
    the residual stream that is pooled. The blocks containing the site return that stream: the
    last of them whose output has the site's shape, when its output is a different tensor, is
    the site instead (the stage that returns the block's output). Masking it zeroes the
    channel of the final feature map, shortcut included, as masking ResNet-18's post-add ReLU
    does.
    """
    modules = [m for m in names if m is not model]
    calls = [(c.module, c.output) for c in completion_order(trace(model, modules))]
    at = max(i for i, (m, _) in enumerate(calls) if m is site.module)
    out = calls[at][1]
    # Only the blocks containing the site can add a shortcut to it (not, e.g., a global pool
    # that keeps a 1x1 map's shape).
    ancestors = {m for m in modules if site.name.startswith(names[m] + ".")}
    same = [
        i
        for i, (m, o) in enumerate(calls)
        if i > at
        and m in ancestors
        and isinstance(o, Tensor)
        and isinstance(out, Tensor)
        and o.shape == out.shape
    ]
    if not same or calls[same[-1]][1] is out:
        return site
    module = calls[same[-1]][0]
    if sum(m is module for m, _ in calls) != 1:
        return site  # a shared module: its output is not one place in the network
    return PruneSite(names[module], module, site.conv_name, site.channels, "block")
