"""The engines that run a variant's graph: the session protocol and feed every engine shares (`base`),
ONNX Runtime (`ort`), OpenVINO (`openvino`, an optional extra), the settings both read (`settings`) and
`registry.open_session`, which opens the engine a manifest names.

The variant/engine/device table is `corom_runtime.catalog`; its names are re-exported here because
`corom_runtime.engines.VARIANTS` is where earlier releases kept it.
"""

from corom_runtime.catalog import (DEVICES, ENGINES, INT8_RECIPES, VARIANTS, Device, Engine, Gate,
                                   VariantSpec, auto_order, device_names, engine_installed, gate_of, variant_names)

__all__ = ["DEVICES", "ENGINES", "INT8_RECIPES", "VARIANTS", "Device", "Engine", "Gate", "VariantSpec", "auto_order", "device_names", "engine_installed", "gate_of", "variant_names"]
