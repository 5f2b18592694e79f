"""Training and evaluation.

- ``train.py``     the loop (single process or torchrun DDP), exact resumption, checkpoints, logs
- ``optim.py``     AdamW parameter groups (official ``paramwise_cfg``) and the poly + warm-up schedule
- ``evaluate.py``  dataset evaluation with mmseg's protocol; ``inference.py`` whole / slide / TTA
- ``metrics.py``   the dataset-level confusion matrix → mIoU / mAcc / aAcc
- ``demo.py``      ``edgeseg demo``: minutes-long CPU training on procedural scenes, with a report
- ``distill.py``   DynaSegFormer's two-stage distillation

Import the submodule you need (``from edgeseg.engine.train import train``); this package imports nothing eagerly.
"""
