# ResNet18 (CIFAR variant: 3x3 stem, no max pool) on CIFAR-100, trained from scratch.
# This is the baseline network (78.27% top-1 published) that the Block-ReLU pipeline starts from.
#   python mmlab_tools/train.py configs/classification/resnet18_cifar100.py
# Data: DATA_ROOT (default ./data) must hold cifar100/cifar-100-python/{train,test,meta};
# mmpretrain reads the python pickles (download them yourself; nothing is fetched here).
_base_ = [
    'mmpretrain::_base_/models/resnet18_cifar.py',
    'mmpretrain::_base_/datasets/cifar100_bs16.py',
    'mmpretrain::_base_/schedules/cifar10_bs128.py',
    'mmpretrain::_base_/default_runtime.py',
]

data_root = '{{$DATA_ROOT:data}}/cifar100'

model = dict(head=dict(num_classes=100))

train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='PackInputs')]

# 8 GPUs x 16 images = 128 per step (the mmpretrain CIFAR recipe).
train_dataloader = dict(
    batch_size=16,
    num_workers=2,
    dataset=dict(type='CIFAR100', data_root=data_root, split='train',
                 pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=16,
    num_workers=2,
    dataset=dict(type='CIFAR100', data_root=data_root, split='test', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_evaluator = val_evaluator

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=0.0005, nesterov=False))
param_scheduler = dict(type='MultiStepLR', by_epoch=True, milestones=[60, 120, 160], gamma=0.2)
train_cfg = dict(by_epoch=True, max_epochs=200, val_interval=1)

default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=3,
                                     save_best='auto'))

# Read by secure_inference (input shape of the sites, distortion extraction data: the
# training images through the deterministic test pipeline).
secure_inference = dict(
    input_shape=[3, 32, 32],
    convert=[],
    distortion_data=dict(type='CIFAR100', data_root=data_root, split='train',
                         pipeline=test_pipeline),
)
