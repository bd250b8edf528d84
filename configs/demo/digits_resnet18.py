# Demo task (make demo): a narrow ResNet18 (CIFAR variant, base width 16) on scikit-learn's
# bundled handwritten digits (1,797 real 8x8 scans, upscaled to 16x16 PNGs by research/demo.py).
#   DEMO_DATA=demo_output/data python mmlab_tools/train.py configs/demo/digits_resnet18.py
# The data folder holds {train,val,test}/<digit>/*.png (mmpretrain CustomDataset layout).
_base_ = ['../classification/resnet18_cifar100.py']

data_root = '{{$DEMO_DATA:demo_output/data}}'
num_classes = 10

model = dict(
    backbone=dict(stem_channels=16, base_channels=16),
    head=dict(num_classes=num_classes, in_channels=128))
# digit strokes on black: pixel statistics of the upscaled set (0..255)
data_preprocessor = dict(num_classes=num_classes, mean=[78.0, 78.0, 78.0], std=[96.0, 96.0, 96.0],
                         to_rgb=False)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomCrop', crop_size=16, padding=2),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]

train_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=64, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = dict(
    batch_size=64, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='test',
                 pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1,))
test_evaluator = val_evaluator

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True))
param_scheduler = dict(_delete_=True, type='CosineAnnealingLR', by_epoch=True, T_max=8)
train_cfg = dict(by_epoch=True, max_epochs=8, val_interval=8)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', interval=8, max_keep_ckpts=1, save_best=None))

secure_inference = dict(
    input_shape=[3, 16, 16],
    convert=[],
    distortion_data=dict(_delete_=True, type='CustomDataset', data_root=data_root,
                         data_prefix='train', pipeline=test_pipeline),
)
