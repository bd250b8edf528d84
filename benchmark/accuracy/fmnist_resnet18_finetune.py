# The finetune recipe shared by every method of the accuracy study (research/compare_methods.py):
# one epoch over the 60,000 training images from the baseline checkpoint, SGD lr 0.01 with a
# cosine decay per iteration, no validation during training (the study evaluates every run on
# the 10,000 test images itself).
_base_ = ['./fmnist_resnet18.py']

max_epochs = 1
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True))
param_scheduler = [dict(type='CosineAnnealingLR', by_epoch=False, begin=0, T_max=469, end=469,
                        eta_min=1e-4)]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1000)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=100),
    checkpoint=dict(type='CheckpointHook', interval=1000, max_keep_ckpts=1, save_best=None))
