"""Transfer of a pretrained backbone: Detectron2 conversion, configs and trainer, linear evaluation.

Detectron2 is optional: only :mod:`transfer.detection`, :mod:`transfer.detectron2_config` and
:mod:`transfer.roi_heads` import it, and only when a detection command runs.
"""
