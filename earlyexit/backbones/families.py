"""Built-in adapters for the timm and torchvision families.

Every family here is run by forward hooks that shrink the batch at block boundaries: the blocks of a
stage are called one after another and only see the previous block's output, so a hook may drop
rows there. Candidates are therefore *blocks* (finer than stages), which lets ``exits="auto"`` spread
exits evenly by MACs. Each chosen exit is re-checked by running the model once when wrapping.
"""

from __future__ import annotations

import re

from torch import nn

from .adapter import BackboneAdapter, FeatureLayout, register_adapter


def _is_instance(module: nn.Module, dotted: str) -> bool:
    """isinstance against a class named by its import path, importing lazily."""
    mod_name, _, cls_name = dotted.rpartition(".")
    try:
        module_obj = __import__(mod_name, fromlist=[cls_name])
    except ImportError:
        return False
    cls = getattr(module_obj, cls_name, None)
    return cls is not None and isinstance(module, cls)


def _name_matches(pattern: str):
    regex = re.compile(pattern)
    return lambda name, module: regex.fullmatch(name) is not None


def _timm_input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    # Models built with a non-default img_size keep the old cfg; the patch embed knows the truth.
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None:
        size = (size[0], int(img_size[0]), int(img_size[1]))
    return (int(size[0]), int(size[1]), int(size[2]))


def _timm_fixed_size(model: nn.Module) -> bool:
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        # timm checks sizes strictly unless the model was built with dynamic_img_size.
        return bool(getattr(patch_embed, "strict_img_size", False)) and not bool(
            getattr(model, "dynamic_img_size", False)
        )
    return False


def _timm_vit_layout(model: nn.Module, name: str) -> FeatureLayout:
    pool = "cls" if getattr(model, "global_pool", "token") == "token" else "avg"
    return FeatureLayout(
        "tokens", prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)), token_pool=pool
    )


def _nhwc(model: nn.Module, name: str) -> FeatureLayout:
    return FeatureLayout("nhwc")


def _tv_vit_layout(model: nn.Module, name: str) -> FeatureLayout:
    return FeatureLayout("tokens", prefix_tokens=1, token_pool="cls")


def _tv_vit_input_size(model: nn.Module) -> tuple[int, int, int]:
    size = int(getattr(model, "image_size", 224))
    return (3, size, size)


class _TimmFeatureInfoAdapter(BackboneAdapter):
    """Any other timm model: ``feature_info`` names its stage ends, which are boundaries."""

    def candidates(self, model: nn.Module) -> list[str]:
        names = {info["module"] for info in model.feature_info}
        return [n for n, _ in model.named_modules() if n in names]


def _timm_generic_layout(model: nn.Module, name: str) -> FeatureLayout:
    if str(getattr(model, "output_fmt", "NCHW")).upper() == "NHWC":
        return FeatureLayout("nhwc")
    # Token outputs are recognised by rank; this prefix count is only used for them.
    return FeatureLayout("nchw", prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0))


def _tv_input_size(default: int):
    return lambda model: (3, default, default)


def _family(
    family: str,
    model_class: str,
    names: str | None = None,
    *,
    blocks: tuple[str, ...] = (),
    **options,
) -> BackboneAdapter:
    """The adapter of the models that are instances of ``model_class`` (an import path, imported
    lazily so that an absent library costs nothing). Exit candidates are the modules whose name
    fully matches the regex ``names``, or else the instances of one of the ``blocks`` classes.
    ``options`` are the other :class:`BackboneAdapter` fields (layout, input size, ...)."""

    def is_block(name: str, module: nn.Module) -> bool:
        return any(_is_instance(module, block) for block in blocks)

    return BackboneAdapter(
        family=family,
        matches=lambda model: _is_instance(model, model_class),
        is_exit_candidate=_name_matches(names) if names is not None else is_block,
        **options,
    )


_TIMM_SIZE = {"input_size": _timm_input_size}
_TIMM_FIXED_SIZE = {"input_size": _timm_input_size, "fixed_input_size": _timm_fixed_size}

