"""A tiny mmpretrain classification config shared by the pipeline CLI tests.

``{data}`` is the folder of generated images (distortion split).
"""

TINY_CLS_CONFIG = """
default_scope = 'mmpretrain'
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=10,
                           mean=[125.3, 123.0, 113.9], std=[63.0, 62.1, 66.7], to_rgb=False),
    backbone=dict(type='ResNet_CIFAR', depth=18, num_stages=4, out_indices=(3,),
                  stem_channels=8, base_channels=8, style='pytorch', init_cfg=None),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=10, in_channels=64,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
secure_inference = dict(
    input_shape=[3, 16, 16],
    distortion_data=dict(type='CustomDataset', data_prefix='{data}', with_label=False,
                         pipeline=test_pipeline))
"""
