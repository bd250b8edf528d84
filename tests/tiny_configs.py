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


def write_tiny_cls_setup(folder, images: int, *, bn_stats: bool = False):
    """``images`` random 16×16 PNGs in ``folder/train``, the config above pointing at them
    (``folder/tiny.py``) and a checkpoint of the model it builds (``folder/tiny.pth``; with
    ``bn_stats`` non-trivial BN running statistics). Returns (config, checkpoint, data)."""
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    import secure_inference  # noqa: F401  (compat fixes before MMLab builds the model)
    from secure_inference.models import load_model
    folder = Path(folder)
    data = folder / "train"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    cfg = folder / "tiny.py"
    cfg.write_text(TINY_CLS_CONFIG.replace("{data}", str(data)))
    model = load_model(str(cfg))
    if bn_stats:
        torch.manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    ckpt = folder / "tiny.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, ckpt)
    return cfg, ckpt, data
