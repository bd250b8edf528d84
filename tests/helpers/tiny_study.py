"""A tiny classification task for the study tests: generated 16x16 images of 3 classes, a
width-8 ResNet18-CIFAR config with a one-epoch finetune recipe, and a briefly trained baseline."""
from __future__ import annotations

from pathlib import Path

from helpers.tiny_tasks import CLS_CLASSES, make_cls_data

CLASSES = CLS_CLASSES
SIZE = 16

CONFIG = """
default_scope = 'mmpretrain'
data_root = {root!r}
model = dict(
    type='ImageClassifier',
    backbone=dict(type='ResNet_CIFAR', depth=18, num_stages=4, out_indices=(3,),
                  stem_channels=8, base_channels=8, style='pytorch', init_cfg=None),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes={classes}, in_channels=64,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
data_preprocessor = dict(type='ClsDataPreprocessor', num_classes={classes},
                         mean=[110.0, 110.0, 110.0], std=[60.0, 60.0, 60.0], to_rgb=False)
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline=pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1,))
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=5e-4))
param_scheduler = []
train_cfg = dict(by_epoch=True, max_epochs={epochs}, val_interval=100)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=100, save_best=None),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'),
               dist_cfg=dict(backend='gloo'))
secure_inference = dict(
    input_shape=[3, {size}, {size}], convert=[],
    distortion_data=dict(type='CustomDataset', data_root=data_root, data_prefix='train',
                         pipeline=pipeline))
"""


def write_tiny_study(folder: Path, per_class: int = 8, epochs: int = 1) -> tuple[Path, Path]:
    """Images in ``folder/data/{train,val}/class_k`` (class k brighter in channel k), the
    config ``folder/tiny_study.py`` and a baseline checkpoint trained for 3 epochs
    (``folder/baseline.pth``). Returns (config, checkpoint)."""
    import secure_inference  # noqa: F401  (compat fixes before MMLab)
    from secure_inference.mmlab.runner import train
    from secure_inference.study.runs import unformatted_config_text

    folder = Path(folder)
    data = make_cls_data(folder / "data", per_class, SIZE, seed=0, noise=140)
    cfg = folder / "tiny_study.py"
    cfg.write_text(CONFIG.format(root=str(data), classes=CLASSES, size=SIZE, epochs=epochs))
    base_cfg = folder / "tiny_study_baseline.py"
    base_cfg.write_text(CONFIG.format(root=str(data), classes=CLASSES, size=SIZE, epochs=3))
    with unformatted_config_text():
        runner = train(str(base_cfg), work_dir=str(folder / "baseline"),
                       cfg_options={"log_level": "WARNING", "randomness": dict(seed=0)})
        runner.save_checkpoint(str(folder), "baseline.pth", save_optimizer=False,
                               save_param_scheduler=False)
    ckpt = folder / "baseline.pth"
    return cfg, ckpt
