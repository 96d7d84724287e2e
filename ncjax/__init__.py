"""ncjax: neural collapse and fairness in medical image classification, in JAX."""

__version__ = "0.1.0"
