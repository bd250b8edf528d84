# ResNet50 on ImageNet-1k with the stem MaxPool replaced by AvgPool (linear, so free under
# secure computation), finetuned from mmpretrain's ResNet50 checkpoint (76.55% top-1).
#   python mmlab_tools/train.py configs/classification/resnet50_in1k_avgpool_finetune.py \
#       --load-from checkpoints/resnet50_8xb32_in1k_20210831-ea4938fc.pth
# Data: DATA_ROOT (default ./data) must hold imagenet/{train,val} and imagenet/meta/{train,val}.txt
# (mmpretrain's ImageNet layout). Schedule: 25 epochs, lr 5e-3, x0.25 at epochs 12/18/22.
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py']

data_root = '{{$DATA_ROOT:data}}/imagenet'

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=256, edge='short'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=32,
    num_workers=5,
    dataset=dict(type='ImageNet', data_root=data_root, split='train', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=32,
    num_workers=5,
    dataset=dict(type='ImageNet', data_root=data_root, split='val', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(type='SGD', lr=5e-3, momentum=0.9, weight_decay=0.0001))
param_scheduler = dict(type='MultiStepLR', by_epoch=True, milestones=[12, 18, 22], gamma=0.25)
train_cfg = dict(by_epoch=True, max_epochs=25, val_interval=1)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3,
                                     save_best='auto'))

secure_inference = dict(
    input_shape=[3, 224, 224],
    convert=['maxpool_to_avgpool'],
    distortion_data=dict(type='ImageNet', data_root=data_root, split='train',
                         pipeline=test_pipeline),
)
