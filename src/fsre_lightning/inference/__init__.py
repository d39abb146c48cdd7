"""A trained model at work: the inference graph (`model`), metric scale from the camera height
(`scale`), ONNX / TorchScript export (`export`) and prediction on images and videos
(`predict`). `fsre_lightning.checkpoints` turns a checkpoint into the module these start from."""

from fsre_lightning.inference.model import InferenceModel, build_inference_model

__all__ = ["InferenceModel", "build_inference_model"]
