"""cdg: Contrastive Dual Gating (Meng et al.), dynamically sparse self-supervised encoders.

Layers: :mod:`cdg.nn` (GatedConv2d), backbones: :mod:`cdg.models`, methods: :mod:`cdg.methods`,
data: :mod:`cdg.data`, metrics: :mod:`cdg.metrics`, evaluation: :mod:`cdg.eval`.
"""

__version__ = "0.1.0"
