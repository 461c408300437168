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


BUILTIN_ADAPTERS: tuple[BackboneAdapter, ...] = (
    # ---- timm ---------------------------------------------------------------------------------
    BackboneAdapter(
        family="timm.resnet",
        matches=lambda m: _is_instance(m, "timm.models.resnet.ResNet"),
        is_exit_candidate=_name_matches(r"layer\d+\.\d+"),
        input_size=_timm_input_size,
    ),
    BackboneAdapter(
        family="timm.vit",  # ViT, DeiT (distilled too), and their subclasses
        matches=lambda m: _is_instance(m, "timm.models.vision_transformer.VisionTransformer"),
        is_exit_candidate=_name_matches(r"blocks\.\d+"),
        layout=_timm_vit_layout,
        input_size=_timm_input_size,
        fixed_input_size=_timm_fixed_size,
    ),
    BackboneAdapter(
        family="timm.convnext",
        matches=lambda m: _is_instance(m, "timm.models.convnext.ConvNeXt"),
        is_exit_candidate=_name_matches(r"stages\.\d+\.blocks\.\d+"),
        input_size=_timm_input_size,
    ),
    BackboneAdapter(
        family="timm.efficientnet",  # EfficientNet, EfficientNet-Lite, MixNet, ...
        matches=lambda m: _is_instance(m, "timm.models.efficientnet.EfficientNet"),
        is_exit_candidate=_name_matches(r"blocks\.\d+\.\d+"),
        input_size=_timm_input_size,
    ),
    BackboneAdapter(
        family="timm.mobilenetv3",
        matches=lambda m: _is_instance(m, "timm.models.mobilenetv3.MobileNetV3"),
        is_exit_candidate=_name_matches(r"blocks\.\d+\.\d+"),
        input_size=_timm_input_size,
    ),
    BackboneAdapter(
        family="timm.regnet",
        matches=lambda m: _is_instance(m, "timm.models.regnet.RegNet"),
        is_exit_candidate=_name_matches(r"s\d+\.b\d+"),
        input_size=_timm_input_size,
    ),
    BackboneAdapter(
        family="timm.swin",
        matches=lambda m: _is_instance(m, "timm.models.swin_transformer.SwinTransformer"),
        is_exit_candidate=_name_matches(r"layers\.\d+\.blocks\.\d+"),
        layout=_nhwc,
        input_size=_timm_input_size,
        fixed_input_size=_timm_fixed_size,
    ),
    # ---- torchvision --------------------------------------------------------------------------
    BackboneAdapter(
        family="torchvision.resnet",  # also ResNeXt and Wide ResNet
        matches=lambda m: _is_instance(m, "torchvision.models.resnet.ResNet"),
        is_exit_candidate=_name_matches(r"layer\d+\.\d+"),
    ),
    BackboneAdapter(
        family="torchvision.vit",
        matches=lambda m: _is_instance(
            m, "torchvision.models.vision_transformer.VisionTransformer"
        ),
        is_exit_candidate=_name_matches(r"encoder\.layers\.encoder_layer_\d+"),
        layout=_tv_vit_layout,
        input_size=_tv_vit_input_size,
        fixed_input_size=lambda m: True,
    ),
    BackboneAdapter(
        family="torchvision.convnext",
        matches=lambda m: _is_instance(m, "torchvision.models.convnext.ConvNeXt"),
        is_exit_candidate=lambda n, m: _is_instance(m, "torchvision.models.convnext.CNBlock"),
    ),
    BackboneAdapter(
        family="torchvision.efficientnet",
        matches=lambda m: _is_instance(m, "torchvision.models.efficientnet.EfficientNet"),
        is_exit_candidate=lambda n, m: (
            _is_instance(m, "torchvision.models.efficientnet.MBConv")
            or _is_instance(m, "torchvision.models.efficientnet.FusedMBConv")
        ),
    ),
    BackboneAdapter(
        family="torchvision.mobilenet_v2",
        matches=lambda m: _is_instance(m, "torchvision.models.mobilenetv2.MobileNetV2"),
        is_exit_candidate=_name_matches(r"features\.\d+"),
    ),
    BackboneAdapter(
        family="torchvision.mobilenet_v3",
        matches=lambda m: _is_instance(m, "torchvision.models.mobilenetv3.MobileNetV3"),
        is_exit_candidate=_name_matches(r"features\.\d+"),
    ),
    BackboneAdapter(
        family="torchvision.swin",
        matches=lambda m: _is_instance(m, "torchvision.models.swin_transformer.SwinTransformer"),
        is_exit_candidate=lambda n, m: (
            _is_instance(m, "torchvision.models.swin_transformer.SwinTransformerBlock")
            or _is_instance(m, "torchvision.models.swin_transformer.SwinTransformerBlockV2")
        ),
        layout=_nhwc,
    ),
    BackboneAdapter(
        family="torchvision.densenet",
        matches=lambda m: _is_instance(m, "torchvision.models.densenet.DenseNet"),
        # Inside a dense block every layer sees all earlier outputs: only block ends are boundaries.
        is_exit_candidate=_name_matches(r"features\.(denseblock|transition)\d+"),
    ),
    BackboneAdapter(
        family="torchvision.inception_v3",
        matches=lambda m: _is_instance(m, "torchvision.models.inception.Inception3"),
        is_exit_candidate=_name_matches(r"Mixed_\d[a-e]"),
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
    """Register the built-in families (idempotent), after any user adapters."""
    for adapter in BUILTIN_ADAPTERS:
        register_adapter(adapter, override=False)
