# Demo Block-ReLU finetune: short schedule from the baseline checkpoint (research/demo.py).
#   DEMO_DATA=demo_output/data bash mmlab_tools/dist_train.sh \
#       configs/demo/digits_resnet18_brelu_finetune.py 2 --relu-spec-file SPEC --load-from BASE.pth
_base_ = ['./digits_resnet18.py']

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=5e-4, nesterov=True))
param_scheduler = dict(_delete_=True, type='CosineAnnealingLR', by_epoch=True, T_max=3)
train_cfg = dict(by_epoch=True, max_epochs=3, val_interval=3)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=3, max_keep_ckpts=1,
                                     save_best=None))
