"""Reference models for spa-prune: seeded PyTorch architectures, ONNX export, and bundled real models.

``models.make_example`` is deliberately not imported here so that it runs cleanly
as ``python -m models.make_example``; import ``make_example`` from that module.
Sentences, tokenisation and onnxruntime sentence embeddings for checking exported
encoders are in ``models.sentences``.
"""

from __future__ import annotations

from .export import TOLERANCE, ExportVerificationError, export_architecture, export_checked, export_onnx, verify_onnx
from .real import (
    export_minilm,
    load_minilm,
    minilm_dir,
    onnx_light_model_paths,
    ppocr_input_shapes,
    ppocr_model_paths,
)
from .zoo import (
    ARCHITECTURES,
    Spec,
    conv_bn_act,
    conv_fc,
    densenet_tiny,
    gpt2_tiny,
    mobilenet_v2,
    mobilenet_v2_tiny,
    mobilenet_v3_small,
    mobilenet_v3_tiny,
    resnet,
    resnet_tiny_basic,
    resnet_tiny_bottleneck,
    resnext_tiny,
    shufflenet_v2_tiny,
    unet_tiny,
    vit_tiny,
    yolo_c2f_tiny,
)

__all__ = [
    "ARCHITECTURES",
    "TOLERANCE",
    "ExportVerificationError",
    "Spec",
    "conv_bn_act",
    "conv_fc",
    "densenet_tiny",
    "export_architecture",
    "export_checked",
    "export_minilm",
    "export_onnx",
    "gpt2_tiny",
    "load_minilm",
    "minilm_dir",
    "mobilenet_v2",
    "mobilenet_v2_tiny",
    "mobilenet_v3_small",
    "mobilenet_v3_tiny",
    "onnx_light_model_paths",
    "ppocr_input_shapes",
    "ppocr_model_paths",
    "resnet",
    "resnet_tiny_basic",
    "resnet_tiny_bottleneck",
    "resnext_tiny",
    "shufflenet_v2_tiny",
    "unet_tiny",
    "verify_onnx",
    "vit_tiny",
    "yolo_c2f_tiny",
]
