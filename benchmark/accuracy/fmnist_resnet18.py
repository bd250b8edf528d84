# Fashion-MNIST baseline for the accuracy study (benchmark/accuracy/README.md): ResNet18, CIFAR
# variant (3x3 stem, no max pool), ONE input channel, widths narrowed to an EIGHTH of the
# original (stem/base 8 instead of 64: stages of 8/16/32/64 channels, 17 ReLU sites, 54,272
# ReLUs per 28x28 image) so that the whole study (baseline, distortion, 48 finetunes) fits a
# few hours on one thread of a 2-core CPU (width 16: 15 min per epoch there; width 8: 3.3 min).
#   FMNIST_DATA=DIR python mmlab_tools/train.py \
#       benchmark/accuracy/fmnist_resnet18.py --work-dir work_dirs/fmnist/baseline
# FMNIST_DATA holds the four *decompressed* IDX files (train-images-idx3-ubyte, ...), see
# benchmark/accuracy/run_study.sh. Nothing is downloaded.
_base_ = ['mmpretrain::_base_/models/resnet18_cifar.py',
          'mmpretrain::_base_/default_runtime.py']

data_root = '{{$FMNIST_DATA:data/fashion-mnist}}'
num_classes = 10
width = 8

model = dict(
    backbone=dict(in_channels=1, stem_channels=width, base_channels=width, init_cfg=None),
    head=dict(num_classes=num_classes, in_channels=8 * width))
# Fashion-MNIST pixel statistics (0..255): mean 0.286, std 0.353
data_preprocessor = dict(type='ClsDataPreprocessor', num_classes=num_classes, mean=[72.94],
                         std=[90.02], to_rgb=False)

train_pipeline = [
    dict(type='RandomCrop', crop_size=28, padding=2),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='PackInputs')]

train_dataloader = dict(
    batch_size=128, num_workers=0, persistent_workers=False,
    dataset=dict(type='FashionMNIST', data_root=data_root, split='train', download=False,
                 pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=500, num_workers=0, persistent_workers=False,
    # mmpretrain's MNIST datasets pick their files by test_mode, not by split: both are needed
    dataset=dict(type='FashionMNIST', data_root=data_root, split='test', test_mode=True,
                 download=False, pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1,))
test_evaluator = val_evaluator

max_epochs = 20
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=1, T_max=max_epochs - 1, eta_min=1e-4),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=1, save_best=None))
randomness = dict(seed=0)

secure_inference = dict(
    input_shape=[1, 28, 28],
    convert=[],
    distortion_data=dict(type='FashionMNIST', data_root=data_root, split='train',
                         download=False, pipeline=test_pipeline),
)
