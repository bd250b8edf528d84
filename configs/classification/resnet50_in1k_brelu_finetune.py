# Block-ReLU finetune of the AvgPool ResNet50 (6% DReLUs: 70.36% top-1 published, 76.55% baseline).
#   bash mmlab_tools/dist_train.sh configs/classification/resnet50_in1k_brelu_finetune.py 8 \
#       --relu-spec-file SPEC --load-from work_dirs/resnet50_in1k_avgpool_finetune/best_*.pth
# Schedule: 25 epochs, lr 5e-3, x0.25 at epochs 12/18/22 (inherited).
# Knowledge distillation from the AvgPool network:
#   --cfg-options secure_inference.distill.enabled=True \
#                 secure_inference.distill.teacher_checkpoint=AVGPOOL.pth
_base_ = ['./resnet50_in1k_avgpool_finetune.py']

secure_inference = dict(
    distill=dict(enabled=False, teacher_checkpoint=None, temperature=4.0, loss_weight=1.0))
