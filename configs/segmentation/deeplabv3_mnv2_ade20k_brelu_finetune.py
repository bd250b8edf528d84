# DeepLabV3 with a MobileNetV2 backbone on ADE20K: ReLU6 -> ReLU and Block-ReLU finetune
# from mmseg's DeepLabV3-MobileNetV2 ADE20K checkpoint (6% DReLUs: 34.73 mIoU published).
#   bash mmlab_tools/dist_train.sh configs/segmentation/deeplabv3_mnv2_ade20k_brelu_finetune.py 4 \
#       --relu-spec-file SPEC --load-from checkpoints/deeplabv3_m-v2-d8_512x512_160k_ade20k_*.pth
# Without --relu-spec-file the same command finetunes the ReLU (no ReLU6) network alone.
# Data: DATA_ROOT (default ./data) must hold ade/ADEChallengeData2016/{images,annotations}.
# Schedule: 40k iterations, poly lr from 5e-4, 1000 linear warm-up iterations.
_base_ = ['mmseg::mobilenet_v2/mobilenet-v2-d8_deeplabv3_4xb4-160k_ade20k-512x512.py']

data_root = '{{$DATA_ROOT:data}}/ade/ADEChallengeData2016'
crop_size = (512, 512)

# Weights come from --load-from; nothing is downloaded.
model = dict(pretrained=None)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
# Deterministic 512x512 view of a training image for the distortion extraction.
distortion_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(8192, 512), keep_ratio=True),
    dict(type='CenterCrop', crop_size=crop_size),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    dataset=dict(type='ADE20KDataset', data_root=data_root,
                 data_prefix=dict(img_path='images/training',
                                  seg_map_path='annotations/training'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    dataset=dict(type='ADE20KDataset', data_root=data_root,
                 data_prefix=dict(img_path='images/validation',
                                  seg_map_path='annotations/validation'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=5e-4, momentum=0.9, weight_decay=0.0005),
    clip_grad=None)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=1000),
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=1000, end=40000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000,
                                     max_keep_ckpts=3, save_best='mIoU'))

secure_inference = dict(
    input_shape=[3, 512, 512],
    convert=['relu6_to_relu'],
    distortion_data=dict(type='ADE20KDataset', data_root=data_root,
                         data_prefix=dict(img_path='images/training',
                                          seg_map_path='annotations/training'),
                         pipeline=distortion_pipeline),
    distill=dict(enabled=False, teacher_checkpoint=None, temperature=4.0, loss_weight=1.0),
)
