# Block-ReLU finetune of the ResNet18 CIFAR-100 baseline (6% DReLUs: 71.16% top-1 published).
#   python mmlab_tools/train.py configs/classification/resnet18_cifar100_brelu_finetune.py \
#       --relu-spec-file SPEC --load-from work_dirs/resnet18_cifar100/best_accuracy_top1_epoch_*.pth
# Schedule: 120 epochs, lr 5e-3, x0.25 at epochs 30/60/90, 5 warm-up epochs.
# Knowledge distillation from the baseline (teacher = the checkpoint before Block-ReLUs):
#   --cfg-options secure_inference.distill.enabled=True \
#                 secure_inference.distill.teacher_checkpoint=BASELINE.pth
_base_ = ['./resnet18_cifar100.py']

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=5e-3, momentum=0.9, weight_decay=0.0005, nesterov=False))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=5,
         convert_to_iter_based=True),
    dict(type='MultiStepLR', by_epoch=True, milestones=[30, 60, 90], gamma=0.25),
]
train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=1)

secure_inference = dict(
    distill=dict(enabled=False, teacher_checkpoint=None, temperature=4.0, loss_weight=1.0))
