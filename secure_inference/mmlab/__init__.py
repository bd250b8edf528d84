"""MMLab integration: compatibility fixes, finetuning runner, configs and checkpoints.

``load_finetuned`` (config + finetuned checkpoint -> model with conversions, Block-ReLUs and
weights) is exported lazily: importing mmengine here would run before the compat fixes.
"""


def __getattr__(name: str):
    if name in ("load_finetuned", "checkpoint_spec", "build_task_model", "prepare_model"):
        from . import finetune
        return getattr(finetune, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
