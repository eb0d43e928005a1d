"""Transfer of a pretrained backbone: Detectron2 conversion, configs and trainer, linear evaluation.

Detectron2 is optional. Only :mod:`transfer.roi_heads` and :mod:`transfer.detectron2_trainer`
import it at module level, and they are imported only once a detection command has checked its
inputs; conversion (:mod:`transfer.detectron2_weights`), the toy dataset, the input checks and
linear evaluation never need it.
"""
