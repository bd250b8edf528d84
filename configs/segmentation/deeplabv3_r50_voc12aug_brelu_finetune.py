# DeepLabV3 ResNet50-V1c (dilated, output stride 8) on PASCAL VOC 2012 + SBD aug, with the stem
# MaxPool replaced by AvgPool, Block-ReLU finetune from mmseg's 20k VOC-aug checkpoint
# (6% DReLUs: 74.27 mIoU published).
#   bash mmlab_tools/dist_train.sh configs/segmentation/deeplabv3_r50_voc12aug_brelu_finetune.py 4 \
#       --relu-spec-file SPEC --load-from checkpoints/deeplabv3_r50-d8_512x512_20k_voc12aug_*.pth
# Without --relu-spec-file the same command finetunes the AvgPool network alone.
# Data: DATA_ROOT (default ./data) must hold VOCdevkit/VOC2012 with JPEGImages,
# SegmentationClass, SegmentationClassAug and ImageSets/Segmentation/{train,aug,val}.txt.
# Schedule: 20k iterations, poly lr from 5e-4.
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py']

data_root = '{{$DATA_ROOT:data}}/VOCdevkit/VOC2012'
crop_size = (512, 512)

# Weights come from --load-from; nothing is downloaded.
model = dict(pretrained=None)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='Pad', size=crop_size),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
distortion_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(8192, 512), keep_ratio=True),
    dict(type='CenterCrop', crop_size=crop_size),
    dict(type='PackSegInputs'),
]
dataset_train = dict(
    type='PascalVOCDataset', data_root=data_root,
    data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
    ann_file='ImageSets/Segmentation/train.txt', pipeline=train_pipeline)
dataset_aug = dict(
    type='PascalVOCDataset', data_root=data_root,
    data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassAug'),
    ann_file='ImageSets/Segmentation/aug.txt', pipeline=train_pipeline)
train_dataloader = dict(
    dataset=dict(_delete_=True, type='ConcatDataset', datasets=[dataset_train, dataset_aug]))
val_dataloader = dict(
    dataset=dict(type='PascalVOCDataset', data_root=data_root,
                 data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
                 ann_file='ImageSets/Segmentation/val.txt', pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=5e-4, momentum=0.9, weight_decay=0.0005),
    clip_grad=None)
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=20000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=20000, val_interval=2000)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2000,
                                     max_keep_ckpts=3, save_best='mIoU'))

secure_inference = dict(
    input_shape=[3, 512, 512],
    convert=['maxpool_to_avgpool'],
    distortion_data=dict(type='PascalVOCDataset', data_root=data_root,
                         data_prefix=dict(img_path='JPEGImages',
                                          seg_map_path='SegmentationClass'),
                         ann_file='ImageSets/Segmentation/train.txt',
                         pipeline=distortion_pipeline),
    distill=dict(enabled=False, teacher_checkpoint=None, temperature=4.0, loss_weight=1.0),
)
