"""Backbones with the RecursiveMix RoI head.

`model(images)` -> logits; `model(images, boxes)` -> (logits, roi_logits).
"""
from rmix.models.loading import load_pretrained, load_state_dict_flexible
from rmix.models.roi import RoIClassifier, count_parameters, roi_pool
from rmix.models.zoo import build, check_input_size, list_models, model_family, param_count

__all__ = ["RoIClassifier", "build", "check_input_size", "count_parameters", "list_models", "load_pretrained",
           "load_state_dict_flexible", "model_family", "param_count", "roi_pool"]
