"""Reference-task architectures built from the installed MMLab packages (random init, no downloads).

Each build runs under its package's registry scope, so tests that ran earlier with another
default scope (mmengine keeps it process-wide) cannot redirect the lookup.
"""
from __future__ import annotations

import torch
from mmengine.registry import DefaultScope


def build_classifier(backbone: dict, in_channels: int, num_classes: int) -> torch.nn.Module:
    import mmpretrain.models  # noqa: F401
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope("mmpretrain"):
        return MODELS.build(dict(
            type="ImageClassifier", backbone=backbone, neck=dict(type="GlobalAveragePooling"),
            head=dict(type="LinearClsHead", num_classes=num_classes, in_channels=in_channels,
                      loss=dict(type="CrossEntropyLoss", loss_weight=1.0))))


def mmpretrain_resnet18_cifar(num_classes: int = 100) -> torch.nn.Module:
    return build_classifier(dict(type="ResNet_CIFAR", depth=18, num_stages=4, out_indices=(3,),
                            style="pytorch"), 512, num_classes)


def mmpretrain_resnet50(num_classes: int = 1000) -> torch.nn.Module:
    return build_classifier(dict(type="ResNet", depth=50, num_stages=4, out_indices=(3,),
                            style="pytorch"), 2048, num_classes)


def build_deeplabv3(backbone: dict, in_channels: int, channels: int, num_classes: int):
    import mmseg.models  # noqa: F401
    from mmseg.registry import MODELS
    norm = dict(type="BN", requires_grad=True)
    with DefaultScope.overwrite_default_scope("mmseg"):
        return MODELS.build(dict(
            type="EncoderDecoder",
            backbone=backbone,
            decode_head=dict(type="ASPPHead", in_channels=in_channels, in_index=3,
                             channels=channels, dilations=(1, 12, 24, 36), dropout_ratio=0.1,
                             num_classes=num_classes, norm_cfg=norm, align_corners=False,
                             loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False)),
            train_cfg=dict(), test_cfg=dict(mode="whole")))


def mmseg_deeplabv3_r50(num_classes: int = 21) -> torch.nn.Module:
    backbone = dict(type="ResNetV1c", depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
                    dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
                    norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False,
                    style="pytorch", contract_dilation=True)
    return build_deeplabv3(backbone, 2048, 512, num_classes)


def mmseg_deeplabv3_mobilenetv2(num_classes: int = 150) -> torch.nn.Module:
    backbone = dict(type="MobileNetV2", widen_factor=1.0, strides=(1, 2, 2, 1, 1, 1, 1),
                    dilations=(1, 1, 1, 2, 2, 4, 4), out_indices=(1, 2, 4, 6),
                    norm_cfg=dict(type="BN", requires_grad=True))
    return build_deeplabv3(backbone, 320, 512, num_classes)