BUILTIN_ADAPTERS: tuple[BackboneAdapter, ...] = (
    # ---- timm ---------------------------------------------------------------------------------
    _family("timm.resnet", "timm.models.resnet.ResNet", r"layer\d+\.\d+", **_TIMM_SIZE),
    # ViT, DeiT (distilled too), and their subclasses
    _family(
        "timm.vit",
        "timm.models.vision_transformer.VisionTransformer",
        r"blocks\.\d+",
        layout=_timm_vit_layout,
        **_TIMM_FIXED_SIZE,
    ),
    _family(
        "timm.convnext", "timm.models.convnext.ConvNeXt", r"stages\.\d+\.blocks\.\d+", **_TIMM_SIZE
    ),
    # EfficientNet, EfficientNet-Lite, MixNet, ...
    _family(
        "timm.efficientnet",
        "timm.models.efficientnet.EfficientNet",
        r"blocks\.\d+\.\d+",
        **_TIMM_SIZE,
    ),
    _family(
        "timm.mobilenetv3", "timm.models.mobilenetv3.MobileNetV3", r"blocks\.\d+\.\d+", **_TIMM_SIZE
    ),
    _family("timm.regnet", "timm.models.regnet.RegNet", r"s\d+\.b\d+", **_TIMM_SIZE),
    _family(
        "timm.swin",
        "timm.models.swin_transformer.SwinTransformer",
        r"layers\.\d+\.blocks\.\d+",
        layout=_nhwc,
        **_TIMM_FIXED_SIZE,
    ),
    # ---- torchvision --------------------------------------------------------------------------
    # ResNet, also ResNeXt and Wide ResNet
    _family("torchvision.resnet", "torchvision.models.resnet.ResNet", r"layer\d+\.\d+"),
    _family(
        "torchvision.vit",
        "torchvision.models.vision_transformer.VisionTransformer",
        r"encoder\.layers\.encoder_layer_\d+",
        layout=_tv_vit_layout,
        input_size=_tv_vit_input_size,
        fixed_input_size=lambda m: True,
    ),
    _family(
        "torchvision.convnext",
        "torchvision.models.convnext.ConvNeXt",
        blocks=("torchvision.models.convnext.CNBlock",),
    ),
    _family(
        "torchvision.efficientnet",
        "torchvision.models.efficientnet.EfficientNet",
        blocks=(
            "torchvision.models.efficientnet.MBConv",
            "torchvision.models.efficientnet.FusedMBConv",
        ),
    ),
    _family(
        "torchvision.mobilenet_v2", "torchvision.models.mobilenetv2.MobileNetV2", r"features\.\d+"
    ),
    _family(
        "torchvision.mobilenet_v3", "torchvision.models.mobilenetv3.MobileNetV3", r"features\.\d+"
    ),
    _family(
        "torchvision.swin",
        "torchvision.models.swin_transformer.SwinTransformer",
        blocks=(
            "torchvision.models.swin_transformer.SwinTransformerBlock",
            "torchvision.models.swin_transformer.SwinTransformerBlockV2",
        ),
        layout=_nhwc,
    ),
    # Inside a dense block every layer sees all earlier outputs: only block ends are boundaries.
    _family(
        "torchvision.densenet",
        "torchvision.models.densenet.DenseNet",
        r"features\.(denseblock|transition)\d+",
    ),
    _family(
        "torchvision.inception_v3",
        "torchvision.models.inception.Inception3",
        r"Mixed_\d[a-e]",
        input_size=_tv_input_size(299),
    ),
    _TimmFeatureInfoAdapter(
        family="timm.feature_info",
        matches=lambda m: (
            type(m).__module__.startswith("timm.") and bool(getattr(m, "feature_info", None))
        ),
        is_exit_candidate=lambda n, m: False,  # unused: candidates() reads feature_info
        layout=_timm_generic_layout,
        input_size=_timm_input_size,
        fixed_input_size=_timm_fixed_size,
    ),
)


def register_builtin_adapters() -> None:
    """Register the built-in families after any user adapters; registering again restores them
    (a built-in family replaced by the user's ``overwrite=True`` included)."""
    for adapter in BUILTIN_ADAPTERS:
        register_adapter(adapter, overwrite=True, first=False)
