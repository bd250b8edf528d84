"""Imported by the local process harness's fork server (see ``run_local_processes``): warms
torch up once there, so every party process forked from it starts with the lazily imported
meta-tensor machinery already loaded (:func:`.lifecycle.warm_up`)."""
from .lifecycle import warm_up

warm_up()
