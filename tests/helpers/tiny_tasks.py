"""Tiny generated data sets and scaled-down task configs for the finetuning tests.

The configs inherit the project's reference configs and replace only data, sizes and
schedule, so the tests exercise the real model definitions, conversions and dataset classes
(mmpretrain ``CustomDataset`` reading PNG files, mmseg ``ADE20KDataset`` reading JPEG images
and PNG masks).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CLS_BASE = REPO / "configs" / "classification" / "resnet18_cifar100_brelu_finetune.py"
SEG_BASE = REPO / "configs" / "segmentation" / "deeplabv3_mnv2_ade20k_brelu_finetune.py"

CLS_CLASSES = 3
CLS_SIZE = 16     # ResNet18-CIFAR runs at any multiple of 8; 16x16 keeps CPU tests fast
SEG_SIZE = 32


def make_cls_data(root: Path, per_class: int = 2, size: int = CLS_SIZE, *,
                  seed: int | None = None, noise: int = 120) -> Path:
    """``root/{train,val}/class_k/*.png``: class k images are brighter in channel k (by 100,
    over uniform noise below ``noise``); ``seed`` fixes the pixels."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for k in range(CLS_CLASSES):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, noise, size=(size, size, 3), dtype=np.uint8)
                img[..., k] += 100
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def make_seg_data(root: Path, count: int = 2, size: int = SEG_SIZE) -> Path:
    """ADE20K layout: ``images/{training,validation}/*.jpg``, ``annotations/…/*.png`` masks."""
    rng = np.random.default_rng()
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[: size // 2] = 1 + rng.integers(0, 3)       # ADE labels are 1-based (0 = ignore)
            mask[size // 2:] = 4 + rng.integers(0, 3)
            img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            img += (mask[..., None] * 30).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"img_{i}.jpg", quality=95)
            Image.fromarray(mask).save(root / "annotations" / split / f"img_{i}.png")
    return root


def cls_config(path: Path, data_root: Path, max_epochs: int = 1) -> Path:
    """ResNet18-CIFAR finetune config on the tiny set: 2 iterations per epoch on 2 processes
    (6 training images, 2 per batch)."""
    text = f"""
_base_ = [{str(CLS_BASE)!r}]
model = dict(head=dict(num_classes={CLS_CLASSES}))
data_preprocessor = dict(num_classes={CLS_CLASSES})
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root={str(data_root)!r},
                 data_prefix='train', pipeline=pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root={str(data_root)!r},
                 data_prefix='val', pipeline=pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1,))
test_evaluator = val_evaluator
param_scheduler = [dict(type='MultiStepLR', by_epoch=True, milestones=[30], gamma=0.25)]
train_cfg = dict(by_epoch=True, max_epochs={max_epochs}, val_interval=1)
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', interval=1, save_best=None,
                                     max_keep_ckpts=-1))
secure_inference = dict(input_shape=[3, {CLS_SIZE}, {CLS_SIZE}],
                        distortion_data=dict(_delete_=True, type='CustomDataset',
                                             data_root={str(data_root)!r},
                                             data_prefix='train', pipeline=pipeline))
"""
    path.write_text(text)
    return path


def seg_config(path: Path, data_root: Path, max_iters: int = 2) -> Path:
    """DeepLabV3-MobileNetV2 (ReLU6→ReLU) finetune config on the tiny ADE20K-layout set.

    Training batches hold 2 images per process: the ASPP image-pool BN needs more than one
    value per channel in training mode (BN, not SyncBN, on CPU).
    """
    s = SEG_SIZE
    text = f"""
_base_ = [{str(SEG_BASE)!r}]
crop = ({s}, {s})
model = dict(data_preprocessor=dict(size=crop))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root={str(data_root)!r}, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root={str(data_root)!r}, pipeline=test_pipeline))
test_dataloader = val_dataloader
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=100, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters={max_iters}, val_interval=2)
default_hooks = dict(logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2,
                                     save_best=None, max_keep_ckpts=-1))
secure_inference = dict(
    input_shape=[3, {s}, {s}],
    distortion_data=dict(data_root={str(data_root)!r}, pipeline=[
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(8192, {s}), keep_ratio=True),
        dict(type='CenterCrop', crop_size=crop),
        dict(type='PackSegInputs'),
    ]))
"""
    path.write_text(text)
    return path
